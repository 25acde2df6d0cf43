"""What gateway.ws.uvicorn_protocol borrows from uvicorn's websockets-sansio protocol is still there.

Our native WebSocket protocol subclasses an internal uvicorn class (docs/architecture.md, "What we borrow from
uvicorn"). An upgrade that renames a hook would not fail loudly: our override would simply never be called (pongs
ignored, sessions never told of a close). These checks fail with a message naming what changed.
"""

from __future__ import annotations

import inspect
import re

import pytest
import uvicorn
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from uvicorn.server import ServerState
from websockets.server import ServerProtocol

from gateway.ws.uvicorn_protocol import PricegateWebSocketProtocol

# Hooks we override, and the uvicorn method whose source must still call each (so the override runs).
OVERRIDDEN_HOOKS = {
    "handle_connect": "handle_events",
    "handle_text": "handle_events",
    "handle_cont": "handle_events",
    "handle_bytes": "handle_events",
    "handle_pong": "handle_events",
    "handle_close": "handle_events",
    "handle_parser_exception": "data_received",
    "keepalive_timeout": "send_keepalive_ping",
    "start_keepalive": None,  # called by uvicorn for ASGI routes, by us for native sessions
    "stop_keepalive": None,
    "connection_lost": None,  # asyncio.Protocol callbacks
    "pause_writing": None,
    "resume_writing": None,
    "shutdown": None,  # called by uvicorn's Server on exit
}
# Instance attributes we read or replace.
INSTANCE_ATTRIBUTES = (
    "app_state", "conn", "queue", "writable", "transport", "client", "loop", "handshake_initiated",
    "handshake_complete", "close_sent", "disconnected", "pending_ping_payload",
)  # fmt: skip
# What we use of websockets' sans-I/O ServerProtocol (uvicorn's ``conn``): methods, then attributes.
SERVER_PROTOCOL_METHODS = ("accept", "reject", "send_response", "data_to_send", "send_close")
SERVER_PROTOCOL_ATTRIBUTES = ("close_rcvd", "close_sent", "logger")


@pytest.mark.parametrize("hook", sorted(OVERRIDDEN_HOOKS))
def test_every_hook_we_override_exists_in_uvicorn(hook: str) -> None:
    assert hook in vars(PricegateWebSocketProtocol), f"test list out of date: we no longer override {hook}"
    assert callable(getattr(WebSocketsSansIOProtocol, hook, None)), (
        f"uvicorn {uvicorn.__version__} has no WebSocketsSansIOProtocol.{hook}: our override is never called; "
        "see docs/architecture.md 'What we borrow from uvicorn'"
    )


@pytest.mark.parametrize(("hook", "caller"), [(h, c) for h, c in sorted(OVERRIDDEN_HOOKS.items()) if c])
def test_uvicorn_still_dispatches_to_each_hook(hook: str, caller: str) -> None:
    source = inspect.getsource(getattr(WebSocketsSansIOProtocol, caller))
    assert re.search(rf"self\.{hook}\b", source), (
        f"uvicorn {uvicorn.__version__}: WebSocketsSansIOProtocol.{caller} no longer calls self.{hook}"
    )


async def test_the_attributes_we_use_are_set_by_uvicorns_constructor() -> None:
    config = uvicorn.Config(app=lambda scope, receive, send: None, ws_per_message_deflate=False)
    config.load()
    protocol = WebSocketsSansIOProtocol(config, ServerState(), app_state={})
    missing = [name for name in INSTANCE_ATTRIBUTES if not hasattr(protocol, name)]
    assert not missing, f"uvicorn {uvicorn.__version__}: WebSocketsSansIOProtocol instances lack {missing}"
    assert isinstance(protocol.conn, ServerProtocol)
    lacking = [name for name in SERVER_PROTOCOL_METHODS if not callable(getattr(protocol.conn, name, None))]
    lacking += [name for name in SERVER_PROTOCOL_ATTRIBUTES if not hasattr(protocol.conn, name)]
    # connection_lost closes websockets' parser generator to break its reference cycle with the protocol.
    assert callable(getattr(getattr(protocol.conn, "parser", None), "close", None)), "ServerProtocol.parser changed"
    assert not lacking, f"websockets' ServerProtocol lacks {lacking}"
