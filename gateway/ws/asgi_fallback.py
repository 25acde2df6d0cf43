"""The WebSocket endpoint for ASGI servers other than ours: sessions over plain ``websocket.send``.

Our uvicorn protocol (:mod:`gateway.ws.uvicorn_protocol`) runs sessions natively and never reaches this endpoint
for stream paths. Under any other ASGI server (or uvicorn's stock WebSocket protocols) this keeps the gateway
correct: frames queue in a bounded :class:`~gateway.ws.asgi_outbox.Outbox` (conflating state streams, closing
4000 on event-stream overflow) and one writer task per client drains it with ASGI sends. Slower, never wrong.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from starlette.responses import PlainTextResponse
from starlette.websockets import WebSocket, WebSocketDisconnect

from gateway.edge.client_ip import forwarded_for
from gateway.ws.admission import Admitted, Decision, Rejection, handshake_from
from gateway.ws.asgi_outbox import Outbox
from gateway.ws.close_codes import CloseCode
from gateway.ws.host import HOST_STATE_KEY, ConnectionHost
from gateway.ws.hub import StreamBatch
from gateway.ws.session import Session


class AsgiConnection:
    """A :class:`~gateway.ws.session.Connection` without direct writes: everything goes through the outbox."""

    write: Callable[[bytes], object] | None = None

    def __init__(self, websocket: WebSocket, limit: int) -> None:
        self.websocket = websocket
        self.outbox = Outbox(limit)
        self._wakeup = asyncio.Event()
        self._close: tuple[int, str] | None = None

    @property
    def peer(self) -> tuple[str, int] | None:
        client = self.websocket.client
        return (client.host, client.port) if client else None

    @property
    def dropped(self) -> tuple[int, int]:
        return self.outbox.conflated, self.outbox.dropped

    def write_frames(self, payloads: list[bytes]) -> int:
        for payload in payloads:
            self.outbox.push_control(payload)
        self._wakeup.set()
        return 0  # counted when really sent

    def enqueue(self, batch: StreamBatch, combined: bool) -> None:
        push = self.outbox.push
        for frame in batch.frames(combined):
            push(batch.stream, batch.is_state, frame)
        self._wakeup.set()

    def close_now(self, code: CloseCode, reason: str) -> None:
        self._close = (code, reason)
        self._wakeup.set()

    async def write_forever(self, session: Session) -> None:
        outbox = self.outbox
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            if outbox.overflowed and self._close is None:
                session.close_slow_consumer()
            if self._close is not None:
                with contextlib.suppress(RuntimeError, WebSocketDisconnect):
                    await self.websocket.close(*self._close)
                return
            for frame in outbox.take():
                await self.websocket.send_text(frame.decode())
                session.host.sent_bytes += len(frame)


async def websocket_endpoint(websocket: WebSocket) -> None:
    host: ConnectionHost = websocket.scope["state"][HOST_STATE_KEY]
    headers = websocket.headers
    query = websocket.scope.get("query_string", b"").decode("latin-1")
    client = websocket.client
    identity = host.identify(
        websocket, client.host if client else None, forwarded_for(headers.getlist("x-forwarded-for"))
    )
    decision: Decision
    if isinstance(identity, Rejection):
        decision = identity
    else:
        handshake = handshake_from(websocket.scope["path"], query, headers.getlist, identity)
        pending = handshake if isinstance(handshake, Rejection) else host.admit(handshake)
        decision = pending if isinstance(pending, Admitted | Rejection) else await pending
    if isinstance(decision, Rejection):
        response = PlainTextResponse(decision.reason, status_code=decision.status, headers=decision.headers)
        await websocket.send_denial_response(response)
        return
    await websocket.accept()
    connection = AsgiConnection(websocket, host.client_buffer_bytes)
    session = host.open_session(connection, decision)
    writer = asyncio.create_task(connection.write_forever(session))
    code: int | None = None
    try:
        session.start(decision.connect)
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                code = int(message.get("code") or CloseCode.NORMAL)
                break
            if not session.allow_frame():  # ASGI hands over messages, not frames: one charge each
                continue
            text = message.get("text")
            if text is not None:
                session.on_text(text)
            else:
                session.on_binary(message.get("bytes") or b"")
    finally:
        session.closed(code)
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer
