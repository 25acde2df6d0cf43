"""Binance's REST request weights, a client's share of them, and its answer to 429/418 (pure, clock injected).

Binance limits REST by *weight* per IP and minute (6000 in its docs' example; every response says how much the
IP has used this minute in ``X-MBX-USED-WEIGHT-1M``). Going over earns 429 with ``Retry-After``; continuing
after a 429 earns 418, an IP ban from 2 minutes to 3 days. The endpoints' weights (Binance's published table)
are declared here once, for the gateway's own limits and for the exchange client alike. :class:`RestWeightBudget`
keeps one client (ingest's, or a gateway's exchange fallback) under its own ``limit`` (a share of the IP's
budget): it counts what it spends in the current wall-clock minute, takes the exchange's figure when one
arrives (it includes everyone else on the IP), and after a 429 or 418 refuses everything until ``Retry-After``
has passed. Callers ask :meth:`delay` before a request and report the response with :meth:`observe`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

MINUTE_S = 60.0
IP_WEIGHT_LIMIT_PER_MIN = 6000  # Binance's weight per IP and minute: a budget this large holds back only 429s
DEFAULT_RETRY_AFTER_S = 60.0  # a 429/418 without a usable Retry-After: assume a minute, never retry at once
MIN_RETRY_AFTER_S = 1.0  # "Retry-After: 0" on a 429 still means not at once: an immediate retry risks a 418 ban
MAX_RETRY_AFTER_S = 3 * 86_400.0  # Binance's longest IP ban; a larger figure is taken as this
RATE_LIMIT_STATUSES = (418, 429)

# Request weights of Binance's market-data endpoints (GET /api/v3/...), from its REST docs.
WEIGHT_EXCHANGE_INFO = 20
WEIGHT_KLINES = 2
WEIGHT_TICKER_ONE, WEIGHT_TICKER_MANY = 2, 4  # ticker/price for one symbol; for a list or every symbol


def depth_weight(limit: int) -> int:
    """Binance's weight for ``GET /api/v3/depth?limit=``."""
    if limit <= 100:
        return 5
    if limit <= 500:
        return 25
    if limit <= 1000:
        return 50
    return 250


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (Binance sends seconds), or None if absent or unusable (not a
    number, negative, infinite or NaN). A finite figure beyond Binance's longest ban is capped to it."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return min(seconds, MAX_RETRY_AFTER_S)


def parse_used_weight(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        used = int(value.strip())
    except ValueError:
        return None
    return used if used >= 0 else None


class RestWeightBudget:
    def __init__(self, limit_per_minute: int, *, clock: Callable[[], float] = time.time) -> None:
        if limit_per_minute < 1:
            raise ValueError(f"limit_per_minute must be at least 1, not {limit_per_minute!r}")
        self.limit = limit_per_minute
        self._clock = clock
        self._minute = -1
        self._used = 0
        self.blocked_until = 0.0  # wall clock before which no request may go (429/418 Retry-After)
        self.last_status_block: int | None = None  # 429 or 418: why we are (or were last) blocked

    def _roll(self, now: float) -> None:
        minute = int(now // MINUTE_S)
        if minute != self._minute:
            self._minute = minute
            self._used = 0

    @property
    def used(self) -> int:
        """Weight used in the current minute, as far as we know (ours, or the exchange's figure for the IP)."""
        self._roll(self._clock())
        return self._used

    def blocked_s(self) -> float:
        """Seconds left of a 429/418 block (0: not blocked)."""
        return max(0.0, self.blocked_until - self._clock())

    def delay(self, weight: int) -> float:
        """Seconds to wait before a request of ``weight`` may be sent (0: now)."""
        now = self._clock()
        if now < self.blocked_until:
            return self.blocked_until - now
        self._roll(now)
        if self._used + weight <= self.limit:
            return 0.0
        if weight > self.limit:
            raise ValueError(f"a request of weight {weight} can never fit a budget of {self.limit} per minute")
        return (self._minute + 1) * MINUTE_S - now  # the budget refills when the exchange's minute turns

    def spend(self, weight: int) -> None:
        """Count a request about to be sent (before its answer, so concurrent callers see it)."""
        self._roll(self._clock())
        self._used += weight

    def observe(self, status: int, used_weight: int | None, retry_after_s: float | None) -> None:
        """Account for a response: the IP's used weight if the exchange said, and a block after 429/418."""
        now = self._clock()
        self._roll(now)
        if used_weight is not None:
            # The exchange's figure covers everyone on the IP; ours covers requests still in flight. Keep the larger.
            self._used = max(self._used, used_weight)
        if status in RATE_LIMIT_STATUSES:
            wait = DEFAULT_RETRY_AFTER_S if retry_after_s is None else max(MIN_RETRY_AFTER_S, retry_after_s)
            self.blocked_until = max(self.blocked_until, now + wait)
            self.last_status_block = status
