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
from tests.harness import RunningGateway, native, running_gateway
from tests.polling import eventually
from tests.raw_sockets import handshake, open_raw, read_response_head, upgrade_request

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


async def drop_while_full(gw: RunningGateway, clients: int) -> None:
    """``clients`` clients on the stream, then all of them gone with a FIN; returns once the gateway has seen the
    EOFs and at least half of their closes wait in the closer's queue (run with closes_per_turn=1)."""
    node = gw.node
    leaving = []
    for _ in range(clients):
        status, _, _, writer = await handshake(gw, upgrade_request(f"/ws/{STREAM}"))
        assert status == 101
        leaving.append(writer)
    await eventually(lambda: len(node.sessions) == clients, what="every client's session")
    for writer in leaving:
        writer.close()
    for _ in range(1000):  # loop turn by turn until the gateway has seen the EOFs and queued their closes
        if node.closer.waiting >= clients // 2:
            break
        await asyncio.sleep(0)
    assert node.closer.waiting >= clients // 2


async def test_closes_waiting_their_turn_do_not_count_against_max_connections() -> None:
    """A full replica whose clients all drop and reconnect at once takes them back, although their old sessions
    are still waiting to be closed."""
    full = 20
    async with running_gateway(MemoryBroker(), max_connections=full, closes_per_turn=1) as gw:
        node = gw.node
        await drop_while_full(gw, full)
        statuses = [
            status
            for status, _, _, _ in await asyncio.gather(
                *(handshake(gw, upgrade_request(f"/ws/{STREAM}")) for _ in range(full))
            )
        ]
        assert statuses == [101] * full
        await eventually(lambda: len(node.sessions) == full and node.closer.waiting == 0, what="the old ones closed")


async def test_a_half_closed_client_that_reads_nothing_does_not_keep_its_socket() -> None:
    """The edge stops counting a client at its FIN: a client that half-closes while bytes for it are still
    buffered, and reads nothing, must not hold its socket (uncounted) until the keepalive gives up on it."""
    broker = MemoryBroker()
    loop = asyncio.get_running_loop()
    async with running_gateway(broker, client_sndbuf_bytes=4096, client_buffer_bytes=1 << 20) as gw:
        node = gw.node
        # A plain socket (an asyncio reader would read in the background), with a small receive buffer.
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, ("127.0.0.1", gw.port))
            await loop.sock_sendall(sock, upgrade_request(f"/ws/{STREAM}"))
            head = b""
            while b"\r\n\r\n" not in head:
                head += await asyncio.wait_for(loop.sock_recv(sock, 1), 5)
            assert head.startswith(b"HTTP/1.1 101")
            await eventually(lambda: len(node.sessions) == 1, what="the session")
            (session,) = node.sessions
            await eventually(lambda: STREAM in node.relay.active, what="the relay's subscription")
            padding = b"1" * 480
            for index in range(200):  # ~100 KB the client never reads: most of it stays in the server's buffer
                payload = b'{"e":"trade","t":%d,"p":"%s"}' % (index, padding)
                await broker.publish([OutgoingMessage(STREAM, payload, False)])
            await eventually(
                lambda: native(session).transport.get_write_buffer_size() > 0, what="bytes buffered for the client"
            )
            sock.shutdown(socket.SHUT_WR)
            await eventually(lambda: not node.sessions, what="the session closed")
            await eventually(
                lambda: not gw.server.server_state.connections, what="the socket closed, not left to the keepalive"
            )
            assert node.edge is not None and node.edge.open_connections == 0
        finally:
            sock.close()


async def test_a_client_reconnecting_at_once_gets_its_streams_although_its_old_session_waits_to_close() -> None:
    """What the address was charged for its subscriptions is released when the client leaves, not when its
    close has had its turn: a reconnect storm of known clients gets its streams, not "too many subscriptions"."""
    clients = 20
    async with running_gateway(MemoryBroker(), max_subscriptions_per_ip=clients, closes_per_turn=1) as gw:
        node = gw.node
        await drop_while_full(gw, clients)
        back = await asyncio.gather(*(handshake(gw, upgrade_request(f"/ws/{STREAM}")) for _ in range(clients)))
        assert [status for status, _, _, _ in back] == [101] * clients
        await eventually(lambda: node.closer.waiting == 0 and len(node.sessions) == clients, what="old ones closed")
        assert node.hub.subscriber_count(STREAM) == clients, "every client that came back is subscribed"
        for _, _, reader, _ in back:
            assert not reader.at_eof()


async def test_http_is_served_while_left_sessions_wait_for_their_close() -> None:
    """uvicorn counts a connection until its connection_lost, which for a client that left comes after the
    closer's turn: while a full replica's clients drop and come back, its own cap (limit_concurrency) must leave
    room for both, or /livez, /readyz and REST would answer 503."""
    full = 100
    async with running_gateway(MemoryBroker(), max_connections=full, closes_per_turn=1) as gw:
        await drop_while_full(gw, full)
        back = await asyncio.gather(*(handshake(gw, upgrade_request(f"/ws/{STREAM}")) for _ in range(full * 4 // 5)))
        assert [status for status, _, _, _ in back] == [101] * (full * 4 // 5)
        counted_by_uvicorn = len(gw.server.server_state.connections)
        assert counted_by_uvicorn > full + 1, "the situation under test: more in uvicorn's count than max_connections"
        reader, writer = await open_raw(gw.port)
        writer.write(b"GET /livez HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        status, _ = await read_response_head(reader, 5)
        assert status == 200, f"/livez answered {status} with {counted_by_uvicorn} connections in uvicorn's count"
