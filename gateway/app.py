"""The gateway ASGI app: ``create_app(settings, broker)`` composes routes once; the lifespan owns the tasks.

The broker is started and closed by the caller (the CLI or a test fixture), so that "Redis unreachable at
start" is reported as one clear configuration error before the server binds. Background coroutines given in
``background`` (the demo's in-process ingest) run beside the relay; if any long-lived task dies, the failure is
logged with its traceback and readiness turns false — never a silent stop.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from typing import Any

from prometheus_client import make_asgi_app, start_http_server
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.types import Receive, Scope, Send

from gateway.auth.service import Authenticator
from gateway.edge.client_ip import TrustedProxies
from gateway.edge.guard import EdgeGuard, EdgeLimits
from gateway.edge.http_protocol import EDGE_STATE_KEY
from gateway.edge.origins import OriginPolicy
from gateway.metrics import GatewayMetrics
from gateway.node import GatewayNode
from gateway.rest.api import RestApi, not_served
from gateway.rest.openapi import openapi_document, openapi_routes, swagger_ui_directory
from gateway.static_assets import StaticAssets
from gateway.symbols import SymbolDirectory
from gateway.ws.asgi_fallback import websocket_endpoint
from gateway.ws.host import HOST_STATE_KEY
from gateway.ws.uvicorn_protocol import DRAIN_STATE_KEY
from shared.broker.contract import Broker
from shared.candles.model import CandleStore
from shared.runtime_metrics import GcFreezer, GcPauseMonitor, LoopLagMonitor
from shared.settings import Settings

logger = logging.getLogger("pricegate.gateway")

# The live page for browsers and its assets under content-hashed names: read and hashed once, at import.
STATIC_ASSETS = StaticAssets()

BackgroundJob = Callable[[], Coroutine[Any, Any, None]]


class _MetricsEndpoint:
    """prometheus_client's ASGI app as a Starlette endpoint (a class instance, so Starlette passes the raw
    ASGI triple instead of treating it as a request handler; Mount would redirect /metrics to /metrics/)."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self.app = make_asgi_app(metrics.registry)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


def _json(content: bytes, status_code: int = 200) -> Response:
    return Response(content, status_code=status_code, media_type="application/json")


