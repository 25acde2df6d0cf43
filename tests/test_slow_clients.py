"""Fan-out guarantees over real sockets (docs/architecture.md, "The hot path and why"; README "Slow clients"): a
client that stops reading is closed with 4000 on an event stream and conflated on a state stream, never delays
anyone else, and never holds more than its buffer; one frame serves every subscriber; drain closes everyone with
1001, spread out.

A client that really stops reading cannot be a websockets-library client (it reads in the background), so
:class:`StuckClient` does the handshake by hand on a plain socket with a tiny receive buffer and then reads
nothing until the test says so. Loopback TCP auto-tunes the *server's* kernel send buffer up to several MB
(``net.ipv4.tcp_wmem``), which would only make the test slow and machine-dependent, so the test pins that
socket's ``SO_SNDBUF`` small: the kernel then stops accepting after a few KB, exactly as for a far-away client.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from gateway.ws.close_codes import REASONS, CloseCode
from gateway.ws.frames import encode_text_frames
from gateway.ws.session import Session
from shared.broker.contract import OutgoingMessage
from shared.broker.memory import MemoryBroker
from tests.harness import RunningGateway, native, running_gateway
from tests.polling import eventually

pytestmark = pytest.mark.timeout(60)

TRADE = "btcusdt@trade"
BOOK = "btcusdt@bookTicker"
BUFFER = 64 * 1024  # client_buffer_bytes for these tests
PAD = b"x" * 960  # payloads of ~1 KB
OP_TEXT, OP_CLOSE, OP_PING = 0x1, 0x8, 0x9


def socket_buffered(session: Session) -> int:
    return int(native(session).transport.get_write_buffer_size())


def trade(seq: int) -> bytes:
    return b'{"e":"trade","E":%d,"s":"BTCUSDT","t":%d,"p":"1.00","q":"2.00","pad":"%b"}' % (seq, seq, PAD)


def book(seq: int) -> bytes:
    return b'{"u":%d,"s":"BTCUSDT","b":"1.00","B":"1","a":"2.00","A":"1","pad":"%b"}' % (seq, PAD)


def seq_of(payload: bytes) -> int:
    """The sequence number in a payload built by trade()/book() (its first integer field)."""
    start = payload.index(b":") + 1
    return int(payload[start : payload.index(b",", start)])


# ---- a client that really stops reading ------------------------------------------------------------------------


class StuckClient:
    """A WebSocket client on a plain socket: handshake by hand, then nothing is read until :meth:`read_frames`."""

    def __init__(self, sock: socket.socket, early: bytes) -> None:
        self.sock = sock
        self._buffer = bytearray(early)  # bytes that arrived with the handshake response
        self.eof = False
        self.pings = 0

    @classmethod
    async def connect(cls, port: int, path: str, receive_buffer: int = 4096) -> StuckClient:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            # Before connect(), so the advertised TCP window is small from the first segment.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
            sock.setblocking(False)
            async with asyncio.timeout(5):
                await loop.sock_connect(sock, ("127.0.0.1", port))
                key = base64.b64encode(os.urandom(16)).decode()
                request = (
                    f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                    f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
                )
                await loop.sock_sendall(sock, request.encode())
                response = b""
                while b"\r\n\r\n" not in response:
                    chunk = await loop.sock_recv(sock, 4096)
                    if not chunk:
                        raise ConnectionError(f"handshake refused: {response!r}")
                    response += chunk
        except BaseException:
            sock.close()
            raise
        head, _, early = response.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            sock.close()
            raise ConnectionError(f"handshake refused: {head!r}")
        return cls(sock, early)

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def _parse(self) -> list[tuple[int, bytes]]:
        """Complete server frames (unmasked, unfragmented) from the buffer; keepalive pings are counted, not
        returned (the gateway may ping at any time; a stuck client never answers)."""
        frames: list[tuple[int, bytes]] = []
        buf = self._buffer
        pos = 0
        while len(buf) - pos >= 2:
            opcode, length = buf[pos] & 0x0F, buf[pos + 1] & 0x7F
            header = 2
            if length == 126:
                if len(buf) - pos < 4:
                    break
                (length,) = struct.unpack_from("!H", buf, pos + 2)
                header = 4
            elif length == 127:
                if len(buf) - pos < 10:
                    break
                (length,) = struct.unpack_from("!Q", buf, pos + 2)
                header = 10
            if len(buf) - pos < header + length:
                break
            if opcode == OP_PING:
                self.pings += 1
            else:
                frames.append((opcode, bytes(buf[pos + header : pos + header + length])))
            pos += header + length
        del buf[:pos]
        return frames

    async def read_frames(
        self, done: Callable[[list[tuple[int, bytes]]], bool], timeout: float = 5.0
    ) -> list[tuple[int, bytes]]:
        """Read until ``done(frames)`` or end of stream; returns every frame read."""
        loop = asyncio.get_running_loop()
        frames = self._parse()
        try:
            async with asyncio.timeout(timeout):
                while not done(frames) and not self.eof:
                    chunk = await loop.sock_recv(self.sock, 1 << 16)
                    if not chunk:
                        self.eof = True
                    self._buffer += chunk
                    frames += self._parse()
        except TimeoutError:
            last = frames[-1][1][:60] if frames else None
            raise AssertionError(f"still waiting after {timeout}s: {len(frames)} frames, the last {last!r}") from None
        return frames

    async def read_quiet(self, quiet_s: float) -> list[tuple[int, bytes]]:
        """Whatever arrives until nothing has arrived for ``quiet_s``."""
        loop = asyncio.get_running_loop()
        frames: list[tuple[int, bytes]] = []
        while not self.eof:
            try:
                chunk = await asyncio.wait_for(loop.sock_recv(self.sock, 1 << 16), quiet_s)
            except TimeoutError:
                break
            if not chunk:
                self.eof = True
            self._buffer += chunk
            frames += self._parse()
        return frames

    def close(self) -> None:
        self.sock.close()


def session_of(gw: RunningGateway, client: StuckClient) -> Session:
    for session in gw.node.sessions:
        if session.connection.peer is not None and session.connection.peer[1] == client.port:
            return session
    raise AssertionError("no session for the stuck client")


def pin_send_buffer(session: Session, size: int = 16 * 1024) -> None:
    """Stop the kernel from auto-tuning this server socket's send buffer to MBs (see the module docstring)."""
    native(session).transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)


