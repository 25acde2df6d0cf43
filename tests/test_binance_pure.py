"""ingest.sources.binance.wire without sockets or an event loop: frame parsing (incl. arbitrary bytes), subscription
planning within Binance's limits, and the control-message pacer with the token bucket under it; and the one
``Retry-After`` parser every Binance answer goes through."""

from __future__ import annotations

import math

import orjson
import pytest
from hypothesis import given, settings, strategies as st

from ingest.sources.binance.wire import (
    MAX_PARAMS_PER_MESSAGE,
    ControlError,
    ControlPacer,
    ControlReply,
    ControlRequest,
    DataFrame,
    Malformed,
    ServerShutdown,
    assign_streams,
    control_requests,
    parse_frame,
    plan_changes,
    plan_subscriptions,
)
from shared.binance.weight import (
    DEFAULT_RETRY_AFTER_S,
    MAX_RETRY_AFTER_S,
    RestWeightBudget,
    depth_weight,
    parse_retry_after,
)
from shared.ratelimit import TokenBucket

TRADE = b'{"e":"trade","E":1767225600123,"s":"BTCUSDT","t":5612345678,"p":"94250.01000000","q":"0.00210000","T":1767225600122,"m":true,"M":true}'  # noqa: E501


# ---- parsing ----


def test_combined_frame_payload_is_sliced_verbatim() -> None:
    # Spacing and number spelling that a re-encode would change must survive.
    payload = b'{"e": "trade", "E": 1767225600123, "p": "1.0", "x": 1e3}'
    parsed = parse_frame(b'{"stream":"btcusdt@trade","data":' + payload + b"}")
    assert parsed == DataFrame("btcusdt@trade", payload)
    assert parse_frame(b'{"stream":"btcusdt@trade","data":' + TRADE + b"}") == DataFrame("btcusdt@trade", TRADE)


def test_text_frames_are_accepted_as_str() -> None:
    frame = '{"stream":"btcusdt@trade","data":' + TRADE.decode() + "}"
    assert parse_frame(frame) == DataFrame("btcusdt@trade", TRADE)


def test_array_payloads() -> None:
    payload = b'[{"e":"24hrMiniTicker","s":"BTCUSDT"}]'
    assert parse_frame(b'{"stream":"!miniTicker@arr","data":' + payload + b"}") == DataFrame("!miniTicker@arr", payload)


def test_other_envelope_layouts_fall_back_to_json() -> None:
    parsed = parse_frame(b'{"data":{"e":"trade","t":1},"stream":"btcusdt@trade"}')
    assert parsed == DataFrame("btcusdt@trade", b'{"e":"trade","t":1}')
    # A key after "data" makes the slice invalid JSON: the full parse handles it.
    parsed = parse_frame(b'{"stream":"btcusdt@trade","data":{"t":1},"extra":2}')
    assert parsed == DataFrame("btcusdt@trade", b'{"t":1}')
    parsed = parse_frame(b' {"stream" : "btcusdt@trade", "data" : {"t":1}} ')
    assert parsed == DataFrame("btcusdt@trade", b'{"t":1}')


def test_control_replies_and_errors() -> None:
    assert parse_frame(b'{"result":null,"id":7}') == ControlReply(7, None)
    assert parse_frame(b'{"result":["btcusdt@trade"],"id":"abc"}') == ControlReply("abc", ["btcusdt@trade"])
    assert parse_frame(b'{"error":{"code":2,"msg":"Invalid request: invalid stream"},"id":3}') == ControlError(
        3, 2, "Invalid request: invalid stream"
    )
    assert parse_frame(b'{"code":3,"msg":"Invalid JSON","id":null}') == ControlError(None, 3, "Invalid JSON")
    assert parse_frame(b'{"error":"oops","id":true}') == ControlError(None, None, "oops")


def test_server_shutdown_in_both_forms() -> None:
    assert parse_frame(b'{"e":"serverShutdown","E":1770123456789}') == ServerShutdown(1770123456789)
    combined = b'{"stream":"!serverShutdown","data":{"e":"serverShutdown","E":1770123456789}}'
    assert parse_frame(combined) == ServerShutdown(1770123456789)
    assert parse_frame(b'{"data":{"e":"serverShutdown"},"stream":"!serverShutdown"}') == ServerShutdown(None)


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        b"not json",
        b"\xff\xfe\x00",
        b"[1,2,3]",
        b'{"unexpected":true}',
        b'{"stream":"btcusdt@trade","data":}',
        b'{"stream":"btcusdt@trade","data":{"e":"trade",}',
        b'{"stream":"btcusdt@trade","data":"a string"}',
        b'{"stream":"","data":{}}',
        b'{"stream":"has space","data":{}}',
        b'{"stream":5,"data":{}}',
        b"null",
        b'"just a string"',
    ],
)
def test_malformed_frames(frame: bytes) -> None:
    assert isinstance(parse_frame(frame), Malformed)


