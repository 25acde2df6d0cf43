"""Reference-counted broker subscriptions on real Redis: 1 000 local clients on one stream = one subscription."""

from __future__ import annotations

import asyncio
import json

import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import ClientConnection, connect

from shared.broker.redis import RedisBroker
from shared.streams import ChannelNamer
from tests.harness import message, running_gateway
from tests.polling import eventually

pytestmark = pytest.mark.integration
CLIENTS = 1000


async def numsub(client: aioredis.Redis, channel: str) -> int:
    reply = await client.pubsub_numsub(channel)
    return int(reply[0][1])


async def test_thousand_clients_share_one_redis_subscription(redis_url: str, key_prefix: str) -> None:
    gateway_broker = RedisBroker(redis_url, prefix=key_prefix)
    ingest_broker = RedisBroker(redis_url, prefix=key_prefix)
    await ingest_broker.start()
    observer = aioredis.from_url(redis_url)
    channel = ChannelNamer(key_prefix, "binance").channel("btcusdt@bookTicker")
    clients: list[ClientConnection] = []
    try:
        async with running_gateway(gateway_broker, channel_prefix=key_prefix) as gw:
            for start in range(0, CLIENTS, 100):
                clients += await asyncio.gather(
                    *(connect(f"{gw.ws_base}/ws/btcusdt@bookTicker") for _ in range(start, start + 100))
                )
            await eventually(
                lambda: gw.node.hub.subscriber_count("btcusdt@bookTicker") == CLIENTS,
                what="every client subscribed",
                timeout=20,
            )
            await eventually(
                lambda: "btcusdt@bookTicker" in gw.node.relay.active,
                what="the relay's subscription to btcusdt@bookTicker",
            )
            assert await numsub(observer, channel) == 1

            await ingest_broker.publish([message("btcusdt@bookTicker", {"u": 42, "s": "BTCUSDT"})])
            received = await asyncio.gather(*(asyncio.wait_for(ws.recv(), 10) for ws in clients))
            assert {json.dumps(json.loads(frame)) for frame in received} == {json.dumps({"u": 42, "s": "BTCUSDT"})}

            # Half leave: still one subscription. All leave: none.
            for ws in clients[: CLIENTS // 2]:
                await ws.close()
            await eventually(
                lambda: gw.node.hub.subscriber_count("btcusdt@bookTicker") == CLIENTS // 2,
                what="half the clients gone",
                timeout=10,
            )
            assert await numsub(observer, channel) == 1
            for ws in clients[CLIENTS // 2 :]:
                await ws.close()
            await eventually(lambda: not gw.node.relay.active, what="the relay to drop every stream", timeout=10)
            assert await numsub(observer, channel) == 0
    finally:
        for ws in clients:
            await ws.close()
        await ingest_broker.close()
        keys = [key async for key in observer.scan_iter(match=f"{key_prefix}:*")]
        if keys:
            await observer.delete(*keys)
        await observer.aclose()
