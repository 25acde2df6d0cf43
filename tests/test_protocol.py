"""Example-based tests of gateway.ws.control: URL forms, every control method, every documented error reply."""

from __future__ import annotations

import time

import orjson
import pytest

from gateway.ws.control import (
    ControlOutcome,
    ControlState,
    error_frame,
    parse_connect_path,
    result_frame,
)
from shared.errors import ProtocolError
from shared.streams import Stream, parse_stream

UNKNOWN_VARIANT_TAIL = (
    "expected one of `SUBSCRIBE`, `UNSUBSCRIBE`, `LIST_SUBSCRIPTIONS`, `SET_PROPERTY`, `GET_PROPERTY`, `REFRESH_TOKEN`"
)
BAD_ID = b'{"error":{"code":2,"msg":"Invalid request: request ID must be an unsigned integer"},"id":null}'


def names(streams: list[Stream]) -> list[str]:
    return [stream.name for stream in streams]


def request(method: str, params: object = None, request_id: object = 1) -> bytes:
    body: dict[str, object] = {"method": method, "id": request_id}
    if params is not None:
        body["params"] = params
    return orjson.dumps(body)


def error_of(outcome: ControlOutcome) -> tuple[int, str]:
    error = orjson.loads(outcome.reply)["error"]
    return error["code"], error["msg"]


def assert_rejected(outcome: ControlOutcome, code: int, msg: str, request_id: object = 1) -> None:
    assert outcome.reply == orjson.dumps({"error": {"code": code, "msg": msg}, "id": request_id})
    assert outcome.subscribe == []
    assert outcome.unsubscribe == []


@pytest.fixture
def state() -> ControlState:
    return ControlState(combined=False)


# ---- frames -------------------------------------------------------------------------------------


def test_frame_shapes_match_binance_bytes() -> None:
    assert result_frame(None, 1) == b'{"result":null,"id":1}'
    assert result_frame(["btcusdt@trade"], "a1") == b'{"result":["btcusdt@trade"],"id":"a1"}'
    assert error_frame(2, "Invalid request: too many parameters", None) == (
        b'{"error":{"code":2,"msg":"Invalid request: too many parameters"},"id":null}'
    )


def test_error_frame_escapes_lone_surrogates_instead_of_raising() -> None:
    frame = error_frame(2, "bad \ud800 name", 7)
    assert orjson.loads(frame) == {"error": {"code": 2, "msg": "bad \\ud800 name"}, "id": 7}


# ---- connect path -------------------------------------------------------------------------------


def test_bare_ws_is_raw_with_no_streams() -> None:
    for path in ("/ws", "/ws/"):
        connect = parse_connect_path(path, "")
        assert (connect.combined, connect.streams, connect.errors) == (False, [], [])


def test_ccxt_connection_labels_are_ignored() -> None:
    for path in ("/ws/0", "/ws/1", "/ws/17", "/ws/anything-at-all"):
        connect = parse_connect_path(path, "")
        assert (connect.combined, connect.streams, connect.errors) == (False, [], [])


def test_raw_stream_in_path() -> None:
    connect = parse_connect_path("/ws/btcusdt@trade", "")
    assert connect.combined is False
    assert connect.streams == [parse_stream("btcusdt@trade")]
    assert connect.errors == []


def test_several_streams_in_ws_path_are_normalised_and_deduplicated() -> None:
    connect = parse_connect_path("/ws/BTCUSDT@depth5@1000ms//btcusdt@depth5/0/!miniTicker@arr@1000ms", "")
    assert names(connect.streams) == ["btcusdt@depth5", "!miniTicker@arr"]
    assert connect.errors == []


def test_bare_stream_is_combined_with_no_streams() -> None:
    for path in ("/stream", "/stream/"):
        connect = parse_connect_path(path, "")
        assert (connect.combined, connect.streams, connect.errors) == (True, [], [])


def test_combined_streams_query() -> None:
    connect = parse_connect_path("/stream", "streams=btcusdt@trade/ETHUSDT@depth5@1000ms")
    assert connect.combined is True
    assert names(connect.streams) == ["btcusdt@trade", "ethusdt@depth5"]
    assert connect.errors == []


def test_combined_streams_query_ignores_empty_tokens_and_percent_encoding() -> None:
    connect = parse_connect_path("/stream", "streams=/btcusdt%40trade//ethusdt@aggTrade/")
    assert names(connect.streams) == ["btcusdt@trade", "ethusdt@aggTrade"]
    assert connect.errors == []


