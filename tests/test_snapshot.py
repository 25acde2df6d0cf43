"""Our ``snapshot`` extension over real sockets: a new state-stream subscription first gets the stream's last value
(from the hub, or from the broker: in memory and in real Redis), never for event streams, never by default, and
never out of order with live messages of the same stream."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect

from shared.broker.memory import MemoryBroker
from shared.broker.redis import RedisBroker
from shared.frames import Publication
from tests.harness import RunningGateway, message, running_gateway
from tests.polling import eventually

EXCHANGE_INFO = orjson.dumps(
    {"symbols": [{"symbol": "BTCUSDT", "status": "TRADING"}, {"symbol": "ETHUSDT", "status": "TRADING"}]}
)
QUIET_S = 0.2  # how long a test waits to be sure that no stray frame follows
SNAPSHOT_ON = '{"method":"SET_PROPERTY","params":["snapshot",true],"id":1}'


def ticker(price: int) -> dict[str, Any]:
    return {"e": "24hrTicker", "E": price, "s": "BTCUSDT", "c": f"{price}.00"}


async def recv_json(ws: ClientConnection, timeout: float = 3.0) -> Any:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def nothing_more(ws: ClientConnection) -> None:
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(ws.recv(), QUIET_S)


@pytest.fixture
async def gateway() -> AsyncIterator[tuple[RunningGateway, MemoryBroker]]:
    broker = MemoryBroker()
    async with running_gateway(broker) as running:
        running.node.symbols.update(EXCHANGE_INFO)
        yield running, broker


async def test_off_by_default_a_subscriber_waits_for_the_next_message(
    gateway: tuple[RunningGateway, MemoryBroker],
) -> None:
    gw, broker = gateway
    await broker.publish([message("btcusdt@ticker", ticker(1))])  # stored as the last value
    async with connect(f"{gw.ws_base}/ws") as ws:
        await ws.send('{"method":"SUBSCRIBE","params":["btcusdt@ticker"],"id":1}')
        assert await recv_json(ws) == {"result": None, "id": 1}
        await nothing_more(ws)
        await eventually(lambda: "btcusdt@ticker" in gw.node.relay.active, what="the relay's subscription")
        await broker.publish([message("btcusdt@ticker", ticker(2))])
        assert await recv_json(ws) == ticker(2)


async def test_set_property_snapshot_sends_the_brokers_last_value_after_the_reply(
    gateway: tuple[RunningGateway, MemoryBroker],
) -> None:
    gw, broker = gateway
    await broker.publish([message("btcusdt@ticker", ticker(1)), message("btcusdt@trade", {"e": "trade", "t": 1})])
    async with connect(f"{gw.ws_base}/ws") as ws:
        await ws.send(SNAPSHOT_ON)
        assert await recv_json(ws) == {"result": None, "id": 1}
        await ws.send('{"method":"GET_PROPERTY","params":["snapshot"],"id":2}')
        assert await recv_json(ws) == {"result": True, "id": 2}
        await ws.send('{"method":"SUBSCRIBE","params":["btcusdt@trade","btcusdt@ticker","ethusdt@ticker"],"id":3}')
        assert await recv_json(ws) == {"result": None, "id": 3}
        assert await recv_json(ws) == ticker(1)  # the ticker's last value; a trade stream never gets one
        await nothing_more(ws)  # ethusdt@ticker has no last value: nothing
        await eventually(lambda: "btcusdt@ticker" in gw.node.relay.active, what="the relay's subscription")
        await broker.publish([message("btcusdt@ticker", ticker(2))])
        assert await recv_json(ws) == ticker(2)


async def test_snapshot_in_the_url_and_from_the_hub_for_a_later_subscriber(
    gateway: tuple[RunningGateway, MemoryBroker],
) -> None:
    gw, broker = gateway
    async with connect(f"{gw.ws_base}/stream?streams=btcusdt@ticker") as first:
        await eventually(lambda: "btcusdt@ticker" in gw.node.relay.active, what="the relay's subscription")
        await broker.publish([message("btcusdt@ticker", ticker(5))])
        assert (await recv_json(first))["data"] == ticker(5)
        # The hub holds the newest value: a new subscriber gets it at once, combined since it is on /stream.
        async with connect(f"{gw.ws_base}/stream?streams=btcusdt@ticker/btcusdt@trade&snapshot=true") as second:
            assert await recv_json(second) == {"stream": "btcusdt@ticker", "data": ticker(5)}
            await nothing_more(second)
            await broker.publish([message("btcusdt@ticker", ticker(6))])
            assert await recv_json(second) == {"stream": "btcusdt@ticker", "data": ticker(6)}
            assert (await recv_json(first))["data"] == ticker(6)


class SlowLastValue(MemoryBroker):
    """The in-memory broker whose last-value reads answer what was stored when asked, but only once released: the
    round trip to Redis, made long enough for live messages to overtake it."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    async def last_value(self, stream: str) -> Publication | None:
        value = await super().last_value(stream)
        await self.release.wait()
        return value


