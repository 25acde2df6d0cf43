"""Binance's stream protocol as seen from ingest, without I/O: bytes and frames in, typed results out; streams in,
control messages out; and the pacing of those messages against Binance's inbound-message limit.

Everything here is pure (no sockets, no event loop) so the parsing, planning and pacing rules are tested
on their own; ``ingest.sources.binance.source`` is the thin asyncio adapter that feeds it bytes and a clock. Three jobs:

- :func:`read_data_frames` cuts the WebSocket data frames Binance streams out of received bytes (the rest of the
  WebSocket protocol stays the websockets library's), and :func:`parse_frame` classifies one upstream text frame: a
  combined data frame (payload sliced out verbatim, so downstream clients receive Binance's exact bytes, with the
  event's identity read from the same decode that validates it), a control reply or error, a ``serverShutdown``
  notice, or a malformed frame. It never raises: outside input must not crash ingest.
- :func:`plan_subscriptions`, :func:`assign_streams` and :func:`plan_changes` spread streams over
  connections (≤ 1024 each) and turn them into SUBSCRIBE/UNSUBSCRIBE requests of bounded size.
- :class:`ControlPacer` is a token bucket that says when the next control message may go out, so a
  connection never sends more than Binance's 5 messages/s (pings, pongs and control messages all count);
  :class:`ConnectionAttemptPacer` keeps connection attempts under Binance's 300 per 5 minutes per IP.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import orjson

from shared.binance.identity import event_identity
from shared.broker.contract import EventId
from shared.frames import split_combined_frame
from shared.ratelimit import TokenBucket
from shared.streams import MAX_STREAM_NAME_LENGTH

MAX_STREAMS_PER_CONNECTION = 1024
"""Binance's documented cap on streams per connection."""

MAX_PARAMS_PER_MESSAGE = 200
"""Streams per SUBSCRIBE/UNSUBSCRIBE message. Binance documents no cap; 200 keeps each control frame a few
KiB while a full 1024-stream connection still subscribes in six messages (about 1.5 s at 4 msg/s)."""

MAX_CONTROL_MESSAGES_PER_S = 5.0
"""Binance's inbound limit per connection; pings, pongs and control messages all count."""

MAX_CONNECTION_ATTEMPTS = 300
CONNECTION_ATTEMPT_WINDOW_S = 300.0
"""Binance allows 300 connection attempts per 5 minutes per IP (WebSocket streams and API together)."""

SERVER_SHUTDOWN_STREAM = "!serverShutdown"
SERVER_SHUTDOWN_EVENT = "serverShutdown"

ControlId = int | str | None
Method = Literal["SUBSCRIBE", "UNSUBSCRIBE", "LIST_SUBSCRIPTIONS"]


# ---------------------------------------------------------------------------------------------------------
# Frame parsing


@dataclass(frozen=True, slots=True)
class DataFrame:
    """A market-data event: the stream it belongs to, the exchange's payload bytes and, when the payload was
    decoded, the exchange's identity of the event (see :mod:`shared.binance.identity`)."""

    stream: str
    payload: bytes
    event: EventId | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class ControlReply:
    """``{"result":…,"id":…}``: a control request succeeded (``result`` is None except for queries)."""

    id: ControlId
    result: object


@dataclass(frozen=True, slots=True)
class ControlError:
    """``{"error":{"code":…,"msg":…},"id":…}`` (or the flat ``{"code","msg","id"}`` form of the docs)."""

    id: ControlId
    code: int | None
    msg: str


@dataclass(frozen=True, slots=True)
class ServerShutdown:
    """Binance is about to close this connection: reconnect now."""

    event_time_ms: int | None


@dataclass(frozen=True, slots=True)
class Malformed:
    """A frame that is none of the above; ``reason`` says why, for logs."""

    reason: str


UpstreamFrame = DataFrame | ControlReply | ControlError | ServerShutdown | Malformed