class Reader:
    """A healthy client: reads every frame as it comes and remembers it."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.frames: list[bytes] = []
        self.arrived_at: list[float] = []
        self._progress = asyncio.Event()
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        try:
            while True:
                frame = await self.ws.recv(decode=False)
                self.frames.append(frame)
                self.arrived_at.append(time.perf_counter())
                self._progress.set()
        except ConnectionClosed:
            pass
        finally:
            self._progress.set()

    async def wait_count(self, count: int, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while True:
                self._progress.clear()
                if len(self.frames) >= count:
                    return
                if self.task.done():
                    raise AssertionError(
                        f"healthy client closed ({self.ws.close_code}) after {len(self.frames)}/{count} frames"
                    )
                await self._progress.wait()

    async def stop(self) -> None:
        await self.ws.close()
        await self.task


async def connect_many(url: str, count: int) -> list[ClientConnection]:
    return list(await asyncio.gather(*(connect(url) for _ in range(count))))


async def metrics_text(gw: RunningGateway) -> str:
    async with httpx.AsyncClient(base_url=gw.http_base) as client:
        return (await client.get("/metrics")).text


def sample_value(text: str, name: str) -> float:
    """The value of one exposition line ``name value`` (name includes any labels)."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


class Peaks:
    """Largest socket buffer seen for one session (direct mode queues nothing else per client)."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.transport = 0

    def sample(self) -> None:
        assert self.session.direct  # direct mode: no per-client queue besides the socket buffer
        self.transport = max(self.transport, socket_buffered(self.session))


@pytest.fixture
async def gateway() -> AsyncIterator[tuple[RunningGateway, MemoryBroker]]:
    broker = MemoryBroker()
    async with running_gateway(broker, client_buffer_bytes=BUFFER, shutdown_drain_s=0.5) as running:
        yield running, broker


async def publish_paced(
    broker: MemoryBroker,
    stream: str,
    make: Callable[[int], bytes],
    *,
    batches: int,
    batch_size: int,
    readers: list[Reader],
    peaks: Peaks,
    on_batch: Callable[[], None] = lambda: None,
) -> list[bytes]:
    """Publish ``batches`` batches; after each, sample the stuck session's buffers (right after the broadcast
    and right after the node's flush, the two moments they can grow) and let the healthy readers catch up."""
    published: list[bytes] = []
    is_state = stream == BOOK
    for _ in range(batches):
        payloads = [make(len(published) + index + 1) for index in range(batch_size)]
        await broker.publish([OutgoingMessage(stream, payload, is_state) for payload in payloads])
        published += payloads
        peaks.sample()
        await asyncio.sleep(0)  # the node's flush, scheduled with call_soon during the broadcast, runs now
        peaks.sample()
        for reader in readers:
            await reader.wait_count(len(published))
        on_batch()
    return published