@pytest.mark.parametrize("unit", ["MICROSECOND", "microsecond", "MILLISECOND", "Millisecond"])
def test_time_unit_is_tolerated(unit: str) -> None:
    connect = parse_connect_path("/stream", f"streams=btcusdt@trade&timeUnit={unit}")
    assert names(connect.streams) == ["btcusdt@trade"]
    assert connect.errors == []
    assert parse_connect_path("/ws/btcusdt@trade", f"timeUnit={unit}").errors == []


def test_bad_time_unit_is_an_error_frame_not_a_refusal() -> None:
    connect = parse_connect_path("/ws/btcusdt@trade", "timeUnit=NANOSECOND")
    assert names(connect.streams) == ["btcusdt@trade"]
    assert connect.errors == [
        b'{"error":{"code":2,"msg":"Invalid request: invalid timeUnit \'NANOSECOND\': '
        b'expected MILLISECOND or MICROSECOND"},"id":null}'
    ]


def test_invalid_url_streams_become_error_frames_and_the_rest_applies() -> None:
    connect = parse_connect_path("/stream", "streams=btcusdt@trade/btcusdt@nope/!ticker@arr/ethusdt@trade")
    assert names(connect.streams) == ["btcusdt@trade", "ethusdt@trade"]
    assert [orjson.loads(frame) for frame in connect.errors] == [
        {
            "error": {"code": 2, "msg": "Invalid request: invalid stream 'btcusdt@nope': unknown stream kind 'nope'"},
            "id": None,
        },
        {
            "error": {
                "code": 2,
                "msg": "Invalid request: invalid stream '!ticker@arr': !ticker@arr was retired by "
                "Binance on 2026-03-26; use <symbol>@ticker or !miniTicker@arr",
            },
            "id": None,
        },
    ]


def test_invalid_stream_looking_tokens_in_ws_path_become_error_frames() -> None:
    connect = parse_connect_path("/ws/0/btcusdt@kline_7m/!bookTicker", "")
    assert connect.streams == []
    assert [error_of_frame(frame)[0] for frame in connect.errors] == [2, 2]


def test_bare_words_in_streams_query_are_errors_not_labels() -> None:
    connect = parse_connect_path("/stream", "streams=0")
    assert connect.streams == []
    assert len(connect.errors) == 1


def test_unknown_symbols_in_url_are_error_frames_when_a_symbol_check_is_given() -> None:
    connect = parse_connect_path(
        "/stream", "streams=btcusdt@trade/zzzzzz@trade", is_known_symbol=lambda symbol: symbol == "BTCUSDT"
    )
    assert names(connect.streams) == ["btcusdt@trade"]
    assert connect.errors == [
        b'{"error":{"code":2,"msg":"Invalid request: invalid stream \'zzzzzz@trade\': unknown symbol ZZZZZZ"},'
        b'"id":null}'
    ]


def test_too_many_url_streams_keeps_the_first_max_streams() -> None:
    query = "streams=" + "/".join(f"sym{i}usdt@trade" for i in range(10))
    connect = parse_connect_path("/stream", query, max_streams=3)
    assert names(connect.streams) == ["sym0usdt@trade", "sym1usdt@trade", "sym2usdt@trade"]
    assert connect.errors == [
        b'{"error":{"code":2,"msg":"Invalid request: too many streams (max 3 per connection)"},"id":null}'
    ]


def test_duplicates_do_not_count_towards_the_url_limit() -> None:
    connect = parse_connect_path("/stream", "streams=btcusdt@trade/BTCUSDT@trade/ethusdt@trade", max_streams=2)
    assert names(connect.streams) == ["btcusdt@trade", "ethusdt@trade"]
    assert connect.errors == []


def test_url_error_frames_are_capped() -> None:
    query = "streams=" + "/".join(f"bad{i}@nope" for i in range(1000))
    connect = parse_connect_path("/stream", query)
    assert len(connect.errors) == 17
    assert error_of_frame(connect.errors[-1]) == (
        2,
        "Invalid request: 984 more invalid streams in the URL were not reported",
    )


