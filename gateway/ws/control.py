"""Binance market-stream control protocol, sans I/O: URL paths and JSON control frames in, objects out.

This module knows nothing about sockets or asyncio. The WebSocket session calls:

* :func:`parse_connect_path` once, with the request path and query string, to learn whether the connection
  is raw (``/ws``) or combined (``/stream``), which streams the URL names, and which error frames to send
  right after accepting (for bad names in the URL; Binance-style clients expect the connection to stay up).
* :meth:`ControlState.handle_text` / :meth:`ControlState.handle_binary` for every inbound data frame. Each
  call returns exactly one reply frame plus the subscription diff the session must apply to the hub.
  **Nothing raises out of these two methods for any input**: a client cannot crash its session with a
  frame (tests/test_protocol_properties.py proves it with hypothesis).

Wire shapes follow binance-protocol.md §1.3-1.4: ``{"result":null,"id":1}`` for success and
``{"error":{"code":2,"msg":"..."},"id":1}`` for errors, with Binance's codes (0 unknown property, 1 bad value
type, 2 invalid request, 3 invalid JSON) and message texts.

Decisions where Binance's documentation is silent (see also the module constants):

* Binary frames are not control messages: reply code 2 (the request is invalid whatever its bytes are;
  code 3 would claim a JSON syntax error that may not exist) and change nothing.
* ``SUBSCRIBE`` / ``UNSUBSCRIBE`` with ``"params": []`` succeed as no-ops; a missing or non-array ``params``
  is code 2. ``LIST_SUBSCRIPTIONS`` accepts absent, ``null`` or ``[]`` params.
* A request naming more than ``max_streams`` entries is rejected before any name is parsed, even if the
  names would deduplicate below the limit: no connection can hold more, and it bounds the work per frame.
* Request ids follow the doc strictly: an int in the signed 64-bit range (bools are not ints), ``null``, or
  a string of 1-36 ASCII letters and digits (so UUIDs with ``-`` are rejected; see ``_STRING_ID_RE``). A
  missing ``id`` is an error (the doc's table says so). Errors found before the id is checked (missing or
  unknown ``method``) still echo a valid id; when the id itself is invalid the reply's id is ``null``.
* User-supplied text quoted in error messages is truncated to ``_MAX_ECHO`` characters.
* ``REFRESH_TOKEN`` (ours, not Binance's: ``{"method":"REFRESH_TOKEN","params":["<jwt>"],"id":1}``) takes exactly
  one non-empty string. Verifying it needs keys this module does not have, so the outcome carries the token
  (:attr:`ControlOutcome.refresh_token`) with the success reply; the session verifies it and answers an error
  instead when it is refused. The token is never quoted in a reply.
* ``snapshot`` (ours, not Binance's; off by default, so Binance clients see exactly Binance's behaviour): a boolean
  property (``SET_PROPERTY ["snapshot", true]``, ``GET_PROPERTY ["snapshot"]``, or ``snapshot=true`` in the
  URL's query) under which every later new subscription to a *state* stream first receives that stream's last
  value. This module only decides which streams those are (:attr:`ControlOutcome.snapshot`,
  :meth:`ControlState.snapshot_of`); the session finds the values and keeps them in order with live data.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Final
from urllib.parse import parse_qsl

import orjson

from shared.errors import ProtocolError
from shared.streams import INVALID_REQUEST, Stream, invalid_stream, parse_stream

RequestId = int | str | None

# Binance error codes (binance-protocol.md §1.4).
UNKNOWN_PROPERTY: Final = 0
INVALID_VALUE_TYPE: Final = 1
INVALID_JSON: Final = 3

DEFAULT_MAX_STREAMS: Final = 1024
NOT_FOUND: Final = 404  # ProtocolError code for "this path is not a stream endpoint"

METHODS: Final = ("SUBSCRIBE", "UNSUBSCRIBE", "LIST_SUBSCRIPTIONS", "SET_PROPERTY", "GET_PROPERTY", "REFRESH_TOKEN")
COMBINED_PROPERTY: Final = "combined"
SNAPSHOT_PROPERTY: Final = "snapshot"  # ours: the last value of each new state-stream subscription first
PROPERTIES: Final = (COMBINED_PROPERTY, SNAPSHOT_PROPERTY)
TIME_UNITS: Final = frozenset({"MILLISECOND", "MICROSECOND"})

_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1
_STRING_ID_RE: Final = re.compile(r"[A-Za-z0-9]{1,36}")
_MAX_ECHO: Final = 64
# A URL with thousands of bad names would otherwise make us queue thousands of frames before any data.
_MAX_URL_ERROR_FRAMES: Final = 16

_UNKNOWN_VARIANT_TAIL: Final = "expected one of " + ", ".join(f"`{m}`" for m in METHODS)
_MISSING: Final = object()  # distinguishes an absent key from an explicit null


# --------------------------------------------------------------------------------------------------
# Frames


def error_frame(code: int, msg: str, request_id: RequestId) -> bytes:
    """``{"error":{"code":N,"msg":"..."},"id":<id>}``, the envelope ccxt and other clients parse."""
    try:
        return orjson.dumps({"error": {"code": code, "msg": msg}, "id": request_id})
    except orjson.JSONEncodeError:
        # Only a message carrying lone surrogates (from a caller-built string) gets here; escape them
        # rather than fail to answer.
        safe = msg.encode("utf-8", "backslashreplace").decode("utf-8")
        return orjson.dumps({"error": {"code": code, "msg": safe}, "id": request_id})


def result_frame(result: object, request_id: RequestId) -> bytes:
    """``{"result":<result>,"id":<id>}``; ``result`` is ``None`` for a successful non-query request."""
    return orjson.dumps({"result": result, "id": request_id})


def _quote(text: str) -> str:
    """User text for an error message, bounded so a 1 MB method name cannot make a 1 MB reply."""
    return text if len(text) <= _MAX_ECHO else text[:_MAX_ECHO] + "..."


def _too_many_streams(max_streams: int) -> ProtocolError:
    return ProtocolError(INVALID_REQUEST, f"Invalid request: too many streams (max {max_streams} per connection)")


def _parse_stream_name(raw: str) -> Stream:
    """parse_stream, with every failure reported as ProtocolError.

    shared.streams.parse_stream can raise ValueError for some non-ASCII digits (``btcusdt@depth²``:
    ``str.isdigit`` accepts it, ``int`` does not); until that is fixed there, map it to a normal rejection.
    """
    try:
        return parse_stream(raw)
    except ValueError:
        raise invalid_stream(raw, "malformed stream name") from None


def _check_known_symbol(raw: str, stream: Stream, is_known_symbol: Callable[[str], bool] | None) -> None:
    if is_known_symbol is not None and stream.symbol is not None and not is_known_symbol(stream.symbol):
        raise invalid_stream(raw, f"unknown symbol {stream.symbol}")


# --------------------------------------------------------------------------------------------------
# Connect path


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    """What the URL of a new connection asks for."""

    combined: bool  # True for /stream..., False for /ws...
    streams: list[Stream]  # valid streams named in the URL, in order, deduplicated, at most max_streams
    errors: list[bytes]  # error frames to send right after accept, for URL stream names that are invalid
    snapshot: bool = False  # ``snapshot=true`` in the query: the ``snapshot`` property starts on


def parse_connect_path(
    path: str,
    query_string: str,
    *,
    max_streams: int = DEFAULT_MAX_STREAMS,
    is_known_symbol: Callable[[str], bool] | None = None,
) -> ConnectRequest:
    """Parse a connection URL. Raises ProtocolError(404, ...) only when ``path`` is not a stream endpoint.

    ``path`` is the already-percent-decoded path (ASGI ``scope["path"]``); ``query_string`` is the raw query
    (it is percent-decoded here). Accepted: ``/ws``, ``/ws/``, ``/ws/<t1>/<t2>...``, ``/stream``,
    ``/stream/`` with ``?streams=a/b/c``; both with an optional ``timeUnit`` and our ``snapshot=true|false``
    (any other value is an error frame and leaves it off). In ``/ws/...`` a token with no
    ``@`` that does not start with ``!`` is a connection label (ccxt's ``/ws/0``) and is ignored; in
    ``streams=`` every non-empty token is meant as a stream, so a bad one gets an error frame. Invalid
    stream names never refuse the connection (Binance-style clients would just reconnect in a loop); they
    produce error frames (code 2, id null) and the rest of the URL still applies. ``is_known_symbol``,
    when given, rejects well-formed streams of symbols the venue does not list, the same way.
    """
    combined, path_tail = _split_endpoint(path)
    # Most clients send no query; parse_qsl("") still took ~2 % of a handshake's CPU (py-spy of loadtests.handshakes).
    query = parse_qsl(query_string, keep_blank_values=True) if query_string else []
    errors = [error_frame(INVALID_REQUEST, msg, None) for msg in _time_unit_errors(query)]
    snapshot, snapshot_errors = _snapshot_query(query)
    errors += [error_frame(INVALID_REQUEST, msg, None) for msg in snapshot_errors]
    candidates: Iterable[str]
    if combined:
        candidates = _split_tokens(value for key, value in query if key == "streams")
    else:
        candidates = (token for token in _split_tokens([path_tail]) if _looks_like_stream(token))
    streams, stream_errors = _collect_url_streams(candidates, max_streams, is_known_symbol)
    return ConnectRequest(combined=combined, streams=streams, errors=errors + stream_errors, snapshot=snapshot)


def _split_endpoint(path: str) -> tuple[bool, str]:
    """(combined, the part of the path after the endpoint) or ProtocolError(404)."""
    if path == "/ws" or path.startswith("/ws/"):
        return False, path[len("/ws/") :]
    if path in ("/stream", "/stream/"):
        return True, ""
    raise ProtocolError(NOT_FOUND, f"not a stream endpoint: {_quote(path)!r}")


def _split_tokens(values: Iterable[str]) -> Iterator[str]:
    # Lazy, so a huge URL stops being scanned as soon as the stream limit is reached.
    for value in values:
        for token in value.split("/"):
            if token:
                yield token


def _looks_like_stream(token: str) -> bool:
    return "@" in token or token.startswith("!")


def _time_unit_errors(query: list[tuple[str, str]]) -> list[str]:
    # Tolerated, not implemented: payloads stay in milliseconds (the session may act on MICROSECOND later).
    return [
        f"Invalid request: invalid timeUnit {_quote(value)!r}: expected MILLISECOND or MICROSECOND"
        for key, value in query
        if key == "timeUnit" and value.upper() not in TIME_UNITS
    ]


def _snapshot_query(query: list[tuple[str, str]]) -> tuple[bool, list[str]]:
    """Our ``snapshot`` query parameter: ``true`` or ``false`` (any case); the last valid one counts."""
    snapshot = False
    errors: list[str] = []
    for key, value in query:
        if key != SNAPSHOT_PROPERTY:
            continue
        if value.lower() in ("true", "false"):
            snapshot = value.lower() == "true"
        else:
            errors.append(f"Invalid request: invalid snapshot {_quote(value)!r}: expected true or false")
    return snapshot, errors


def _collect_url_streams(
    tokens: Iterable[str], max_streams: int, is_known_symbol: Callable[[str], bool] | None
) -> tuple[list[Stream], list[bytes]]:
    kept: dict[str, Stream] = {}
    errors: list[bytes] = []
    suppressed = 0
    for token in tokens:
        try:
            stream = _parse_stream_name(token)
            _check_known_symbol(token, stream, is_known_symbol)
        except ProtocolError as error:
            if len(errors) < _MAX_URL_ERROR_FRAMES:
                errors.append(error_frame(error.code, error.reason, None))
            else:
                suppressed += 1
            continue
        if stream.name in kept:
            continue
        if len(kept) >= max_streams:
            errors.append(error_frame(INVALID_REQUEST, _too_many_streams(max_streams).reason, None))
            break
        kept[stream.name] = stream
    if suppressed:
        msg = f"Invalid request: {suppressed} more invalid streams in the URL were not reported"
        errors.append(error_frame(INVALID_REQUEST, msg, None))
    return list(kept.values()), errors


# --------------------------------------------------------------------------------------------------
# Control frames


@dataclass(frozen=True, slots=True)
class ControlOutcome:
    """The result of one inbound frame."""

    reply: bytes  # the JSON text frame to send back (result or error), always exactly one
    subscribe: list[Stream]  # streams newly added to this connection by this request (not already there)
    unsubscribe: list[str]  # canonical names removed from this connection by this request
    # REFRESH_TOKEN: the token for the session to verify (``reply`` is the answer if it is accepted), and the
    # request id for the error it answers instead if not.
    refresh_token: str | None = None
    request_id: RequestId = None
    # Our ``snapshot`` property: the state streams of ``subscribe`` that get their last value first, in order.
    snapshot: tuple[str, ...] = ()


class ControlState:
    """Per-connection protocol state: the subscription set and the ``combined`` and ``snapshot`` properties."""

    def __init__(
        self,
        *,
        combined: bool,
        max_streams: int = DEFAULT_MAX_STREAMS,
        is_known_symbol: Callable[[str], bool] = lambda s: True,
        is_allowed: Callable[[str], bool] | None = None,
        reserve: Callable[[int], bool] | None = None,
    ) -> None:
        self.combined = combined
        self.max_streams = max_streams
        self.is_known_symbol = is_known_symbol
        # May this connection's credential have the stream (a token's ``streams`` claim)? None: every stream.
        self.is_allowed = is_allowed
        # Takes n more subscriptions from a budget shared beyond this connection (per IP); False: none left.
        self.reserve = reserve
        self.subscriptions: dict[str, Stream] = {}  # canonical name -> Stream, insertion-ordered
        self.snapshot = False  # ours (SET_PROPERTY snapshot): new state-stream subscriptions get the last value

    def add_initial(self, streams: Sequence[Stream]) -> list[Stream]:
        """Subscribe the URL's streams (already validated by parse_connect_path); returns those added.

        Duplicates are skipped and nothing beyond ``max_streams`` is added.
        """
        added: list[Stream] = []
        for stream in streams:
            if stream.name in self.subscriptions:
                continue
            if len(self.subscriptions) >= self.max_streams:
                break
            if self.reserve is not None and not self.reserve(1):
                break
            self.subscriptions[stream.name] = stream
            added.append(stream)
        return added

    def snapshot_of(self, streams: Iterable[Stream]) -> tuple[str, ...]:
        """The streams among ``streams`` (new subscriptions) whose last value goes first: the state streams, when
        the ``snapshot`` property is on; never an event stream (trade, aggTrade, diff depth, ``!miniTicker@arr``)."""
        if not self.snapshot:
            return ()
        return tuple(stream.name for stream in streams if stream.is_state)

    def handle_text(self, data: str | bytes) -> ControlOutcome:
        """Handle one text frame. Never raises; always exactly one reply."""
        try:
            request = orjson.loads(data)
        except (ValueError, TypeError) as error:  # orjson.JSONDecodeError is a ValueError
            return _rejected(INVALID_JSON, _invalid_json_message(data, error), None)
        return self._dispatch(request)

    def handle_binary(self, data: bytes) -> ControlOutcome:
        """Binary frames are never control messages: code 2, id null, nothing changes."""
        msg = "Invalid request: binary frames are not supported, send control messages as JSON text frames"
        return _rejected(INVALID_REQUEST, msg, None)

    # ---- dispatch -------------------------------------------------------------------------------

    def _dispatch(self, request: object) -> ControlOutcome:
        if not isinstance(request, dict):
            return _rejected(INVALID_REQUEST, "Invalid request: expected a JSON object", None)
        id_valid, request_id = _parse_id(request)
        reply_id = request_id if id_valid else None
        try:
            handler = _HANDLERS[_parse_method(request)]
            if not id_valid:
                raise ProtocolError(INVALID_REQUEST, "Invalid request: request ID must be an unsigned integer")
            return handler(self, request.get("params", _MISSING), request_id)
        except ProtocolError as error:
            return _rejected(error.code, error.reason, reply_id)

    # ---- methods --------------------------------------------------------------------------------

    def _subscribe(self, params: object, request_id: RequestId) -> ControlOutcome:
        names = _stream_name_list(params, self.max_streams)
        new: dict[str, Stream] = {}
        for raw in names:
            stream = _parse_stream_name(raw)
            _check_known_symbol(raw, stream, self.is_known_symbol)
            if self.is_allowed is not None and not self.is_allowed(stream.name):
                raise ProtocolError(
                    INVALID_REQUEST, f"Invalid request: stream {_quote(raw)!r} is not allowed by your token"
                )
            if stream.name not in self.subscriptions:
                new.setdefault(stream.name, stream)
        if len(self.subscriptions) + len(new) > self.max_streams:
            raise _too_many_streams(self.max_streams)
        if new and self.reserve is not None and not self.reserve(len(new)):
            raise ProtocolError(INVALID_REQUEST, "Invalid request: too many subscriptions from your address")
        # Only now, with every name valid and the limit respected, is anything applied (atomicity).
        self.subscriptions.update(new)
        added = list(new.values())
        return ControlOutcome(result_frame(None, request_id), added, [], snapshot=self.snapshot_of(added))

    def _unsubscribe(self, params: object, request_id: RequestId) -> ControlOutcome:
        names = _stream_name_list(params, self.max_streams)
        # No symbol check: a symbol delisted after subscribing must still be removable.
        canonical = [_parse_stream_name(raw).name for raw in names]
        removed: list[str] = []
        for name in canonical:
            if self.subscriptions.pop(name, None) is not None:
                removed.append(name)
        return ControlOutcome(result_frame(None, request_id), [], removed)

    def _list_subscriptions(self, params: object, request_id: RequestId) -> ControlOutcome:
        if params is not _MISSING and params is not None:
            _property_params(params, max_count=0)
        return _replied(result_frame(list(self.subscriptions), request_id))

    def _set_property(self, params: object, request_id: RequestId) -> ControlOutcome:
        args = _property_params(params, max_count=2)
        name = _check_property_name(args)
        value = args[1] if len(args) > 1 else None
        if not isinstance(value, bool):
            raise ProtocolError(INVALID_VALUE_TYPE, "Invalid value type: expected Boolean")
        if name == COMBINED_PROPERTY:
            self.combined = value
        else:
            self.snapshot = value
        return _replied(result_frame(None, request_id))

    def _get_property(self, params: object, request_id: RequestId) -> ControlOutcome:
        name = _check_property_name(_property_params(params, max_count=1))
        return _replied(result_frame(self.combined if name == COMBINED_PROPERTY else self.snapshot, request_id))

    def _refresh_token(self, params: object, request_id: RequestId) -> ControlOutcome:
        if params is _MISSING:
            raise ProtocolError(INVALID_REQUEST, "Invalid request: missing field `params`")
        if not isinstance(params, list) or len(params) != 1:
            raise ProtocolError(INVALID_REQUEST, "Invalid request: params must be an array holding one token")
        token = params[0]
        if not isinstance(token, str) or not token:
            raise ProtocolError(INVALID_REQUEST, "Invalid request: the token must be a non-empty string")
        return ControlOutcome(result_frame(None, request_id), [], [], refresh_token=token, request_id=request_id)


# Method -> handler, shared by every connection: a per-connection dict of bound methods would cost memory per
# client and make each ControlState a reference cycle that only the cycle collector frees.
_HANDLERS: dict[str, Callable[[ControlState, object, RequestId], ControlOutcome]] = {
    "SUBSCRIBE": ControlState._subscribe,
    "UNSUBSCRIBE": ControlState._unsubscribe,
    "LIST_SUBSCRIPTIONS": ControlState._list_subscriptions,
    "SET_PROPERTY": ControlState._set_property,
    "GET_PROPERTY": ControlState._get_property,
    "REFRESH_TOKEN": ControlState._refresh_token,
}

# --------------------------------------------------------------------------------------------------
# Request validation helpers (raise ProtocolError; _dispatch turns it into the reply)


def _rejected(code: int, msg: str, request_id: RequestId) -> ControlOutcome:
    return ControlOutcome(error_frame(code, msg, request_id), [], [])


def _replied(reply: bytes) -> ControlOutcome:
    return ControlOutcome(reply, [], [])


def _parse_id(request: dict[str, object]) -> tuple[bool, RequestId]:
    """(valid, id). Missing is invalid; explicit null is valid (binance-protocol.md §1.3)."""
    value = request.get("id", _MISSING)
    if value is None:
        return True, None
    if isinstance(value, bool):  # bool is an int subclass in Python, but not in JSON
        return False, None
    if isinstance(value, int):
        return _INT64_MIN <= value <= _INT64_MAX, value
    if isinstance(value, str) and _STRING_ID_RE.fullmatch(value):
        return True, value
    return False, None


def _parse_method(request: dict[str, object]) -> str:
    method = request.get("method", _MISSING)
    if method is _MISSING:
        raise ProtocolError(INVALID_REQUEST, "Invalid request: missing field `method`")
    if not isinstance(method, str):
        raise ProtocolError(INVALID_REQUEST, f"Invalid request: method must be a string, {_UNKNOWN_VARIANT_TAIL}")
    if method not in METHODS:
        raise ProtocolError(
            INVALID_REQUEST, f"Invalid request: unknown variant `{_quote(method)}`, {_UNKNOWN_VARIANT_TAIL}"
        )
    return method


def _stream_name_list(params: object, max_streams: int) -> list[str]:
    """SUBSCRIBE/UNSUBSCRIBE params: a list of at most max_streams strings (count checked first)."""
    if params is _MISSING:
        raise ProtocolError(INVALID_REQUEST, "Invalid request: missing field `params`")
    if not isinstance(params, list):
        raise ProtocolError(INVALID_REQUEST, "Invalid request: params must be an array of stream names")
    if len(params) > max_streams:
        raise _too_many_streams(max_streams)
    for value in params:
        if not isinstance(value, str):
            # Never repr() the value: it may be a deeply nested array (repr could recurse too deep).
            raise ProtocolError(
                INVALID_REQUEST, f"Invalid request: invalid stream: names must be strings, not {_json_type(value)}"
            )
    return params


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, list):
        return "array"
    return "object"


def _property_params(params: object, *, max_count: int) -> list[object]:
    if params is _MISSING or params is None:
        return []
    if not isinstance(params, list):
        raise ProtocolError(INVALID_REQUEST, "Invalid request: params must be an array")
    if len(params) > max_count:
        raise ProtocolError(INVALID_REQUEST, "Invalid request: too many parameters")
    return params


def _check_property_name(args: list[object]) -> str:
    name = args[0] if args else None
    if not isinstance(name, str):
        raise ProtocolError(INVALID_REQUEST, "Invalid request: property name must be a string")
    if name not in PROPERTIES:
        raise ProtocolError(UNKNOWN_PROPERTY, "Unknown property")
    return name


# --------------------------------------------------------------------------------------------------
# Invalid JSON position


def _invalid_json_message(data: object, error: Exception) -> str:
    line, column = _error_position(data, error)
    return f"Invalid JSON: expected value at line {line} column {column}"


def _error_position(data: object, error: Exception) -> tuple[int, int]:
    """1-based (line, column) of the parse error, as serde_json (Binance) reports it.

    orjson reports lineno/colno for syntax errors but position 0 for invalid UTF-8 (or lone surrogates in
    a str), so for those the first bad byte/character is located here.
    """
    bad = _first_invalid_unicode(data)
    if bad is not None:
        return bad
    line = getattr(error, "lineno", 1)
    column = getattr(error, "colno", 1)
    return (line, column) if isinstance(line, int) and isinstance(column, int) else (1, 1)


def _first_invalid_unicode(data: object) -> tuple[int, int] | None:
    if isinstance(data, bytes):
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as error:
            # Columns count bytes here, as serde_json's do for its byte-slice input.
            return data.count(b"\n", 0, error.start) + 1, error.start - data.rfind(b"\n", 0, error.start)
        return None
    if isinstance(data, str):
        try:
            data.encode("utf-8")
        except UnicodeEncodeError as error:
            return data.count("\n", 0, error.start) + 1, error.start - data.rfind("\n", 0, error.start)
    return None