def test_unvalidated_fast_path_trusts_the_layout() -> None:
    frame = b'{"stream":"btcusdt@trade","data":{"t":}}'
    assert isinstance(parse_frame(frame), Malformed)
    assert parse_frame(frame, validate_payload=False) == DataFrame("btcusdt@trade", b'{"t":}')


@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_raise(frame: bytes) -> None:
    result = parse_frame(frame)
    assert isinstance(result, DataFrame | ControlReply | ControlError | ServerShutdown | Malformed)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=12,
)


@given(
    st.dictionaries(
        st.sampled_from(["stream", "data", "result", "id", "error", "code", "msg", "e", "E"]),
        _json_values,
        max_size=5,
    )
)
def test_arbitrary_json_objects_never_raise(document: dict[str, object]) -> None:
    try:
        frame = orjson.dumps(document)
    except TypeError:  # integers wider than 64 bits
        return
    parse_frame(frame)
    parse_frame(frame, validate_payload=False)


@given(st.binary(max_size=200), st.sampled_from(["btcusdt@trade", "!serverShutdown", "x"]))
def test_arbitrary_payloads_in_a_valid_envelope_never_raise(payload: bytes, stream: str) -> None:
    frame = b'{"stream":"' + stream.encode() + b'","data":' + payload + b"}"
    result = parse_frame(frame)
    if isinstance(result, DataFrame) and result.stream == stream:
        orjson.loads(result.payload)  # whatever is published is valid JSON


# ---- planning ----


def test_control_request_encoding() -> None:
    request = ControlRequest("SUBSCRIBE", ("btcusdt@trade", "ethusdt@trade"), 4)
    assert orjson.loads(request.encode()) == {
        "method": "SUBSCRIBE",
        "params": ["btcusdt@trade", "ethusdt@trade"],
        "id": 4,
    }
    assert orjson.loads(ControlRequest("LIST_SUBSCRIPTIONS", (), 5).encode()) == {
        "method": "LIST_SUBSCRIPTIONS",
        "id": 5,
    }


def test_plan_subscriptions_splits_connections_and_messages() -> None:
    streams = [f"s{i:04d}usdt@trade" for i in range(2500)]
    plans = plan_subscriptions(streams, max_params_per_message=300)
    assert [len(plan.streams) for plan in plans] == [1024, 1024, 452]
    ids = [request.id for plan in plans for request in plan.requests]
    assert ids == list(range(1, len(ids) + 1))
    for plan in plans:
        assert all(request.method == "SUBSCRIBE" for request in plan.requests)
        assert [s for request in plan.requests for s in request.params] == list(plan.streams)
        assert all(len(request.params) <= 300 for request in plan.requests)
    assert plan_subscriptions([]) == []
    with pytest.raises(ValueError):
        plan_subscriptions(streams, max_params_per_message=0)


def test_assign_streams_keeps_existing_placements() -> None:
    groups = assign_streams(
        [{"a@trade", "b@trade"}, {"c@trade"}],
        ["b@trade", "c@trade", "d@trade", "e@trade"],
        max_streams_per_connection=2,
    )
    assert groups == [frozenset({"b@trade", "d@trade"}), frozenset({"c@trade", "e@trade"})]
    groups = assign_streams(groups, ["c@trade", "e@trade", "f@trade"], max_streams_per_connection=2)
    assert groups == [frozenset({"f@trade"}), frozenset({"c@trade", "e@trade"})]
    assert assign_streams(groups, [], max_streams_per_connection=2) == [frozenset(), frozenset()]