def parse_frame(frame: bytes | str, *, validate_payload: bool = True) -> UpstreamFrame:
    """Classify one frame received on a combined (``/stream``) connection. Never raises.

    The fast path slices ``stream`` and ``data`` out of Binance's fixed envelope layout, so the payload is
    the exchange's bytes untouched. When the layout differs the frame is decoded with orjson and the payload
    re-encoded, which is the only case where bytes may change. ``validate_payload`` checks that a sliced
    payload is well-formed JSON: one orjson pass (about a microsecond for a typical event) that stops a
    corrupt payload from reaching every downstream client, who cannot recover from it. Without it the
    envelope layout is trusted as is.
    """
    data = frame.encode("utf-8", "surrogatepass") if isinstance(frame, str) else bytes(frame)
    if validate_payload:
        event = read_event(data)
        if event is not None:
            return DataFrame(*event)
    sliced = split_combined_frame(data)
    if sliced is not None:
        stream, payload = sliced
        # A slice that is not JSON on its own means the envelope had another layout (say, a key after
        # "data"): the full parse below then decides.
        if _plausible_stream(stream) and payload[:1] in (b"{", b"["):
            if not validate_payload:
                if stream == SERVER_SHUTDOWN_STREAM:
                    return ServerShutdown(_event_time(payload))
                return DataFrame(stream, payload)
            document = _decode(payload)
            if document is not _INVALID and stream == SERVER_SHUTDOWN_STREAM:
                return ServerShutdown(_event_time_of(document))
    return _parse_slow(data)


def read_event(frame: bytes) -> tuple[str, bytes, EventId | None] | None:
    """:func:`parse_frame`'s fast path as a plain tuple: ``(stream, payload, identity)`` for a market-data frame in
    Binance's envelope layout whose payload is valid JSON (exactly what :func:`parse_frame` returns as a
    :class:`DataFrame` for it), None for any other frame (:func:`parse_frame` then says what it is). The live
    source calls it for every frame: no object is made besides the tuple and the identity."""
    sliced = split_combined_frame(frame)
    if sliced is None:
        return None
    stream, payload = sliced
    if stream not in _PLAUSIBLE:
        if not _plausible_stream(stream) or stream == SERVER_SHUTDOWN_STREAM:
            return None
        if len(_PLAUSIBLE) >= _PLAUSIBLE_MAX:
            _PLAUSIBLE.clear()
        _PLAUSIBLE.add(stream)
    if not payload.startswith(_JSON_STARTS):
        return None
    try:
        document = orjson.loads(payload)
    except ValueError:
        return None
    return stream, payload, event_identity(document)


# Stream names already found plausible (the set a connection carries is small and steady): the check is a lookup.
_PLAUSIBLE: set[str] = set()
_PLAUSIBLE_MAX = 100_000
_JSON_STARTS = (b"{", b"[")


def _plausible_stream(stream: str) -> bool:
    return (
        0 < len(stream) <= MAX_STREAM_NAME_LENGTH and stream.isascii() and stream.isprintable() and (" " not in stream)
    )


_INVALID = object()


def _decode(payload: bytes) -> object:
    try:
        return orjson.loads(payload)
    except ValueError:
        return _INVALID


def _event_time(payload: bytes) -> int | None:
    try:
        document = orjson.loads(payload)
    except ValueError:
        return None
    return _event_time_of(document)


def _event_time_of(document: object) -> int | None:
    if isinstance(document, dict):
        event_time = document.get("E")
        if isinstance(event_time, int) and not isinstance(event_time, bool):
            return event_time
    return None


def _control_id(value: object) -> ControlId:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return None


