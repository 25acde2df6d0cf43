"""The node's flush scheduling on a real event loop (no sockets): chunks continue on later loop turns, and a
subscriber that raises does not stop fan-out for anyone else or for later messages."""

from __future__ import annotations

import asyncio

import pytest

from gateway.node import GatewayNode
from gateway.symbols import SymbolDirectory
from gateway.ws.hub import StreamBatch
from shared.broker.memory import MemoryBroker
from shared.settings import Settings
from shared.streams import parse_stream

TRADE = parse_stream("btcusdt@trade")
TICKER = parse_stream("btcusdt@bookTicker")


class Collector:
    combined = False

    def __init__(self) -> None:
        self.payloads: list[bytes] = []

    def deliver(self, batch: StreamBatch) -> bool:
        self.payloads += batch.payloads
        return False

    def finish(self) -> None:
        pass


class Broken(Collector):
    def deliver(self, batch: StreamBatch) -> bool:
        raise RuntimeError("a bug in one subscriber")


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def new_node(**overrides: object) -> GatewayNode:
    settings = Settings().with_overrides(overrides)
    broker = MemoryBroker()
    return GatewayNode(settings, broker, SymbolDirectory(broker, settings.symbols))


async def test_fan_out_survives_a_subscriber_that_raises(caplog: pytest.LogCaptureFixture) -> None:
    node = new_node(flush_chunk_clients=1)
    broken, healthy, other = Broken(), Collector(), Collector()
    node.hub.add(TRADE, broken)  # served first: its stream's chunk raises
    node.hub.add(TICKER, healthy)
    node.hub.add(TICKER, other)
    node.hub.broadcast(TRADE.name, b"t1")
    node.hub.broadcast(TICKER.name, b"b1")
    node.schedule_flush()
    await settle()
    # The raising chunk was logged by the loop; the next stream's chunk still went out on a later turn.
    assert healthy.payloads == [b"b1"] and other.payloads == [b"b1"]
    assert any("a bug in one subscriber" in repr(record.exc_info) for record in caplog.records)
    # ... and later messages are still fanned out: the flush was not left "scheduled" forever.
    node.hub.remove(TRADE.name, broken)
    node.hub.broadcast(TICKER.name, b"b2")
    node.schedule_flush()
    await settle()
    assert healthy.payloads == [b"b1", b"b2"]
    assert not node.hub.has_pending


async def test_a_flush_in_chunks_continues_on_later_loop_turns() -> None:
    node = new_node(flush_chunk_clients=1)
    names = ["btcusdt@trade", "ethusdt@trade", "bnbusdt@trade"]
    collectors = {name: Collector() for name in names}
    for name, collector in collectors.items():
        node.hub.add(parse_stream(name), collector)
    for name in names:
        node.hub.broadcast(name, name.encode())
    node.schedule_flush()
    await asyncio.sleep(0)  # one loop turn: one chunk (one stream) at most
    served = sum(1 for collector in collectors.values() if collector.payloads)
    assert served == 1
    await settle()
    assert {name: collector.payloads for name, collector in collectors.items()} == {n: [n.encode()] for n in names}