# ---- 1. a stuck client on an event stream ------------------------------------------------------------------------


async def test_stuck_client_on_an_event_stream_is_closed_4000_without_delaying_or_growing(
    gateway: tuple[RunningGateway, MemoryBroker],
) -> None:
    gw, broker = gateway
    stuck = await StuckClient.connect(gw.port, f"/ws/{TRADE}")
    healthy = await connect_many(f"{gw.ws_base}/ws/{TRADE}", 20)
    readers = [Reader(ws) for ws in healthy]
    drained: asyncio.Task[list[tuple[int, bytes]]] | None = None
    try:
        await eventually(lambda: gw.node.hub.subscriber_count(TRADE) == 21, what="21 subscribers")
        session = session_of(gw, stuck)
        pin_send_buffer(session)
        peaks = Peaks(session)

        def start_draining_once_closed() -> None:
            # Read the stuck client as soon as the gateway gave up on it: the gateway aborts a closed socket
            # that still has unsent bytes after ABORT_AFTER_CLOSE_S, and the close frame is among them.
            nonlocal drained
            if drained is None and session not in gw.node.sessions:
                drained = asyncio.create_task(stuck.read_frames(lambda frames: False, timeout=10))

        # 3 MB in 96 batches of 32 messages; the stuck client overflows after a few hundred KB.
        published = await publish_paced(
            broker, TRADE, trade, batches=96, batch_size=32, readers=readers, peaks=peaks,
            on_batch=start_draining_once_closed,
        )  # fmt: skip

        # Every healthy client got every message, byte for byte, in order, and is still connected.
        for reader in readers:
            assert reader.frames == published
            assert not reader.task.done()
        # The stuck one is gone, closed as a slow consumer, and counted.
        assert session not in gw.node.sessions
        assert session.close_code == CloseCode.SLOW_CONSUMER
        text = await metrics_text(gw)
        assert sample_value(text, "pricegate_gateway_slow_consumer_disconnects_total") == 1
        assert sample_value(text, 'pricegate_gateway_disconnects_total{code="4000"}') == 1
        # It really was stuck (its socket buffer passed the limit, so the gateway stopped writing to it) and its
        # memory stayed bounded: client_buffer_bytes plus at most the one batch that crossed it.
        batch_block = len(encode_text_frames(published[-32:]))
        assert peaks.transport > BUFFER
        assert peaks.transport <= BUFFER + batch_block

        # What the stuck client finally reads: an unbroken prefix of the stream, then the 4000 close frame.
        assert drained is not None
        frames = await drained
        assert stuck.eof
        data = [payload for opcode, payload in frames if opcode == OP_TEXT]
        assert 0 < len(data) < len(published)
        assert data == published[: len(data)]
        assert frames[-1][0] == OP_CLOSE
        code, reason = struct.unpack("!H", frames[-1][1][:2])[0], frames[-1][1][2:].decode()
        assert (code, reason) == (CloseCode.SLOW_CONSUMER, REASONS[CloseCode.SLOW_CONSUMER])
    finally:
        if drained is not None:
            drained.cancel()
            await asyncio.gather(drained, return_exceptions=True)
        stuck.close()
        await asyncio.gather(*(reader.stop() for reader in readers))