@pytest.mark.parametrize(
    "path", ["/", "/wss", "/ws2/btcusdt@trade", "/streams", "/stream/btcusdt@trade", "/api/v3/ping", ""]
)
def test_non_stream_paths_raise_404(path: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        parse_connect_path(path, "")
    assert caught.value.code == 404


def error_of_frame(frame: bytes) -> tuple[int, str]:
    error = orjson.loads(frame)["error"]
    return error["code"], error["msg"]


# ---- initial subscriptions and combined defaults -----------------------------------------------


def test_combined_flag_defaults_follow_the_endpoint() -> None:
    for path, expected in (("/ws", False), ("/ws/0", False), ("/stream", True), ("/stream/", True)):
        connect = parse_connect_path(path, "")
        state = ControlState(combined=connect.combined)
        assert state.handle_text(request("GET_PROPERTY", ["combined"], 2)).reply == orjson.dumps(
            {"result": expected, "id": 2}
        )


def test_add_initial_deduplicates_and_respects_the_limit() -> None:
    state = ControlState(combined=True, max_streams=2)
    streams = [parse_stream(name) for name in ("btcusdt@trade", "BTCUSDT@trade", "ethusdt@trade", "x1@trade")]
    assert names(state.add_initial(streams)) == ["btcusdt@trade", "ethusdt@trade"]
    assert list(state.subscriptions) == ["btcusdt@trade", "ethusdt@trade"]
    assert state.add_initial(streams) == []


def test_unicorn_resubscribing_the_url_streams_is_idempotent() -> None:
    connect = parse_connect_path("/stream", "streams=btcusdt@trade")
    state = ControlState(combined=connect.combined)
    state.add_initial(connect.streams)
    outcome = state.handle_text(request("SUBSCRIBE", ["btcusdt@trade", "ethusdt@trade"], 1))
    assert outcome.reply == b'{"result":null,"id":1}'
    assert names(outcome.subscribe) == ["ethusdt@trade"]
    assert list(state.subscriptions) == ["btcusdt@trade", "ethusdt@trade"]


# ---- the five methods (binance-protocol.md §1.3 table, exact bytes) ----------------------------


def test_documented_request_response_pairs(state: ControlState) -> None:
    pairs = [
        (b'{"method":"SUBSCRIBE","params":["btcusdt@aggTrade","btcusdt@depth"],"id":1}', b'{"result":null,"id":1}'),
        (b'{"method":"UNSUBSCRIBE","params":["btcusdt@depth"],"id":312}', b'{"result":null,"id":312}'),
        (b'{"method":"LIST_SUBSCRIPTIONS","id":3}', b'{"result":["btcusdt@aggTrade"],"id":3}'),
        (b'{"method":"SET_PROPERTY","params":["combined",true],"id":5}', b'{"result":null,"id":5}'),
        (b'{"method":"GET_PROPERTY","params":["combined"],"id":2}', b'{"result":true,"id":2}'),
    ]
    for sent, expected in pairs:
        assert state.handle_text(sent).reply == expected


def test_subscribe_reports_new_streams_only_and_is_idempotent(state: ControlState) -> None:
    first = state.handle_text(request("SUBSCRIBE", ["btcusdt@trade", "BTCUSDT@trade", "ethusdt@depth@1000ms"]))
    assert names(first.subscribe) == ["btcusdt@trade", "ethusdt@depth"]
    again = state.handle_text(request("SUBSCRIBE", ["btcusdt@trade"], 2))
    assert again.reply == b'{"result":null,"id":2}'
    assert again.subscribe == []
    assert list(state.subscriptions) == ["btcusdt@trade", "ethusdt@depth"]


def test_text_may_be_str_or_bytes(state: ControlState) -> None:
    outcome = state.handle_text('{"method":"SUBSCRIBE","params":["btcusdt@trade"],"id":1}')
    assert outcome.reply == b'{"result":null,"id":1}'
    assert names(outcome.subscribe) == ["btcusdt@trade"]


def test_empty_subscribe_is_a_successful_no_op(state: ControlState) -> None:
    outcome = state.handle_text(request("SUBSCRIBE", [], 9))
    assert (outcome.reply, outcome.subscribe, outcome.unsubscribe) == (b'{"result":null,"id":9}', [], [])


def test_unsubscribe_reports_removed_canonical_names(state: ControlState) -> None:
    state.handle_text(request("SUBSCRIBE", ["btcusdt@trade", "ethusdt@depth5@100ms"]))
    outcome = state.handle_text(
        request("UNSUBSCRIBE", ["ETHUSDT@depth5@100ms", "ethusdt@depth5@100ms", "bnbusdt@trade"], 4)
    )
    assert outcome.reply == b'{"result":null,"id":4}'
    assert outcome.unsubscribe == ["ethusdt@depth5@100ms"]
    assert list(state.subscriptions) == ["btcusdt@trade"]


def test_unsubscribe_skips_the_symbol_check() -> None:
    known = {"BTCUSDT"}
    state = ControlState(combined=False, is_known_symbol=lambda symbol: symbol in known)
    state.handle_text(request("SUBSCRIBE", ["btcusdt@trade"]))
    known.clear()  # delisted while subscribed
    assert state.handle_text(request("UNSUBSCRIBE", ["btcusdt@trade"])).unsubscribe == ["btcusdt@trade"]


def test_list_subscriptions_is_in_subscription_order(state: ControlState) -> None:
    state.handle_text(request("SUBSCRIBE", ["ethusdt@trade", "!miniTicker@arr@1000ms", "btcusdt@kline_1m"]))
    assert state.handle_text(request("LIST_SUBSCRIPTIONS", None, 3)).reply == (
        b'{"result":["ethusdt@trade","!miniTicker@arr","btcusdt@kline_1m"],"id":3}'
    )
    for params in (b"[]", b"null"):
        reply = state.handle_text(b'{"method":"LIST_SUBSCRIPTIONS","params":' + params + b',"id":3}').reply
        assert orjson.loads(reply)["result"] == ["ethusdt@trade", "!miniTicker@arr", "btcusdt@kline_1m"]


def test_set_property_toggles_combined(state: ControlState) -> None:
    assert state.handle_text(request("SET_PROPERTY", ["combined", True], 5)).reply == b'{"result":null,"id":5}'
    assert state.combined is True
    assert state.handle_text(request("GET_PROPERTY", ["combined"], 6)).reply == b'{"result":true,"id":6}'
    state.handle_text(request("SET_PROPERTY", ["combined", False], 7))
    assert state.combined is False
    assert state.handle_text(request("GET_PROPERTY", ["combined"], 8)).reply == b'{"result":false,"id":8}'


# ---- snapshot (ours): the last value of each new state-stream subscription first ---------------------


def test_snapshot_is_off_by_default_so_subscribing_is_binances(state: ControlState) -> None:
    assert state.handle_text(request("GET_PROPERTY", ["snapshot"], 1)).reply == b'{"result":false,"id":1}'
    outcome = state.handle_text(request("SUBSCRIBE", ["btcusdt@ticker", "btcusdt@bookTicker"], 2))
    assert names(outcome.subscribe) == ["btcusdt@ticker", "btcusdt@bookTicker"]
    assert outcome.snapshot == ()
    assert parse_connect_path("/stream", "streams=btcusdt@ticker").snapshot is False


def test_set_property_snapshot_names_the_new_state_streams_only(state: ControlState) -> None:
    assert state.handle_text(request("SET_PROPERTY", ["snapshot", True], 1)).reply == b'{"result":null,"id":1}'
    assert state.handle_text(request("GET_PROPERTY", ["snapshot"], 2)).reply == b'{"result":true,"id":2}'
    assert state.combined is False  # the two properties are independent
    event_streams = ["btcusdt@trade", "btcusdt@aggTrade", "btcusdt@depth", "btcusdt@depth@100ms", "!miniTicker@arr"]
    state_streams = [
        "btcusdt@ticker",
        "btcusdt@miniTicker",
        "btcusdt@bookTicker",
        "btcusdt@depth5",
        "btcusdt@depth20@100ms",
        "btcusdt@kline_1m",
        "btcusdt@avgPrice",
    ]
    outcome = state.handle_text(request("SUBSCRIBE", [*event_streams, *state_streams], 3))
    assert outcome.reply == b'{"result":null,"id":3}'
    assert outcome.snapshot == tuple(state_streams)  # in subscription order; never an event stream
    # Only new subscriptions: subscribing again sends nothing first.
    again = state.handle_text(request("SUBSCRIBE", ["btcusdt@ticker", "ethusdt@ticker"], 4))
    assert again.snapshot == ("ethusdt@ticker",)
    # A rejected request subscribes nothing and so snapshots nothing.
    assert state.handle_text(request("SUBSCRIBE", ["ethusdt@bookTicker", "nope"], 5)).snapshot == ()
    state.handle_text(request("SET_PROPERTY", ["snapshot", False], 6))
    assert state.handle_text(request("SUBSCRIBE", ["ethusdt@bookTicker"], 7)).snapshot == ()
    assert state.snapshot_of([parse_stream("solusdt@ticker")]) == ()


@pytest.mark.parametrize("value", ["true", 1, None, [True]])
def test_snapshot_value_must_be_boolean(state: ControlState, value: object) -> None:
    assert state.handle_text(request("SET_PROPERTY", ["snapshot", value], 5)).reply == (
        b'{"error":{"code":1,"msg":"Invalid value type: expected Boolean"},"id":5}'
    )
    assert state.snapshot is False


@pytest.mark.parametrize(("query", "expected"), [("snapshot=true", True), ("snapshot=TRUE", True), ("", False)])
def test_snapshot_in_the_url(query: str, expected: bool) -> None:
    for path in ("/stream", "/ws/btcusdt@ticker"):
        connect = parse_connect_path(path, f"streams=btcusdt@ticker&{query}" if path == "/stream" else query)
        assert (connect.snapshot, connect.errors, names(connect.streams)) == (expected, [], ["btcusdt@ticker"])
    assert parse_connect_path("/ws", "snapshot=true&snapshot=false").snapshot is False  # the last one counts


def test_bad_snapshot_in_the_url_is_an_error_frame_and_leaves_it_off() -> None:
    connect = parse_connect_path("/stream", "streams=btcusdt@ticker&snapshot=yes")
    assert connect.snapshot is False
    assert names(connect.streams) == ["btcusdt@ticker"]
    assert connect.errors == [
        b'{"error":{"code":2,"msg":"Invalid request: invalid snapshot \'yes\': expected true or false"},"id":null}'
    ]


def test_url_streams_take_the_snapshot_property_of_the_url() -> None:
    connect = parse_connect_path("/stream", "streams=btcusdt@trade/btcusdt@ticker&snapshot=true")
    state = ControlState(combined=True)
    state.snapshot = connect.snapshot  # as the session does at start
    assert state.snapshot_of(state.add_initial(connect.streams)) == ("btcusdt@ticker",)


# ---- REFRESH_TOKEN (ours): the outcome carries the token for the session to verify ------------------


def test_refresh_token_hands_the_token_over_with_the_success_reply(state: ControlState) -> None:
    state.handle_text(request("SUBSCRIBE", ["btcusdt@trade"]))
    outcome = state.handle_text(request("REFRESH_TOKEN", ["eyJhbGciOi.x.y"], request_id=7))
    assert outcome.refresh_token == "eyJhbGciOi.x.y" and outcome.request_id == 7
    assert outcome.reply == b'{"result":null,"id":7}'
    assert outcome.subscribe == [] and outcome.unsubscribe == []
    assert list(state.subscriptions) == ["btcusdt@trade"]  # nothing else changes


@pytest.mark.parametrize(
    ("params", "msg"),
    [
        (None, "Invalid request: missing field `params`"),
        ("tok", "Invalid request: params must be an array holding one token"),
        ([], "Invalid request: params must be an array holding one token"),
        (["a", "b"], "Invalid request: params must be an array holding one token"),
        ([""], "Invalid request: the token must be a non-empty string"),
        ([1], "Invalid request: the token must be a non-empty string"),
        ([None], "Invalid request: the token must be a non-empty string"),
    ],
)
def test_refresh_token_params_are_one_non_empty_string(state: ControlState, params: object, msg: str) -> None:
    outcome = state.handle_text(request("REFRESH_TOKEN", params))
    assert_rejected(outcome, 2, msg)
    assert outcome.refresh_token is None


def test_refresh_token_with_a_bad_id_never_reaches_the_session(state: ControlState) -> None:
    outcome = state.handle_text(b'{"method":"REFRESH_TOKEN","params":["t"],"id":"not-valid"}')
    assert outcome.reply == BAD_ID and outcome.refresh_token is None


def test_other_methods_carry_no_token(state: ControlState) -> None:
    for frame in (request("SUBSCRIBE", ["btcusdt@trade"]), request("LIST_SUBSCRIPTIONS"), b"nonsense"):
        assert state.handle_text(frame).refresh_token is None


# ---- request ids --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "request_id", [0, 1, 1_700_000_000_000, -1, 2**63 - 1, -(2**63), "abc", "A1b2", "x" * 36, None]
)
def test_valid_ids_are_echoed_exactly(state: ControlState, request_id: object) -> None:
    reply = state.handle_text(request("LIST_SUBSCRIPTIONS", None, request_id)).reply
    assert reply == b'{"result":[],"id":' + orjson.dumps(request_id) + b"}"


