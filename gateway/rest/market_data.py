"""Prices and order books for REST, read from the streams' last values in the broker.

``GET /api/v3/ticker/price`` takes the newest fresh value among a symbol's ticker, miniTicker and stored-interval
kline streams (they all carry the last price as ``c``); ``GET /api/v3/depth`` takes the deepest fresh partial
book (``@depth20`` first), cut to the requested limit (verbatim bytes when no cut is needed). "Fresh" means
published within :data:`FRESH_S`: last values never expire in the broker, and a stream that stopped flowing
must not answer with an old price. When nothing is fresh the caller can ask ingest for the stream (announce
demand, as a WebSocket client would) and wait briefly, or fall back to the exchange.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson

from shared.broker.contract import Broker
from shared.candles.model import kline_stream
from shared.errors import BrokerError
from shared.frames import Publication

logger = logging.getLogger("pricegate.gateway.marketdata")

FRESH_S = 10.0
WAIT_POLL_S = 0.05
DEPTH_LEVELS_PREFERRED = (20, 10, 5)
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Book:
    payload: bytes  # partial-depth layout, cut to the requested limit
    levels: int  # levels per side the stream carries (before the cut)


def depth_streams(symbol: str) -> list[tuple[str, int]]:
    lower = symbol.lower()
    return [(f"{lower}@depth{levels}{speed}", levels) for levels in DEPTH_LEVELS_PREFERRED for speed in ("@100ms", "")]


def price_streams(symbol: str, kline_intervals: Sequence[str]) -> list[str]:
    lower = symbol.lower()
    return [f"{lower}@ticker", f"{lower}@miniTicker", *(kline_stream(symbol, i) for i in kline_intervals)]


def price_of(payload: bytes) -> str | None:
    """The last price in a ticker, miniTicker or kline payload."""
    try:
        event: Any = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(event, dict):
        return None
    holder = event.get("k") if event.get("e") == "kline" else event
    price = holder.get("c") if isinstance(holder, dict) else None
    return price if isinstance(price, str) else None


def cut_book(payload: bytes, levels: int, limit: int) -> bytes | None:
    """A partial-depth payload limited to ``limit`` levels per side (the same bytes when it has no more)."""
    if levels <= limit:
        return payload
    try:
        book: Any = orjson.loads(payload)
        return orjson.dumps(
            {"lastUpdateId": book["lastUpdateId"], "bids": book["bids"][:limit], "asks": book["asks"][:limit]}
        )
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None


class LiveMarket:
    def __init__(
        self,
        broker: Broker,
        *,
        kline_intervals: Sequence[str],
        demand_ttl_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.broker = broker
        self.kline_intervals = tuple(kline_intervals)
        self.demand_ttl_s = demand_ttl_s
        self._clock = clock

    async def _fresh(self, stream: str) -> Publication | None:
        try:
            publication = await self.broker.last_value(stream)
        except BrokerError as error:
            logger.warning("reading the last value of %s failed: %r", stream, error)
            return None
        if publication is None or self._clock() * 1000 - publication.published_at_ms > FRESH_S * 1000:
            return None
        return publication

    async def price(self, symbol: str) -> str | None:
        streams = price_streams(symbol, self.kline_intervals)
        values = await asyncio.gather(*(self._fresh(stream) for stream in streams))
        for publication in sorted((v for v in values if v is not None), key=lambda p: -p.published_at_ms):
            price = price_of(publication.payload)
            if price is not None:
                return price
        return None

    async def book(self, symbol: str, limit: int) -> Book | None:
        streams = depth_streams(symbol)
        values = await asyncio.gather(*(self._fresh(stream) for stream, _ in streams))
        candidates = [(levels, p) for (_, levels), p in zip(streams, values, strict=True) if p is not None]
        if not candidates:
            return None
        # The deepest book wins (it serves any limit up to its depth); among equals the newest.
        levels, publication = max(candidates, key=lambda item: (item[0], item[1].published_at_ms))
        payload = cut_book(publication.payload, levels, limit)
        return None if payload is None else Book(payload, levels)

    async def request(self, streams: Sequence[str]) -> None:
        """Ask ingest to start ``streams`` (demand expires after ``demand_ttl_s`` unless renewed)."""
        try:
            await self.broker.announce_demand(streams, self._clock() + self.demand_ttl_s)
        except BrokerError as error:
            logger.warning("announcing demand for %s failed: %r", list(streams), error)

    async def wait_for(self, read: Callable[[], Awaitable[T | None]], timeout_s: float) -> T | None:
        """Poll ``read`` until it returns a value or ``timeout_s`` passed."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = await read()
            if value is not None or time.monotonic() >= deadline:
                return value
            await asyncio.sleep(WAIT_POLL_S)
