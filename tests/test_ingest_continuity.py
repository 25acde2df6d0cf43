"""The pure rules behind gap-free ingest, without sockets or an event loop: event identities, duplicate and gap
verdicts, backfill plans, the standby buffer, the rotation handover rule, the REST weight budget, REST rows
rebuilt as stream events, and connection-attempt pacing."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, strategies as st

from ingest.publish.continuity import BackfillPlan, Continuity, IdRange, Verdict, plan_backfill
from ingest.publish.standby import StandbyBuffer
from ingest.publish.trades import events_from_rest, last_row_id
from ingest.sources.binance.rotation import handover_ready, uncovered_streams
from ingest.sources.binance.wire import ConnectionAttemptPacer, DataFrame, parse_frame
from shared.binance.identity import event_identity
from shared.binance.weight import RestWeightBudget, parse_retry_after
from shared.broker.contract import EventId, OutgoingMessage
from shared.streams import StreamKind


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# ---- identities ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ({"e": "trade", "E": 5, "s": "BTCUSDT", "t": 42, "p": "1"}, EventId(42, 42, 5)),
        ({"e": "aggTrade", "E": 5, "a": 7, "f": 100, "l": 103}, EventId(7, 7, 5)),
        ({"e": "depthUpdate", "E": 9, "U": 10, "u": 14, "b": [], "a": []}, EventId(10, 14, 9)),
        ({"e": "kline", "E": 1767225601000, "k": {"t": 1}}, EventId(1767225601000, 1767225601000, 1767225601000)),
        ({"e": "24hrMiniTicker", "E": 3}, EventId(3, 3, 3)),
        ({"u": 81, "s": "BTCUSDT", "b": "1", "B": "1", "a": "2", "A": "1"}, EventId(81, 81, None)),
        ({"lastUpdateId": 77, "bids": [], "asks": []}, EventId(77, 77, None)),
        ([{"e": "24hrMiniTicker", "E": 4}, {"e": "24hrMiniTicker", "E": 6}], EventId(6, 6, 6)),
        ({"e": "trade", "t": "42"}, None),  # not an integer id: no identity, no checks
        ({"e": "kline"}, None),
        ({"e": "depthUpdate", "U": 20, "u": 14}, EventId(14, 14, None)),  # nonsense range: the final id only
        ({"e": "trade", "t": True}, None),
        ([], None),
        ("text", None),
    ],
)
def test_event_identity(payload: object, expected: EventId | None) -> None:
    assert event_identity(payload) == expected


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(), lambda c: st.lists(c) | st.dictionaries(st.text(), c)
    )
)
def test_event_identity_never_raises(document: object) -> None:
    event_identity(document)


def test_parse_frame_reads_the_identity_from_its_validation_decode() -> None:
    payload = b'{"e":"aggTrade","E":5,"s":"BTCUSDT","a":9,"p":"1","q":"1","f":1,"l":1,"T":4,"m":true,"M":true}'
    parsed = parse_frame(b'{"stream":"btcusdt@aggTrade","data":' + payload + b"}")
    assert isinstance(parsed, DataFrame) and parsed.payload == payload
    assert parsed.event == EventId(9, 9, 5)
    slow = parse_frame(b'{"data":{"e":"trade","t":3,"E":2},"stream":"btcusdt@trade"}')
    assert isinstance(slow, DataFrame) and slow.event == EventId(3, 3, 2)
    unchecked = parse_frame(b'{"stream":"btcusdt@aggTrade","data":' + payload + b"}", validate_payload=False)
    assert isinstance(unchecked, DataFrame) and unchecked.event is None


# ---- continuity -----------------------------------------------------------------------------------------------


def test_continuity_verdicts() -> None:
    continuity = Continuity()
    assert continuity.judge("s", EventId(10, 10), contiguous=True).verdict is Verdict.NEW  # nothing to compare
    continuity.advance("s", 10)
    assert continuity.judge("s", EventId(10, 10), contiguous=True).verdict is Verdict.DUPLICATE
    assert continuity.judge("s", EventId(9, 9), contiguous=True).verdict is Verdict.DUPLICATE
    assert continuity.judge("s", EventId(11, 11), contiguous=True).verdict is Verdict.NEW
    gap = continuity.judge("s", EventId(15, 15), contiguous=True)
    assert gap.verdict is Verdict.GAP and gap.missing == IdRange(11, 14) and gap.missing.count == 4
    assert continuity.judge("s", EventId(15, 15), contiguous=False).verdict is Verdict.NEW  # state: no gaps
    # Diff depth: the first id U must follow the last u.
    assert continuity.judge("s", EventId(11, 20), contiguous=True).verdict is Verdict.NEW
    assert continuity.judge("s", EventId(12, 20), contiguous=True).missing == IdRange(11, 11)
    continuity.advance("s", 8)  # never backwards
    assert continuity.last("s") == 10
    continuity.prime({"s": 12, "t": 3})
    assert continuity.last("s") == 12 and continuity.last("t") == 3
    continuity.forget(["s"])
    assert continuity.judge("s", EventId(100, 100), contiguous=True).verdict is Verdict.NEW
    assert continuity.streams == {"t"}


def test_backfill_plan_keeps_the_newest_ids_within_the_cap() -> None:
    assert plan_backfill(IdRange(11, 14), 10) == BackfillPlan(IdRange(11, 14), None)
    assert plan_backfill(IdRange(1, 100), 10) == BackfillPlan(IdRange(91, 100), IdRange(1, 90))
    assert plan_backfill(IdRange(5, 5), 0) == BackfillPlan(None, IdRange(5, 5))
    with pytest.raises(ValueError):
        IdRange(3, 2)
    assert str(IdRange(3, 9)) == "3..9"


# ---- standby buffer ---------------------------------------------------------------------------------------------


def trade(stream: str, trade_id: int) -> OutgoingMessage:
    return OutgoingMessage(stream, b'{"t":%d}' % trade_id, False, EventId(trade_id, trade_id))


def ticker(stream: str, value: int) -> OutgoingMessage:
    return OutgoingMessage(stream, b'{"E":%d}' % value, True, EventId(value, value, value))


def test_standby_buffer_keeps_a_window_of_events_and_the_newest_state() -> None:
    buffer = StandbyBuffer(window_s=5.0, max_events=100)
    buffer.add([trade("a@trade", 1), ticker("a@ticker", 1)], now=0.0)
    buffer.add([trade("a@trade", 2), ticker("a@ticker", 2), trade("b@trade", 7)], now=3.0)
    buffer.add([trade("a@trade", 3)], now=6.0)  # trade 1 is now older than the window
    assert buffer.streams() == {"a@trade", "a@ticker", "b@trade"}
    drained = buffer.drain(now=6.0)
    assert drained == [ticker("a@ticker", 2), trade("a@trade", 2), trade("b@trade", 7), trade("a@trade", 3)]
    assert buffer.evicted == 1 and len(buffer) == 0 and buffer.drain(now=7.0) == []


def test_standby_buffer_is_bounded_and_forgets_dropped_streams() -> None:
    buffer = StandbyBuffer(window_s=60.0, max_events=3)
    buffer.add([trade("a@trade", n) for n in range(1, 6)], now=0.0)
    buffer.add([ticker("a@ticker", 1), trade("b@trade", 1)], now=1.0)
    buffer.discard(["b@trade", "a@ticker"])
    assert buffer.drain(now=1.0) == [trade("a@trade", 4), trade("a@trade", 5)]
    assert buffer.evicted == 3
    with pytest.raises(ValueError):
        StandbyBuffer(window_s=-1)


# ---- rotation handover ------------------------------------------------------------------------------------------


def test_handover_waits_until_the_old_connection_reaches_the_successors_first_event() -> None:
    streams = {"a@trade", "b@aggTrade", "c@depth"}
    first = {"a@trade": 100, "b@aggTrade": 50}
    assert uncovered_streams({"a@trade": 98, "b@aggTrade": 60}, first, streams) == ["a@trade"]
    assert not handover_ready(True, {"a@trade": 98, "b@aggTrade": 60}, first, streams)
    assert handover_ready(True, {"a@trade": 99, "b@aggTrade": 49}, first, streams)
    assert not handover_ready(False, {"a@trade": 99, "b@aggTrade": 49}, first, streams)  # not subscribed yet
    assert uncovered_streams({}, first, streams) == ["a@trade", "b@aggTrade"]  # old one saw nothing there yet
    assert uncovered_streams({}, first, {"c@depth"}) == []  # streams no longer wanted are not waited for


# ---- REST weight budget -----------------------------------------------------------------------------------------


def test_weight_budget_counts_the_minute_and_takes_the_exchanges_figure() -> None:
    clock = Clock(600.0)  # the start of a wall-clock minute
    budget = RestWeightBudget(100, clock=clock)
    assert budget.delay(40) == 0
    budget.spend(40)
    budget.spend(40)
    assert budget.delay(40) == pytest.approx(60.0)  # 120 > 100: wait for the next minute
    clock.now = 630.0
    budget.observe(200, 95, None)  # someone else on the IP uses weight too
    assert budget.used == 95 and budget.delay(10) == pytest.approx(30.0)
    clock.now = 660.0
    assert budget.used == 0 and budget.delay(100) == 0
    with pytest.raises(ValueError):
        budget.delay(101)


@pytest.mark.parametrize("status", [429, 418])
def test_weight_budget_blocks_everything_for_retry_after(status: int) -> None:
    clock = Clock(600.0)
    budget = RestWeightBudget(6000, clock=clock)
    budget.observe(status, 10, parse_retry_after("7"))
    assert budget.delay(1) == pytest.approx(7.0) and budget.last_status_block == status
    clock.now = 607.0
    assert budget.delay(1) == 0
    budget.observe(429, None, parse_retry_after("soon"))  # unusable header: a minute, never at once
    assert budget.delay(1) == pytest.approx(60.0)
    assert parse_retry_after(None) is None and parse_retry_after("-3") is None and parse_retry_after("2.5") == 2.5


# ---- REST rows as stream events ---------------------------------------------------------------------------------


def test_agg_trades_rows_become_aggtrade_events_in_id_order() -> None:
    rows = [
        {"a": 12, "p": "2.0", "q": "1.5", "f": 30, "l": 31, "T": 1700, "m": False, "M": True},
        {"a": 11, "p": "1.0", "q": "0.5", "f": 29, "l": 29, "T": 1699, "m": True, "M": True},
        {"a": 13, "p": 3, "q": "1", "f": 32, "l": 32, "T": 1701, "m": True, "M": True},  # price not a string
        {"a": 14, "p": "4", "q": "1", "f": 33, "l": 33, "T": 1702, "m": True, "M": True},  # beyond the range
        "junk",
    ]
    events = events_from_rest(StreamKind.AGG_TRADE, "btcusdt@aggTrade", "BTCUSDT", rows, 10, 13)
    assert [e.event for e in events] == [EventId(11, 11, 1699), EventId(12, 12, 1700)]
    assert events[0].payload == (
        b'{"e":"aggTrade","E":1699,"s":"BTCUSDT","a":11,"p":"1.0","q":"0.5","f":29,"l":29,"T":1699,"m":true,"M":true}'
    )
    assert event_identity(orjson.loads(events[0].payload)) == EventId(11, 11, 1699)
    assert not events[0].keep_last and events[0].stream == "btcusdt@aggTrade"
    assert last_row_id(StreamKind.AGG_TRADE, rows) == 14
    assert events_from_rest(StreamKind.AGG_TRADE, "s", "S", {"code": -1}, 1, 2) == []


def test_historical_trades_rows_become_trade_events() -> None:
    rows = [
        {"id": 5, "price": "9.5", "qty": "2", "quoteQty": "19", "time": 88, "isBuyerMaker": True, "isBestMatch": True}
    ]
    (event,) = events_from_rest(StreamKind.TRADE, "ethusdt@trade", "ETHUSDT", rows, 5, 5)
    assert event.payload == b'{"e":"trade","E":88,"s":"ETHUSDT","t":5,"p":"9.5","q":"2","T":88,"m":true,"M":true}'
    assert event_identity(orjson.loads(event.payload)) == EventId(5, 5, 88)
    assert last_row_id(StreamKind.TRADE, rows) == 5 and last_row_id(StreamKind.TRADE, []) is None


# ---- connection attempts ------------------------------------------------------------------------------------------


def test_connection_attempts_stay_within_the_window_limit() -> None:
    clock = Clock(0.0)
    pacer = ConnectionAttemptPacer(3, 10.0, margin_s=0.0, clock=clock)
    for _ in range(3):
        assert pacer.delay() == 0
        pacer.record()
        clock.now += 1.0
    assert pacer.in_window == 3 and pacer.delay() == pytest.approx(7.0)  # the first attempt leaves at t=10
    clock.now = 10.0
    assert pacer.delay() == 0
    pacer.record()
    assert pacer.delay() == pytest.approx(1.0)
    # Whatever the timing of the callers, no window of 10 s ever holds more than 3 attempts.
    attempts: list[float] = []
    clock.now = 100.0
    for step in (0.0, 0.3, 2.0, 0.1, 9.0, 0.0, 4.0, 0.2):
        clock.now += step
        clock.now += pacer.delay()
        pacer.record()
        attempts.append(clock.now)
    for start in attempts:
        assert sum(1 for t in attempts if start <= t < start + 10.0) <= 3
    with pytest.raises(ValueError):
        ConnectionAttemptPacer(0)
    # With a margin, an attempt stays counted that much longer than the exchange's window.
    late = ConnectionAttemptPacer(1, 10.0, margin_s=0.5, clock=clock)
    late.record()
    assert late.delay() == pytest.approx(10.5)
