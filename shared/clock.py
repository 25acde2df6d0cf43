"""The wall clock in Unix milliseconds, the unit of every Binance timestamp (event, trade and candle times)."""

from __future__ import annotations

import time


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000
