"""Closed connections are freed by reference counting alone: nothing of ours (nor of uvicorn, websockets or
httptools) is left in a reference cycle for the collector. That is what lets long-lived objects be frozen or
collection be tuned without closed connections piling up (docs/architecture.md, "The hot path and why")."""

from __future__ import annotations

import asyncio
import gc
import socket
import struct
from collections import Counter

import pytest
import uvloop
from websockets.asyncio.client import connect

from shared.broker.memory import MemoryBroker
from tests.harness import running_gateway
from tests.polling import eventually
from tests.raw_sockets import handshake, upgrade_request

OUR_MODULES = ("gateway", "shared", "websockets", "uvicorn", "httptools", "starlette")


@pytest.mark.parametrize("leave", ["close_handshake", "fin", "rst"])
async def test_closed_connections_leave_no_cycles_behind(leave: str) -> None:
    """Whichever way a client leaves: a closing handshake, or gone with a FIN or a reset (those closes go
    through the node's closer on a later loop turn)."""
    async with running_gateway(MemoryBroker(), closes_per_turn=1) as gw:

        async def visit() -> None:
            if leave == "close_handshake":
                async with connect(f"{gw.ws_base}/stream?streams=btcusdt@trade/ethusdt@trade") as ws:
                    await ws.send('{"method":"SUBSCRIBE","params":["bnbusdt@trade"],"id":1}')
                    await ws.recv()
                return
            status, _, _, writer = await handshake(gw, upgrade_request("/stream?streams=btcusdt@trade/ethusdt@trade"))
            assert status == 101
            await eventually(lambda: len(gw.node.sessions) == 1, what="the session")
            if leave == "rst":
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
            else:
                writer.close()
            await eventually(lambda: not gw.node.sessions, what="the session closed")

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


def test_with_the_gc_freezer_on_closed_connections_leave_nothing_frozen_behind() -> None:
    """The freezer hides survivors from the collector; anything that later became cyclic garbage would stay
    frozen forever. Connections that come and go must leave the frozen count where it was. (On uvloop, as the
    gateway runs: asyncio's own transports are cycles, which is why the freezer only runs on uvloop.)"""
    uvloop.run(_churn_with_the_freezer_on())


async def _churn_with_the_freezer_on() -> None:
    async with running_gateway(MemoryBroker(), gc_freeze_interval_s=0.02) as gw:
        assert gw.app.state.gc_freezer.active

        async def visit() -> None:
            async with connect(f"{gw.ws_base}/stream?streams=btcusdt@trade/ethusdt@trade") as ws:
                await ws.send('{"method":"SUBSCRIBE","params":["bnbusdt@trade"],"id":1}')
                await ws.recv()
                await asyncio.sleep(0.03)  # frozen while open

        for _ in range(3):
            await visit()
        await asyncio.sleep(0.1)
        before = gc.get_freeze_count()
        for _ in range(60):
            await visit()
        await asyncio.sleep(0.2)
        grown = gc.get_freeze_count() - before
    # Each connection and its client hold a few hundred tracked objects while open: sixty leaking would be
    # tens of thousands.
    assert grown < 1500, f"{grown} objects stayed frozen after 60 connections came and went"