def _parse_slow(data: bytes) -> UpstreamFrame:
    try:
        document = orjson.loads(data)
    except ValueError:
        return Malformed("invalid JSON")
    if not isinstance(document, dict):
        return Malformed(f"unexpected JSON {type(document).__name__} outside a stream envelope")
    if "stream" in document and "data" in document:
        stream = document["stream"]
        if not isinstance(stream, str) or not _plausible_stream(stream):
            return Malformed("stream envelope without a valid stream name")
        payload = document["data"]
        if stream == SERVER_SHUTDOWN_STREAM:
            return ServerShutdown(_event_time_of(payload))
        if not isinstance(payload, dict | list):
            return Malformed(f"payload of {stream} is not a JSON object or array")
        try:
            return DataFrame(stream, orjson.dumps(payload), event_identity(payload))
        except TypeError:  # orjson.JSONEncodeError, e.g. an integer wider than 64 bits
            return Malformed(f"payload of {stream} cannot be re-encoded")
    if document.get("e") == SERVER_SHUTDOWN_EVENT:
        return ServerShutdown(_event_time_of(document))
    if "error" in document:
        error = document["error"]
        if isinstance(error, dict):
            return _control_error(document.get("id"), error)
        return ControlError(_control_id(document.get("id")), None, str(error))
    if "result" in document and "id" in document:
        return ControlReply(_control_id(document["id"]), document["result"])
    if "code" in document and "msg" in document:
        return _control_error(document.get("id"), document)
    return Malformed("JSON object that is neither an event envelope nor a control reply")


def _control_error(request_id: object, error: dict[str, object]) -> ControlError:
    code = error.get("code")
    return ControlError(
        _control_id(request_id),
        code if isinstance(code, int) and not isinstance(code, bool) else None,
        str(error.get("msg", "")),
    )


def read_data_frames(buffer: bytes, max_size: int, start: int = 0) -> tuple[list[bytes], int, bool]:
    """The WebSocket data frames in ``buffer`` (bytes a client received) from ``start``, as many as are complete:
    ``(payloads, position after them, handover)``.

    Only final, unmasked text or binary frames without RSV bits and of at most ``max_size`` bytes are read here, the
    frames Binance streams; at the first frame of any other kind (a ping, a close, a fragment, a masked or oversized
    frame) reading stops with ``handover`` True: that frame is for a complete WebSocket implementation, which answers
    control frames and enforces the protocol (:func:`frame_size` says where it ends). ``handover`` False and bytes
    left over: the last frame is not complete yet (keep the rest and read more)."""
    payloads: list[bytes] = []
    append = payloads.append
    position = start
    end = len(buffer)
    while end - position >= 2:
        first = buffer[position]
        length = buffer[position + 1]
        if (first != 0x81 and first != 0x82) or length & 0x80:
            return payloads, position, True
        begin = position + 2
        if length == 126:
            if end - begin < 2:
                break
            length = (buffer[begin] << 8) | buffer[begin + 1]
            begin += 2
        elif length == 127:
            if end - begin < 8:
                break
            length = int.from_bytes(buffer[begin : begin + 8], "big")
            begin += 8
        if length > max_size:
            return payloads, position, True
        stop = begin + length
        if stop > end:
            break
        append(buffer[begin:stop])
        position = stop
    return payloads, position, False


def frame_size(buffer: bytes, start: int = 0) -> int | None:
    """How many bytes the WebSocket frame at ``start`` takes, header included (any kind of frame, masked or not), or
    None while its header is incomplete."""
    end = len(buffer)
    if end - start < 2:
        return None
    second = buffer[start + 1]
    length = second & 0x7F
    header = 2
    if length == 126:
        if end - start < 4:
            return None
        length = (buffer[start + 2] << 8) | buffer[start + 3]
        header = 4
    elif length == 127:
        if end - start < 10:
            return None
        length = int.from_bytes(buffer[start + 2 : start + 10], "big")
        header = 10
    return header + (4 if second & 0x80 else 0) + length


# ---------------------------------------------------------------------------------------------------------
# Subscription planning


@dataclass(frozen=True, slots=True)
class ControlRequest:
    """One control message to send upstream."""

    method: Method
    params: tuple[str, ...]
    id: int

    def encode(self) -> bytes:
        if self.method == "LIST_SUBSCRIPTIONS":
            return orjson.dumps({"method": self.method, "id": self.id})
        return orjson.dumps({"method": self.method, "params": list(self.params), "id": self.id})


@dataclass(frozen=True, slots=True)
class ConnectionPlan:
    """What one upstream connection carries and the SUBSCRIBE requests that set it up."""

    streams: tuple[str, ...]
    requests: tuple[ControlRequest, ...]