def test_null_id_is_valid() -> None:
    state = ControlState(combined=False)
    assert state.handle_text(b'{"method":"SUBSCRIBE","params":["btcusdt@trade"],"id":null}').reply == (
        b'{"result":null,"id":null}'
    )
    assert list(state.subscriptions) == ["btcusdt@trade"]


@pytest.mark.parametrize(
    "id_json",
    [
        b"true",
        b"false",
        b"1.5",
        b"1.0",
        b"9223372036854775808",
        b"-9223372036854775809",
        b"18446744073709551616",
        b'""',
        b'"' + b"x" * 37 + b'"',
        b'"has-dash"',
        b'"under_score"',
        b'"sp ace"',
        b'"\xc3\xa9t\xc3\xa9"',
        b"[1]",
        b'{"a":1}',
    ],
)
def test_invalid_ids_are_rejected_with_a_null_id(state: ControlState, id_json: bytes) -> None:
    outcome = state.handle_text(b'{"method":"SUBSCRIBE","params":["btcusdt@trade"],"id":' + id_json + b"}")
    assert outcome.reply == BAD_ID
    assert outcome.subscribe == []
    assert state.subscriptions == {}


def test_missing_id_is_rejected(state: ControlState) -> None:
    assert state.handle_text(b'{"method":"LIST_SUBSCRIPTIONS"}').reply == BAD_ID


