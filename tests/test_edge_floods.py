"""Frame floods over raw sockets against a real gateway: whatever one client sends, it is closed quickly, the
others keep receiving and the process stays responsive. Each case was measured as a stall before the fix
(issue 10): empty continuations stalled everyone ~12 s, pings ~5 s, 2-byte fragments cost ~26 MB."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import struct
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect

from shared.broker.contract import OutgoingMessage
from shared.broker.memory import MemoryBroker
from tests.harness import RunningGateway, native, running_gateway
from tests.raw_sockets import handshake

STREAM = "btcusdt@bookTicker"


def client_frame(opcode: int, payload: bytes = b"", *, fin: bool = True) -> bytes:
    """One masked client frame (RFC 6455 §5.2)."""
    mask = os.urandom(4)
    first = (0x80 if fin else 0) | opcode
    length = len(payload)
    if length < 126:
        head = bytes((first, 0x80 | length))
    elif length < 65536:
        head = bytes((first, 0x80 | 126)) + struct.pack("!H", length)
    else:
        head = bytes((first, 0x80 | 127)) + struct.pack("!Q", length)
    masked = bytes(byte ^ mask[index % 4] for index, byte in enumerate(payload))
    return head + mask + masked


TEXT, CONT, PING, PONG = 0x1, 0x0, 0x9, 0xA


class Bystander:
    """A well-behaved client on a stream published every 20 ms; records the longest gap between frames."""

    def __init__(self) -> None:
        self.arrivals: list[float] = []

    def longest_gap(self, since: float) -> float:
        times = [since, *(t for t in self.arrivals if t >= since)]
        return max(b - a for a, b in itertools.pairwise(times)) if len(times) > 1 else float("inf")


@contextlib.asynccontextmanager
async def watched_gateway(**overrides: Any) -> AsyncIterator[tuple[RunningGateway, Bystander]]:
    broker = MemoryBroker()
    async with running_gateway(broker, **overrides) as gw:
        bystander = Bystander()

        async def publish() -> None:
            seq = 0
            while True:
                seq += 1
                await broker.publish([OutgoingMessage(STREAM, b'{"u":%d}' % seq, True)])
                await asyncio.sleep(0.02)

        async def listen() -> None:
            async with connect(f"{gw.ws_base}/ws/{STREAM}") as ws:
                async for _ in ws:
                    bystander.arrivals.append(time.monotonic())

        tasks = [asyncio.create_task(publish()), asyncio.create_task(listen())]
        try:
            while len(bystander.arrivals) < 5:
                await asyncio.sleep(0.02)
            yield gw, bystander
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def close_code_of(reader: asyncio.StreamReader, timeout: float = 5.0) -> int | None:
    """Read server frames until a close frame; its code (None if the socket just ended)."""
    deadline = time.monotonic() + timeout
    buffer = b""
    while time.monotonic() < deadline:
        try:
            chunk = await asyncio.wait_for(reader.read(65536), deadline - time.monotonic())
        except (TimeoutError, ConnectionError):
            return None
        if not chunk:
            return None
        buffer += chunk
        while len(buffer) >= 2:
            opcode, length = buffer[0] & 0x0F, buffer[1] & 0x7F
            offset = 2
            if length == 126:
                length, offset = struct.unpack("!H", buffer[2:4])[0], 4
            elif length == 127:
                length, offset = struct.unpack("!Q", buffer[2:10])[0], 10
            if len(buffer) < offset + length:
                break
            payload, buffer = buffer[offset : offset + length], buffer[offset + length :]
            if opcode == 0x8:
                return int(struct.unpack("!H", payload[:2])[0]) if len(payload) >= 2 else None
    return None


@pytest.mark.parametrize(
    ("flood", "expected_code"),
    [
        (client_frame(TEXT, b"{", fin=False) + client_frame(CONT, fin=False) * 500_000, 1008),
        (client_frame(PING) * 500_000, 1008),
        (client_frame(PONG) * 500_000, 1008),
        (client_frame(TEXT, b"x", fin=False) + client_frame(CONT, b"xx", fin=False) * 500_000, 1008),
    ],
    ids=["empty-continuations", "pings", "pongs", "two-byte-fragments"],
)
async def test_a_frame_flood_closes_the_flooder_and_stalls_nobody(flood: bytes, expected_code: int) -> None:
    async with watched_gateway() as (gw, bystander):
        status, _, reader, writer = await handshake(gw)
        assert status == 101
        started = time.monotonic()
        writer.write(flood)  # 3-4 MB in one go, as fast as the socket takes it
        code = await close_code_of(reader)
        assert code == expected_code
        assert time.monotonic() - started < 3
        async with httpx.AsyncClient() as http:
            probe = time.monotonic()
            assert (await http.get(f"{gw.http_base}/livez")).status_code == 200
            assert time.monotonic() - probe < 0.5
        await asyncio.sleep(0.3)
        assert bystander.longest_gap(started) < 0.5


async def test_a_message_in_too_many_fragments_is_closed_1009() -> None:
    async with running_gateway(MemoryBroker(), max_fragments_per_message=8, control_burst=100) as gw:
        status, _, reader, writer = await handshake(gw)
        assert status == 101
        writer.write(client_frame(TEXT, b"{", fin=False) + client_frame(CONT, b" ", fin=False) * 20)
        assert await close_code_of(reader) == 1009


async def test_a_fragmented_request_within_the_limits_is_answered() -> None:
    async with running_gateway(MemoryBroker()) as gw:
        status, _, reader, writer = await handshake(gw)
        assert status == 101
        request = b'{"method":"LIST_SUBSCRIPTIONS","id":7}'
        writer.write(
            client_frame(TEXT, request[:10], fin=False)
            + client_frame(CONT, request[10:20], fin=False)
            + client_frame(CONT, request[20:])
        )
        reply = await asyncio.wait_for(reader.read(4096), 3)
        assert reply.endswith(b'{"result":["btcusdt@trade"],"id":7}')


async def test_a_client_that_never_reads_cannot_pile_up_replies() -> None:
    """Pings from a client that reads nothing: reading pauses once our buffer for it is full, so the pongs it
    provokes stay bounded (and the control rate closes it long before that at default settings)."""
    async with running_gateway(MemoryBroker(), control_rate_per_s=1e6, control_burst=10**9) as gw:
        status, _, _reader, writer = await handshake(gw)
        assert status == 101
        transport = native(next(iter(gw.node.sessions))).transport
        ping = client_frame(PING, b"p" * 100)
        peak = 0
        with contextlib.suppress(ConnectionError):
            for _ in range(200):
                writer.write(ping * 1000)  # 106 KB of pings per round, the client never reads
                await asyncio.sleep(0)
                peak = max(peak, transport.get_write_buffer_size())
        limit = gw.node.client_buffer_bytes
        assert peak <= limit + 64 * 1024  # the buffer limit plus what one read slice can provoke
