"""The WebSocket endpoint for ASGI servers other than ours: sessions over plain ``websocket.send``.

Our uvicorn protocol (:mod:`gateway.ws.uvicorn_protocol`) runs sessions natively and never reaches this endpoint for
stream paths. Under any other ASGI server (or uvicorn's stock WebSocket protocols) this keeps the gateway
correct: frames queue in a bounded :class:`~gateway.ws.hub.Outbox` (conflating state streams, closing 4000 on
event-stream overflow) and one writer task per client drains it with ASGI sends. Slower, never wrong.
"""

from __future__ import annotations

import asyncio
import contextlib

from starlette.responses import PlainTextResponse
from starlette.websockets import WebSocket, WebSocketDisconnect

from gateway.node import GatewayNode
from gateway.ws.hub import Outbox
from gateway.ws.session import Rejection, Session, admit


class AsgiConnection:
    transport = None  # no direct writes: the session queues into the outbox

    def __init__(self, websocket: WebSocket, limit: int) -> None:
        self.websocket = websocket
        self.outbox: Outbox | None = Outbox(limit)
        self._wakeup = asyncio.Event()
        self._close: tuple[int, str] | None = None

    @property
    def peer(self) -> tuple[str, int] | None:
        client = self.websocket.client
        return (client.host, client.port) if client else None

    def write_text_frames(self, payloads: list[bytes]) -> int:
        assert self.outbox is not None
        for payload in payloads:
            self.outbox.push_control(payload)
        self._wakeup.set()
        return 0  # counted when really sent

    def close_now(self, code: int, reason: str) -> None:
        self._close = (code, reason)
        self._wakeup.set()

    def wake_writer(self) -> None:
        self._wakeup.set()

    async def write_forever(self, session: Session) -> None:
        outbox = self.outbox
        assert outbox is not None
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            if outbox.overflowed and self._close is None:
                session._close_slow_consumer()
            if self._close is not None:
                with contextlib.suppress(RuntimeError, WebSocketDisconnect):
                    await self.websocket.close(*self._close)
                return
            for frame in outbox.take():
                await self.websocket.send_text(frame.decode())
                session.node.sent_bytes += len(frame)


async def websocket_endpoint(websocket: WebSocket) -> None:
    node: GatewayNode = websocket.app.state.node
    admission = admit(node, websocket.scope["path"], websocket.scope.get("query_string", b"").decode("latin-1"))
    if isinstance(admission, Rejection):
        response = PlainTextResponse(admission.reason, status_code=admission.status, headers=admission.headers)
        await websocket.send_denial_response(response)
        return
    await websocket.accept()
    connection = AsgiConnection(websocket, node.settings.client_buffer_bytes)
    session = Session(node, connection, admission.combined)
    writer = asyncio.create_task(connection.write_forever(session))
    code: int | None = None
    try:
        session.start(admission)
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                code = int(message.get("code") or 1000)
                break
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
