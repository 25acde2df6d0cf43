"""How a gateway app is served: the uvicorn configuration every entry point (CLI, tests, benchmarks) shares."""

from __future__ import annotations

import uvicorn
from starlette.applications import Starlette

from gateway.edge.http_protocol import PricegateHttpProtocol
from gateway.ws.uvicorn_protocol import PricegateWebSocketProtocol
from shared.settings import Settings


def uvicorn_config(app: Starlette, settings: Settings) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=PricegateHttpProtocol,
        ws=PricegateWebSocketProtocol,
        # uvicorn's own cap counts connections and running requests; the edge refuses beyond max_connections
        # already at accept (gateway.edge.http_protocol), this is the backstop for requests in flight.
        limit_concurrency=settings.max_connections + 1,
        ws_max_size=settings.max_frame_bytes,
        ws_ping_interval=settings.ping_interval_s,
        ws_ping_timeout=settings.ping_timeout_s,
        # Compression costs CPU per connection per message and our frames are small JSON: off.
        ws_per_message_deflate=False,
        lifespan="on",
        ssl_certfile=settings.ssl_certfile,
        ssl_keyfile=settings.ssl_keyfile,
        log_level=settings.log_level.lower(),
        # Long enough for the staggered 1001 drain, short enough for lifespan shutdown to close the broker.
        timeout_graceful_shutdown=int(settings.shutdown_drain_s) + 5,
        access_log=False,
    )


def bound_port(server: uvicorn.Server) -> int:
    """The port the started server listens on (useful with port 0)."""
    return int(server.servers[0].sockets[0].getsockname()[1])
