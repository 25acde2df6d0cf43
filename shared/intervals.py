"""Kline interval arithmetic (pure): the window a time falls in, and the open times a klines request covers.

Fixed intervals are aligned to the Unix epoch, ``1w`` to Monday 00:00 UTC and ``1M`` to calendar months, as on
Binance. ``open_times`` turns Binance's ``startTime``/``endTime``/``limit`` semantics into the exact list of
candle open times a response may contain, which is what lets the gateway tell whether a stored range is
complete (covered) or has holes to fill from the exchange.

Months are computed with integer calendar arithmetic (no ``datetime``), so no time can overflow a date type
here. What clients may ask for is bounded by :data:`MIN_TIME_MS`..:data:`MAX_TIME_MS` (the gateway refuses the
rest with a Binance error): every candle of a supported time, up to a whole month, opens and closes within the
years 1970..9999 that Python's ``datetime``, PostgreSQL and most client libraries represent.
"""

from __future__ import annotations

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

# The times a klines request may name. 9999-12-01 00:00 UTC is the first moment whose month candle would close
# in year 10000, beyond datetime's (and most clients') range: Binance's example of a hostile startTime.
MIN_TIME_MS = 0
MAX_TIME_MS = 253_399_622_399_999  # 9999-11-30 23:59:59.999 UTC


def _month_index(days: int) -> int:
    """Months since 1970-01 of the UTC day ``days`` after the epoch (negative before it); proleptic Gregorian
    calendar, the civil-from-days algorithm of H. Hinnant (exact for any integer)."""
    shifted = days + 719_468  # days since 0000-03-01, where 400-year eras start
    era = shifted // 146_097
    day_of_era = shifted - era * 146_097
    year_of_era = (day_of_era - day_of_era // 1460 + day_of_era // 36_524 - day_of_era // 146_096) // 365
    day_of_year = day_of_era - (365 * year_of_era + year_of_era // 4 - year_of_era // 100)
    march_based = (5 * day_of_year + 2) // 153  # 0 = March ... 11 = February
    year = year_of_era + era * 400 + (1 if march_based >= 10 else 0)
    month = march_based + 3 if march_based < 10 else march_based - 9
    return (year - 1970) * 12 + month - 1


def _month_start_ms(index: int) -> int:
    """Unix ms of the first day of the month ``index`` months after 1970-01 (days-from-civil, H. Hinnant)."""
    year, month = 1970 + index // 12, index % 12 + 1
    year -= 1 if month <= 2 else 0
    era = year // 400
    year_of_era = year - era * 400
    day_of_year = (153 * (month - 3 if month > 2 else month + 9) + 2) // 5
    day_of_era = year_of_era * 365 + year_of_era // 4 - year_of_era // 100 + day_of_year
    return (era * 146_097 + day_of_era - 719_468) * DAY_MS


def candle_window(interval: str, time_ms: int) -> tuple[int, int]:
    """Open time and exclusive end of the ``interval`` candle that contains ``time_ms`` (UTC). Fixed intervals
    are aligned to the Unix epoch, weeks to Monday, ``1M`` to calendar months. Exact for any integer."""
    if interval == "1M":
        index = _month_index(time_ms // DAY_MS)
        return _month_start_ms(index), _month_start_ms(index + 1)
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
