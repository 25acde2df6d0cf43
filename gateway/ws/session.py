"""One client WebSocket session: the Binance control protocol applied to the hub, and the data path out.

The control protocol itself is :mod:`gateway.ws.control` (pure); a session applies its outcomes (subscribe,
unsubscribe, reply) and is the hub's :class:`~gateway.ws.hub.Subscriber`. It is driven by callbacks, not by a
task: :meth:`Session.on_text` for every inbound message, :meth:`Session.closed` once at the end. Two kinds of
connection carry it:

* **native** (the normal case): our uvicorn WebSocket protocol (:mod:`gateway.ws.uvicorn_protocol`) accepts the
  handshake itself and calls the session directly: no ASGI task, queue or coroutine chain per client. Once
  per flush the hub hands the session one :class:`~gateway.ws.hub.StreamBatch` per subscribed stream with new
  messages, and it writes the batch's pre-encoded block to the socket: one write per client per flush.
* **ASGI fallback** (:mod:`gateway.ws.asgi_fallback`, for other servers): frames go through a bounded
  :class:`~gateway.ws.hub.Outbox` and a writer task.

Slow clients (native): once more than ``client_buffer_bytes`` wait in the socket's buffer the session stops
writing. Batches of *state* streams are skipped and the stream is marked stale; when the buffer drains
(``resume_writing``) the client gets the newest value of each stale stream — conflation without per-client
queues. A batch of an *event* stream that cannot be written closes the client with 4000. Memory per client
is bounded by the limit plus one batch.

Close codes: 1000 normal, 1001 server going away (drain), 1007 invalid UTF-8, 1008 control-message rate
exceeded, 1009 frame too big, 1011 keepalive timeout, 4000 slow consumer.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Protocol

from gateway.node import CLOSE_GOING_AWAY, GatewayNode
from gateway.ws.control import ConnectRequest, ControlOutcome, ControlState, parse_connect_path
from gateway.ws.hub import CLOSE_SLOW_CONSUMER, CLOSE_SLOW_CONSUMER_REASON, Outbox, StreamBatch
from shared.errors import ProtocolError
from shared.ratelimit import TokenBucket
from shared.streams import Stream

logger = logging.getLogger("pricegate.gateway.session")

CLOSE_RATE_LIMIT = 1008
CLOSE_RATE_LIMIT_REASON = "too many control messages"


class Connection(Protocol):
    """What a session needs from the socket it runs on."""

    @property
    def peer(self) -> tuple[str, int] | None: ...

    # The asyncio transport for direct writes, or None when frames must go through ``outbox`` (ASGI fallback).
    transport: Any
    outbox: Outbox | None

    def write_text_frames(self, payloads: list[bytes]) -> int: ...

    def close_now(self, code: int, reason: str) -> None: ...

    def wake_writer(self) -> None: ...


class Session:
    def __init__(self, node: GatewayNode, connection: Connection, combined: bool) -> None:
        self.node = node
        self.connection = connection
        self.transport: Any = connection.transport
        self.combined = combined
        settings = node.settings
        self.buffer_limit = settings.client_buffer_bytes
        self.control = ControlState(
            combined=combined,
            max_streams=settings.max_streams_per_connection,
            is_known_symbol=node.is_known_symbol,
        )
        self.bucket = TokenBucket(settings.control_rate_per_s, settings.control_burst, time.monotonic())
        self.closing = False
        self.ended = False
        self.close_code: int | None = None
        self.stale: set[str] = set()  # state streams skipped while the socket was full
        self.conflated = 0  # state messages skipped for a full socket (native)
        self._parts: list[bytes] | None = None  # blocks of this flush, for clients on several streams
        # Hot-path flags, kept current by the events that change them so deliver() tests one attribute:
        self.paused = False  # the socket buffer passed client_buffer_bytes (transport's pause_writing)
        self.blocked = self.transport is None  # closing, paused, or no direct writes (ASGI fallback)
        self.multi = False  # subscribed to more than one stream: coalesce this flush's blocks in finish()
        self._write: Any = self.transport.write if self.transport is not None else None

    # ---- lifecycle (called by the connection) ----
    def start(self, connect: ConnectRequest) -> None:
        """The handshake was accepted: register, report bad URL streams, subscribe to the URL's streams."""
        node = self.node
        node.sessions.add(self)
        node.metrics.connections.inc()
        node.metrics.connections_accepted.inc()
        for frame in connect.errors:
            self._send_reply(frame)
        self._subscribe(self.control.add_initial(connect.streams))

    def on_text(self, text: str) -> None:
        if self.closing:
            return
        metrics = self.node.metrics
        if not self.bucket.allow(time.monotonic()):
            metrics.control_messages.labels(result="rate_limited").inc()
            self.close(CLOSE_RATE_LIMIT, CLOSE_RATE_LIMIT_REASON)
            return
        outcome = self.control.handle_text(text)
        metrics.control_messages.labels(result="error" if outcome.reply.startswith(b'{"error"') else "ok").inc()
        self._apply(outcome)

    def on_binary(self, data: bytes) -> None:
        if self.closing:
            return
        if not self.bucket.allow(time.monotonic()):
            self.node.metrics.control_messages.labels(result="rate_limited").inc()
            self.close(CLOSE_RATE_LIMIT, CLOSE_RATE_LIMIT_REASON)
            return
        self.node.metrics.control_messages.labels(result="error").inc()
        self._apply(self.control.handle_binary(data))

    def closed(self, code: int | None) -> None:
        """The connection is over (either side closed it, or it was lost). Idempotent."""
        if self.ended:
            return
        self.ended = True
        self.closing = self.blocked = True
        if self.close_code is None:
            self.close_code = code or 1000
        self._unsubscribe(list(self.control.subscriptions))
        node = self.node
        node.metrics.connections.dec()
        node.metrics.disconnects.labels(code=str(self.close_code)).inc()
        node.session_closed(self)

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
        self.node.sent_bytes += len(block)
        return False

    def _deliver_blocked(self, batch: StreamBatch) -> bool:
        if self.closing:
            return False
        if self.transport is None:
            return self._deliver_to_outbox(batch)
        # Paused: more than client_buffer_bytes wait in the socket buffer.
        if batch.is_state:
            self.stale.add(batch.stream)
            self.conflated += len(batch.payloads)
        else:
            self._close_slow_consumer()
        return False

    def finish(self) -> None:
        parts, self._parts = self._parts, None
        if parts and not self.closing:
            data = b"".join(parts)
            self._write(data)
            self.node.sent_bytes += len(data)

    def on_pause(self) -> None:
        """The socket buffer passed its high-water mark (client_buffer_bytes): stop writing data."""
        self.paused = self.blocked = True

    def on_writable(self) -> None:
        """The socket drained below its low-water mark: write again, starting with the newest value of every
        state stream skipped meanwhile."""
        self.paused = False
        self.blocked = self.closing or self.transport is None
        if not self.stale or self.closing:
            return
        stale, self.stale = self.stale, set()
        hub = self.node.hub
        # A stream whose batch still waits for its turn needs no resend: the batch ends with the newest value, and
        # sending it now as well would show the client that value, then older ones, then it again.
        frames = [
            frame
            for name in stale
            if not hub.is_pending(name) and (frame := hub.latest_frame(name, self.combined)) is not None
        ]
        if frames:
            self.node.sent_bytes += self.connection.write_text_frames(frames)

    def _deliver_to_outbox(self, batch: StreamBatch) -> bool:
        outbox = self.connection.outbox
        assert outbox is not None
        push = outbox.push
        for frame in batch.frames(self.combined):
            push(batch.stream, batch.is_state, frame)
        self.connection.wake_writer()
        return False

    def _send_reply(self, frame: bytes) -> None:
        self.node.sent_bytes += self.connection.write_text_frames([frame])

    # ---- closing ----
    def _close_slow_consumer(self) -> None:
        self.node.metrics.slow_consumer_disconnects.inc()
        self.close(CLOSE_SLOW_CONSUMER, CLOSE_SLOW_CONSUMER_REASON)

    def close(self, code: int, reason: str) -> None:
        """Close from our side; :meth:`closed` follows when the connection reports the end."""
        if self.closing:
            return
        self.closing = self.blocked = True
        self.close_code = code
        self.connection.close_now(code, reason)

    def close_going_away(self) -> None:
        self.close(CLOSE_GOING_AWAY, "server shutting down")

    @property
    def dropped(self) -> tuple[int, int]:
        """(conflated, overflow-dropped) messages of this client, for the metrics."""
        outbox = self.connection.outbox
        if outbox is None:
            return self.conflated, 0
        return self.conflated + outbox.conflated, outbox.dropped

    # ---- subscriptions ----
    def _subscribe(self, streams: list[Stream]) -> None:
        hub, relay = self.node.hub, self.node.relay
        for stream in streams:
            if hub.add(stream, self):
                relay.want(stream.name)
        self.multi = len(self.control.subscriptions) > 1

    def _unsubscribe(self, names: list[str]) -> None:
        for name in self.node.hub.remove_all(names, self):
            self.node.relay.unwant(name)
        self.stale.difference_update(names)
        self.multi = len(self.control.subscriptions) > 1

    def _apply(self, outcome: ControlOutcome) -> None:
        self._unsubscribe(outcome.unsubscribe)
        self.combined = self.control.combined
        self._send_reply(outcome.reply)
        self._subscribe(outcome.subscribe)


class Rejection:
    """A handshake the gateway refuses, with the HTTP status and text to answer."""

    __slots__ = ("headers", "reason", "status")

    def __init__(self, status: int, reason: str, headers: dict[str, str] | None = None) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers or {}


def admit(node: GatewayNode, path: str, query_string: str) -> ConnectRequest | Rejection:
    """Decide on a WebSocket handshake: the parsed URL, or why it is refused (404 / 503)."""
    if node.draining or len(node.sessions) >= node.settings.max_connections:
        reason = "draining" if node.draining else "max_connections"
        node.metrics.connections_rejected.labels(reason=reason).inc()
        return Rejection(503, f"gateway unavailable: {reason}", {"Retry-After": "1"})
    try:
        return parse_connect_path(
            path,
            query_string,
            max_streams=node.settings.max_streams_per_connection,
            is_known_symbol=node.is_known_symbol,
        )
    except ProtocolError as error:
        node.metrics.connections_rejected.labels(reason="not_found").inc()
        return Rejection(404, error.reason)