# ---- documented error replies (binance-protocol.md §1.4) ---------------------------------------


def test_invalid_json_reports_line_and_column(state: ControlState) -> None:
    assert state.handle_text(b"{").reply == (
        b'{"error":{"code":3,"msg":"Invalid JSON: expected value at line 1 column 2"},"id":null}'
    )
    assert state.handle_text(b'{"method":"SUBSCRIBE",\n  "params": [x]}').reply == (
        b'{"error":{"code":3,"msg":"Invalid JSON: expected value at line 2 column 14"},"id":null}'
    )
    assert error_of(state.handle_text(b"")) == (3, "Invalid JSON: expected value at line 1 column 1")


def test_non_utf8_bytes_are_invalid_json_at_the_bad_byte(state: ControlState) -> None:
    assert error_of(state.handle_text(b'{"method":\n "\xff"}')) == (
        3,
        "Invalid JSON: expected value at line 2 column 3",
    )
    assert error_of(state.handle_text("{\ud800}")) == (3, "Invalid JSON: expected value at line 1 column 2")


@pytest.mark.parametrize("text", [b"[]", b"1", b'"SUBSCRIBE"', b"null", b"true", b'[{"method":"SUBSCRIBE"}]'])
def test_non_object_json_is_code_2(state: ControlState, text: bytes) -> None:
    assert_rejected(state.handle_text(text), 2, "Invalid request: expected a JSON object", None)


