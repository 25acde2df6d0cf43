"""Binance's REST API, the one client ingest and the gateway's exchange fallback both use.

Every call goes through :meth:`BinanceRest.get`: it waits until the request's weight fits the client's share of
the IP's per-minute budget (:class:`~shared.binance.weight.RestWeightBudget`), reads ``X-MBX-USED-WEIGHT-1M`` from
every answer, and after a 429 (rate limit) or 418 (IP ban) sends nothing at all until ``Retry-After`` has passed —
Binance bans IPs that keep calling after a 429, for 2 minutes up to 3 days. How long a call may wait is the
caller's choice: with a ``deadline`` (backfill) it waits within it, through a 429 too; without one it waits at
most the client's ``max_wait_s`` for budget (ingest: as long as it takes; the gateway: not at all, its cache
serves a stale answer instead) and never for a 429/418 block. What cannot be asked in time is
:class:`RestUnavailable`; a 4xx with Binance's ``{"code","msg"}`` body is :class:`RestRefused` (the request itself
was refused: the gateway relays it as the exchange worded it); any other failure (connection, timeout, 5xx, a
body that is not Binance's shape) is an :class:`~shared.errors.UpstreamError`. Typed helpers cover the endpoints
pricegate calls; :meth:`BinanceRest.get_json` serves the rest (backfill's trade pages).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import httpx
import orjson

from shared.binance.weight import (
    RATE_LIMIT_STATUSES,
    WEIGHT_EXCHANGE_INFO,
    WEIGHT_KLINES,
    WEIGHT_TICKER_MANY,
    RestWeightBudget,
    depth_weight,
    parse_retry_after,
    parse_used_weight,
)
from shared.candles.model import Candle, MalformedKline, candle_from_row
from shared.errors import UpstreamError

logger = logging.getLogger("pricegate.binance.rest")

USED_WEIGHT_HEADER = "X-MBX-USED-WEIGHT-1M"
HEADERS = {"User-Agent": "pricegate"}

ResultHook = Callable[[str, str], None]
"""Told (endpoint, result) of every call: ``ok``, ``error`` (a failure or an error status) or ``backoff`` (not
sent: the budget or a 429/418 block held it back)."""


class RestUnavailable(UpstreamError):
    """The exchange could not be asked in time: rate limited (429), banned (418) or over the weight budget."""


class RestRefused(UpstreamError):
    """The exchange refused the request itself: HTTP 4xx (not 429/418) with Binance's ``{"code","msg"}`` body."""

    def __init__(self, url: str, status: int, code: int, msg: str) -> None:
        super().__init__(f"GET {url} refused: HTTP {status} {code} {msg}")
        self.status = status
        self.code = code
        self.msg = msg


