"""In-process candle store: the embedded default (``pricegate demo``) needs no database.

Per (symbol, interval) a sorted list of open times and a dict of candles; upserts replace by open time, and
each series keeps at most ``max_per_series`` candles (the oldest go first) so memory stays bounded however
long the demo runs.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

from shared.candles.model import Candle


class _Series:
    __slots__ = ("by_open", "opens")

    def __init__(self) -> None:
        self.opens: list[int] = []
        self.by_open: dict[int, Candle] = {}


class MemoryCandleStore:
    def __init__(self, max_per_series: int = 5000) -> None:
        if max_per_series < 1:
            raise ValueError(f"max_per_series must be >= 1, got {max_per_series!r}")
        self.max_per_series = max_per_series
        self._series: dict[tuple[str, str], _Series] = {}

    async def upsert(self, candles: Sequence[Candle]) -> int:
        return self.upsert_now(candles)

    def upsert_now(self, candles: Sequence[Candle]) -> int:
        """Synchronous upsert (no I/O is involved)."""
        for candle in candles:
            series = self._series.get((candle.symbol, candle.interval))
            if series is None:
                series = self._series[(candle.symbol, candle.interval)] = _Series()
            if candle.open_time not in series.by_open:
                if not series.opens or candle.open_time > series.opens[-1]:
                    series.opens.append(candle.open_time)  # the usual case: the newest candle closed
                else:
                    bisect.insort(series.opens, candle.open_time)
            series.by_open[candle.open_time] = candle
            excess = len(series.opens) - self.max_per_series
            if excess > 0:
                for open_time in series.opens[:excess]:
                    del series.by_open[open_time]
                del series.opens[:excess]
        return len(candles)

    async def range(self, symbol: str, interval: str, first_open: int, last_open: int) -> list[Candle]:
        series = self._series.get((symbol, interval))
        if series is None:
            return []
        low = bisect.bisect_left(series.opens, first_open)
        high = bisect.bisect_right(series.opens, last_open)
        return [series.by_open[open_time] for open_time in series.opens[low:high]]

    def count(self) -> int:
        return sum(len(series.opens) for series in self._series.values())

    async def close(self) -> None:
        """Nothing to release."""