def test_missing_method(state: ControlState) -> None:
    assert state.handle_text(b'{"params":[],"id":1}').reply == (
        b'{"error":{"code":2,"msg":"Invalid request: missing field `method`"},"id":1}'
    )


def test_unknown_method(state: ControlState) -> None:
    assert state.handle_text(b'{"method":"subscribe","id":1}').reply == (
        b'{"error":{"code":2,"msg":"Invalid request: unknown variant `subscribe`, '
        + UNKNOWN_VARIANT_TAIL.encode()
        + b'"},"id":1}'
    )


def test_unknown_method_echo_is_truncated(state: ControlState) -> None:
    code, msg = error_of(state.handle_text(request("X" * 100_000)))
    assert code == 2
    assert msg == f"Invalid request: unknown variant `{'X' * 64}...`, {UNKNOWN_VARIANT_TAIL}"


def test_method_of_the_wrong_type(state: ControlState) -> None:
    assert error_of(state.handle_text(b'{"method":5,"id":1}')) == (
        2,
        f"Invalid request: method must be a string, {UNKNOWN_VARIANT_TAIL}",
    )


def test_unknown_property(state: ControlState) -> None:
    for method, params in (("SET_PROPERTY", ["compressed", True]), ("GET_PROPERTY", ["Combined"])):
        assert state.handle_text(request(method, params, 5)).reply == (
            b'{"error":{"code":0,"msg":"Unknown property"},"id":5}'
        )


@pytest.mark.parametrize("value", ["true", 1, 0, None, [True], {"a": True}])
def test_property_value_must_be_boolean(state: ControlState, value: object) -> None:
    assert state.handle_text(request("SET_PROPERTY", ["combined", value], 5)).reply == (
        b'{"error":{"code":1,"msg":"Invalid value type: expected Boolean"},"id":5}'
    )
    assert state.combined is False


def test_set_property_without_a_value_is_a_bad_value_type(state: ControlState) -> None:
    assert error_of(state.handle_text(request("SET_PROPERTY", ["combined"]))) == (
        1,
        "Invalid value type: expected Boolean",
    )


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("SET_PROPERTY", []),
        ("SET_PROPERTY", [1]),
        ("SET_PROPERTY", [None, True]),
        ("SET_PROPERTY", [["combined"]]),
        ("GET_PROPERTY", []),
        ("GET_PROPERTY", [1]),
        ("GET_PROPERTY", [None]),
        ("GET_PROPERTY", [["combined"]]),
    ],
)
def test_property_name_must_be_a_string(state: ControlState, method: str, params: list[object]) -> None:
    assert state.handle_text(request(method, params, 7)).reply == (
        b'{"error":{"code":2,"msg":"Invalid request: property name must be a string"},"id":7}'
    )


def test_property_methods_without_params_are_missing_the_name(state: ControlState) -> None:
    for method in ("SET_PROPERTY", "GET_PROPERTY"):
        assert error_of(state.handle_text(request(method))) == (2, "Invalid request: property name must be a string")


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("SET_PROPERTY", ["combined", True, True]),
        ("GET_PROPERTY", ["combined", True]),
        ("LIST_SUBSCRIPTIONS", ["btcusdt@trade"]),
    ],
)
def test_too_many_parameters(state: ControlState, method: str, params: list[object]) -> None:
    assert state.handle_text(request(method, params, 8)).reply == (
        b'{"error":{"code":2,"msg":"Invalid request: too many parameters"},"id":8}'
    )
    assert state.combined is False


@pytest.mark.parametrize("method", ["SET_PROPERTY", "GET_PROPERTY", "LIST_SUBSCRIPTIONS"])
def test_property_params_must_be_an_array(state: ControlState, method: str) -> None:
    assert error_of(state.handle_text(request(method, "combined"))) == (2, "Invalid request: params must be an array")


# ---- SUBSCRIBE / UNSUBSCRIBE validation and atomicity -----------------------------------------


@pytest.mark.parametrize("method", ["SUBSCRIBE", "UNSUBSCRIBE"])
def test_stream_params_must_be_an_array(state: ControlState, method: str) -> None:
    assert error_of(state.handle_text(request(method, "btcusdt@trade"))) == (
        2,
        "Invalid request: params must be an array of stream names",
    )
    assert error_of(state.handle_text(request(method, {"a": 1}))) == (
        2,
        "Invalid request: params must be an array of stream names",
    )
    assert error_of(state.handle_text(request(method))) == (2, "Invalid request: missing field `params`")


@pytest.mark.parametrize(
    ("value", "kind"), [(1, "number"), (None, "null"), (True, "boolean"), ([["x"]], "array"), ({"a": 1}, "object")]
)
def test_stream_names_must_be_strings(state: ControlState, value: object, kind: str) -> None:
    outcome = state.handle_text(request("SUBSCRIBE", ["btcusdt@trade", value]))
    assert_rejected(outcome, 2, f"Invalid request: invalid stream: names must be strings, not {kind}")
    assert state.subscriptions == {}


def test_invalid_stream_uses_the_grammar_reason(state: ControlState) -> None:
    outcome = state.handle_text(request("SUBSCRIBE", ["btcusdt@trade", "btcusdt@kline_7m"], 11))
    assert_rejected(
        outcome,
        2,
        "Invalid request: invalid stream 'btcusdt@kline_7m': kline interval must be one of "
        "1s 1m 3m 5m 15m 30m 1h 2h 4h 6h 8h 12h 1d 3d 1w 1M",
        11,
    )
    assert state.subscriptions == {}


def test_grammar_value_errors_are_rejections_not_crashes(state: ControlState) -> None:
    # "depth" + a non-ASCII digit once crashed the grammar (int() refuses what isdigit() accepts).
    outcome = state.handle_text(request("SUBSCRIBE", ["btcusdt@depth\u00b2"]))
    assert error_of(outcome) == (2, "Invalid request: invalid stream 'btcusdt@depth\u00b2': stream names are ASCII")


def test_unknown_symbol_rejects_the_whole_request() -> None:
    state = ControlState(combined=False, is_known_symbol=lambda symbol: symbol != "NOPEUSDT")
    outcome = state.handle_text(request("SUBSCRIBE", ["btcusdt@trade", "NOPEusdt@trade", "!miniTicker@arr"], 3))
    assert_rejected(outcome, 2, "Invalid request: invalid stream 'NOPEusdt@trade': unknown symbol NOPEUSDT", 3)
    assert state.subscriptions == {}