async def test_live_data_that_overtakes_the_lookup_wins() -> None:
    broker = SlowLastValue()
    async with running_gateway(broker) as gw:
        gw.node.symbols.update(EXCHANGE_INFO)
        await broker.publish([message("btcusdt@ticker", ticker(1))])
        async with connect(f"{gw.ws_base}/ws/btcusdt@ticker?snapshot=true") as ws:
            await eventually(lambda: "btcusdt@ticker" in gw.node.relay.active, what="the relay's subscription")
            await broker.publish([message("btcusdt@ticker", ticker(2))])
            assert await recv_json(ws) == ticker(2)
            broker.release.set()  # the lookup answers ticker(1): older than what the client has, so dropped
            await nothing_more(ws)
            await broker.publish([message("btcusdt@ticker", ticker(3))])
            assert await recv_json(ws) == ticker(3)
            session = next(iter(gw.node.sessions))
            assert not session.blocked  # back on the hot path


async def test_older_messages_still_in_flight_after_the_snapshot_are_not_delivered() -> None:
    """The broker's last value can be newer than messages the subscription connection has not read yet (Redis
    answers the GET on another connection). The client has the snapshot, so those are skipped; the first newer
    message is delivered alone."""
    broker = MemoryBroker()
    async with running_gateway(broker) as gw:
        gw.node.symbols.update(EXCHANGE_INFO)
        # Publications 1..5 exist in the broker; the gateway's relay has not seen any of them.
        for price in range(1, 6):
            await broker.publish([message("btcusdt@ticker", ticker(price))])
        stored = await broker.last_value("btcusdt@ticker")
        assert stored is not None and stored.seq == 5
        async with connect(f"{gw.ws_base}/ws") as ws:
            await ws.send(SNAPSHOT_ON)
            await recv_json(ws)
            await ws.send('{"method":"SUBSCRIBE","params":["btcusdt@ticker","btcusdt@trade"],"id":2}')
            assert await recv_json(ws) == {"result": None, "id": 2}
            assert await recv_json(ws) == ticker(5)
            await eventually(lambda: "btcusdt@ticker" in gw.node.relay.active, what="the relay's subscription")

            # Now the subscription connection delivers what it had buffered: 4 and 5, then 6 and 7 in one batch.
            def late(seq: int) -> Publication:
                return Publication(stored.epoch, seq, 0, orjson.dumps(ticker(seq)))

            gw.node.relay.on_publication("btcusdt@ticker", late(4))
            gw.node.relay.on_publication("btcusdt@ticker", late(5))
            await nothing_more(ws)
            gw.node.relay.on_publication("btcusdt@ticker", late(6))
            gw.node.relay.on_publication("btcusdt@ticker", late(7))
            assert await recv_json(ws) == ticker(7)  # 6 may be older than the snapshot for all the session knows
            gw.node.relay.on_publication("btcusdt@ticker", late(8))
            assert await recv_json(ws) == ticker(8)
            await broker.publish([message("btcusdt@trade", {"e": "trade", "t": 1})])  # other streams unaffected
            assert await recv_json(ws) == {"e": "trade", "t": 1}
            session = next(iter(gw.node.sessions))
            assert not session.blocked


async def test_unsubscribing_before_the_lookup_answers_sends_nothing() -> None:
    broker = SlowLastValue()
    async with running_gateway(broker) as gw:
        gw.node.symbols.update(EXCHANGE_INFO)
        await broker.publish([message("btcusdt@ticker", ticker(1))])
        async with connect(f"{gw.ws_base}/ws?snapshot=true") as ws:
            await ws.send('{"method":"SUBSCRIBE","params":["btcusdt@ticker"],"id":1}')
            assert await recv_json(ws) == {"result": None, "id": 1}
            await ws.send('{"method":"UNSUBSCRIBE","params":["btcusdt@ticker"],"id":2}')
            assert await recv_json(ws) == {"result": None, "id": 2}
            broker.release.set()
            await nothing_more(ws)


@pytest.mark.integration
async def test_snapshot_from_the_last_value_in_redis(redis_url: str, key_prefix: str) -> None:
    ingest = RedisBroker(redis_url, prefix=key_prefix)
    await ingest.start()
    try:
        # Ingest published before this gateway had any client: the value is only in Redis (<stream>:last).
        book = {"u": 9, "s": "BTCUSDT", "b": "1.0", "a": "1.1"}
        await ingest.publish([message("btcusdt@bookTicker", book)])
        async with running_gateway(RedisBroker(redis_url, prefix=key_prefix)) as gw:
            gw.node.symbols.update(EXCHANGE_INFO)
            async with connect(f"{gw.ws_base}/stream?streams=btcusdt@bookTicker&snapshot=true") as ws:
                frame = await recv_json(ws)
                assert frame == {"stream": "btcusdt@bookTicker", "data": book}
                await eventually(lambda: "btcusdt@bookTicker" in gw.node.relay.active, what="the subscription")
                await ingest.publish([message("btcusdt@bookTicker", {"u": 10, "s": "BTCUSDT"})])
                assert (await recv_json(ws))["data"] == {"u": 10, "s": "BTCUSDT"}
    finally:
        await ingest.close()
