"""One client WebSocket session: the Binance control protocol applied to the fan-out, and the data path out.

The control protocol itself is :mod:`gateway.ws.control` (pure); a session applies its outcomes (subscribe,
unsubscribe, reply) and is the hub's :class:`~gateway.ws.hub.Subscriber`. It is driven by callbacks, not by a
task: :meth:`Session.on_text` for every inbound message, :meth:`Session.closed` once at the end. What it needs
from the process is the narrow :class:`SessionHost` (subscriptions, symbol check, accounting), and from the
socket the narrow :class:`Connection`; two kinds of connection carry it:

* **native** (the normal case): our uvicorn WebSocket protocol (:mod:`gateway.ws.uvicorn_protocol`) accepts the
  handshake itself and calls the session directly: no ASGI task, queue or coroutine chain per client. Once
  per flush the hub hands the session one :class:`~gateway.ws.hub.StreamBatch` per subscribed stream with new
  messages, and it writes the batch's pre-encoded block with the connection's ``write``: one write per client
  per flush.
* **ASGI fallback** (:mod:`gateway.ws.asgi_fallback`, for other servers): no direct ``write``; batches are
  handed to the connection's bounded queue and a writer task sends them.

Slow clients (native): once more than ``client_buffer_bytes`` wait in the socket's buffer the connection calls
:meth:`Session.on_pause` and the session stops writing. Batches of *state* streams are skipped and the stream is
marked stale; when the buffer drains (:meth:`Session.on_writable`) the client gets the newest value of each
stale stream — conflation without per-client queues. A batch of an *event* stream that cannot be written closes
the client with 4000. Memory per client is bounded by the limit plus one batch. Close codes:
:mod:`gateway.ws.close_codes`.

Snapshots (our ``snapshot`` property, :mod:`gateway.ws.control`): a new subscription to a state stream first gets
the stream's last value, which the host finds (:meth:`SessionHost.snapshot`): the hub's newest value at once, or
the broker's after an await. Neither may reach the client after a newer live message of that stream, nor may an
older live message follow it. While a broker lookup is out, a live batch of the stream cancels it (the client has
live data); once a snapshot at broker position (epoch, seq) is written, live batches are compared with the
relay's position: a batch holding nothing newer is skipped, a newer one is cut to its newest message (what
precedes it in the batch may be older than the snapshot). Sessions with either pending go through the slow path
of :meth:`Session.deliver`; the others never look.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from gateway.auth.principal import ANONYMOUS, AuthRefusal, Principal
from gateway.ws.close_codes import REASONS, CloseCode
from gateway.ws.control import ConnectRequest, ControlOutcome, ControlState, error_frame, result_frame
from gateway.ws.hub import StreamBatch, Subscriber
from shared.frames import combined_frame
from shared.ratelimit import TokenBucket
from shared.streams import INVALID_REQUEST, Stream


@dataclass(frozen=True, slots=True)
class SessionLimits:
    max_streams: int  # streams one connection may subscribe
    control_rate_per_s: float  # inbound control messages per second
    control_burst: int  # ... and in a burst


class Connection(Protocol):
    """What a session needs from the socket it runs on."""

    @property
    def peer(self) -> tuple[str, int] | None: ...

    # Writes bytes straight to the socket (native connections), or None when frames must be queued with
    # :meth:`enqueue` (the ASGI fallback). Read once per session: the hot path calls it without indirection.
    write: Callable[[bytes], object] | None

    def write_frames(self, payloads: list[bytes]) -> int:
        """Send text frames now (control replies, resynced values); returns the bytes written."""
        ...

    def enqueue(self, batch: StreamBatch, combined: bool) -> None:
        """Queue a batch for a connection without direct writes (only called when ``write`` is None)."""
        ...

    @property
    def dropped(self) -> tuple[int, int]:
        """(conflated, overflow-dropped) frames of the connection's own queue, if it has one."""
        ...

    def close_now(self, code: CloseCode, reason: str) -> None: ...