def test_all_market_streams_skip_the_symbol_check() -> None:
    state = ControlState(combined=False, is_known_symbol=lambda symbol: False)
    assert names(state.handle_text(request("SUBSCRIBE", ["!miniTicker@arr"])).subscribe) == ["!miniTicker@arr"]


def test_invalid_unsubscribe_removes_nothing(state: ControlState) -> None:
    state.handle_text(request("SUBSCRIBE", ["btcusdt@trade", "ethusdt@trade"]))
    outcome = state.handle_text(request("UNSUBSCRIBE", ["btcusdt@trade", "bad"], 2))
    assert error_of(outcome)[0] == 2
    assert outcome.unsubscribe == []
    assert list(state.subscriptions) == ["btcusdt@trade", "ethusdt@trade"]


def test_subscribe_over_the_limit_applies_nothing() -> None:
    state = ControlState(combined=False, max_streams=3)
    state.handle_text(request("SUBSCRIBE", ["a1@trade", "a2@trade"]))
    outcome = state.handle_text(request("SUBSCRIBE", ["a1@trade", "a3@trade", "a4@trade"], 4))
    assert_rejected(outcome, 2, "Invalid request: too many streams (max 3 per connection)", 4)
    assert list(state.subscriptions) == ["a1@trade", "a2@trade"]
    # Filling exactly to the limit, counting already-subscribed names as free, is fine.
    outcome = state.handle_text(request("SUBSCRIBE", ["a1@trade", "a2@trade", "a3@trade"], 5))
    assert names(outcome.subscribe) == ["a3@trade"]


def test_more_names_than_the_limit_are_rejected_before_parsing() -> None:
    state = ControlState(combined=False, max_streams=1024)
    params = [f"s{i}usdt@trade" for i in range(10_000)]
    started = time.perf_counter()
    outcome = state.handle_text(request("SUBSCRIBE", params, 1))
    assert time.perf_counter() - started < 0.5
    assert_rejected(outcome, 2, "Invalid request: too many streams (max 1024 per connection)")
    assert error_of(state.handle_text(request("UNSUBSCRIBE", params, 1)))[1].startswith(
        "Invalid request: too many streams"
    )


def test_huge_stream_name_fails_fast(state: ControlState) -> None:
    started = time.perf_counter()
    outcome = state.handle_text(request("SUBSCRIBE", ["b" * 1_000_000 + "@trade"], 1))
    assert time.perf_counter() - started < 0.5
    code, msg = error_of(outcome)
    assert code == 2
    assert len(msg) < 200


def test_full_limit_of_valid_streams_is_accepted_quickly() -> None:
    state = ControlState(combined=False)
    params = [f"s{i}usdt@trade" for i in range(1024)]
    started = time.perf_counter()
    outcome = state.handle_text(request("SUBSCRIBE", params, 1))
    assert time.perf_counter() - started < 0.5
    assert len(outcome.subscribe) == 1024
    assert len(state.subscriptions) == 1024


# ---- binary frames and junk ---------------------------------------------------------------------


def test_binary_frames_are_rejected_and_change_nothing(state: ControlState) -> None:
    state.handle_text(request("SUBSCRIBE", ["btcusdt@trade"]))
    outcome = state.handle_binary(b'{"method":"UNSUBSCRIBE","params":["btcusdt@trade"],"id":1}')
    assert_rejected(
        outcome,
        2,
        "Invalid request: binary frames are not supported, send control messages as JSON text frames",
        None,
    )
    assert list(state.subscriptions) == ["btcusdt@trade"]
    assert state.combined is False


def test_extra_fields_are_ignored(state: ControlState) -> None:
    outcome = state.handle_text(b'{"method":"SUBSCRIBE","params":["btcusdt@trade"],"id":1,"extra":{"x":[1]}}')
    assert outcome.reply == b'{"result":null,"id":1}'


def test_deeply_nested_json_is_invalid_json(state: ControlState) -> None:
    assert error_of(state.handle_text(b"[" * 100_000))[0] == 3
    nested = b'{"method":"SUBSCRIBE","params":[' + b"[" * 1000 + b"]" * 1000 + b'],"id":1}'
    assert error_of(state.handle_text(nested)) == (
        2,
        "Invalid request: invalid stream: names must be strings, not array",
    )