def control_requests(
    method: Method,
    streams: Iterable[str],
    *,
    first_id: int,
    max_params_per_message: int = MAX_PARAMS_PER_MESSAGE,
) -> list[ControlRequest]:
    """``method`` requests covering ``streams`` (sorted, deduplicated) in chunks, ids ``first_id, +1, …``."""
    if max_params_per_message < 1:
        raise ValueError(f"max_params_per_message must be at least 1, not {max_params_per_message}")
    ordered = sorted(set(streams))
    return [
        ControlRequest(method, tuple(ordered[start : start + max_params_per_message]), first_id + index)
        for index, start in enumerate(range(0, len(ordered), max_params_per_message))
    ]


def plan_subscriptions(
    streams: Iterable[str],
    *,
    max_streams_per_connection: int = MAX_STREAMS_PER_CONNECTION,
    max_params_per_message: int = MAX_PARAMS_PER_MESSAGE,
    first_id: int = 1,
) -> list[ConnectionPlan]:
    """Spread ``streams`` over as few connections as the per-connection cap allows and give each its
    SUBSCRIBE requests. Ids increase across the whole plan, so every request in it is unique."""
    groups = assign_streams((), streams, max_streams_per_connection=max_streams_per_connection)
    plans: list[ConnectionPlan] = []
    next_id = first_id
    for group in groups:
        requests = control_requests("SUBSCRIBE", group, first_id=next_id, max_params_per_message=max_params_per_message)
        next_id += len(requests)
        plans.append(ConnectionPlan(tuple(sorted(group)), tuple(requests)))
    return plans


def assign_streams(
    current: Sequence[Collection[str]],
    wanted: Iterable[str],
    *,
    max_streams_per_connection: int = MAX_STREAMS_PER_CONNECTION,
) -> list[frozenset[str]]:
    """Place ``wanted`` on connections, given what each existing connection carries now.

    Entry ``i`` of the result is connection ``i``'s new set; entries past ``len(current)`` are new
    connections. A wanted stream stays where it already is (moving it would mean an unsubscribe and a
    subscribe, a gap and two control messages); new streams fill the existing connections in order, then
    new ones. Existing entries may come back empty: the caller closes those connections.
    """
    if max_streams_per_connection < 1:
        raise ValueError(f"max_streams_per_connection must be at least 1, not {max_streams_per_connection}")
    wanted_set = set(wanted)
    groups: list[set[str]] = []
    placed: set[str] = set()
    for existing in current:
        # Trim first, in case the caller lowered the cap or handed us an overfull group.
        kept = sorted((set(existing) & wanted_set) - placed)[:max_streams_per_connection]
        groups.append(set(kept))
        placed.update(kept)
    pending = sorted(wanted_set - placed)
    for group in groups:
        room = max_streams_per_connection - len(group)
        if room > 0 and pending:
            group.update(pending[:room])
            pending = pending[room:]
    while pending:
        groups.append(set(pending[:max_streams_per_connection]))
        pending = pending[max_streams_per_connection:]
    return [frozenset(group) for group in groups]


def plan_changes(
    subscribed: Collection[str],
    desired: Collection[str],
    *,
    first_id: int,
    max_params_per_message: int = MAX_PARAMS_PER_MESSAGE,
    isolated: Collection[str] = (),
) -> list[ControlRequest]:
    """Requests that take one connection from ``subscribed`` to ``desired``.

    Unsubscribes come first, so the connection never holds more than the larger of the two sets (the 1024
    cap applies to what it holds). Streams in ``isolated`` are subscribed one per message, after the rest:
    Binance rejects a whole SUBSCRIBE for one bad name without saying which, so a rejected batch is
    retried stream by stream to find the culprit and keep the others.
    """
    removed = set(subscribed) - set(desired)
    added = set(desired) - set(subscribed)
    solo = added & set(isolated)
    requests = control_requests(
        "UNSUBSCRIBE", removed, first_id=first_id, max_params_per_message=max_params_per_message
    )
    requests += control_requests(
        "SUBSCRIBE", added - solo, first_id=first_id + len(requests), max_params_per_message=max_params_per_message
    )
    requests += control_requests("SUBSCRIBE", solo, first_id=first_id + len(requests), max_params_per_message=1)
    return requests


