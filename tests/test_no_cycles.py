"""Closed connections are freed by reference counting alone: nothing of ours (nor of uvicorn, websockets or
httptools) is left in a reference cycle for the collector. That is what lets long-lived objects be frozen or
collection be tuned without closed connections piling up (docs/architecture.md, "The hot path and why")."""

from __future__ import annotations

import asyncio
import gc
from collections import Counter

from websockets.asyncio.client import connect

from shared.broker.memory import MemoryBroker
from tests.harness import running_gateway

OUR_MODULES = ("gateway", "shared", "websockets", "uvicorn", "httptools", "starlette")


async def test_closed_connections_leave_no_cycles_behind() -> None:
    async with running_gateway(MemoryBroker()) as gw:

        async def visit() -> None:
            async with connect(f"{gw.ws_base}/stream?streams=btcusdt@trade/ethusdt@trade") as ws:
                await ws.send('{"method":"SUBSCRIBE","params":["bnbusdt@trade"],"id":1}')
                await ws.recv()

        await visit()  # first use creates long-lived caches; not what this test is about
        await asyncio.sleep(0.2)
        gc.collect()
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for _ in range(30):
                await visit()
            await asyncio.sleep(0.3)
            gc.collect()
            leftovers = Counter(
                f"{type(obj).__module__}.{type(obj).__qualname__}"
                for obj in gc.garbage
                if type(obj).__module__.split(".")[0] in OUR_MODULES
            )
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
        assert not leftovers, f"objects freed only by the cycle collector: {leftovers.most_common(10)}"
