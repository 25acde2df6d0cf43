"""The canonical stream names of one simulated symbol, spelled once so the hot path compares ready-made strings
against the wanted set instead of formatting a name per event. Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.streams import DEPTH_LEVELS, KLINE_INTERVALS


@dataclass(frozen=True, slots=True)
class StreamNames:
    """Canonical stream names of one symbol (as ``shared.streams.parse_stream(...).name`` spells them)."""

    trade: str
    agg_trade: str
    book_ticker: str
    mini_ticker: str
    ticker: str
    avg_price: str
    depth: str
    depth_fast: str
    partial: dict[int, str]
    partial_fast: dict[int, str]
    klines: dict[str, str]

    @classmethod
    def of(cls, symbol: str) -> StreamNames:
        lower = symbol.lower()
        return cls(
            trade=f"{lower}@trade",
            agg_trade=f"{lower}@aggTrade",
            book_ticker=f"{lower}@bookTicker",
            mini_ticker=f"{lower}@miniTicker",
            ticker=f"{lower}@ticker",
            avg_price=f"{lower}@avgPrice",
            depth=f"{lower}@depth",
            depth_fast=f"{lower}@depth@100ms",
            partial={levels: f"{lower}@depth{levels}" for levels in DEPTH_LEVELS},
            partial_fast={levels: f"{lower}@depth{levels}@100ms" for levels in DEPTH_LEVELS},
            klines={interval: f"{lower}@kline_{interval}" for interval in KLINE_INTERVALS},
        )
