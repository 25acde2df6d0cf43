"""The exchange's REST API as the gateway's fallback backend (async httpx: pooled connections, timeouts).

Used only with the Binance source, for what neither the candle store nor the streams hold: klines outside the
stored range, and depth or prices for symbols whose streams are not flowing. Every failure (connection, timeout,
non-200, a body that is not what Binance sends) is an ``UpstreamError``; the caller then serves a stale cached
value if it has one. When the exchange answers 429 or 418 the client stops calling it for the ``Retry-After``
period (as Binance requires, or the IP gets banned) and fails fast meanwhile. A 4xx with a Binance error body
for a request we validated (an unknown symbol, say) is raised as :class:`ExchangeRefused` so it reaches the
client as the exchange worded it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import httpx
import orjson
from prometheus_client import Counter

from shared.candles.model import Candle, MalformedKline, candle_from_row
from shared.errors import UpstreamError

BACKOFF_STATUSES = (418, 429)
DEFAULT_BACKOFF_S = 60.0


class ExchangeRefused(UpstreamError):
    """The exchange refused the request itself (HTTP 4xx with ``{"code","msg"}``)."""

    def __init__(self, status: int, code: int, msg: str) -> None:
        super().__init__(f"exchange refused the request: HTTP {status} {code} {msg}")
        self.status = status
        self.code = code
        self.msg = msg


class ExchangeRest:
    def __init__(
        self,
        base_url: str,
        *,
        timeout_s: float,
        max_connections: int,
        requests: Counter | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """``requests`` counts calls by (endpoint, result)."""
        self.base_url = base_url.rstrip("/")
        self.requests = requests
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=httpx.Timeout(timeout_s),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            headers={"User-Agent": "pricegate"},
            transport=transport,
        )
        self._blocked_until = 0.0

    async def aclose(self) -> None:
        await self._client.aclose()

    async def get(self, endpoint: str, params: Mapping[str, str | int]) -> bytes:
        """The body of a successful ``GET /api/v3/<endpoint>``."""
        if time.monotonic() < self._blocked_until:
            self._count(endpoint, "backoff")
            raise UpstreamError(
                f"exchange rate limit: not calling it for {self._blocked_until - time.monotonic():.0f}s"
            )
        try:
            response = await self._client.get(f"/api/v3/{endpoint}", params=dict(params))
        except httpx.HTTPError as error:
            self._count(endpoint, "error")
            raise UpstreamError(f"exchange GET {endpoint}: {error!r}") from error
        if response.status_code == 200:
            self._count(endpoint, "ok")
            return response.content
        self._count(endpoint, "error")
        if response.status_code in BACKOFF_STATUSES:
            self._blocked_until = time.monotonic() + _retry_after(response.headers.get("Retry-After"))
        refusal = _binance_error(response) if 400 <= response.status_code < 500 else None
        if refusal is not None and response.status_code not in BACKOFF_STATUSES:
            raise ExchangeRefused(response.status_code, *refusal)
        raise UpstreamError(f"exchange GET {endpoint}: HTTP {response.status_code} {response.text[:200]!r}")

    async def klines(
        self, symbol: str, interval: str, *, start_ms: int | None, end_ms: int | None, limit: int
    ) -> list[Candle]:
        params: dict[str, str | int] = {"symbol": symbol, "interval": interval, "limit": limit}
        if start_ms is not None:
            params["startTime"] = start_ms
        if end_ms is not None:
            params["endTime"] = end_ms
        body = await self.get("klines", params)
        try:
            rows = orjson.loads(body)
            if not isinstance(rows, list):
                raise MalformedKline("klines response is not an array")
            return [candle_from_row(symbol, interval, row) for row in rows]
        except (orjson.JSONDecodeError, MalformedKline) as error:
            raise UpstreamError(f"exchange klines response is not Binance's shape: {error}") from error

    def _count(self, endpoint: str, result: str) -> None:
        if self.requests is not None:
            self.requests.labels(endpoint=endpoint, result=result).inc()


def _retry_after(value: str | None) -> float:
    try:
        return max(1.0, float(value)) if value is not None else DEFAULT_BACKOFF_S
    except ValueError:
        return DEFAULT_BACKOFF_S


def _binance_error(response: httpx.Response) -> tuple[int, str] | None:
    try:
        document: Any = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return None
    if isinstance(document, dict) and isinstance(document.get("code"), int) and isinstance(document.get("msg"), str):
        return int(document["code"]), str(document["msg"])[:200]
    return None