def create_app(
    settings: Settings,
    broker: Broker,
    *,
    background: Sequence[BackgroundJob] = (),
    metrics: GatewayMetrics | None = None,
    candles: CandleStore | None = None,
) -> Starlette:
    """``candles`` is the candle store klines and technicals are served from (opened and closed by the caller,
    like the broker); without one they come from the exchange, or are empty for a synthetic market."""
    symbols = SymbolDirectory(broker, settings.symbols)
    metrics = metrics or GatewayMetrics()
    edge = edge_guard(settings, metrics)
    # Authentication (PRICEGATE_AUTH): checked at the handshake and per REST request, never per message.
    auth = Authenticator(settings, metrics) if settings.auth_modes else None
    node = GatewayNode(settings, broker, symbols, metrics, edge=edge, authenticator=auth)
    rest_api = RestApi(
        settings,
        broker,
        symbols,
        node.metrics.registry,
        candles=candles,
        authenticate=auth.authenticate if auth is not None else None,
        proxies=edge.proxies,
    )
    failed: list[str] = []

    # The process's pid: under `pricegate gateway --workers N` it says which worker took the connection.
    alive = b'{"status":"alive","pid":%d}' % os.getpid()

    async def livez(request: Request) -> Response:
        return _json(alive)

    async def readyz(request: Request) -> Response:
        ready = node.ready and not failed
        node.metrics.ready.set(1 if ready else 0)
        body: dict[str, Any] = {
            "ready": ready,
            "draining": node.draining,
            "broker_connected": node.broker.connected,
            # Why not (a shard or the master unreachable, a slot served by nobody): the brokers' ``problem``.
            "broker_problem": getattr(node.broker, "problem", None),
            "relay_healthy": node.relay.healthy,
            "failed_tasks": failed,
            "connections": len(node.sessions),
            "broker_subscriptions": len(node.relay.active),
            "ingest_heartbeat_age_s": (
                round(time.time() - node.relay.last_heartbeat_ms / 1000, 3) if node.relay.last_heartbeat_ms else None
            ),
            # Informational: readiness does not depend on it (see Authenticator.status).
            "auth": auth.status() if auth is not None else {"modes": []},
        }
        return JSONResponse(body, status_code=200 if ready else 503)

    def watch(name: str, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            failed.append(name)
            logger.critical("background task %s crashed; readiness is now false", name, exc_info=error)

    loop_lag = LoopLagMonitor(node.metrics.registry, "gateway")
    gc_pauses = GcPauseMonitor(node.metrics.registry, "gateway")
    gc_freezer = GcFreezer(settings.gc_freeze_interval_s)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        jobs: list[tuple[str, BackgroundJob]] = [
            ("relay", node.relay.run),
            ("exchange_info", symbols.poll_forever),
        ]
        jobs += [(getattr(job, "__qualname__", "background"), job) for job in background]
        if auth is not None:
            await auth.start()
            jobs.append(("auth", auth.run))
        tasks: list[asyncio.Task[None]] = []
        loop_lag.start()
        gc_pauses.start()
        gc_freezer.start()
        metrics_server = None
        if settings.metrics_port:
            # Its own port (kept internal, e.g. not behind the Ingress): clients cannot read it. A thread of
            # prometheus_client's; the collectors only read plain ints, which the GIL keeps consistent.
            metrics_server, _ = start_http_server(settings.metrics_port, settings.host, node.metrics.registry)
        for name, job in jobs:
            task = asyncio.create_task(job(), name=name)
            task.add_done_callback(functools.partial(watch, name))
            tasks.append(task)
        try:
            yield {DRAIN_STATE_KEY: node.begin_drain, HOST_STATE_KEY: node, EDGE_STATE_KEY: edge}
        finally:
            node.draining = True
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            loop_lag.stop()
            gc_pauses.stop()
            gc_freezer.stop()
            if metrics_server is not None:
                metrics_server.shutdown()
            await node.relay.aclose()
            await node.aclose()
            await rest_api.aclose()
            if auth is not None:
                await auth.aclose()

    routes = [
        WebSocketRoute("/ws", websocket_endpoint),
        WebSocketRoute("/ws/{rest:path}", websocket_endpoint),
        WebSocketRoute("/stream", websocket_endpoint),
        WebSocketRoute("/stream/{rest:path}", websocket_endpoint),
        *rest_api.routes(),
        # The REST API's OpenAPI document and the /docs page rendering it (gateway/rest/openapi.py).
        *openapi_routes(
            openapi_document(
                auth_modes=settings.auth_modes,
                weight_limit_per_min=settings.rest_weight_limit_per_min,
                symbols=settings.symbols,
            ),
            assets=swagger_ui_directory(),
        ),
        *STATIC_ASSETS.routes(),  # /, /static/<name>.<hash>.<ext>, /favicon.ico
        Route("/livez", livez),
        Route("/readyz", readyz),
    ]
    if not settings.metrics_port:
        routes.append(Route("/metrics", _MetricsEndpoint(node.metrics)))
    # 404/405 under /api/ answer in Binance's error shape, as the OpenAPI document says.
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={404: not_served, 405: not_served})
    app.state.node = node
    app.state.edge = edge
    app.state.gc_freezer = gc_freezer
    app.state.symbols = symbols
    app.state.rest = rest_api
    app.state.auth = auth
    return app


def edge_guard(settings: Settings, metrics: GatewayMetrics) -> EdgeGuard:
    """The process's edge: per-IP limits, trusted proxies and allowed origins, from the settings."""
    limits = EdgeLimits(
        max_connections=settings.max_connections,
        max_connections_per_ip=settings.max_connections_per_ip,
        attempts_per_ip=settings.connection_attempts_per_ip,
        attempt_window_s=settings.connection_attempt_window_s,
        max_subscriptions_per_ip=settings.max_subscriptions_per_ip,
        handshake_timeout_s=settings.handshake_timeout_s,
        handshakes_per_turn=settings.handshakes_per_turn,
        max_request_line_bytes=settings.max_request_line_bytes,
        max_header_bytes=settings.max_header_bytes,
        max_headers=settings.max_headers,
    )
    return EdgeGuard(
        limits,
        proxies=TrustedProxies(settings.forwarded_allow_ips),
        origins=OriginPolicy(settings.allowed_origins),
        clock=time.monotonic,
        on_refused=lambda reason: metrics.connections_rejected.labels(reason=reason).inc(),
    )