class BinanceRest:
    """Counters for metrics: ``requests`` (by ``"<status>"``, or ``"error"`` for no answer), ``rate_limited``
    (by 429/418), ``weight_waits_s`` (seconds spent waiting for budget or Retry-After), and ``on_result``."""

    def __init__(
        self,
        base_url: str,
        *,
        weight_limit_per_min: int = 3000,
        timeout_s: float = 30.0,
        connect_timeout_s: float = 10.0,
        max_wait_s: float | None = None,
        max_connections: int | None = None,
        on_result: ResultHook | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        """``max_wait_s``: the longest a call without a deadline waits for budget (None: until it fits).
        ``max_connections``: keep a pool of that many connections (close it with :meth:`aclose`); None opens
        one per call, for a client that calls rarely and is never closed (ingest's)."""
        self.base_url = base_url.rstrip("/")
        self.budget = RestWeightBudget(weight_limit_per_min, clock=wall_clock)
        self.timeout = httpx.Timeout(timeout_s, connect=connect_timeout_s)
        self.max_wait_s = max_wait_s
        self.on_result = on_result
        self.requests: Counter[str] = Counter()
        self.rate_limited: Counter[int] = Counter()
        self.weight_waits_s = 0.0
        self._pool: httpx.AsyncClient | None = None
        if max_connections is not None:
            self._pool = httpx.AsyncClient(
                timeout=self.timeout,
                limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
                headers=HEADERS,
            )

    async def aclose(self) -> None:
        if self._pool is not None:
            await self._pool.aclose()

    # ---- the endpoints pricegate calls ----

    async def exchange_info(self, symbols: Collection[str] | None = None) -> bytes:
        """``GET /api/v3/exchangeInfo`` for ``symbols`` only, or (the default) for every symbol."""
        params: dict[str, str | int] = {}
        if symbols:
            params["symbols"] = orjson.dumps(sorted({symbol.upper() for symbol in symbols})).decode()
        path = "/api/v3/exchangeInfo"
        document, body = await self.get_json(path, params, WEIGHT_EXCHANGE_INFO)
        if not isinstance(document, dict) or not isinstance(document.get("symbols"), list):
            raise UpstreamError(f"GET {self.base_url}{path} returned a document without a symbols list")
        return body

    async def klines(
        self, symbol: str, interval: str, *, start_ms: int | None, end_ms: int | None, limit: int
    ) -> list[Candle]:
        params: dict[str, str | int] = {"symbol": symbol, "interval": interval, "limit": limit}
        if start_ms is not None:
            params["startTime"] = start_ms
        if end_ms is not None:
            params["endTime"] = end_ms
        rows, _ = await self.get_json("/api/v3/klines", params, WEIGHT_KLINES)
        try:
            if not isinstance(rows, list):
                raise MalformedKline("klines response is not an array")
            return [candle_from_row(symbol, interval, row) for row in rows]
        except MalformedKline as error:
            raise UpstreamError(f"exchange klines response is not Binance's shape: {error}") from error

    async def depth(self, symbol: str, limit: int) -> bytes:
        """The body of ``GET /api/v3/depth`` (the order book, verbatim)."""
        return await self.get("/api/v3/depth", {"symbol": symbol, "limit": limit}, depth_weight(limit))

    async def ticker_prices(self, symbols: Sequence[str] | None = None) -> bytes:
        """The body of ``GET /api/v3/ticker/price`` for ``symbols`` (in that order), or for every symbol."""
        params: dict[str, str | int] = {} if symbols is None else {"symbols": orjson.dumps(list(symbols)).decode()}
        return await self.get("/api/v3/ticker/price", params, WEIGHT_TICKER_MANY)

    # ---- any endpoint ----

    async def get_json(
        self, path: str, params: Mapping[str, str | int], weight: int, *, deadline: float | None = None
    ) -> tuple[object, bytes]:
        """:meth:`get` and decode; returns (document, body bytes)."""
        body = await self.get(path, params, weight, deadline=deadline)
        try:
            return orjson.loads(body), body
        except orjson.JSONDecodeError as error:
            raise UpstreamError(f"GET {self.base_url}{path} returned invalid JSON: {error}") from error

    async def get(
        self, path: str, params: Mapping[str, str | int], weight: int, *, deadline: float | None = None
    ) -> bytes:
        """The body of a successful ``GET <path>`` of ``weight``. ``deadline`` is on the loop's clock."""
        loop = asyncio.get_running_loop()
        url = f"{self.base_url}{path}"
        endpoint = path.removeprefix("/api/v3/")
        while True:
            delay = self.budget.delay(weight)
            if delay > 0:
                if deadline is None and self.budget.blocked_s() > 0:
                    self._result(endpoint, "backoff")
                    raise RestUnavailable(f"GET {url}: the exchange asked us to wait {delay:.0f} s (HTTP 429/418)")
                latest = deadline
                if latest is None and self.max_wait_s is not None:
                    latest = loop.time() + self.max_wait_s
                if latest is not None and loop.time() + delay > latest:
                    self._result(endpoint, "backoff")
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
                response = await self._send(url, params, timeout)
            except httpx.HTTPError as error:
                self.requests["error"] += 1
                self._result(endpoint, "error")
                raise UpstreamError(f"GET {url} failed: {error!r}") from error
            status = response.status_code
            self.requests[str(status)] += 1
            self._result(endpoint, "ok" if status == 200 else "error")
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
            self.budget.observe(status, parse_used_weight(response.headers.get(USED_WEIGHT_HEADER)), retry_after)
            if status == 200:
                return response.content
            if status in RATE_LIMIT_STATUSES:
                self.rate_limited[status] += 1
                logger.warning(
                    "Binance REST answered %d to GET %s: no REST call for %.0f s", status, path, self.budget.blocked_s()
                )
                if deadline is None:
                    raise RestUnavailable(f"GET {url} answered HTTP {status} (Retry-After: {retry_after})")
                continue  # the budget now holds every call back until Retry-After; the deadline bounds the wait
            refusal = _binance_error(response.content) if 400 <= status < 500 else None
            if refusal is not None:
                raise RestRefused(url, status, *refusal)
            raise UpstreamError(f"GET {url} answered HTTP {status}: {response.text[:200]!r}")

    async def _send(self, url: str, params: Mapping[str, str | int], timeouts: httpx.Timeout) -> httpx.Response:
        if self._pool is not None:
            return await self._pool.get(url, params=dict(params), timeout=timeouts)
        async with httpx.AsyncClient(headers=HEADERS) as client:
            return await client.get(url, params=dict(params), timeout=timeouts)

    def _result(self, endpoint: str, result: str) -> None:
        if self.on_result is not None:
            self.on_result(endpoint, result)


def _binance_error(body: bytes) -> tuple[int, str] | None:
    """Binance's ``{"code": int, "msg": str}`` error body, if that is what ``body`` is."""
    try:
        document: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if isinstance(document, dict) and isinstance(document.get("code"), int) and isinstance(document.get("msg"), str):
        return int(document["code"]), str(document["msg"])[:200]
    return None
