"""One client WebSocket: accept, read control frames, write replies and data, close with documented codes.

The Binance control protocol itself lives in :mod:`gateway.protocol` (pure); this module is the thin I/O
around it. A session is a :class:`~gateway.hub.Subscriber`: once per flush the hub hands it one
:class:`~gateway.hub.StreamBatch` per subscribed stream with new messages, and it writes the batch's
pre-encoded block straight to its socket (direct mode, our uvicorn protocol): one write per client per flush,
no per-message work, no await. Without the direct extension (other ASGI servers) it falls back to a bounded
:class:`~gateway.hub.Outbox` drained by a writer task through ASGI sends.

Slow clients (direct mode): once more than ``client_buffer_bytes`` wait in the socket's buffer the session
stops writing. Batches of *state* streams are skipped and the stream is marked stale; when the buffer drains
(``resume_writing``) the client gets the newest value of each stale stream — conflation without per-client
queues. A batch of an *event* stream that cannot be written closes the client with 4000. Memory per client is
bounded by the limit plus one batch.

Close codes: 1000 normal, 1001 server going away (drain), 1007 invalid UTF-8, 1008 control-message rate
exceeded, 1009 frame too big (uvicorn), 1011 keepalive timeout (uvicorn), 4000 slow consumer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from starlette.responses import PlainTextResponse
from starlette.websockets import WebSocket, WebSocketDisconnect

from gateway.hub import CLOSE_SLOW_CONSUMER, CLOSE_SLOW_CONSUMER_REASON, Outbox, StreamBatch
from gateway.node import CLOSE_GOING_AWAY, GatewayNode
from gateway.protocol import ControlOutcome, ControlState, parse_connect_path
from gateway.wsprotocol import DIRECT_EXTENSION
from shared.errors import ProtocolError
from shared.ratelimit import TokenBucket
from shared.streams import Stream

logger = logging.getLogger("pricegate.gateway.session")

CLOSE_RATE_LIMIT = 1008
CLOSE_RATE_LIMIT_REASON = "too many control messages"


class Session:
    def __init__(self, websocket: WebSocket, node: GatewayNode, combined: bool) -> None:
        self.websocket = websocket
        self.node = node
        settings = node.settings
        self.direct: Any = websocket.scope.get("extensions", {}).get(DIRECT_EXTENSION)
        self.transport: Any = self.direct.transport if self.direct is not None else None
        self.combined = combined
        self.buffer_limit = settings.client_buffer_bytes
        # Only the ASGI fallback queues frames; direct mode writes them to the socket at once.
        self.outbox: Outbox | None = None if self.direct is not None else Outbox(settings.client_buffer_bytes)
        self.control = ControlState(
            combined=combined,
            max_streams=settings.max_streams_per_connection,
            is_known_symbol=node.is_known_symbol,
        )
        self.bucket = TokenBucket(settings.control_rate_per_s, settings.control_burst, time.monotonic())
        self.closing = False
        self.close_code: int | None = None
        self.stale: set[str] = set()  # state streams skipped while the socket was full
        self.conflated = 0  # state messages skipped for a full socket (direct mode)
        self._parts: list[bytes] | None = None  # blocks of this flush, for clients on several streams
        self._wakeup = asyncio.Event()

    # ---- Subscriber: the hub's once-per-flush delivery ----
    def deliver(self, batch: StreamBatch) -> bool:
        if self.closing:
            return False
        transport = self.transport
        if transport is None:
            return self._deliver_to_outbox(batch)
        if transport.is_closing():
            return False
        if transport.get_write_buffer_size() > self.buffer_limit:
            if batch.is_state:
                self.stale.add(batch.stream)
                self.conflated += len(batch.payloads)
            else:
                self._close_slow_consumer()
            return False
        if self.stale:
            self.stale.discard(batch.stream)  # this batch carries a newer value than the one we skipped
        block = batch.block(self.combined)
        if len(self.control.subscriptions) > 1:
            if self._parts is None:
                self._parts = [block]
                return True
            self._parts.append(block)
            return False
        transport.write(block)
        self.node.sent_bytes += len(block)
        return False

    def finish(self) -> None:
        parts, self._parts = self._parts, None
        if parts and not self.closing and not self.transport.is_closing():
            data = b"".join(parts)
            self.transport.write(data)
            self.node.sent_bytes += len(data)

    def _on_writable(self) -> None:
        """The socket drained below its low-water mark: send the newest value of every skipped state stream."""
        if not self.stale or self.closing:
            return
        stale, self.stale = self.stale, set()
        frames = [
            frame for name in stale if (frame := self.node.hub.latest_frame(name, self.combined)) is not None
        ]
        if frames:
            self.node.sent_bytes += self.direct.write_text_frames(frames)

    def _deliver_to_outbox(self, batch: StreamBatch) -> bool:
        assert self.outbox is not None
        push = self.outbox.push
        for frame in batch.frames(self.combined):
            push(batch.stream, batch.is_state, frame)
        self._wakeup.set()
        return False

    def _send_reply(self, frame: bytes) -> None:
        if self.direct is not None:
            self.node.sent_bytes += self.direct.write_text_frames([frame])
        else:
            assert self.outbox is not None
            self.outbox.push_control(frame)
            self._wakeup.set()

    async def _write_via_asgi(self) -> None:
        """Fallback writer when the server does not offer the direct extension."""
        outbox = self.outbox
        assert outbox is not None
        while not self.closing:
            await self._wakeup.wait()
            self._wakeup.clear()
            if outbox.overflowed:
                self._close_slow_consumer()
                return
            for frame in outbox.take():
                await self.websocket.send_text(frame.decode())
                self.node.sent_bytes += len(frame)

    # ---- closing ----
    def _close_slow_consumer(self) -> None:
        self.node.metrics.slow_consumer_disconnects.inc()
        self.close(CLOSE_SLOW_CONSUMER, CLOSE_SLOW_CONSUMER_REASON)

    def close(self, code: int, reason: str) -> None:
        if self.closing:
            return
        self.closing = True
        self.close_code = code
        if self.outbox is not None:
            self.outbox.take()
        if self.direct is not None:
            self.direct.close_now(code, reason)
        else:
            asyncio.get_running_loop().create_task(self._close_via_asgi(code, reason))

    async def _close_via_asgi(self, code: int, reason: str) -> None:
        try:
            await self.websocket.close(code, reason)
        except (RuntimeError, WebSocketDisconnect):
            pass  # already closed by the peer

    def close_going_away(self) -> None:
        self.close(CLOSE_GOING_AWAY, "server shutting down")

    @property
    def dropped(self) -> tuple[int, int]:
        """(conflated, overflow-dropped) messages of this client, for the metrics."""
        if self.outbox is None:
            return self.conflated, 0
        return self.conflated + self.outbox.conflated, self.outbox.dropped

    # ---- subscriptions ----
    def _subscribe(self, streams: list[Stream]) -> None:
        hub, relay = self.node.hub, self.node.relay
        for stream in streams:
            if hub.add(stream, self):
                relay.want(stream.name)

    def _unsubscribe(self, names: list[str]) -> None:
        for name in self.node.hub.remove_all(names, self):
            self.node.relay.unwant(name)
        self.stale.difference_update(names)

    def _apply(self, outcome: ControlOutcome) -> None:
        self._unsubscribe(outcome.unsubscribe)
        self.combined = self.control.combined
        self._send_reply(outcome.reply)
        self._subscribe(outcome.subscribe)

    # ---- the connection ----
    async def run(self) -> None:
        websocket = self.websocket
        try:
            connect = parse_connect_path(
                websocket.scope["path"],
                websocket.scope.get("query_string", b"").decode("latin-1"),
                max_streams=self.node.settings.max_streams_per_connection,
                is_known_symbol=self.node.is_known_symbol,
            )
        except ProtocolError as error:
            await websocket.send_denial_response(PlainTextResponse(error.reason, status_code=404))
            return
        await websocket.accept()
        node = self.node
        node.sessions.add(self)
        node.metrics.connections.inc()
        node.metrics.connections_accepted.inc()
        if self.direct is not None:
            self.direct.on_writable = self._on_writable
            # Pause (and so later resume, which resends stale state) around our own limit, not the loop's default.
            self.transport.set_write_buffer_limits(high=self.buffer_limit, low=self.buffer_limit // 4)
        writer = None if self.direct is not None else asyncio.get_running_loop().create_task(self._write_via_asgi())
        try:
            for frame in connect.errors:
                self._send_reply(frame)
            self._subscribe(self.control.add_initial(connect.streams))
            await self._read_loop()
        finally:
            self.closing = True
            self._unsubscribe(list(self.control.subscriptions))
            if writer is not None:
                self._wakeup.set()
                writer.cancel()
            node.metrics.connections.dec()
            node.metrics.disconnects.labels(code=str(self.close_code or 1000)).inc()
            node.session_closed(self)

    async def _read_loop(self) -> None:
        receive = self.websocket.receive
        metrics = self.node.metrics
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                if self.close_code is None:
                    self.close_code = int(message.get("code") or 1000)
                return
            if self.closing:
                continue
            if not self.bucket.allow(time.monotonic()):
                metrics.control_messages.labels(result="rate_limited").inc()
                self.close(CLOSE_RATE_LIMIT, CLOSE_RATE_LIMIT_REASON)
                continue
            text = message.get("text")
            if text is not None:
                outcome = self.control.handle_text(text)
            else:
                outcome = self.control.handle_binary(message.get("bytes") or b"")
            metrics.control_messages.labels(result="error" if outcome.reply.startswith(b'{"error"') else "ok").inc()
            self._apply(outcome)


async def websocket_endpoint(websocket: WebSocket) -> None:
    node: GatewayNode = websocket.app.state.node
    if node.draining or len(node.sessions) >= node.settings.max_connections:
        reason = "draining" if node.draining else "max_connections"
        node.metrics.connections_rejected.labels(reason=reason).inc()
        await websocket.send_denial_response(
            PlainTextResponse(f"gateway unavailable: {reason}", status_code=503, headers={"Retry-After": "1"})
        )
        return
    combined = websocket.scope["path"].startswith("/stream")
    await Session(websocket, node, combined).run()