class SessionHost(Protocol):
    """What a session needs from the gateway process it runs in (implemented by :class:`gateway.node.GatewayNode`)."""

    sent_bytes: int  # bytes written to clients: sessions add to it per write (a plain int on the hot path)

    def is_known_symbol(self, symbol: str) -> bool: ...

    def subscribe(self, stream: Stream, subscriber: Subscriber) -> None: ...

    def unsubscribe(self, stream_names: list[str], subscriber: Subscriber) -> None: ...

    def reserve_subscriptions(self, client_ip: str, count: int) -> bool:
        """Take ``count`` more subscriptions from the client IP's budget; False when it has none left."""
        ...

    def release_subscriptions(self, client_ip: str, count: int) -> None: ...

    def newest_frames(self, stream_names: set[str], combined: bool) -> list[bytes]:
        """The newest value of each state stream whose batch does not still wait in the hub."""
        ...

    def session_opened(self, session: Session) -> None: ...

    def session_left(self, session: Session) -> None:
        """The client went away; :meth:`session_closed` follows when its close has had its turn."""
        ...

    def session_closed(self, session: Session) -> None: ...

    def control_message(self, result: str) -> None:
        """Count one inbound control message: ``ok``, ``error`` or ``rate_limited``."""
        ...

    def slow_consumer(self) -> None:
        """Count one client closed for overflowing on an event stream."""
        ...

    def refresh_credential(self, session: Session, token: str) -> Principal | AuthRefusal:
        """Verify a REFRESH_TOKEN's token for ``session``: its new principal (its expiry moved), or the refusal."""
        ...

    def snapshot(self, session: Session, stream_name: str) -> None:
        """Give ``session``, just subscribed to the state stream, its last value: :meth:`Session.write_snapshot`
        now, or :meth:`Session.expect_snapshot` and later :meth:`Session.snapshot_arrived` or
        :meth:`Session.snapshot_dropped`; nothing when a live batch of the stream is about to reach it anyway."""
        ...

    def stream_position(self, stream_name: str) -> tuple[int, int] | None:
        """(epoch, seq) of the newest message of the stream handed to the hub, or None."""
        ...


