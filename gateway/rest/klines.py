"""Klines from three places, merged by open time without duplicates: store, live stream, exchange.

A request's exact candle open times are known in advance (``shared.intervals.open_times``). The candle store
(PostgreSQL, or memory in the demo) is asked for that range first; the still-open newest candle, and a candle
that closed a moment ago and is not written yet, come from the kline stream's last value in the broker. Only
the open times still missing after that are fetched from the exchange, in one call spanning them, and the
exchange never overrides a stored candle. Without an exchange (synthetic or replayed market) the response holds
what the store and the streams have.

Those open times are also what a response depends on, so they are what it is cached under
(:attr:`KlineWindow.cache_key`): every ``startTime``/``endTime`` inside the same candle windows names the same
entry, and arbitrary timestamps cannot each make a new one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import Counter

from shared.binance.rest import BinanceRest
from shared.broker.contract import Broker
from shared.candles.model import Candle, CandleStore, MalformedKline, candle_from_event, kline_stream
from shared.clock import wall_clock_ms
from shared.errors import BrokerError
from shared.intervals import candle_window, open_times

logger = logging.getLogger("pricegate.gateway.klines")


@dataclass(frozen=True, slots=True)
class KlineWindow:
    """The candles a klines request covers: consecutive open times, oldest first (empty: nothing can exist)."""

    symbol: str
    interval: str
    opens: tuple[int, ...]

    @property
    def cache_key(self) -> str:
        # The opens are consecutive windows, so the first and their count name them all.
        first = self.opens[0] if self.opens else "-"
        return f"klines:{self.symbol}:{self.interval}:{first}:{len(self.opens)}"


class KlineSource:
    def __init__(
        self,
        store: CandleStore | None,
        exchange: BinanceRest | None,
        broker: Broker,
        *,
        served: Counter | None = None,
        clock_ms: Callable[[], int] = wall_clock_ms,
    ) -> None:
        """``served`` counts candles served by source (``store``, ``stream``, ``exchange``)."""
        self.store = store
        self.exchange = exchange
        self.broker = broker
        self.served = served
        self._clock_ms = clock_ms

    def window(
        self, symbol: str, interval: str, *, start_ms: int | None, end_ms: int | None, limit: int
    ) -> KlineWindow:
        """The open times Binance's ``startTime``/``endTime``/``limit`` resolve to now."""
        opens = open_times(interval, now_ms=self._clock_ms(), start_ms=start_ms, end_ms=end_ms, limit=limit)
        return KlineWindow(symbol, interval, tuple(opens))

    async def klines(
        self, symbol: str, interval: str, *, start_ms: int | None, end_ms: int | None, limit: int
    ) -> list[Candle]:
        return await self.candles(self.window(symbol, interval, start_ms=start_ms, end_ms=end_ms, limit=limit))

    async def candles(self, window: KlineWindow) -> list[Candle]:
        """The candles of ``window`` that exist, oldest first."""
        symbol, interval, wanted = window.symbol, window.interval, window.opens
        if not wanted:
            return []
        now_ms = self._clock_ms()
        wanted_set = set(wanted)
        found: dict[int, Candle] = {}
        if self.store is not None:
            for candle in await self.store.range(symbol, interval, wanted[0], wanted[-1]):
                if candle.open_time in wanted_set:
                    found[candle.open_time] = candle
        self._count("store", len(found))
        live = await self._from_stream(symbol, interval, now_ms)
        if live is not None and live.open_time in wanted_set and live.open_time not in found:
            found[live.open_time] = live
            self._count("stream", 1)
        missing = [open_time for open_time in wanted if open_time not in found]
        if missing and self.exchange is not None:
            span = wanted.index(missing[-1]) - wanted.index(missing[0]) + 1
            fetched = await self.exchange.klines(symbol, interval, start_ms=missing[0], end_ms=missing[-1], limit=span)
            added = 0
            for candle in fetched:
                if candle.open_time in wanted_set and candle.open_time not in found:
                    found[candle.open_time] = candle
                    added += 1
            self._count("exchange", added)
        return [found[open_time] for open_time in wanted if open_time in found]

    async def _from_stream(self, symbol: str, interval: str, now_ms: int) -> Candle | None:
        """The kline stream's last value: the open candle of the current window, or a candle that closed."""
        try:
            publication = await self.broker.last_value(kline_stream(symbol, interval))
        except BrokerError as error:
            logger.warning("reading the last %s %s kline failed: %r", symbol, interval, error)
            return None
        if publication is None:
            return None
        try:
            candle, closed = candle_from_event(publication.payload)
        except MalformedKline:
            return None
        # An open candle of an earlier window is a stream that stopped mid-candle: its figures are incomplete.
        if not closed and candle.open_time != candle_window(interval, now_ms)[0]:
            return None
        if candle.symbol != symbol or candle.interval != interval:
            return None
        return candle

    def _count(self, source: str, candles: int) -> None:
        if self.served is not None and candles:
            self.served.labels(source=source).inc(candles)
