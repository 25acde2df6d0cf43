"""OHLC accumulation, written once: an ``Ohlc`` bar covers the time window ``[open_ms, end_ms)`` and folds the
trades in it into open/high/low/close, volumes, taker volumes, a trade count and the first and last trade id.
The symbol market keeps one per kline interval (pushed on the kline streams) and the rolling 24 h window one per
minute (behind ticker and miniTicker). Prices are integer ticks, volumes lot steps, quote volumes 1e-8 atoms.
Pure: no I/O.
"""

from __future__ import annotations


class Ohlc:
    """Trades folded into one bar. Before its first trade every price is the one it opened with (a bar
    without trades shows the previous close everywhere, as Binance's do) and both trade ids are -1."""

    __slots__ = (
        "close",
        "end_ms",
        "first_id",
        "high",
        "last_id",
        "low",
        "open",
        "open_ms",
        "quote",
        "taker_quote",
        "taker_volume",
        "trades",
        "volume",
    )

    def __init__(self, open_ms: int, end_ms: int, price: int) -> None:
        self.open_ms = open_ms
        self.end_ms = end_ms
        self.open = self.high = self.low = self.close = price
        self.volume = self.quote = self.taker_volume = self.taker_quote = self.trades = 0
        self.first_id = self.last_id = -1

    def add(self, trade_id: int, price: int, units: int, quote: int, taker_is_buyer: bool) -> None:
        if self.trades == 0:
            self.open = self.high = self.low = price
            self.first_id = trade_id
        elif price > self.high:
            self.high = price
        elif price < self.low:
            self.low = price
        self.close = price
        self.volume += units
        self.quote += quote
        if taker_is_buyer:
            self.taker_volume += units
            self.taker_quote += quote
        self.trades += 1
        self.last_id = trade_id