# ---------------------------------------------------------------------------------------------------------
# Pacing


class ControlPacer:
    """The messages one connection sends upstream, paced by a :class:`~shared.ratelimit.TokenBucket` on an
    injected clock.

    ``rate_per_s`` tokens accrue per second up to ``burst``; a control message spends one. With ``burst``
    = 1 (the default) consecutive messages are at least ``1 / rate_per_s`` apart, so any window of W
    seconds holds at most ``ceil(W * rate_per_s)`` of them; in general ``burst - 1`` more. Messages the
    client cannot hold back (pongs answering Binance's pings, which count against the same limit) are
    charged with :meth:`charge`, which may overdraw the bucket and so delays the next control message.
    The pacer never sleeps: :meth:`next_allowed` says when, the caller waits.
    """

    def __init__(
        self,
        rate_per_s: float = MAX_CONTROL_MESSAGES_PER_S,
        *,
        burst: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self._bucket = TokenBucket(rate_per_s, burst, clock())

    def next_allowed(self) -> float:
        """Clock time from which :meth:`try_acquire` succeeds (now, if a token is available)."""
        return self._bucket.available_at(self._clock())

    def delay(self) -> float:
        """Seconds until :meth:`try_acquire` succeeds."""
        return self._bucket.delay_until_available(self._clock())

    def try_acquire(self) -> bool:
        """Spend a token for a message about to be sent; False (and nothing spent) if it is too early."""
        return self._bucket.allow(self._clock())

    def charge(self) -> None:
        """Account for a message that went out regardless (a pong); may leave the bucket overdrawn."""
        self._bucket.charge(self._clock())


class ConnectionAttemptPacer:
    """Connection attempts (successful or not) in a sliding window, on an injected clock.

    Binance counts every connection attempt from an IP, 300 per 5 minutes, and its answer beyond that is not
    documented; a reconnect storm (a flapping network, a rotation of many connections) must never get there.
    :meth:`delay` says how long to wait before the next attempt is allowed, :meth:`record` counts one. Shared by
    all of one process's upstream connections; processes on the same IP share Binance's budget, so give each a
    share (``limit``) of it."""

    def __init__(
        self,
        limit: int = MAX_CONNECTION_ATTEMPTS,
        window_s: float = CONNECTION_ATTEMPT_WINDOW_S,
        *,
        margin_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``margin_s`` keeps each attempt in the window that much longer: we count an attempt when we start it,
        the exchange when the handshake reaches it, up to a round trip (and a TLS handshake) later."""
        if limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit!r}")
        if not math.isfinite(window_s) or window_s <= 0:
            raise ValueError(f"window_s must be a positive number, not {window_s!r}")
        if not math.isfinite(margin_s) or margin_s < 0:
            raise ValueError(f"margin_s must be >= 0, not {margin_s!r}")
        self.limit = limit
        self.window_s = window_s
        self.margin_s = margin_s
        self._clock = clock
        self._attempts: deque[float] = deque()

    def _expire(self, now: float) -> None:
        while self._attempts and self._attempts[0] <= now - self.window_s - self.margin_s:
            self._attempts.popleft()

    def delay(self) -> float:
        """Seconds until one more attempt stays within ``limit`` per ``window_s`` (0: now)."""
        now = self._clock()
        self._expire(now)
        if len(self._attempts) < self.limit:
            return 0.0
        # The oldest attempt that must leave the window before a new one fits.
        return max(0.0, self._attempts[len(self._attempts) - self.limit] + self.window_s + self.margin_s - now)

    def record(self) -> None:
        """Count an attempt made now."""
        now = self._clock()
        self._expire(now)
        self._attempts.append(now)

    @property
    def in_window(self) -> int:
        """Attempts counted in the current window."""
        self._expire(self._clock())
        return len(self._attempts)
