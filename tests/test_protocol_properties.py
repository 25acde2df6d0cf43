"""Property tests of gateway.ws.control: no input crashes a session, and subscriptions follow a simple model."""

from __future__ import annotations

import json
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings, strategies as st

from gateway.ws.control import METHODS, ControlOutcome, ControlState, parse_connect_path
from shared.errors import ProtocolError

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
INT64 = 2**63

# Valid spellings -> canonical name, written out by hand so the model does not reuse the parser under test.
VALID_NAMES: dict[str, str] = {
    "btcusdt@trade": "btcusdt@trade",
    "BTCUSDT@trade": "btcusdt@trade",
    "btcusdt@aggTrade": "btcusdt@aggTrade",
    "ethusdt@depth": "ethusdt@depth",
    "ethusdt@depth@1000ms": "ethusdt@depth",
    "ethusdt@depth@100ms": "ethusdt@depth@100ms",
    "EthUsdt@depth5@1000ms": "ethusdt@depth5",
    "bnbusdt@kline_1m": "bnbusdt@kline_1m",
    "bnbusdt@kline_1M": "bnbusdt@kline_1M",
    "!miniTicker@arr": "!miniTicker@arr",
    "!miniTicker@arr@1000ms": "!miniTicker@arr",
    "solusdt@bookTicker": "solusdt@bookTicker",
}
INVALID_NAMES = ["btcusdt@nope", "!ticker@arr", "x@trade", "btcusdt@depth7", "btcusdt@kline_7m", "", "0"]

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.sampled_from([INT64 - 1, INT64, -INT64, -INT64 - 1, 2**64 - 1, 2**64])
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=15,
)
stream_like = (
    st.sampled_from([*VALID_NAMES, *INVALID_NAMES])
    | st.text(alphabet="abcdefusdtABC0123456789@!_²٥é", max_size=30)
    | st.builds(lambda n: "b" * n + "@trade", st.integers(min_value=0, max_value=5000))
)
request_ids = st.one_of(
    st.integers(min_value=-(2**64), max_value=2**64),
    st.sampled_from([None, True, False, 0, 1.0, -1.5, INT64 - 1, INT64, -INT64, -INT64 - 1, 2**64 - 1]),
    st.sampled_from(["", "abc", "A1", "x" * 36, "x" * 37, "a-b", "a_b", "é", "١٢"]),
    st.text(alphabet="abcXYZ019-_ é", max_size=40),
    json_values,
)
methods = st.sampled_from(METHODS) | st.sampled_from(["subscribe", "", "PING"]) | json_values
stream_params = st.lists(stream_like | json_values, max_size=8) | json_values
property_params = st.lists(st.sampled_from(["combined", "Combined", True, False, None, 1, "true"]), max_size=4)
request_objects = st.fixed_dictionaries(
    {},
    optional={
        "method": methods,
        "params": stream_params | property_params,
        "id": request_ids,
        "extra": json_values,
    },
) | st.fixed_dictionaries(
    {"method": st.sampled_from(METHODS), "id": request_ids},
    optional={"params": stream_params | property_params},
)


@st.composite
def request_texts(draw: st.DrawFn) -> str | bytes:
    """Mostly well-formed request objects, encoded in several ways, some corrupted."""
    body = draw(request_objects | json_values)
    text = json.dumps(body, ensure_ascii=draw(st.booleans()))  # stdlib: encodes ints of any size
    corruption = draw(st.sampled_from(["none"] * 7 + ["insert", "truncate", "bytes"]))
    if corruption == "insert":
        at = draw(st.integers(min_value=0, max_value=len(text)))
        text = text[:at] + draw(st.text(min_size=1, max_size=3)) + text[at:]
    elif corruption == "truncate":
        text = text[: draw(st.integers(min_value=0, max_value=len(text)))]
    elif corruption == "bytes":
        return text.encode("utf-8", "surrogatepass") + draw(st.binary(max_size=4))
    return text


