"""Token bucket with an injected clock (pure): inbound control-message limits and upstream pacing."""

from __future__ import annotations

import math


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up. Time is passed in, never read here.

    :meth:`allow` is the gateway's per-message check, so it stays a refill and a comparison. :meth:`charge` takes
    tokens for something that happened regardless (the bucket may go below zero, delaying what follows), and
    :meth:`available_at` says when ``cost`` tokens will be there."""

    __slots__ = ("burst", "rate", "tokens", "updated")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if not math.isfinite(rate) or rate <= 0:
            raise ValueError(f"rate must be a positive number, not {rate!r}")
        if not math.isfinite(burst) or burst < 1:
            raise ValueError(f"burst must be at least 1, not {burst!r}")
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.updated = now

    def _refill(self, now: float) -> None:
        if now > self.updated:
            self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
            self.updated = now

    def allow(self, now: float, cost: float = 1.0) -> bool:
        """Take ``cost`` tokens if available."""
        self._refill(now)
        if self.tokens >= cost:
            self.tokens -= cost
            return True
        return False

    def charge(self, now: float, cost: float = 1.0) -> None:
        """Take ``cost`` tokens whether or not they are there (the bucket may be overdrawn)."""
        self._refill(now)
        self.tokens -= cost

    def available_at(self, now: float, cost: float = 1.0) -> float:
        """The earliest time from which :meth:`allow` succeeds for ``cost`` (``now`` if it does now)."""
        if cost > self.burst:
            raise ValueError(f"a cost of {cost} never fits a burst of {self.burst}")
        self._refill(now)
        if self.tokens >= cost:
            return now
        at = self.updated + (cost - self.tokens) / self.rate
        # Float round-off can leave the refill at `at` an ulp short of `cost`: step to the first instant where the
        # refill allow() computes is enough, so a caller that waits until then is never refused.
        while self.tokens + (at - self.updated) * self.rate < cost:
            at = math.nextafter(at, math.inf)
        return at

    def delay_until_available(self, now: float, cost: float = 1.0) -> float:
        """Seconds to wait before ``cost`` tokens are available (0 if they are now)."""
        return max(0.0, self.available_at(now, cost) - now)
