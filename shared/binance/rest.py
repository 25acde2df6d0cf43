"""Binance REST calls made by ingest, within a weight budget and obeying 429/418.

Every call goes through :meth:`BinanceRest.get_json`: it waits until the request's weight fits ingest's share of
the IP's per-minute budget (:class:`~shared.binance.weight.RestWeightBudget`), reads ``X-MBX-USED-WEIGHT-1M`` from
every answer, and after a 429 (rate limit) or 418 (IP ban) sends nothing at all until ``Retry-After`` has passed —
Binance bans IPs that keep calling after a 429, for 2 minutes up to 3 days. A caller with a deadline (backfill)
waits within it and gets :class:`RestUnavailable` if the exchange cannot be asked in time; a caller without one
gets the 429/418 as an :class:`~shared.errors.UpstreamError` at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping

import httpx
import orjson

from shared.binance.weight import RestWeightBudget, parse_retry_after, parse_used_weight
from shared.errors import UpstreamError

logger = logging.getLogger("pricegate.ingest.rest")

USED_WEIGHT_HEADER = "X-MBX-USED-WEIGHT-1M"


class RestUnavailable(UpstreamError):
    """The exchange could not be asked before the caller's deadline (rate limited, banned or over budget)."""


class RestRefused(UpstreamError):
    """The exchange answered with an error status (other than 429/418); ``status`` and Binance's ``code``."""

    def __init__(self, message: str, status: int, code: int | None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class BinanceRest:
    """Counters for metrics: ``requests`` (by ``"<status>"``, or ``"error"`` for no answer), ``rate_limited``
    (by 429/418), ``weight_waits_s`` (seconds spent waiting for budget or Retry-After)."""

    def __init__(
        self,
        base_url: str,
        *,
        weight_limit_per_min: int = 3000,
        timeout_s: float = 30.0,
        connect_timeout_s: float = 10.0,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.budget = RestWeightBudget(weight_limit_per_min, clock=wall_clock)
        self.timeout = httpx.Timeout(timeout_s, connect=connect_timeout_s)
        self.requests: Counter[str] = Counter()
        self.rate_limited: Counter[int] = Counter()
        self.weight_waits_s = 0.0

    async def get_json(
        self, path: str, params: Mapping[str, str | int], weight: int, *, deadline: float | None = None
    ) -> tuple[object, bytes]:
        """``GET`` and decode; returns (document, body bytes). ``deadline`` is on the loop's clock."""
        loop = asyncio.get_running_loop()
        url = f"{self.base_url}{path}"
        while True:
            delay = self.budget.delay(weight)
            if delay > 0:
                if deadline is None and self.budget.blocked_s() > 0:
                    raise UpstreamError(f"GET {url}: the exchange asked us to wait {delay:.0f} s (HTTP 429/418)")
                if deadline is not None and loop.time() + delay > deadline:
                    raise RestUnavailable(f"GET {url}: no REST budget before the deadline (next in {delay:.1f} s)")
                self.weight_waits_s += delay
                await asyncio.sleep(delay)
                continue
            self.budget.spend(weight)
            timeout = self.timeout
            if deadline is not None:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise RestUnavailable(f"GET {url}: deadline passed")
                timeout = httpx.Timeout(min(remaining, self.timeout.read or remaining), connect=self.timeout.connect)
            try:
                async with httpx.AsyncClient(timeout=timeout) as client:
                    response = await client.get(url, params=dict(params))
            except httpx.HTTPError as error:
                self.requests["error"] += 1
                raise UpstreamError(f"GET {url} failed: {error!r}") from error
            self.requests[str(response.status_code)] += 1
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
            self.budget.observe(
                response.status_code, parse_used_weight(response.headers.get(USED_WEIGHT_HEADER)), retry_after
            )
            if response.status_code in (418, 429):
                self.rate_limited[response.status_code] += 1
                logger.warning(
                    "Binance REST answered %d to GET %s: no REST call for %s s",
                    response.status_code,
                    path,
                    "60" if retry_after is None else f"{retry_after:g}",
                )
                if deadline is None:
                    raise UpstreamError(f"GET {url} answered HTTP {response.status_code} (Retry-After: {retry_after})")
                continue  # the budget now holds every call back until Retry-After; the deadline bounds the wait
            body = response.content
            if response.status_code != 200:
                code = None
                try:
                    error_document = orjson.loads(body)
                    if isinstance(error_document, dict) and isinstance(error_document.get("code"), int):
                        code = error_document["code"]
                except ValueError:
                    pass
                raise RestRefused(
                    f"GET {url} answered HTTP {response.status_code}: {response.text[:200]}", response.status_code, code
                )
            try:
                return orjson.loads(body), body
            except ValueError as error:
                raise UpstreamError(f"GET {url} returned invalid JSON: {error}") from error