class Session:
    def __init__(
        self,
        host: SessionHost,
        connection: Connection,
        combined: bool,
        limits: SessionLimits,
        *,
        principal: Principal = ANONYMOUS,
        client_ip: str = "",
    ) -> None:
        self.host = host
        self.connection = connection
        self.combined = combined
        self.principal = principal
        self.client_ip = client_ip
        self.control = ControlState(
            combined=combined,
            max_streams=limits.max_streams,
            is_known_symbol=host.is_known_symbol,
            is_allowed=principal.allows if principal.patterns is not None else None,
            # A partial, not a bound method of ours: the control state must not point back at the session.
            reserve=functools.partial(host.reserve_subscriptions, client_ip) if client_ip else None,
        )
        self.bucket = TokenBucket(limits.control_rate_per_s, limits.control_burst, time.monotonic())
        self.closing = False
        self.left = False  # the client went away (peer_gone); closed() follows on a later loop turn
        self.ended = False
        self.close_code: int | None = None
        self.stale: set[str] = set()  # state streams skipped while the socket was full
        self.conflated = 0  # state messages skipped for a full socket (native)
        self._parts: list[bytes] | None = None  # blocks of this flush, for clients on several streams
        write = connection.write
        self.direct = write is not None  # frames go straight to the socket (native), else to the connection's queue
        self._direct_write: Callable[[bytes], object] = write if write is not None else _no_direct_write
        self._write = self._direct_write  # swapped while a ping waits to ride on the next write
        self._carrying: bytes | None = None
        # Hot-path flags, kept current by the events that change them so deliver() tests one attribute:
        self.blocked = not self.direct  # closing, paused, snapshots pending, or no direct writes (ASGI fallback)
        self.paused = False  # the socket buffer is above its high-water mark
        # Snapshots in flight, by stream: a token while the broker lookup is out, then the (epoch, seq) the client
        # got, until a newer live message passes it. None (the common case) until the first one.
        self._snapshots: dict[str, object] | None = None
        self.multi = False  # subscribed to more than one stream: coalesce this flush's blocks in finish()

    # ---- lifecycle (called by the connection) ----
    def start(self, connect: ConnectRequest) -> None:
        """The handshake was accepted: register, report bad URL streams, subscribe to the URL's streams."""
        self.host.session_opened(self)
        for frame in connect.errors:
            self._send_reply(frame)
        self.control.snapshot = connect.snapshot
        added = self.control.add_initial(connect.streams)
        if len(added) < len(connect.streams) and len(added) < self.control.max_streams:
            msg = "Invalid request: too many subscriptions from your address"
            self._send_reply(error_frame(INVALID_REQUEST, msg, None))
        self._subscribe(added, self.control.snapshot_of(added))

    def allow_frame(self) -> bool:
        """Charge one inbound frame — data, ping, pong or continuation: Binance counts them all — to the control
        rate; beyond it the client is closed with 1008 and False returned (the connection drops the frame)."""
        if self.closing:
            return False
        if self.bucket.allow(time.monotonic()):
            return True
        self.host.control_message("rate_limited")
        self.close(CloseCode.POLICY_VIOLATION)
        return False

    def on_text(self, text: str) -> None:
        """A complete text message (its frames already charged by :meth:`allow_frame`)."""
        if self.closing:
            return
        outcome = self.control.handle_text(text)
        self.host.control_message("error" if outcome.reply.startswith(b'{"error"') else "ok")
        self._apply(outcome)

    def on_binary(self, data: bytes) -> None:
        if self.closing:
            return
        self.host.control_message("error")
        self._apply(self.control.handle_binary(data))

    def peer_gone(self) -> None:
        """The client went away; its connection closes on a later loop turn (then :meth:`closed`). Until then it
        gets nothing: there is no one to read it."""
        if self.ended or self.left:
            return
        self.left = True
        self.closing = self.blocked = True
        # What the client's address was charged for its streams is free now, for the client reconnecting; the hub
        # subscriptions go with closed().
        if self.client_ip and self.control.subscriptions:
            self.host.release_subscriptions(self.client_ip, len(self.control.subscriptions))
        self.host.session_left(self)

    def closed(self, code: int | None) -> None:
        """The connection is over (either side closed it, or it was lost). Idempotent."""
        if self.ended:
            return
        self.ended = True
        self.closing = self.blocked = True
        self._carrying, self._write = None, self._direct_write  # disarm a waiting ping (and its closure's cycle)
        if self.close_code is None:
            self.close_code = code or CloseCode.NORMAL
        self._unsubscribe(list(self.control.subscriptions))
        self._snapshots = None
        self.host.session_closed(self)

    # ---- Subscriber: the hub's once-per-flush delivery ----
    def deliver(self, batch: StreamBatch) -> bool:
        # The hot path: one attribute test, one cached block, one socket write.
        if self.blocked:
            return self._deliver_blocked(batch)
        block = batch.block(self.combined)
        if self.multi:
            if self._parts is None:
                self._parts = [block]
                return True
            self._parts.append(block)
            return False
        self._write(block)
        self.host.sent_bytes += len(block)
        return False

    def _deliver_blocked(self, batch: StreamBatch) -> bool:
        if self.closing:
            return False
        if self._snapshots and batch.stream in self._snapshots:
            passed = self._past_snapshot(batch)
            if passed is None:
                return False
            batch = passed
        if not self.direct:
            self.connection.enqueue(batch, self.combined)
            return False
        if not self.paused:
            # Blocked only for snapshots elsewhere: deliver as the hot path does.
            block = batch.block(self.combined)
            if self.multi:
                if self._parts is None:
                    self._parts = [block]
                    return True
                self._parts.append(block)
                return False
            self._write(block)
            self.host.sent_bytes += len(block)
            return False
        # Paused: more than client_buffer_bytes wait in the socket buffer.
        if batch.is_state:
            self.stale.add(batch.stream)
            self.conflated += len(batch.payloads)
        else:
            self.close_slow_consumer()
        return False

    def _past_snapshot(self, batch: StreamBatch) -> StreamBatch | None:
        """A live batch of a stream with a snapshot pending: what of it the client may have (None: nothing)."""
        assert self._snapshots is not None
        watched = self._snapshots[batch.stream]
        if isinstance(watched, tuple):
            # The client has the snapshot at broker position ``watched``; the batch ends at the relay's position.
            position = self.host.stream_position(batch.stream)
            if position is not None and position[0] == watched[0] and position[1] <= watched[1]:
                return None  # nothing newer than what the client has (an older message still in flight)
            if len(batch.payloads) > 1:
                # Only the newest message: the ones before it may be older than the snapshot.
                batch = StreamBatch(batch.stream, batch.kind, batch.payloads[-1:])
        # else: the lookup is still out and live data came first; the snapshot is dropped when it arrives.
        del self._snapshots[batch.stream]
        self._update_blocked()
        return batch

    def finish(self) -> None:
        parts, self._parts = self._parts, None
        if parts and not self.closing:
            data = b"".join(parts)
            self._write(data)
            self.host.sent_bytes += len(data)

    # ---- pings riding on data (native connections) ----
    def carry_on_next_write(self, frame: bytes) -> None:
        """Send ``frame`` (a server ping) with this client's next data write instead of in a write of its own: at
        a hundred thousand clients a ping per client every 20 s is thousands of extra syscalls a second, and most
        clients get data anyway. The direct write is swapped for one that carries the frame once, so the hot path
        pays nothing until then; :meth:`flush_carried` sends it alone if no data came meanwhile."""
        if not self.direct or self.closing or self._carrying is not None:
            return
        direct = self._direct_write

        def write_carrying(data: bytes) -> object:
            # (This closure refers to the session; closed() disarms it, so no cycle outlives the connection.)
            self._write, self._carrying = direct, None
            return direct(frame + data)

        self._carrying = frame
        self._write = write_carrying

    def flush_carried(self) -> bool:
        """Write a frame still waiting for data alone; True when one was written."""
        frame = self._carrying
        if frame is None:
            return False
        self._carrying = None
        self._write = self._direct_write
        if self.closing:
            return False
        self._write(frame)
        return True

    # ---- flow control (native connections) ----
    def on_pause(self) -> None:
        """The socket buffer passed its high-water mark (client_buffer_bytes): stop writing data."""
        self.paused = self.blocked = True

    def on_writable(self) -> None:
        """The socket drained below its low-water mark: write again, starting with the newest value of every
        state stream skipped meanwhile."""
        self.paused = False
        self._update_blocked()
        if not self.stale or self.closing:
            return
        stale, self.stale = self.stale, set()
        frames = self.host.newest_frames(stale, self.combined)
        if frames:
            self.host.sent_bytes += self.connection.write_frames(frames)

    # ---- snapshots (called by the host, see SessionHost.snapshot) ----
    def write_snapshot(self, frame: bytes) -> None:
        """The stream's newest value as the hub holds it: every later live batch is newer."""
        if not self.closing:
            self._send_reply(frame)

    def expect_snapshot(self, stream_name: str) -> object:
        """A broker lookup for the stream's last value starts; returns the token it must come back with."""
        token = object()
        if self._snapshots is None:
            self._snapshots = {}
        self._snapshots[stream_name] = token
        self.blocked = True
        return token

    def snapshot_arrived(self, stream_name: str, token: object, payload: bytes, position: tuple[int, int]) -> None:
        """The lookup found ``payload`` at broker position (epoch, seq), newer than anything the relay handed the
        hub: written unless live data came first or the subscription changed meanwhile."""
        snapshots = self._snapshots
        if self.closing or snapshots is None or snapshots.get(stream_name) is not token:
            return
        snapshots[stream_name] = position
        self._send_reply(combined_frame(stream_name, payload) if self.combined else payload)

    def snapshot_dropped(self, stream_name: str, token: object) -> None:
        """The lookup found nothing to send (no value, a broker error, or live data is on its way)."""
        snapshots = self._snapshots
        if snapshots is not None and snapshots.get(stream_name) is token:
            del snapshots[stream_name]
            self._update_blocked()

    def _update_blocked(self) -> None:
        self.blocked = self.closing or self.paused or not self.direct or bool(self._snapshots)

    # ---- closing ----
    def close_slow_consumer(self) -> None:
        self.host.slow_consumer()
        self.close(CloseCode.SLOW_CONSUMER)

    def close(self, code: CloseCode, reason: str | None = None) -> None:
        """Close from our side; :meth:`closed` follows when the connection reports the end."""
        if self.closing:
            return
        self.closing = self.blocked = True
        self.close_code = code
        self.connection.close_now(code, reason if reason is not None else REASONS.get(code, ""))

    @property
    def dropped(self) -> tuple[int, int]:
        """(conflated, overflow-dropped) messages of this client, for the metrics."""
        queue_conflated, queue_dropped = self.connection.dropped
        return self.conflated + queue_conflated, queue_dropped

    # ---- internals ----
    def _send_reply(self, frame: bytes) -> None:
        self.host.sent_bytes += self.connection.write_frames([frame])

    def _subscribe(self, streams: list[Stream], snapshot: tuple[str, ...] = ()) -> None:
        for stream in streams:
            self.host.subscribe(stream, self)
        self.multi = len(self.control.subscriptions) > 1
        for name in snapshot:
            self.host.snapshot(self, name)

    def _unsubscribe(self, names: list[str]) -> None:
        if not names:
            return
        self.host.unsubscribe(names, self)
        if self.client_ip and not self.left:  # (released at peer_gone already)
            self.host.release_subscriptions(self.client_ip, len(names))
        self.stale.difference_update(names)
        self.multi = len(self.control.subscriptions) > 1
        if self._snapshots:
            for name in names:
                self._snapshots.pop(name, None)
            self._update_blocked()

    def _apply(self, outcome: ControlOutcome) -> None:
        if outcome.refresh_token is not None:
            self._send_reply(self._refresh(outcome.refresh_token, outcome.request_id))
            return
        self._unsubscribe(outcome.unsubscribe)
        self.combined = self.control.combined
        self._send_reply(outcome.reply)
        self._subscribe(outcome.subscribe, outcome.snapshot)

    def _refresh(self, token: str, request_id: int | str | None) -> bytes:
        """REFRESH_TOKEN: a new principal (and expiry) for this connection, or an error and the old one stays."""
        outcome = self.host.refresh_credential(self, token)
        if isinstance(outcome, AuthRefusal):
            return error_frame(INVALID_REQUEST, f"Invalid request: token refused: {outcome.message}", request_id)
        self.principal = outcome
        self.control.is_allowed = outcome.allows if outcome.patterns is not None else None
        return result_frame(None, request_id)


def _no_direct_write(data: bytes) -> None:
    raise AssertionError("a session without direct writes queued a write")  # blocked is always set for those