# ---- 2. a stuck client on a state stream ---------------------------------------------------------------------------


async def test_stuck_client_on_a_state_stream_is_conflated_not_closed_and_ends_on_the_newest_value(
    gateway: tuple[RunningGateway, MemoryBroker],
) -> None:
    gw, broker = gateway
    stuck = await StuckClient.connect(gw.port, f"/ws/{BOOK}")
    healthy = await connect_many(f"{gw.ws_base}/ws/{BOOK}", 5)
    readers = [Reader(ws) for ws in healthy]
    try:
        await eventually(lambda: gw.node.hub.subscriber_count(BOOK) == 6, what="6 subscribers")
        session = session_of(gw, stuck)
        pin_send_buffer(session)
        peaks = Peaks(session)
        published = await publish_paced(broker, BOOK, book, batches=32, batch_size=32, readers=readers, peaks=peaks)

        for reader in readers:
            assert reader.frames == published
        # Still connected, never marked for closing, and bounded although it read nothing of ~1 MB.
        assert session in gw.node.sessions and not session.closing
        batch_block = len(encode_text_frames(published[-32:]))
        assert peaks.transport > BUFFER
        assert peaks.transport <= BUFFER + batch_block
        text = await metrics_text(gw)
        assert sample_value(text, 'pricegate_gateway_messages_dropped_total{reason="conflated"}') > 0
        assert sample_value(text, "pricegate_gateway_slow_consumer_disconnects_total") == 0

        # It reads at last: older values were conflated away, order is kept, and the last one is the newest.
        newest = published[-1]
        frames = await stuck.read_frames(lambda frames: bool(frames) and frames[-1][1] == newest)
        frames += await stuck.read_quiet(0.3)  # nothing may follow the newest value
        assert all(opcode == OP_TEXT for opcode, _ in frames)
        data = [payload for _, payload in frames]
        assert data[-1] == newest
        seqs = [seq_of(payload) for payload in data]
        assert seqs == sorted(set(seqs))
        assert len(data) < len(published)
        assert set(data) <= set(published)
    finally:
        stuck.close()
        await asyncio.gather(*(reader.stop() for reader in readers))


# ---- 3. many clients, one frame ---------------------------------------------------------------------------------


async def test_two_hundred_clients_raw_and_combined_get_byte_identical_frames(
    gateway: tuple[RunningGateway, MemoryBroker],
) -> None:
    gw, broker = gateway
    raw = await connect_many(f"{gw.ws_base}/ws/{TRADE}", 100)
    combined = await connect_many(f"{gw.ws_base}/stream?streams={TRADE}", 100)
    try:
        await eventually(lambda: gw.node.hub.subscriber_count(TRADE) == 200, what="200 subscribers")
        # Exchange bytes with odd spacing, escapes and non-ASCII: forwarded verbatim, never re-encoded.
        payloads = [
            b'{"e":"trade","E":%d,"s":"BTCUSDT","p":"0.00100000", "note":"caf\xc3\xa9 \\u00e9\\"q\\""}' % i
            for i in range(5)
        ]
        await broker.publish([OutgoingMessage(TRADE, payload, False) for payload in payloads])
        expected_combined = [b'{"stream":"' + TRADE.encode() + b'","data":' + payload + b"}" for payload in payloads]

        async def frames_of(ws: ClientConnection) -> list[bytes]:
            return [await asyncio.wait_for(ws.recv(decode=False), 5) for _ in payloads]

        raw_frames = await asyncio.gather(*(frames_of(ws) for ws in raw))
        combined_frames = await asyncio.gather(*(frames_of(ws) for ws in combined))
        assert all(frames == payloads for frames in raw_frames)
        assert all(frames == expected_combined for frames in combined_frames)

        text = await metrics_text(gw)
        # One publish call, one flush: the five messages went out to each client in one write.
        assert sample_value(text, "pricegate_gateway_broadcast_duration_seconds_count") >= 1
        assert sample_value(text, "pricegate_gateway_flushes_total") < len(payloads)
        assert sample_value(text, 'pricegate_gateway_messages_sent_total{kind="trade"}') == 200 * len(payloads)
    finally:
        await asyncio.gather(*(ws.close() for ws in raw + combined))


