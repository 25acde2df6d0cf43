"""The gateway over real sockets: uvicorn on an ephemeral port, real WebSocket clients, in-memory broker."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from shared.broker.memory import MemoryBroker
from shared.settings import Settings
from tests.harness import RunningGateway, message, native, running_gateway
from tests.polling import eventually

EXCHANGE_INFO = orjson.dumps(
    {"symbols": [{"symbol": "BTCUSDT", "status": "TRADING"}, {"symbol": "ETHUSDT", "status": "TRADING"}]}
)


async def recv_json(ws: ClientConnection, timeout: float = 3.0) -> Any:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


Gateway = tuple[RunningGateway, MemoryBroker]


@pytest.fixture
async def gateway() -> AsyncIterator[Gateway]:
    broker = MemoryBroker()
    async with running_gateway(broker) as running:
        await broker.put_exchange_info(EXCHANGE_INFO)
        running.node.symbols.update(EXCHANGE_INFO)
        yield running, broker


async def publish_when_subscribed(
    gw: RunningGateway, broker: MemoryBroker, stream: str, payload: dict[str, Any]
) -> None:
    await eventually(lambda: stream in gw.node.relay.active, what="the relay's subscription to the stream")
    await broker.publish([message(stream, payload)])


async def test_raw_path_stream_delivers_payload_bytes_verbatim(gateway: Gateway) -> None:
    gw, broker = gateway
    async with connect(f"{gw.ws_base}/ws/btcusdt@trade") as ws:
        await eventually(
            lambda: "btcusdt@trade" in gw.node.relay.active, what="the relay's subscription to btcusdt@trade"
        )
        payload = b'{"e":"trade","E":1,"s":"BTCUSDT","t":7,"p":"1.00000000","q":"2.00000000","T":1,"m":true,"M":true}'
        from shared.broker.contract import OutgoingMessage

        await broker.publish([OutgoingMessage("btcusdt@trade", payload, False)])
        assert await asyncio.wait_for(ws.recv(decode=False), 3) == payload


async def test_combined_path_wraps_in_envelope(gateway: Gateway) -> None:
    gw, broker = gateway
    async with connect(f"{gw.ws_base}/stream?streams=btcusdt@trade/ETHUSDT@bookTicker") as ws:
        await publish_when_subscribed(gw, broker, "ethusdt@bookTicker", {"u": 1, "s": "ETHUSDT"})
        assert await recv_json(ws) == {"stream": "ethusdt@bookTicker", "data": {"u": 1, "s": "ETHUSDT"}}


async def test_subscribe_list_unsubscribe_and_properties(gateway: Gateway) -> None:
    gw, broker = gateway
    async with connect(f"{gw.ws_base}/ws") as ws:
        await ws.send('{"method":"SUBSCRIBE","params":["btcusdt@trade","btcusdt@depth5@1000ms"],"id":1}')
        assert await recv_json(ws) == {"result": None, "id": 1}
        await ws.send('{"method":"SUBSCRIBE","params":["btcusdt@trade"],"id":"again"}')
        assert await recv_json(ws) == {"result": None, "id": "again"}
        await ws.send('{"method":"LIST_SUBSCRIPTIONS","id":3}')
        assert await recv_json(ws) == {"result": ["btcusdt@trade", "btcusdt@depth5"], "id": 3}
        await ws.send('{"method":"GET_PROPERTY","params":["combined"],"id":4}')
        assert await recv_json(ws) == {"result": False, "id": 4}
        await ws.send('{"method":"SET_PROPERTY","params":["combined",true],"id":5}')
        assert await recv_json(ws) == {"result": None, "id": 5}
        await publish_when_subscribed(gw, broker, "btcusdt@trade", {"e": "trade", "t": 1})
        assert await recv_json(ws) == {"stream": "btcusdt@trade", "data": {"e": "trade", "t": 1}}
        await ws.send('{"method":"UNSUBSCRIBE","params":["btcusdt@trade"],"id":null}')
        assert await recv_json(ws) == {"result": None, "id": None}
        await eventually(lambda: "btcusdt@trade" not in gw.node.relay.active, what="the relay to drop btcusdt@trade")


async def test_bad_input_gets_binance_errors_and_connection_lives(gateway: Gateway) -> None:
    gw, broker = gateway
    async with connect(f"{gw.ws_base}/ws", max_size=None) as ws:
        bad_frames = [
            "{not json",
            "[1,2,3]",
            '{"method":"FLY","id":1}',
            '{"method":"SUBSCRIBE","params":["btcusdt@nonsense"],"id":2}',
            '{"method":"SUBSCRIBE","params":["dogecoinusdt@trade"],"id":3}',
            '{"method":"SUBSCRIBE","params":' + json.dumps([f"s{i}usdt@trade" for i in range(10_000)]) + ',"id":4}',
            '{"method":"SET_PROPERTY","params":["combined","yes"],"id":5}',
        ]
        # Slow enough to stay under the 5 msg/s control limit (burst 10).
        for frame in bad_frames:
            await ws.send(frame)
            reply = await recv_json(ws)
            assert "error" in reply, (frame[:60], reply)
            assert isinstance(reply["error"]["code"], int) and reply["error"]["msg"]
        await ws.send(b"\x00\x01binary")
        assert "error" in await recv_json(ws)
        # Still alive and serving.
        await asyncio.sleep(0.5)
        await ws.send('{"method":"SUBSCRIBE","params":["btcusdt@trade"],"id":9}')
        assert await recv_json(ws) == {"result": None, "id": 9}
        await publish_when_subscribed(gw, broker, "btcusdt@trade", {"e": "trade", "t": 2})
        assert await recv_json(ws) == {"e": "trade", "t": 2}


async def test_oversized_frame_closes_1009_and_others_unaffected(gateway: Gateway) -> None:
    gw, broker = gateway
    async with connect(f"{gw.ws_base}/ws/btcusdt@trade") as bystander:
        async with connect(f"{gw.ws_base}/ws", max_size=None) as attacker:
            await attacker.send("x" * (Settings().max_frame_bytes + 1))
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(attacker.recv(), 3)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
        await publish_when_subscribed(gw, broker, "btcusdt@trade", {"e": "trade", "t": 3})
        assert await recv_json(bystander) == {"e": "trade", "t": 3}


async def test_non_utf8_text_closes_1007(gateway: Gateway) -> None:
    gw, _ = gateway
    async with connect(f"{gw.ws_base}/ws") as ws:
        # websockets refuses to send invalid UTF-8 as text; write a raw masked text frame instead.
        from websockets.frames import Frame, Opcode

        ws.protocol.send_frame(Frame(Opcode.TEXT, b"\xff\xfe"))
        ws.send_data()
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 3)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1007


async def test_control_rate_limit_closes_1008(gateway: Gateway) -> None:
    gw, _ = gateway
    async with connect(f"{gw.ws_base}/ws") as ws:
        for index in range(30):
            await ws.send(json.dumps({"method": "LIST_SUBSCRIPTIONS", "id": index}))
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                await asyncio.wait_for(ws.recv(), 3)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008


async def test_rest_start_up_endpoints(gateway: Gateway) -> None:
    gw, _ = gateway
    async with httpx.AsyncClient(base_url=gw.http_base) as client:
        assert (await client.get("/api/v3/ping")).json() == {}
        assert abs((await client.get("/api/v3/time")).json()["serverTime"]) > 0
        info = await client.get("/api/v3/exchangeInfo")
        assert info.status_code == 200 and info.content == EXCHANGE_INFO
        assert (await client.get("/livez")).status_code == 200
        ready = await client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["ready"] is True
        metrics = (await client.get("/metrics")).text
        assert "pricegate_gateway_connections" in metrics
        assert "pricegate_gateway_pubsub_lag_seconds_bucket" in metrics


async def test_one_broker_subscription_for_many_clients(gateway: Gateway) -> None:
    gw, broker = gateway
    clients = [await connect(f"{gw.ws_base}/ws/btcusdt@bookTicker") for _ in range(50)]
    try:
        await eventually(lambda: gw.node.hub.subscriber_count("btcusdt@bookTicker") == 50, what="50 subscribers")
        assert gw.node.relay.active == {"btcusdt@bookTicker"}
        assert broker._subscribed == {"btcusdt@bookTicker"}
        await broker.publish([message("btcusdt@bookTicker", {"u": 5, "s": "BTCUSDT"})])
        for client in clients:
            assert await recv_json(client) == {"u": 5, "s": "BTCUSDT"}
    finally:
        for client in clients:
            await client.close()
    await eventually(lambda: not gw.node.relay.active, what="the relay to drop every stream")
    assert broker._subscribed == set()


async def test_live_ticker_page_is_served(gateway: Gateway) -> None:
    gw, _ = gateway
    async with httpx.AsyncClient(base_url=gw.http_base) as client:
        page = await client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    # The page reads the market from exchangeInfo and streams tickers over the combined endpoint.
    assert "/api/v3/exchangeInfo" in page.text and "/stream?streams=" in page.text


async def expect_rounds(
    single: dict[str, list[ClientConnection]], combined: ClientConnection, streams: list[str], rounds: range
) -> None:
    for stream, clients in single.items():
        for client in clients:
            assert [(await recv_json(client))["t"] for _ in rounds] == list(rounds), stream
    received: dict[str, list[int]] = {stream: [] for stream in streams}
    for _ in range(len(rounds) * len(streams)):
        frame = await recv_json(combined)
        received[frame["stream"]].append(frame["data"]["t"])
    assert received == {stream: list(rounds) for stream in streams}


async def test_chunked_flushes_deliver_every_message_in_order() -> None:
    """One client per flush chunk: streams are served in turns across loop iterations, with the broker read in
    between; every client still gets every message of its streams, in order, and combined clients all of theirs."""
    broker = MemoryBroker()
    streams = ["btcusdt@trade", "ethusdt@trade", "btcusdt@aggTrade"]
    async with running_gateway(broker, flush_chunk_clients=1) as gw:
        await broker.put_exchange_info(EXCHANGE_INFO)
        gw.node.symbols.update(EXCHANGE_INFO)
        single = {stream: [await connect(f"{gw.ws_base}/ws/{stream}") for _ in range(4)] for stream in streams}
        combined = await connect(f"{gw.ws_base}/stream?streams={'/'.join(streams)}")
        try:
            await eventually(
                lambda: all(gw.node.hub.subscriber_count(stream) == 5 for stream in streams),
                what="5 subscribers per stream",
            )
            # All at once: one pass would serve the three streams in one flush; chunks of one client take three.
            flushes_before = gw.node.hub.flushes
            await broker.publish([message(stream, {"e": "trade", "t": 0}) for stream in streams])
            await expect_rounds(single, combined, streams, range(1))
            assert gw.node.hub.flushes - flushes_before >= len(streams)
            # Rounds published while earlier chunks are still going out: order and completeness hold.
            for round_ in range(1, 11):
                await broker.publish([message(stream, {"e": "trade", "t": round_}) for stream in streams])
                await asyncio.sleep(0)
            await expect_rounds(single, combined, streams, range(1, 11))
        finally:
            for client in [*(c for clients in single.values() for c in clients), combined]:
                await client.close()


async def test_native_sessions_share_one_keepalive_timer(gateway: Gateway) -> None:
    gw, _ = gateway
    clients = [await connect(f"{gw.ws_base}/ws/btcusdt@trade") for _ in range(10)]
    try:
        await eventually(lambda: len(gw.node.sessions) == 10, what="10 sessions")
        assert len(gw.node.keepalive) == 10
        # No per-connection timers: the node's schedule pings them (uvicorn would hold a ping timer each).
        assert all(native(session).ping_timer is None for session in gw.node.sessions)
    finally:
        for client in clients:
            await client.close()
    await eventually(lambda: len(gw.node.keepalive) == 0, what="an empty keepalive schedule")


TCP_WMEM_DEFAULT = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[1])


async def test_client_sockets_get_a_fixed_kernel_send_buffer() -> None:
    """SO_SNDBUF is set (Linux reports it doubled), which turns the kernel's autotuning off for the socket; 0
    leaves autotuning on."""
    for setting in (32768, 0):
        async with running_gateway(MemoryBroker(), client_sndbuf_bytes=setting) as gw:
            async with connect(f"{gw.ws_base}/ws/btcusdt@trade"):
                await eventually(lambda: len(gw.node.sessions) == 1, what="the session")
                (session,) = gw.node.sessions
                sock = native(session).transport.get_extra_info("socket")
                sndbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
                if setting:
                    assert sndbuf == 2 * setting
                else:  # untouched: the kernel's initial size (tcp_wmem's default), not a value we set
                    assert sndbuf >= TCP_WMEM_DEFAULT