@given(
    st.lists(st.sets(st.integers(0, 60), max_size=12), max_size=5),
    st.sets(st.integers(0, 60), max_size=60),
    st.integers(1, 16),
)
def test_assign_streams_invariants(current_ids: list[set[int]], wanted_ids: set[int], cap: int) -> None:
    # Existing groups may overlap or exceed the cap (a lowered cap): the result must still be sound.
    current = [{f"s{i}@trade" for i in group} for group in current_ids]
    wanted = {f"s{i}@trade" for i in wanted_ids}
    groups = assign_streams(current, wanted, max_streams_per_connection=cap)
    assert len(groups) >= len(current)
    assert all(len(group) <= cap for group in groups)
    assert set().union(*groups) == wanted if groups else not wanted
    assert sum(len(group) for group in groups) == len(wanted)  # disjoint
    assert all(group for group in groups[len(current) :])  # no empty new connections
    # A new connection is opened only when the existing ones are full.
    if len(groups) > len(current):
        assert all(len(group) == cap for group in groups[: len(current)])
    if all(len(group) <= cap for group in current) and all(
        not (a & b) for i, a in enumerate(current) for b in current[i + 1 :]
    ):
        for before, after in zip(current, groups, strict=False):
            assert before & wanted <= after  # nothing wanted moved


@given(
    st.sets(st.integers(0, 400), max_size=300),
    st.sets(st.integers(0, 400), max_size=300),
    st.sets(st.integers(0, 400), max_size=20),
    st.integers(1, 50),
    st.integers(1, 10**6),
)
def test_plan_changes(
    subscribed_ids: set[int], desired_ids: set[int], isolated_ids: set[int], chunk: int, first_id: int
) -> None:
    subscribed = {f"s{i}@trade" for i in subscribed_ids}
    desired = {f"s{i}@trade" for i in desired_ids}
    isolated = {f"s{i}@trade" for i in isolated_ids}
    requests = plan_changes(subscribed, desired, first_id=first_id, max_params_per_message=chunk, isolated=isolated)
    assert [request.id for request in requests] == list(range(first_id, first_id + len(requests)))
    held = set(subscribed)
    peak = len(held)
    seen_subscribe = False
    for request in requests:
        assert 1 <= len(request.params) <= chunk
        if request.method == "UNSUBSCRIBE":
            assert not seen_subscribe  # unsubscribes first
            held -= set(request.params)
        else:
            seen_subscribe = True
            if set(request.params) & isolated:
                assert len(request.params) == 1
            held |= set(request.params)
        peak = max(peak, len(held))
    assert held == desired
    assert peak <= max(len(subscribed), len(desired))


def test_control_requests_default_chunk() -> None:
    requests = control_requests("SUBSCRIBE", [f"s{i}@trade" for i in range(450)], first_id=10)
    assert [len(r.params) for r in requests] == [MAX_PARAMS_PER_MESSAGE, MAX_PARAMS_PER_MESSAGE, 50]
    assert [r.id for r in requests] == [10, 11, 12]


# ---- pacing ----


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_pacer_spaces_messages() -> None:
    clock = FakeClock()
    pacer = ControlPacer(5.0, clock=clock)
    assert pacer.try_acquire()
    assert not pacer.try_acquire()
    assert pacer.next_allowed() == pytest.approx(1000.2)
    assert pacer.delay() == pytest.approx(0.2)
    clock.now = pacer.next_allowed()
    assert pacer.try_acquire()


def test_pacer_charges_pongs() -> None:
    clock = FakeClock()
    pacer = ControlPacer(4.0, clock=clock)
    pacer.charge()  # a pong spent the only token
    assert not pacer.try_acquire()
    pacer.charge()  # and another one overdraws the bucket
    assert pacer.delay() == pytest.approx(0.5)


def test_pacer_rejects_bad_settings() -> None:
    for rate in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError):
            ControlPacer(rate)
    with pytest.raises(ValueError):
        ControlPacer(5.0, burst=0.5)


@settings(max_examples=200)
@given(
    st.floats(0.5, 20.0),
    st.integers(1, 5),
    st.lists(st.tuples(st.floats(0.0, 0.5), st.booleans()), min_size=1, max_size=200),
)
def test_pacer_never_exceeds_its_rate(rate: float, burst: int, steps: list[tuple[float, bool]]) -> None:
    """Whatever the timing of attempts and pongs, a control message is only allowed when the window it
    closes holds at most burst + W * rate messages (pongs included): messages i..j, j a control message,
    span at least (count - burst) / rate seconds. Pongs cannot be held back, so windows ending in a pong
    are the pinger's business."""
    clock = FakeClock()
    pacer = ControlPacer(rate, burst=burst, clock=clock)
    sent: list[tuple[float, bool]] = []
    for advance, is_pong in steps:
        clock.now += advance
        if is_pong:
            pacer.charge()
            sent.append((clock.now, False))
        elif pacer.try_acquire():
            sent.append((clock.now, True))
        else:
            assert pacer.next_allowed() > clock.now
    eps = 1e-6
    for j, (end, is_control) in enumerate(sent):
        if not is_control:
            continue
        for i in range(j + 1):
            count = j - i + 1
            assert end - sent[i][0] >= (count - burst) / rate - eps


