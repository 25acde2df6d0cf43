"""What a WebSocket connection needs from the gateway process it is accepted into (the connection's side of
the boundary; :class:`gateway.node.GatewayNode` implements it).

Both connection kinds — the native uvicorn protocol (:mod:`gateway.ws.uvicorn_protocol`) and the ASGI
fallback (:mod:`gateway.ws.asgi_fallback`) — find a :class:`ConnectionHost` in the app's lifespan state under
:data:`HOST_STATE_KEY` and use only this: admission, opening a session, buffer sizes, keepalive and drain.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from gateway.ws.admission import Admitted, Decision, Handshake, Rejection
from gateway.ws.keepalive import KeptAlive
from gateway.ws.session import Connection, Session

HOST_STATE_KEY = "pricegate.ws_host"


class ConnectionHost(Protocol):
    client_buffer_bytes: int  # outbound bytes a client may have waiting before it counts as slow
    client_sndbuf_bytes: int  # fixed kernel send buffer per client (0: kernel autotuning)
    max_message_bytes: int  # largest inbound message, fragments together (close 1009 beyond)
    max_fragments_per_message: int  # frames one inbound message may span (close 1009 beyond)

    def admit(self, handshake: Handshake) -> Decision | Awaitable[Decision]: ...

    def open_session(self, connection: Connection, admitted: Admitted) -> Session:
        """A session for an accepted handshake (the caller starts it with ``admitted.connect``)."""
        ...

    def identify(self, transport: object, peer: str | None, forwarded_for: str | None) -> str | Rejection:
        """The client's address (behind a trusted proxy: from X-Forwarded-For, charged to its per-IP limits now),
        or why the connection is refused."""
        ...

    def connection_closed(self, connection: object) -> None:
        """The socket is gone: release what the edge counted for it (idempotent)."""
        ...

    def close_soon(self, close: Callable[[], None]) -> None:
        """Run ``close`` (a connection whose client went away) now or on a later loop turn: closes come a few per
        turn (gateway/turn_gate.py)."""
        ...

    def keep_alive(self, connection: KeptAlive) -> None: ...

    def stop_keeping_alive(self, connection: KeptAlive) -> None: ...

    def begin_drain(self) -> None:
        """Stop taking connections and close every session with 1001, spread over a few seconds."""
        ...
