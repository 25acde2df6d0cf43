"""The gateway under a stock ASGI WebSocket implementation (no native sessions): same protocol, same data,
bounded outbox, slow-consumer close — slower, never wrong."""

from __future__ import annotations

import asyncio
import json

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from gateway.ws.asgi_fallback import AsgiConnection
from shared.broker.contract import OutgoingMessage
from shared.broker.memory import MemoryBroker
from tests.harness import message, running_gateway
from tests.polling import eventually


async def test_protocol_and_data_over_plain_asgi() -> None:
    broker = MemoryBroker()
    async with running_gateway(broker, ws_protocol="websockets-sansio") as gw:
        async with connect(f"{gw.ws_base}/stream?streams=btcusdt@trade") as ws:
            await eventually(
                lambda: "btcusdt@trade" in gw.node.relay.active, what="the relay's subscription to btcusdt@trade"
            )
            (session,) = gw.node.sessions
            assert isinstance(session.connection, AsgiConnection)  # really the fallback path
            await ws.send('{"method":"LIST_SUBSCRIPTIONS","id":1}')
            assert json.loads(await asyncio.wait_for(ws.recv(), 3)) == {"result": ["btcusdt@trade"], "id": 1}
            await ws.send("{bad json")
            assert json.loads(await asyncio.wait_for(ws.recv(), 3))["error"]["code"] == 3
            await broker.publish([message("btcusdt@trade", {"e": "trade", "t": 1})])
            assert json.loads(await asyncio.wait_for(ws.recv(), 3)) == {
                "stream": "btcusdt@trade",
                "data": {"e": "trade", "t": 1},
            }
        await eventually(lambda: not gw.node.sessions, what="every session closed")


async def test_event_stream_overflow_closes_4000_over_plain_asgi() -> None:
    broker = MemoryBroker()
    async with running_gateway(broker, ws_protocol="websockets-sansio", client_buffer_bytes=4096) as gw:
        async with connect(f"{gw.ws_base}/ws/btcusdt@trade", max_queue=1) as ws:
            await eventually(
                lambda: "btcusdt@trade" in gw.node.relay.active, what="the relay's subscription to btcusdt@trade"
            )
            # Publish far more than the outbox holds in one go: the writer cannot drain it in between.
            payload = b'{"e":"trade","pad":"' + b"x" * 1000 + b'"}'
            await broker.publish([OutgoingMessage("btcusdt@trade", payload, False) for _ in range(50)])
            with pytest.raises(ConnectionClosed) as closed:
                async with asyncio.timeout(5):
                    while True:
                        await ws.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4000
