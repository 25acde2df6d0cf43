"""uvicorn WebSocket protocol for the gateway: uvicorn's websockets-sansio implementation plus three changes.

1. **Pongs are not payload-checked.** Binance only requires *a* pong within 60 s, and real clients
   (binance-connector) answer pings with an empty payload; uvicorn would ignore those and drop the client.
2. **Direct frame writes.** The protocol object is exposed to the app as the ASGI extension
   ``pricegate.direct``; the session writes all its pending frames with :meth:`write_text_frames` in one
   ``transport.write`` (coalesced, no per-message ASGI ``send``/await), can see the transport's buffer size for
   its slow-client policy, and can close a stuck client without waiting for its buffer to drain.
3. **Drain on shutdown.** On server shutdown uvicorn closes every socket with 1012 at once; instead we ask the
   app (lifespan state ``pricegate.drain``) to close its clients with 1001 spread over a few seconds.

Selected with ``uvicorn.Config(ws=PricegateWebSocketProtocol)``; the app falls back to plain ASGI sends when
the extension is absent (TestClient, other servers).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.frames import Frame
from websockets.http11 import Request

from gateway.wsframe import encode_text_frames

DIRECT_EXTENSION = "pricegate.direct"
DRAIN_STATE_KEY = "pricegate.drain"
ABORT_AFTER_CLOSE_S = 5.0  # a client that does not read cannot receive our close frame either


class PricegateWebSocketProtocol(WebSocketsSansIOProtocol):
    on_writable: Callable[[], None] | None = None

    # ---- keepalive: any pong answers the outstanding ping ----
    def handle_pong(self, event: Frame) -> None:
        if self.pending_ping_payload is not None:
            self.pending_ping_payload = bytes(event.data)
        super().handle_pong(event)

    # ---- expose the direct writer to the app ----
    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        scope: Any = getattr(self, "scope", None)
        if scope is not None:
            scope["extensions"][DIRECT_EXTENSION] = self

    @property
    def is_closed(self) -> bool:
        return bool(self.close_sent or self.disconnected or self.transport.is_closing())

    @property
    def buffered_bytes(self) -> int:
        return int(self.transport.get_write_buffer_size())

    def write_text_frames(self, payloads: list[bytes]) -> int:
        """Write text frames in one transport write; returns bytes written (0 if the socket is closing)."""
        if self.is_closed:
            return 0
        if self.conn.extensions:
            # A negotiated extension (permessage-deflate) must transform each frame: use websockets.
            for payload in payloads:
                self.conn.send_text(payload)
            data = b"".join(self.conn.data_to_send())
        else:
            data = encode_text_frames(payloads)
        self.transport.write(data)
        return len(data)

    def close_now(self, code: int, reason: str) -> None:
        """Send a close frame and end the connection without waiting on a client that does not read."""
        if self.is_closed:
            return
        self.stop_keepalive()
        self.queue.put_nowait({"type": "websocket.disconnect", "code": code, "reason": reason})
        self.conn.send_close(code, reason)
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.close_sent = True
        self.transport.close()
        self.loop.call_later(ABORT_AFTER_CLOSE_S, self._abort_if_open)

    def _abort_if_open(self) -> None:
        if not self.disconnected:
            self.transport.abort()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.on_writable is not None:
            self.on_writable()

    # ---- shutdown: let the app drain with 1001 instead of an instant 1012 ----
    def shutdown(self) -> None:
        scope: Any = getattr(self, "scope", None)
        drain = scope["state"].get(DRAIN_STATE_KEY) if scope is not None else None
        if drain is not None and self.handshake_complete and not self.close_sent and not self.disconnected:
            drain()
            return
        super().shutdown()