any_frame = (
    request_texts()  # listed three times: one_of picks branches about evenly, and these reach the most code
    | request_texts()
    | request_texts()
    | st.text()
    | st.binary()
    | st.builds(lambda n: b"[" * n, st.integers(min_value=0, max_value=3000))
    | st.builds(
        lambda n: b'{"id":1,"method":"SUBSCRIBE","params":' + b"[" * n + b"]" * n + b"}",
        st.integers(min_value=0, max_value=1100),
    )
)


def _id_is_valid(request: dict[str, Any]) -> bool:
    if "id" not in request:
        return False
    value = request["id"]
    if value is None:
        return True
    if type(value) is int:
        return -INT64 <= value < INT64
    return type(value) is str and 1 <= len(value) <= 36 and value.isascii() and value.isalnum()


def _expected_reply_id(frame: str | bytes) -> tuple[bool, object]:
    """(whether the request was an object with a valid id, that id), judged from what orjson parses."""
    try:
        request = orjson.loads(frame)
    except orjson.JSONDecodeError:
        return False, None
    if isinstance(request, dict) and _id_is_valid(request):
        return True, request["id"]
    return False, None


def _check_reply(outcome: ControlOutcome) -> dict[str, Any]:
    reply = orjson.loads(outcome.reply)
    assert isinstance(reply, dict)
    assert set(reply) in ({"result", "id"}, {"error", "id"})
    if "error" in reply:
        assert set(reply["error"]) == {"code", "msg"}
        assert reply["error"]["code"] in (0, 1, 2, 3)
        assert isinstance(reply["error"]["msg"], str)
        assert len(outcome.reply) < 1000  # user text in messages is bounded
        assert outcome.subscribe == [] and outcome.unsubscribe == []
    if outcome.refresh_token is not None:  # only a well-formed REFRESH_TOKEN hands a token to the session
        assert reply == {"result": None, "id": outcome.request_id}
        assert outcome.subscribe == [] and outcome.unsubscribe == []
    return reply


@SETTINGS
@given(frames=st.lists(any_frame, min_size=1, max_size=4), combined=st.booleans())
def test_handle_text_never_raises_and_always_replies_once(frames: list[str | bytes], combined: bool) -> None:
    state = ControlState(combined=combined, max_streams=4, is_known_symbol=lambda s: s != "ABCUSDT")
    for frame in frames:
        outcome = state.handle_text(frame)
        reply = _check_reply(outcome)
        id_valid, expected_id = _expected_reply_id(frame)
        assert reply["id"] == (expected_id if id_valid else None)
        if id_valid:
            assert type(reply["id"]) is type(expected_id)  # an int id never comes back as a float or bool
        assert len(state.subscriptions) <= 4
        assert isinstance(state.combined, bool)


