"""A deterministic synthetic spot market that speaks Binance's stream payloads byte for byte: ``SyntheticMarket``
runs several symbols' simulated markets (``symbol_market``) on one clock. ``advance(now_ms, wanted)`` runs the
simulation up to a time, interleaving every symbol's book changes and taker orders in time order with the
periodic emissions (tickers, klines, depth) on 100 ms boundaries, and returns the payloads of the wanted streams
stamped with simulated event times. Pure: no I/O, no clock, no event loop; all prices and quantities are
integers (ticks, lot steps, 1e-8 "atoms") so every decimal string is exact. Each symbol draws from its own
``random.Random`` seeded by (seed, symbol), so a given seed gives the same market regardless of how ``advance``
calls are chunked, which streams are wanted, or which other symbols are simulated alongside.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Collection, Sequence
from typing import Any

import orjson

from ingest.sources.synthetic.symbol_market import Output, SymbolMarket
from ingest.sources.synthetic.symbols import symbol_spec
from shared.binance.exchange_info import SymbolInfo
from shared.intervals import SECOND_MS
from shared.streams import DEPTH_LEVELS, MINI_TICKER_ARR

BOUNDARY_MS = 100  # the fastest periodic cadence (@100ms depth); every other cadence is a multiple of it

_ORDER_EVENT = 0
_BOOK_EVENT = 1


class SyntheticMarket:
    """Several symbols' simulated markets on one clock (see the module docstring)."""

    def __init__(
        self,
        symbols: Sequence[str],
        *,
        seed: int,
        trade_rate_per_s: float = 5.0,
        start_ms: int,
    ) -> None:
        if not symbols:
            raise ValueError("SyntheticMarket needs at least one symbol")
        if not trade_rate_per_s >= 0 or math.isinf(trade_rate_per_s):
            raise ValueError(f"trade_rate_per_s must be a finite number >= 0, got {trade_rate_per_s!r}")
        unique = list(dict.fromkeys(symbol.upper() for symbol in symbols))
        self._markets = [
            SymbolMarket(symbol_spec(symbol), seed=seed, trade_rate_per_s=trade_rate_per_s, start_ms=start_ms)
            for symbol in unique
        ]
        self._by_symbol = {market.symbol: market for market in self._markets}
        self._now_ms = start_ms
        self._next_boundary = (start_ms // BOUNDARY_MS + 1) * BOUNDARY_MS
        # (time, kind, symbol index): one pending book event and at most one pending taker order per symbol.
        self._events: list[tuple[int, int, int]] = []
        for index, market in enumerate(self._markets):
            self._events.append((int(market.next_book_at), _BOOK_EVENT, index))
            if not math.isinf(market.next_order_at):
                self._events.append((int(market.next_order_at), _ORDER_EVENT, index))
        heapq.heapify(self._events)

    @property
    def symbols(self) -> list[str]:
        """Simulated symbols, uppercase, in the order given."""
        return [market.symbol for market in self._markets]

    @property
    def now_ms(self) -> int:
        """Simulated time reached so far."""
        return self._now_ms

    def symbols_info(self) -> list[SymbolInfo]:
        """What exchangeInfo says about the simulated symbols."""
        return [market.spec.info() for market in self._markets]

    def depth_snapshot(self, symbol: str, limit: int = 100) -> bytes:
        """The current book like ``GET /api/v3/depth`` (up to ``limit`` levels per side) for a local book
        built from diff depth; raises KeyError for a symbol that is not simulated."""
        return orjson.dumps(self._by_symbol[symbol.upper()].book_levels(limit))

    def advance(self, now_ms: int, wanted: Collection[str]) -> list[tuple[str, bytes]]:
        """Run the market up to ``now_ms`` inclusive and return ``(canonical stream, payload)`` for the wanted
        streams, in event-time order. Periodic emissions at a time come before that same millisecond's trades
        and book changes, so a snapshot taken at ``t`` reflects everything strictly before ``t``. A ``now_ms``
        not after the time already reached returns nothing."""
        out: Output = []
        if now_ms <= self._now_ms:
            return out
        events = self._events
        while True:
            boundary = self._next_boundary
            if events and events[0][0] < boundary:
                if events[0][0] > now_ms:
                    break
                time_ms, kind, index = heapq.heappop(events)
                market = self._markets[index]
                if kind == _BOOK_EVENT:
                    market.book_event(time_ms, out, wanted)
                    heapq.heappush(events, (market.schedule_book(), _BOOK_EVENT, index))
                else:
                    market.taker_order(time_ms, out, wanted)
                    next_order = market.schedule_order()
                    if next_order is not None:
                        heapq.heappush(events, (next_order, _ORDER_EVENT, index))
            else:
                if boundary > now_ms:
                    break
                self._emit_periodic(boundary, out, wanted)
                self._next_boundary = boundary + BOUNDARY_MS
        self._now_ms = now_ms
        return out

    def _emit_periodic(self, now_ms: int, out: Output, wanted: Collection[str]) -> None:
        whole_second = now_ms % SECOND_MS == 0
        want_array = MINI_TICKER_ARR in wanted
        array: list[dict[str, Any]] = []
        for market in self._markets:
            names = market.names
            if whole_second:
                market.expire_windows(now_ms)
                market.kline_tick(now_ms, out, wanted)
                want_mini = names.mini_ticker in wanted
                if want_mini or (want_array and market.changed):
                    mini = market.mini_ticker(now_ms)
                    if want_mini:
                        out.append((names.mini_ticker, orjson.dumps(mini)))
                    if want_array and market.changed:
                        array.append(mini)
                market.changed = False
                if names.ticker in wanted:
                    out.append((names.ticker, market.ticker(now_ms)))
                if names.avg_price in wanted:
                    out.append((names.avg_price, market.avg_price(now_ms)))
            # Diffs first: a consumer of both sees the change before the snapshot that includes it.
            market.diff_depth(now_ms, market.fast_diff, names.depth_fast, out, wanted)
            if whole_second:
                market.diff_depth(now_ms, market.slow_diff, names.depth, out, wanted)
            for levels in DEPTH_LEVELS:
                fast_name = names.partial_fast[levels]
                if fast_name in wanted:
                    out.append((fast_name, orjson.dumps(market.book_levels(levels))))
                if whole_second and names.partial[levels] in wanted:
                    out.append((names.partial[levels], orjson.dumps(market.book_levels(levels))))
        if array:
            out.append((MINI_TICKER_ARR, orjson.dumps(array)))
