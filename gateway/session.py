"""One client WebSocket: accept, read control frames, queue replies and data, close with documented codes.

The Binance control protocol itself lives in :mod:`gateway.protocol` (pure); this module is the thin I/O
around it. Data frames never pass through here one by one: the hub queues them in this session's
:class:`~gateway.hub.Outbox` and the node's per-loop-turn flush calls :meth:`Session.flush`, which writes
everything pending in one socket write (direct mode, our uvicorn protocol) or wakes the writer task (plain
ASGI fallback). A client whose socket buffer is full gets nothing more written until it drains; meanwhile its
outbox conflates state streams and overflows on event streams (close 4000).

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

from gateway.hub import CLOSE_SLOW_CONSUMER, CLOSE_SLOW_CONSUMER_REASON, Outbox
from gateway.node import CLOSE_GOING_AWAY, GatewayNode
from gateway.protocol import ControlOutcome, ControlState, parse_connect_path
from gateway.wsprotocol import DIRECT_EXTENSION
from shared.errors import ProtocolError
from shared.ratelimit import TokenBucket
from shared.streams import Stream

logger = logging.getLogger("pricegate.gateway.session")

CLOSE_RATE_LIMIT = 1008
CLOSE_RATE_LIMIT_REASON = "too many control messages"
# Stop writing to a client once this much is queued in its socket's user-space buffer; its outbox then
# absorbs (and conflates) what arrives until the kernel accepts more.
TRANSPORT_HIGH_WATER = 64 * 1024


class Session:
    def __init__(self, websocket: WebSocket, node: GatewayNode, combined: bool) -> None:
        self.websocket = websocket
        self.node = node
        settings = node.settings
        self.direct: Any = websocket.scope.get("extensions", {}).get(DIRECT_EXTENSION)
        self.outbox = Outbox(settings.client_buffer_bytes, combined=combined, flush=self.flush)
        self.control = ControlState(
            combined=combined,
            max_streams=settings.max_streams_per_connection,
            is_known_symbol=node.is_known_symbol,
        )
        self.bucket = TokenBucket(settings.control_rate_per_s, settings.control_burst, time.monotonic())
        self.closing = False
        self.close_code: int | None = None
        self._wakeup = asyncio.Event()

    # ---- output ----
    def flush(self, outbox: Outbox) -> None:
        """Called by the hub once per loop turn when this client has pending frames."""
        if self.closing:
            outbox.take()
            return
        if outbox.overflowed:
            self.node.metrics.slow_consumer_disconnects.inc()
            self.close(CLOSE_SLOW_CONSUMER, CLOSE_SLOW_CONSUMER_REASON)
            return
        direct = self.direct
        if direct is None:
            self._wakeup.set()
            return
        # Hand the transport no more than fills it to TRANSPORT_HIGH_WATER (plus the one frame that crosses it):
        # writing the whole outbox whenever the transport was just under the mark let a stuck client hold up to
        # client_buffer_bytes in its transport *and* client_buffer_bytes in its outbox. Crossing the mark pauses
        # the transport; its resume_writing (our on_writable) flushes the rest. Usually one write per turn.
        sent = 0
        while outbox.frames:
            buffered = direct.buffered_bytes
            if buffered > TRANSPORT_HIGH_WATER:
                break  # resumed by the protocol's on_writable callback
            written = direct.write_text_frames(outbox.take(TRANSPORT_HIGH_WATER - buffered))
            if not written:
                break  # the socket is closing
            sent += written
        if sent:
            self.node.metrics.sent_bytes.inc(sent)

    def _on_writable(self) -> None:
        if self.outbox.frames or self.outbox.overflowed:
            self.node.hub.mark_dirty(self.outbox)
            self.node.schedule_flush()

    def _send_reply(self, frame: bytes) -> None:
        self.outbox.push_control(frame)
        self.node.hub.mark_dirty(self.outbox)
        self.node.schedule_flush()

    async def _write_via_asgi(self) -> None:
        """Fallback writer when the server does not offer the direct extension."""
        while not self.closing:
            await self._wakeup.wait()
            self._wakeup.clear()
            if self.outbox.overflowed:
                self.node.metrics.slow_consumer_disconnects.inc()
                self.close(CLOSE_SLOW_CONSUMER, CLOSE_SLOW_CONSUMER_REASON)
                return
            for frame in self.outbox.take():
                await self.websocket.send_text(frame.decode())
                self.node.metrics.sent_bytes.inc(len(frame))

    # ---- closing ----
    def close(self, code: int, reason: str) -> None:
        if self.closing:
            return
        self.closing = True
        self.close_code = code
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

    # ---- subscriptions ----
    def _subscribe(self, streams: list[Stream]) -> None:
        hub, relay = self.node.hub, self.node.relay
        for stream in streams:
            if hub.add(stream, self.outbox):
                relay.want(stream.name)

    def _unsubscribe(self, names: list[str]) -> None:
        for name in self.node.hub.remove_all(names, self.outbox):
            self.node.relay.unwant(name)

    def _apply(self, outcome: ControlOutcome) -> None:
        self._unsubscribe(outcome.unsubscribe)
        self.outbox.combined = self.control.combined
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
            # flush() stops at TRANSPORT_HIGH_WATER and relies on pause/resume_writing at that same mark; set it
            # explicitly rather than trusting every event loop's (and TLS transport's) default to be 64 KiB.
            self.direct.transport.set_write_buffer_limits(high=TRANSPORT_HIGH_WATER)
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
