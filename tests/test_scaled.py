"""Scaled mode with real processes: one ``pricegate ingest`` and two ``pricegate gateway`` replicas on Redis."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect

from tests.processes import PricegateProcess, free_port, start_pricegate

pytestmark = pytest.mark.integration


Cluster = tuple[list[int], dict[str, str]]  # the gateways' ports, the environment every process runs with


@pytest.fixture
async def cluster(redis_url: str) -> AsyncIterator[Cluster]:
    env = {
        "PRICEGATE_REDIS_URL": redis_url,
        "PRICEGATE_CHANNEL_PREFIX": f"pgtest{uuid.uuid4().hex[:10]}",
        "PRICEGATE_SYMBOLS": "BTCUSDT,ETHUSDT",
        "PRICEGATE_SYNTHETIC_TRADE_RATE": "20",
        "PRICEGATE_INGEST_METRICS_PORT": "0",
        "PRICEGATE_SHUTDOWN_DRAIN_S": "0.5",
    }
    ports = [free_port(), free_port()]
    processes: list[PricegateProcess] = [await start_pricegate("ingest", env=env)]
    for port in ports:
        processes.append(await start_pricegate("gateway", "--port", str(port), env=env))
    try:
        for process in processes[1:]:
            await process.wait_for_line(r"pricegate is serving on")
        yield ports, env
    finally:
        codes = [await process.stop() for process in processes]
        assert codes == [0, 0, 0], [process.output[-20:] for process in processes]


async def collect_trades(ws: ClientConnection, seconds: float) -> list[int]:
    ids: list[int] = []
    deadline = time.monotonic() + seconds
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            frame = json.loads(await asyncio.wait_for(ws.recv(), remaining))
        except TimeoutError:
            break
        if "e" in frame:
            ids.append(frame["t"])
    return ids


async def test_replicas_deliver_the_same_events_in_the_same_order(cluster: Cluster) -> None:
    ports, _ = cluster
    async with (
        connect(f"ws://127.0.0.1:{ports[0]}/ws") as first,
        connect(f"ws://127.0.0.1:{ports[1]}/ws") as second,
    ):
        asked = time.monotonic()
        for ws in (first, second):
            await ws.send('{"method":"SUBSCRIBE","params":["btcusdt@trade"],"id":1}')
            assert json.loads(await ws.recv()) == {"result": None, "id": 1}
        # Nobody configured btcusdt@trade: it flows only because the gateways announced demand.
        first_frame = json.loads(await asyncio.wait_for(first.recv(), 5))
        assert first_frame["e"] == "trade"
        assert time.monotonic() - asked < 3.0
        a, b = await asyncio.gather(collect_trades(first, 3), collect_trades(second, 3))
    a = [first_frame["t"], *a]
    assert len(a) > 10
    # Trade ids are contiguous on each replica (nothing lost, nothing reordered) ...
    assert a == list(range(a[0], a[0] + len(a)))
    assert b == list(range(b[0], b[0] + len(b)))
    # ... and both replicas saw the same events for the time both were listening.
    common = sorted(set(a) & set(b))
    assert len(common) > 10
    assert [t for t in a if t in common] == [t for t in b if t in common]


async def test_readiness_and_metrics_on_each_replica(cluster: Cluster) -> None:
    ports, _ = cluster
    async with httpx.AsyncClient() as client:
        for port in ports:
            ready = await client.get(f"http://127.0.0.1:{port}/readyz")
            assert ready.status_code == 200, ready.text
            assert ready.json()["broker_connected"] is True
            info = await client.get(f"http://127.0.0.1:{port}/api/v3/exchangeInfo")
            assert [entry["symbol"] for entry in info.json()["symbols"]] == ["BTCUSDT", "ETHUSDT"]
