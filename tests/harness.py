"""Test harness: a real gateway (uvicorn + our WebSocket protocol) on an ephemeral port, in the test's loop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import uvicorn
from starlette.applications import Starlette

from gateway.app import BackgroundJob, create_app
from gateway.node import GatewayNode
from gateway.server import bound_port, uvicorn_config
from gateway.ws.session import Session
from gateway.ws.uvicorn_protocol import PricegateWebSocketProtocol
from shared.broker.contract import Broker, OutgoingMessage
from shared.candles.model import CandleStore
from shared.settings import Settings
from shared.streams import parse_stream
from tests.polling import eventually

PER_IP_LIMITS_FOR_TESTS = {
    "max_connections_per_ip": 100_000,
    "connection_attempts_per_ip": 100_000,
    "max_subscriptions_per_ip": 1_000_000,
}


@dataclass
class RunningGateway:
    app: Starlette
    server: uvicorn.Server
    port: int

    @property
    def node(self) -> GatewayNode:
        node: GatewayNode = self.app.state.node
        return node

    @property
    def ws_base(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def http_base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def native(session: Session) -> PricegateWebSocketProtocol:
    """The session's connection, for tests that need it at socket level (a native connection, not the ASGI
    fallback)."""
    connection = session.connection
    assert isinstance(connection, PricegateWebSocketProtocol)
    return connection


@contextlib.asynccontextmanager
async def running_gateway(
    broker: Broker,
    settings: Settings | None = None,
    *,
    background: Sequence[BackgroundJob] = (),
    start_broker: bool = True,
    candles: CandleStore | None = None,
    ws_protocol: str | None = None,
    **overrides: Any,
) -> AsyncIterator[RunningGateway]:
    # Every test client comes from 127.0.0.1: the public per-IP limits would refuse a test's thousandth client.
    # Tests of those limits set them explicitly.
    overrides = {**PER_IP_LIMITS_FOR_TESTS, **overrides}
    settings = (settings or Settings()).with_overrides({"port": 0, "log_level": "warning", **overrides})
    if start_broker:
        await broker.start()
    app = create_app(settings, broker, background=background, candles=candles)
    config = uvicorn_config(app, settings)
    if ws_protocol is not None:
        config.ws = ws_protocol  # e.g. uvicorn's stock "websockets-sansio": exercises the plain-ASGI session path
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        await eventually(lambda: server.started or task.done(), what="the gateway to start serving")
        if task.done():
            task.result()  # uvicorn gave up starting: its error, not a timeout
        yield RunningGateway(app, server, bound_port(server))
    finally:
        server.should_exit = True
        await task
        if start_broker:
            await broker.close()


def message(stream: str, payload: dict[str, Any] | list[Any]) -> OutgoingMessage:
    return OutgoingMessage(stream, orjson.dumps(payload), parse_stream(stream).is_state)