# ---- 4. drain -------------------------------------------------------------------------------------------------------


async def test_drain_closes_every_client_with_1001_spread_out_and_refuses_new_ones(
    gateway: tuple[RunningGateway, MemoryBroker],
) -> None:
    gw, _ = gateway
    clients = await connect_many(f"{gw.ws_base}/ws/{TRADE}", 20)
    try:
        await eventually(lambda: len(gw.node.sessions) == 20, what="20 sessions")
        async with httpx.AsyncClient(base_url=gw.http_base) as http:
            assert (await http.get("/readyz")).status_code == 200

            async def closed_at(ws: ClientConnection) -> float:
                await ws.wait_closed()
                return time.monotonic()

            waiters = [asyncio.create_task(closed_at(ws)) for ws in clients]
            started = time.monotonic()
            gw.node.begin_drain()

            ready = await http.get("/readyz")
            assert ready.status_code == 503 and ready.json()["draining"] is True
            with pytest.raises(InvalidStatus) as refused:
                await connect(f"{gw.ws_base}/ws/{TRADE}")
            assert refused.value.response.status_code == 503

            async with asyncio.timeout(5):
                times = await asyncio.gather(*waiters)
        assert [ws.close_code for ws in clients] == [1001] * 20
        # Spread over shutdown_drain_s (0.5 s: five batches 0.1 s apart), not all at once and not much later.
        assert max(times) - min(times) >= 0.25
        assert max(times) - started <= 0.5 + 1.0
        assert sample_value(await metrics_text(gw), 'pricegate_gateway_disconnects_total{code="1001"}') == 20
    finally:
        await asyncio.gather(*(ws.close() for ws in clients))


# ---- 5. isolation timing ------------------------------------------------------------------------------------------


async def test_a_stuck_client_does_not_delay_a_healthy_one(gateway: tuple[RunningGateway, MemoryBroker]) -> None:
    gw, broker = gateway
    stuck = await StuckClient.connect(gw.port, f"/ws/{BOOK}")
    reader = Reader(await connect(f"{gw.ws_base}/ws/{BOOK}"))
    try:
        await eventually(lambda: gw.node.hub.subscriber_count(BOOK) == 2, what="2 subscribers")
        session = session_of(gw, stuck)
        pin_send_buffer(session)
        # Fill the stuck client until the gateway has stopped writing to it (its socket buffer passed the limit).
        published = 0
        while not socket_buffered(session) > BUFFER:
            assert published < 2000, "the stuck client never filled up"
            await broker.publish([OutgoingMessage(BOOK, book(published + index + 1), True) for index in range(16)])
            published += 16
            await reader.wait_count(published)

        latencies: list[float] = []
        for _ in range(20):
            published += 1
            sent = time.perf_counter()
            await broker.publish([OutgoingMessage(BOOK, book(published), True)])
            await reader.wait_count(published, timeout=2)
            latencies.append(reader.arrived_at[published - 1] - sent)
        assert session in gw.node.sessions and socket_buffered(session) > BUFFER  # still stuck
        assert max(latencies) < 0.2, latencies
    finally:
        stuck.close()
        await reader.stop()