@given(st.floats(0.5, 20.0), st.lists(st.floats(0.0, 1.0), min_size=1, max_size=50))
def test_pacer_allows_at_next_allowed(rate: float, advances: list[float]) -> None:
    clock = FakeClock()
    pacer = ControlPacer(rate, clock=clock)
    for advance in advances:
        clock.now += advance
        if not pacer.try_acquire():
            clock.now = pacer.next_allowed()
            assert pacer.try_acquire()


# ---- the token bucket under the pacer (and the gateway's inbound limit) ----


def test_bucket_rejects_rates_and_bursts_that_are_not_numbers() -> None:
    for rate in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="rate"):
            TokenBucket(rate, 1.0, 0.0)
    for burst in (0.5, math.inf, math.nan):
        with pytest.raises(ValueError, match="burst"):
            TokenBucket(5.0, burst, 0.0)


def test_bucket_charge_overdraws_and_available_at_says_when() -> None:
    bucket = TokenBucket(2.0, 2.0, 100.0)
    assert bucket.allow(100.0) and bucket.available_at(100.0) == 100.0
    bucket.charge(100.0, 3.0)  # one token left, three charged: two in debt
    assert bucket.tokens == -2.0 and not bucket.allow(100.0)
    assert bucket.available_at(100.0) == pytest.approx(101.5)  # 3 tokens at 2/s
    assert bucket.delay_until_available(101.0) == pytest.approx(0.5)
    assert bucket.delay_until_available(102.0) == 0.0
    with pytest.raises(ValueError, match="never fits"):
        bucket.available_at(102.0, 3.0)


@given(
    st.floats(0.1, 50.0),
    st.floats(1.0, 5.0),
    st.floats(0.0, 1e9),
    st.lists(st.tuples(st.floats(0.0, 2.0), st.booleans()), min_size=1, max_size=50),
)
def test_bucket_allows_at_available_at_whatever_the_round_off(
    rate: float, burst: float, start: float, steps: list[tuple[float, bool]]
) -> None:
    """A caller that waits exactly until available_at is never refused (large clock values included)."""
    now = start
    bucket = TokenBucket(rate, burst, now)
    for advance, charge in steps:
        now += advance
        if charge:
            bucket.charge(now)
        elif not bucket.allow(now):
            at = bucket.available_at(now)
            assert at > now
            assert bucket.allow(at)
            now = at


# ---- Retry-After and the REST weight table ----


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        (None, None),
        ("7", 7.0),
        (" 2.5 ", 2.5),
        ("0", 0.0),
        ("-3", None),  # negative
        ("inf", None),
        ("-inf", None),
        ("Infinity", None),
        ("nan", None),
        ("NaN", None),
        ("1e400", None),  # overflows to inf
        ("1e12", MAX_RETRY_AFTER_S),  # huge: capped at Binance's longest ban (3 days)
        ("259201", MAX_RETRY_AFTER_S),
        ("soon", None),  # not a number (Binance sends seconds, never an HTTP date)
        ("Wed, 21 Oct 2015 07:28:00 GMT", None),
        ("", None),
        ("0x10", None),
    ],
)
def test_retry_after_is_parsed_once_for_every_caller(header: str | None, seconds: float | None) -> None:
    assert parse_retry_after(header) == seconds


@pytest.mark.parametrize(("header", "blocked_s"), [("0", 1.0), ("nan", DEFAULT_RETRY_AFTER_S), ("1e12", 259_200.0)])
def test_a_429_blocks_at_least_a_second_and_at_most_the_longest_ban(header: str, blocked_s: float) -> None:
    budget = RestWeightBudget(6000, clock=lambda: 600.0)
    budget.observe(429, None, parse_retry_after(header))
    assert budget.blocked_s() == pytest.approx(blocked_s)


def test_depth_weight_follows_binances_table() -> None:
    assert [depth_weight(limit) for limit in (1, 100, 101, 500, 501, 1000, 1001, 5000)] == [
        5,
        5,
        25,
        25,
        50,
        50,
        250,
        250,
    ]
