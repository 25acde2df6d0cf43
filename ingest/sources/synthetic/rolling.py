"""The two rolling windows a symbol's statistics come from: ``DayWindow``, the last 24 h as one OHLC bucket
per minute (ticker and miniTicker: open, high, low, volumes, trade ids, previous close), and
``AveragePrice``, the volume-weighted price of the last 5 minutes' trades (avgPrice). Both keep running
totals, so a trade or a second's expiry costs O(1) amortised however long the window. Pure: no I/O.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from ingest.sources.synthetic.ohlc import Ohlc
from ingest.sources.synthetic.symbols import ATOMS_PER_UNIT, divide_rounded
from shared.intervals import DAY_MS, MINUTE_MS

AVG_PRICE_WINDOW_MS = 300_000


class DayWindow:
    """The rolling 24 h window: one ``Ohlc`` bucket per minute that saw a trade, oldest first, with totals over
    all of them. ``prev_close`` is the close of the newest minute that already left the window."""

    __slots__ = ("_closed_high_low", "buckets", "prev_close", "quote", "trades", "volume")

    def __init__(self, buckets: Iterable[Ohlc], prev_close: int) -> None:
        self.buckets: deque[Ohlc] = deque()
        self.volume = self.quote = self.trades = 0
        self.prev_close = prev_close
        self._closed_high_low: tuple[int, int] | None = None
        for bucket in buckets:
            self.buckets.append(bucket)
            self.volume += bucket.volume
            self.quote += bucket.quote
            self.trades += bucket.trades

    def add(self, time_ms: int, trade_id: int, price: int, units: int, quote: int, taker_is_buyer: bool) -> None:
        minute_ms = time_ms - time_ms % MINUTE_MS
        buckets = self.buckets
        if not buckets or buckets[-1].open_ms != minute_ms:
            buckets.append(Ohlc(minute_ms, minute_ms + MINUTE_MS, price))
            self._closed_high_low = None
        buckets[-1].add(trade_id, price, units, quote, taker_is_buyer)
        self.volume += units
        self.quote += quote
        self.trades += 1

    def expire(self, now_ms: int) -> bool:
        """Drop the minutes that ended a day or more before ``now_ms``; True if any did."""
        cutoff = now_ms - DAY_MS
        buckets = self.buckets
        expired = False
        while buckets and buckets[0].end_ms <= cutoff:
            bucket = buckets.popleft()
            self.volume -= bucket.volume
            self.quote -= bucket.quote
            self.trades -= bucket.trades
            self.prev_close = bucket.close
            self._closed_high_low = None
            expired = True
        return expired

    def high_low(self, last_price: int) -> tuple[int, int]:
        """The window's highest and lowest price (``last_price`` for both when it is empty)."""
        buckets = self.buckets
        if not buckets:
            return last_price, last_price
        if self._closed_high_low is None:
            # Every bucket but the newest is final: cache their extremes until a bucket comes or goes.
            if len(buckets) > 1:
                closed = [buckets[i] for i in range(len(buckets) - 1)]
                self._closed_high_low = (max(b.high for b in closed), min(b.low for b in closed))
            else:
                self._closed_high_low = (buckets[0].high, buckets[0].low)
        high, low = self._closed_high_low
        newest = buckets[-1]
        return max(high, newest.high), min(low, newest.low)


class AveragePrice:
    """The volume-weighted average price of the last 5 minutes' trades, in atoms. With no trade in the window
    the previous average stands (``atoms`` starts at the symbol's opening price)."""

    __slots__ = ("_quote", "_trades", "_volume", "atoms")

    def __init__(self, atoms: int) -> None:
        self._trades: deque[tuple[int, int, int]] = deque()  # (time, quote atoms, volume atoms)
        self._quote = self._volume = 0
        self.atoms = atoms

    def add(self, time_ms: int, quote: int, volume: int) -> None:
        self._trades.append((time_ms, quote, volume))
        self._quote += quote
        self._volume += volume

    def expire(self, now_ms: int) -> None:
        """Drop trades that left the window and recompute the average from what is left."""
        cutoff = now_ms - AVG_PRICE_WINDOW_MS
        trades = self._trades
        while trades and trades[0][0] <= cutoff:
            _, quote, volume = trades.popleft()
            self._quote -= quote
            self._volume -= volume
        if self._volume:
            self.atoms = divide_rounded(self._quote * ATOMS_PER_UNIT, self._volume)
