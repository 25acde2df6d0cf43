"""Clients that go away together are closed a few per loop turn (gateway/turn_gate.py, the node's closer), over
real sockets: whether they leave with a FIN (a clean exit) or a reset (a crash with unread data), the gateway
queues their closes instead of taking them all in one turn, keeps serving the clients that stay, and in the end
holds nothing of the ones that left (sessions, hub subscriptions, the edge's per-IP count, the gauge)."""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest
from websockets.asyncio.client import connect

from gateway.node import GatewayNode
from shared.broker.contract import OutgoingMessage
from shared.broker.memory import MemoryBroker
from tests.harness import running_gateway
from tests.polling import eventually
from tests.raw_sockets import handshake, upgrade_request

pytestmark = pytest.mark.timeout(60)

STREAM = "btcusdt@trade"
LEAVING = 60
PER_TURN = 2


def gate_waiting(node: GatewayNode, gate: str) -> int:
    """The gauge as a scrape reads it."""
    return int(node.metrics.registry.get_sample_value("pricegate_gateway_gate_waiting", {"gate": gate}) or 0)


@pytest.mark.parametrize("drop", ["fin", "rst"])
async def test_a_burst_of_clients_leaving_is_closed_in_slices_and_leaves_nothing_behind(drop: str) -> None:
    broker = MemoryBroker()
    async with running_gateway(broker, closes_per_turn=PER_TURN) as gw:
        node = gw.node
        async with connect(f"{gw.ws_base}/ws/{STREAM}") as staying:
            leaving = []
            for _ in range(LEAVING):
                status, _, _, writer = await handshake(gw, upgrade_request(f"/ws/{STREAM}"))
                assert status == 101
                leaving.append(writer)
            await eventually(lambda: len(node.sessions) == LEAVING + 1, what="every client's session")
            assert node.hub.subscriber_count(STREAM) == LEAVING + 1

            queued = exported = 0

            async def watch_the_closer() -> None:
                nonlocal queued, exported
                while True:
                    if node.closer.waiting > queued:
                        queued = node.closer.waiting
                        # What an SRE sees: the gauge reads the same queue at scrape time.
                        sample = node.metrics.registry.get_sample_value(
                            "pricegate_gateway_gate_waiting", {"gate": "closes"}
                        )
                        exported = max(exported, int(sample or 0))
                    await asyncio.sleep(0)

            watcher = asyncio.create_task(watch_the_closer())
            for writer in leaving:
                if drop == "rst":
                    sock = writer.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort() if drop == "rst" else writer.close()
            try:
                await eventually(lambda: len(node.sessions) == 1, what="the leaving clients' sessions closed")
            finally:
                watcher.cancel()
            # The closes did not all run in the turn their EOFs (or resets) arrived in.
            assert queued > 0, "no close ever waited for a later turn"
            assert queued <= LEAVING
            assert exported == queued
            await eventually(lambda: node.closer.waiting == 0, what="the closer's queue empty")
            assert gate_waiting(node, "closes") == 0 and gate_waiting(node, "handshakes") == 0
            assert node.hub.subscriber_count(STREAM) == 1
            assert node.edge is not None and node.edge.open_connections == 1
            assert node.metrics.connections._value.get() == 1

            # The client that stayed is served as before.
            await broker.publish([OutgoingMessage(STREAM, b'{"e":"trade","t":1}', False)])
            assert await asyncio.wait_for(staying.recv(), 5) == '{"e":"trade","t":1}'


async def test_a_client_that_half_closes_gets_nothing_more_and_is_closed() -> None:
    """A peer that sent its FIN cannot be sent anything it will read; the session stops delivering at once."""
    broker = MemoryBroker()
    async with running_gateway(broker, closes_per_turn=1) as gw:
        node = gw.node
        status, _, reader, writer = await handshake(gw, upgrade_request(f"/ws/{STREAM}"))
        assert status == 101
        await eventually(lambda: len(node.sessions) == 1, what="the session")
        writer.write_eof()  # half-close: our side stays readable
        await eventually(lambda: not node.sessions, what="the session closed after the client's FIN")
        await broker.publish([OutgoingMessage(STREAM, b'{"e":"trade","t":2}', False)])
        assert await asyncio.wait_for(reader.read(), 5) == b"", "the gateway closed its side, sending nothing"


async def test_closes_waiting_their_turn_do_not_count_against_max_connections() -> None:
    """A full replica whose clients all drop and reconnect at once takes them back, although their old sessions
    are still waiting to be closed."""
    full = 20
    async with running_gateway(MemoryBroker(), max_connections=full, closes_per_turn=1) as gw:
        node = gw.node
        leaving = []
        for _ in range(full):
            status, _, _, writer = await handshake(gw, upgrade_request(f"/ws/{STREAM}"))
            assert status == 101
            leaving.append(writer)
        await eventually(lambda: len(node.sessions) == full, what="a full replica")
        for writer in leaving:
            writer.close()
        for _ in range(1000):  # loop turn by turn until the gateway has seen the EOFs and queued their closes
            if node.closer.waiting >= full // 2:
                break
            await asyncio.sleep(0)
        assert node.closer.waiting >= full // 2
        statuses = [
            status
            for status, _, _, _ in await asyncio.gather(
                *(handshake(gw, upgrade_request(f"/ws/{STREAM}")) for _ in range(full))
            )
        ]
        assert statuses == [101] * full
        await eventually(lambda: len(node.sessions) == full and node.closer.waiting == 0, what="the old ones closed")
