"""Kline interval arithmetic (pure): the window a time falls in, and the open times a klines request covers.

Fixed intervals are aligned to the Unix epoch, ``1w`` to Monday 00:00 UTC and ``1M`` to calendar months, as on
Binance. ``open_times`` turns Binance's ``startTime``/``endTime``/``limit`` semantics into the exact list of
candle open times a response may contain, which is what lets the gateway tell whether a stored range is
complete (covered) or has holes to fill from the exchange.
"""

from __future__ import annotations

from datetime import UTC, datetime

from shared.streams import KLINE_INTERVALS

SECOND_MS = 1000
MINUTE_MS = 60 * SECOND_MS
HOUR_MS = 60 * MINUTE_MS
DAY_MS = 24 * HOUR_MS

FIXED_INTERVAL_MS: dict[str, int] = {
    "1s": SECOND_MS,
    "1m": MINUTE_MS,
    "3m": 3 * MINUTE_MS,
    "5m": 5 * MINUTE_MS,
    "15m": 15 * MINUTE_MS,
    "30m": 30 * MINUTE_MS,
    "1h": HOUR_MS,
    "2h": 2 * HOUR_MS,
    "4h": 4 * HOUR_MS,
    "6h": 6 * HOUR_MS,
    "8h": 8 * HOUR_MS,
    "12h": 12 * HOUR_MS,
    "1d": DAY_MS,
    "3d": 3 * DAY_MS,
    "1w": 7 * DAY_MS,
}
# 1970-01-01 was a Thursday and Binance weeks open on Monday 00:00 UTC, four days later.
_WEEK_OFFSET_MS = 4 * DAY_MS
assert set(FIXED_INTERVAL_MS) | {"1M"} == set(KLINE_INTERVALS)


def candle_window(interval: str, time_ms: int) -> tuple[int, int]:
    """Open time and exclusive end of the ``interval`` candle that contains ``time_ms`` (UTC). Fixed intervals
    are aligned to the Unix epoch, weeks to Monday, ``1M`` to calendar months."""
    if interval == "1M":
        moment = datetime.fromtimestamp(time_ms // 1000, tz=UTC)
        month_start = datetime(moment.year, moment.month, 1, tzinfo=UTC)
        month_end = datetime(moment.year + moment.month // 12, moment.month % 12 + 1, 1, tzinfo=UTC)
        return int(month_start.timestamp()) * 1000, int(month_end.timestamp()) * 1000
    length = FIXED_INTERVAL_MS[interval]
    offset = _WEEK_OFFSET_MS if interval == "1w" else 0
    start = (time_ms - offset) // length * length + offset
    return start, start + length


def is_intraday(interval: str) -> bool:
    """True for intervals shorter than a day (their candles subdivide a UTC day)."""
    return interval != "1M" and FIXED_INTERVAL_MS[interval] < DAY_MS


def open_times(interval: str, *, now_ms: int, start_ms: int | None, end_ms: int | None, limit: int) -> list[int]:
    """Open times, oldest first, of the candles a Binance klines request may return.

    Binance's rules: a candle is in range when ``startTime <= openTime <= endTime``; ``limit`` counts from
    ``startTime`` forward when it is given, otherwise back from ``endTime`` (or from now: the newest candles).
    The candle open at ``now_ms`` is the newest that exists. Times before the epoch are clamped to it.
    """
    if limit <= 0:
        return []
    newest = candle_window(interval, now_ms)[0]
    last = newest if end_ms is None else min(newest, candle_window(interval, max(end_ms, 0))[0])
    times: list[int] = []
    if start_ms is not None:
        opened, _ = candle_window(interval, max(start_ms, 0))
        if opened < start_ms:
            opened = candle_window(interval, opened)[1]
        while opened <= last and len(times) < limit:
            times.append(opened)
            opened = candle_window(interval, opened)[1]
        return times
    opened = last
    while len(times) < limit:
        times.append(opened)
        if opened <= 0:
            break
        opened = candle_window(interval, opened - 1)[0]
    times.reverse()
    return times
