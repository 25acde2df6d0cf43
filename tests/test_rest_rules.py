"""The pure rules behind the REST API: which candle open times a klines request covers (for any supported time,
months by calendar arithmetic up to year 9999), the cache key they make (every timestamp inside the same candle
windows, one key), parameter validation (property-tested: any query either parses into a valid request or is
refused with a Binance error), and the per-IP weight budget."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings, strategies as st

from gateway.rest.klines import KlineSource
from gateway.rest.params import (
    KLINES_MAX_LIMIT,
    MAX_SYMBOLS,
    RestError,
    depth_weight,
    klines_request,
    one_or_many_symbols,
    query_from_pairs,
)
from gateway.rest.weights import WeightLimiter
from shared.broker.memory import MemoryBroker
from shared.intervals import MAX_TIME_MS, MIN_TIME_MS, candle_window, open_times
from shared.streams import KLINE_INTERVALS

HOUR = 3_600_000
NOW = 1_767_225_600_000 + 90 * 60_000 + 5  # 2026-01-01 01:30:00.005 UTC
KNOWN = frozenset({"BTCUSDT", "ETHUSDT"})


def test_newest_candles_end_with_the_open_one() -> None:
    assert open_times("1h", now_ms=NOW, start_ms=None, end_ms=None, limit=3) == [
        1_767_225_600_000 - HOUR,
        1_767_225_600_000,
        1_767_225_600_000 + HOUR,  # 01:00, open now
    ]


def test_start_is_inclusive_of_an_open_time_and_rounds_up_otherwise() -> None:
    start = 1_767_225_600_000 - 2 * HOUR
    assert open_times("1h", now_ms=NOW, start_ms=start, end_ms=None, limit=10) == [start + i * HOUR for i in range(4)]
    assert open_times("1h", now_ms=NOW, start_ms=start + 1, end_ms=None, limit=2) == [start + HOUR, start + 2 * HOUR]


def test_end_counts_back_and_never_reaches_into_the_future() -> None:
    end = 1_767_225_600_000
    assert open_times("1h", now_ms=NOW, start_ms=None, end_ms=end + 1, limit=2) == [end - HOUR, end]
    assert open_times("1h", now_ms=NOW, start_ms=None, end_ms=NOW + 100 * HOUR, limit=1) == [end + HOUR]
    assert open_times("1h", now_ms=NOW, start_ms=NOW + HOUR, end_ms=None, limit=5) == []


def test_months_follow_the_calendar() -> None:
    opens = open_times("1M", now_ms=NOW, start_ms=None, end_ms=None, limit=3)
    assert opens == [1_761_955_200_000, 1_764_547_200_000, 1_767_225_600_000]  # 2025-11-01, 2025-12-01, 2026-01-01


def test_the_epoch_bounds_history() -> None:
    assert open_times("1d", now_ms=2 * 86_400_000, start_ms=None, end_ms=None, limit=10) == [0, 86_400_000, 172_800_000]


@given(
    interval=st.sampled_from(KLINE_INTERVALS),
    now=st.integers(0, 4_102_444_800_000),
    start=st.none() | st.integers(0, 4_102_444_800_000),
    end=st.none() | st.integers(0, 4_102_444_800_000),
    limit=st.integers(1, 1000),
)
@settings(max_examples=300, deadline=None)
def test_open_times_are_aligned_ordered_bounded_and_in_range(
    interval: str, now: int, start: int | None, end: int | None, limit: int
) -> None:
    opens = open_times(interval, now_ms=now, start_ms=start, end_ms=end, limit=limit)
    assert len(opens) <= limit
    assert opens == sorted(set(opens))
    for opened in opens:
        assert candle_window(interval, opened)[0] == opened
        assert opened <= now
        assert start is None or opened >= start
        assert end is None or opened <= end
    # consecutive windows, no gaps
    assert all(candle_window(interval, a)[1] == b for a, b in itertools.pairwise(opens))


@given(time_ms=st.integers(-86_400_000 * 365 * 1969, MAX_TIME_MS))
@settings(max_examples=500, deadline=None)
def test_month_windows_are_calendar_months(time_ms: int) -> None:
    moment = datetime.fromtimestamp(time_ms // 1000, tz=UTC)
    first = datetime(moment.year, moment.month, 1, tzinfo=UTC)
    following = datetime(moment.year + moment.month // 12, moment.month % 12 + 1, 1, tzinfo=UTC)
    assert candle_window("1M", time_ms) == (int(first.timestamp()) * 1000, int(following.timestamp()) * 1000)


def test_month_windows_at_the_ends_of_the_supported_range() -> None:
    assert candle_window("1M", MAX_TIME_MS) == (253_397_030_400_000, 253_399_622_400_000)  # 9999-11 .. 9999-12
    assert candle_window("1M", MAX_TIME_MS + 1) == (253_399_622_400_000, 253_402_300_800_000)  # into year 10000
    assert candle_window("1M", 2**63 - 1)[0] <= 2**63 - 1  # no date type to overflow
    assert candle_window("1M", -1) == (-2_678_400_000, 0)  # December 1969
    assert candle_window("1M", 951_782_400_000) == (951_868_800_000 - 29 * 86_400_000, 951_868_800_000)  # Feb 2000


EDGE_TIMES = st.sampled_from([MIN_TIME_MS, 1, 86_400_000 * 4 - 1, MAX_TIME_MS - 1, MAX_TIME_MS]) | st.integers(
    MIN_TIME_MS, MAX_TIME_MS
)


@given(
    interval=st.sampled_from(KLINE_INTERVALS),
    now=EDGE_TIMES,
    start=st.none() | EDGE_TIMES,
    end=st.none() | EDGE_TIMES,
    limit=st.sampled_from([1, 2, 999, 1000]),
)
@settings(max_examples=500, deadline=None)
def test_open_times_work_across_the_whole_supported_range(
    interval: str, now: int, start: int | None, end: int | None, limit: int
) -> None:
    opens = open_times(interval, now_ms=now, start_ms=start, end_ms=end, limit=limit)
    assert len(opens) <= limit and opens == sorted(set(opens))
    assert all(candle_window(interval, a)[1] == b for a, b in itertools.pairwise(opens))


@given(
    interval=st.sampled_from(KLINE_INTERVALS),
    anchor=st.integers(0, NOW),
    offsets=st.tuples(st.integers(0, 2**40), st.integers(0, 2**40)),
    limit=st.integers(1, 1000),
    by_start=st.booleans(),
)
@settings(max_examples=300, deadline=None)
def test_every_time_inside_the_same_candle_windows_makes_the_same_cache_key(
    interval: str, anchor: int, offsets: tuple[int, int], limit: int, by_start: bool
) -> None:
    source = KlineSource(None, None, MemoryBroker(), clock_ms=lambda: NOW)
    opened, closes = candle_window(interval, anchor)
    keys = set()
    for offset in offsets:
        # Binance keeps a candle when startTime <= openTime <= endTime: every endTime in [open, close) names the
        # same candles, and so does every startTime in (open, close].
        moment = opened + offset % (closes - opened) + (1 if by_start else 0)
        bounds = {"start_ms": moment, "end_ms": None} if by_start else {"start_ms": None, "end_ms": moment}
        window = source.window("BTCUSDT", interval, limit=limit, **bounds)
        assert window.opens == tuple(open_times(interval, now_ms=NOW, limit=limit, **bounds))
        keys.add(window.cache_key)
    assert len(keys) == 1
    key = keys.pop()
    assert key.isascii() and " " not in key and key.startswith(f"klines:BTCUSDT:{interval}:")


@pytest.mark.parametrize(
    ("pairs", "code"),
    [([("startTime", str(MAX_TIME_MS + 1))], -1130), ([("endTime", "253399622400000")], -1130),
     ([("startTime", str(2**63 - 1))], -1130), ([("endTime", str(2**63))], -1108),
     ([("startTime", "-1")], -1100), ([("startTime", "5"), ("endTime", "4")], -1023),
     ([("limit", "0")], -1130), ([("limit", str(2**63 - 1))], -1130), ([("limit", "1e3")], -1100)],
)  # fmt: skip
def test_out_of_range_windows_are_binance_errors(pairs: list[tuple[str, str]], code: int) -> None:
    with pytest.raises(RestError) as refused:
        klines_request(query_from_pairs([("symbol", "ETHUSDT"), ("interval", "1M"), *pairs]), KNOWN)
    assert (refused.value.status, refused.value.code) == (400, code)


def test_the_ends_of_the_supported_range_are_accepted() -> None:
    query = query_from_pairs(
        [("symbol", "ETHUSDT"), ("interval", "1M"), ("startTime", str(MIN_TIME_MS)), ("endTime", str(MAX_TIME_MS))]
    )
    request = klines_request(query, KNOWN)
    assert (request.start_ms, request.end_ms, request.limit) == (MIN_TIME_MS, MAX_TIME_MS, 500)


VALUES = st.sampled_from(
    ["BTCUSDT", "ETHUSDT", "btcusdt", "NOPE", "1h", "1m", "1M", "7h", "0", "1", "500", "1000", "1001", "-1", "1.5",
     "9" * 25, "", "'; DROP TABLE candles; --", '["BTCUSDT"]', "[]", "+08:00", "0", "\x00", "\u2603"]
) | st.text(max_size=30)  # fmt: skip
NAMES = st.sampled_from(["symbol", "interval", "startTime", "endTime", "limit", "timeZone", "symbols", "other"])


@given(pairs=st.lists(st.tuples(NAMES, VALUES), max_size=8))
@settings(max_examples=500, deadline=None)
def test_any_klines_query_is_a_valid_request_or_a_binance_error(pairs: list[tuple[str, str]]) -> None:
    query = query_from_pairs(pairs)
    try:
        request = klines_request(query, KNOWN)
    except RestError as error:
        assert error.status == 400 and error.code in {-1023, -1100, -1101, -1102, -1105, -1108, -1120, -1121, -1130}
        return
    assert request.symbol in KNOWN and request.interval in KLINE_INTERVALS
    assert 1 <= request.limit <= KLINES_MAX_LIMIT
    for moment in (request.start_ms, request.end_ms):
        assert moment is None or 0 <= moment < 2**63
    assert request.start_ms is None or request.end_ms is None or request.start_ms <= request.end_ms
    for moment in (request.start_ms, request.end_ms):
        assert moment is None or MIN_TIME_MS <= moment <= MAX_TIME_MS


@given(pairs=st.lists(st.tuples(st.sampled_from(["symbol", "symbols"]), VALUES), max_size=4))
@settings(max_examples=300, deadline=None)
def test_any_symbols_query_is_known_symbols_or_a_binance_error(pairs: list[tuple[str, str]]) -> None:
    try:
        symbols = one_or_many_symbols(query_from_pairs(pairs), KNOWN)
    except RestError as error:
        assert error.status == 400 and error.code in {-1100, -1101, -1102, -1105, -1121, -1128, -1130, -1151}
        return
    assert symbols is None or (set(symbols) <= KNOWN and len(symbols) == len(set(symbols)) <= MAX_SYMBOLS)


@pytest.mark.parametrize(
    ("query", "weight"),
    [({}, 5), ({"limit": ["100"]}, 5), ({"limit": ["101"]}, 25), ({"limit": ["1000"]}, 50), ({"limit": ["5000"]}, 250),
     ({"limit": ["junk"]}, 5)],
)  # fmt: skip
def test_depth_weight_follows_binances_table(query: dict[str, Any], weight: int) -> None:
    assert depth_weight(query) == weight


def test_weight_budget_per_ip_per_minute() -> None:
    limiter = WeightLimiter(10)
    assert limiter.charge("a", 6, now_s=120.0).used == 6
    assert limiter.charge("b", 10, now_s=121.0).allowed  # per IP
    refused = limiter.charge("a", 5, now_s=150.5)
    assert not refused.allowed and refused.used == 6 and refused.retry_after_s == 30  # until 180 s
    assert limiter.charge("a", 4, now_s=151.0).used == 10  # the refused request was not charged
    assert limiter.charge("a", 10, now_s=180.0).used == 10  # a new minute, a new budget