@SETTINGS
@given(data=st.binary() | st.text().map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_handle_binary_never_raises_and_changes_nothing(data: bytes) -> None:
    state = ControlState(combined=True)
    state.handle_text(b'{"method":"SUBSCRIBE","params":["btcusdt@trade"],"id":1}')
    reply = _check_reply(state.handle_binary(data))
    assert reply["error"]["code"] == 2 and reply["id"] is None
    assert list(state.subscriptions) == ["btcusdt@trade"]
    assert state.combined is True


@SETTINGS
@given(
    batches=st.lists(st.lists(stream_like | st.sampled_from(list(VALID_NAMES)), max_size=8), max_size=6),
    max_streams=st.integers(min_value=0, max_value=5),
)
def test_subscriptions_never_exceed_max_streams(batches: list[list[str]], max_streams: int) -> None:
    state = ControlState(combined=False, max_streams=max_streams)
    for batch in batches:
        outcome = state.handle_text(orjson.dumps({"method": "SUBSCRIBE", "params": batch, "id": 1}))
        _check_reply(outcome)
        assert len(state.subscriptions) <= max_streams


operations = st.tuples(
    st.sampled_from(["SUBSCRIBE", "UNSUBSCRIBE", "LIST_SUBSCRIPTIONS"]),
    st.lists(st.sampled_from([*VALID_NAMES, *INVALID_NAMES[:2]]), max_size=7),
)


@SETTINGS
@given(ops=st.lists(operations, max_size=25), max_streams=st.integers(min_value=1, max_value=6))
def test_subscriptions_follow_an_ordered_set_model(ops: list[tuple[str, list[str]]], max_streams: int) -> None:
    state = ControlState(combined=False, max_streams=max_streams)
    model: dict[str, None] = {}  # insertion-ordered set of canonical names
    for request_id, (method, raw_names) in enumerate(ops):
        outcome = state.handle_text(orjson.dumps({"method": method, "params": raw_names, "id": request_id}))
        reply = _check_reply(outcome)
        assert reply["id"] == request_id
        if method == "LIST_SUBSCRIPTIONS":
            if raw_names:
                assert "error" in reply  # LIST_SUBSCRIPTIONS takes no parameters
            else:
                assert reply["result"] == list(model)
            continue
        canonical = list(dict.fromkeys(VALID_NAMES.get(name, "") for name in raw_names))
        rejected = "" in canonical or len(raw_names) > max_streams
        if method == "SUBSCRIBE":
            added = [name for name in canonical if name not in model]
            rejected = rejected or len(model) + len(added) > max_streams
            if not rejected:
                model.update(dict.fromkeys(added))
                assert [stream.name for stream in outcome.subscribe] == added
        else:
            removed = [name for name in canonical if name in model]
            if not rejected:
                for name in removed:
                    del model[name]
                assert outcome.unsubscribe == removed
        assert ("error" in reply) == rejected
        assert list(state.subscriptions) == list(model)


path_tails = st.text(alphabet="abcusdt0123456789@!/_-%é ²", max_size=60) | st.text(max_size=60)
ws_paths = st.just("/ws") | path_tails.map(lambda tail: "/ws/" + tail)
stream_paths = st.sampled_from(["/stream", "/stream/"])
query_strings = (
    st.text(max_size=100)
    | st.lists(stream_like, max_size=12).map(lambda names: "streams=" + "/".join(names))
    | st.tuples(st.lists(stream_like, max_size=6), st.text(max_size=12)).map(
        lambda parts: "streams=" + "/".join(parts[0]) + "&timeUnit=" + parts[1]
    )
)


@SETTINGS
@given(path=ws_paths | stream_paths, query=query_strings, max_streams=st.integers(min_value=0, max_value=4))
def test_parse_connect_path_never_raises_for_stream_endpoints(path: str, query: str, max_streams: int) -> None:
    connect = parse_connect_path(path, query, max_streams=max_streams)
    assert connect.combined == path.startswith("/stream")
    assert len(connect.streams) <= max_streams
    stream_names = [stream.name for stream in connect.streams]
    assert len(stream_names) == len(set(stream_names))
    assert len(connect.errors) <= 18 + query.count("timeUnit")
    for frame in connect.errors:
        reply = orjson.loads(frame)
        assert reply["id"] is None and reply["error"]["code"] == 2


@SETTINGS
@given(path=st.text(max_size=40), query=st.text(max_size=40))
def test_parse_connect_path_raises_only_protocol_error_404(path: str, query: str) -> None:
    try:
        parse_connect_path(path, query)
    except ProtocolError as error:
        assert error.code == 404
        assert not (path == "/ws" or path.startswith("/ws/") or path in ("/stream", "/stream/"))


@SETTINGS
@given(params=json_values, request_id=st.integers(min_value=-(2**63), max_value=2**63 - 1))
def test_refresh_token_hands_over_exactly_one_non_empty_string(params: Any, request_id: int) -> None:
    state = ControlState(combined=False)
    state.handle_text(b'{"method":"SUBSCRIBE","params":["btcusdt@trade"],"id":1}')
    outcome = state.handle_text(json.dumps({"method": "REFRESH_TOKEN", "params": params, "id": request_id}))
    _check_reply(outcome)
    well_formed = isinstance(params, list) and len(params) == 1 and isinstance(params[0], str) and params[0] != ""
    assert outcome.refresh_token == (params[0] if well_formed else None)
    assert list(state.subscriptions) == ["btcusdt@trade"]  # a refresh never changes subscriptions
