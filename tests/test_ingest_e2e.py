"""Every ingest source end to end, as a user runs it: real ``pricegate`` processes, real Redis, real sockets.

- live Binance (``--source binance``) against the local fake exchange: demand-driven subscriptions, payload
  bytes verbatim, exchangeInfo from the exchange, UNSUBSCRIBE only after the linger, reconnect after a network
  failure, always-on streams without any client;
- replay (``--source replay``) of the bundled sample through Redis and through the in-memory demo, frames in
  recorded order;
- ``pricegate record`` against the fake, then replaying that file (record -> replay -> client);
- SIGTERM: ingest and gateway exit 0, clients get 1001; ``record`` stops cleanly with its count;
- bad ingest/record configuration: exit 2 and one line naming the setting.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from ingest.service import IngestService
from ingest.sources.replay.recording import SAMPLE_PATH, read_recording
from ingest.sources.synthetic.source import SyntheticSource
from shared.broker.contract import OutgoingMessage
from shared.broker.memory import MemoryBroker
from shared.frames import Publication, combined_frame
from shared.settings import Settings
from tests.fake_binance import FakeBinance
from tests.polling import eventually
from tests.processes import PricegateProcess, free_port, run_pricegate, start_pricegate

pytestmark = pytest.mark.integration

Launch = Callable[..., Awaitable[PricegateProcess]]

SERVING = r"pricegate is serving on http://127\.0\.0\.1:\d+"
INGESTING = r"pricegate ingest: \w+ source publishing"
STOP_WITHIN_S = 5.0


@pytest.fixture
async def launch() -> AsyncIterator[Launch]:
    """Start ``pricegate`` processes; whatever is still running when the test ends (even by failing) is killed."""
    started: list[PricegateProcess] = []

    async def start(*args: str, env: dict[str, str]) -> PricegateProcess:
        process = await start_pricegate(*args, env=env)
        started.append(process)
        return process

    yield start
    for process in started:
        if process.process.returncode is None:
            process.process.kill()
        await process.process.wait()
        if process._reader is not None:
            await process._reader


def scaled_env(redis_url: str, key_prefix: str, **extra: str) -> dict[str, str]:
    return {
        "PRICEGATE_REDIS_URL": redis_url,
        "PRICEGATE_CHANNEL_PREFIX": key_prefix,
        "PRICEGATE_INGEST_METRICS_PORT": "0",
        "PRICEGATE_SHUTDOWN_DRAIN_S": "0.3",
        "PRICEGATE_DEMAND_TTL_S": "1",  # the smallest allowed: a left stream's demand expires quickly
        **extra,
    }


async def start_gateway(launch: Launch, env: dict[str, str]) -> tuple[PricegateProcess, int]:
    port = free_port()
    gateway = await launch("gateway", "--port", str(port), env=env)
    await gateway.wait_for_line(SERVING)
    return gateway, port


async def stop_cleanly(process: PricegateProcess, within_s: float = STOP_WITHIN_S) -> None:
    """SIGTERM: the process must exit 0 within ``within_s`` seconds."""
    started = time.monotonic()
    try:
        code = await process.stop(signal.SIGTERM, timeout=within_s)
    except TimeoutError:
        raise AssertionError(f"still running {within_s}s after SIGTERM:\n{''.join(process.output[-30:])}") from None
    assert code == 0, f"exit {code} after SIGTERM:\n{''.join(process.output[-30:])}"
    assert time.monotonic() - started < within_s


async def receive(ws: ClientConnection, count: int, within_s: float) -> list[bytes]:
    """``count`` frames (bytes, exactly as received) within ``within_s`` seconds."""
    frames: list[bytes] = []
    async with asyncio.timeout(within_s):
        while len(frames) < count:
            frames.append(await ws.recv(decode=False))
    return frames


async def receive_for(ws: ClientConnection, seconds: float) -> list[bytes]:
    frames: list[bytes] = []
    deadline = time.monotonic() + seconds
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            frames.append(await asyncio.wait_for(ws.recv(decode=False), remaining))
        except TimeoutError:
            break
    return frames


def split_combined(frames: Sequence[bytes]) -> dict[str, list[bytes]]:
    """Payload bytes per stream of combined frames, checking each envelope is exactly
    ``{"stream":"<name>","data":<payload>}`` around the untouched payload."""
    by_stream: dict[str, list[bytes]] = {}
    for frame in frames:
        match = re.fullmatch(rb'\{"stream":"([^"]+)","data":(.*)\}', frame, re.DOTALL)
        assert match is not None, frame[:200]
        stream, payload = match.group(1).decode(), match.group(2)
        assert frame == combined_frame(stream, payload)
        by_stream.setdefault(stream, []).append(payload)
    return by_stream


def assert_run_of(received: Sequence[bytes], expected: Sequence[bytes], *, looping: bool) -> tuple[int, int]:
    """``received`` is ``expected[i], expected[i+1], …`` for some ``i`` (joined mid-way), wrapping to the start
    when ``looping``; nothing lost, duplicated or reordered. Returns (i, passes wrapped)."""
    assert received, "nothing received"
    assert len(set(expected)) == len(expected), "expected payloads must be distinct to locate a frame"
    assert received[0] in expected, f"not a payload of the source: {received[0][:200]!r}"
    start = list(expected).index(received[0])
    for offset, payload in enumerate(received):
        index = start + offset
        if looping:
            index %= len(expected)
        assert index < len(expected), f"frame {offset} is past the end of a non-looping source"
        assert payload == expected[index], (
            f"frame {offset}: expected payload #{index} {expected[index][:120]!r}, got {payload[:120]!r}"
        )
    return start, (start + len(received) - 1) // len(expected)


def unsubscribes(fake: FakeBinance, stream: str) -> list[dict[str, Any]]:
    return [
        message
        for connection in fake.connections
        for message in connection.control_messages
        if message.get("method") == "UNSUBSCRIBE" and stream in message.get("params", [])
    ]


# ---- live Binance source (the fake exchange) ----------------------------------------------------------------


async def test_binance_source_end_to_end(redis_url: str, key_prefix: str, launch: Launch) -> None:
    symbols = ("BTCUSDT", "ETHUSDT", "DOGEUSDT")  # not the synthetic default: exchangeInfo must be the fake's
    async with FakeBinance(symbols=symbols, spaced_payloads=True) as fake:
        env = scaled_env(
            redis_url,
            key_prefix,
            PRICEGATE_BINANCE_WS_URL=fake.ws_url,
            PRICEGATE_BINANCE_REST_URL=fake.rest_url,
            PRICEGATE_DEMAND_LINGER_S="1",
            PRICEGATE_ALWAYS_ON_STREAMS="btcusdt@bookTicker",
        )
        ingest = await launch("ingest", "--source", "binance", env=env)
        gateway, port = await start_gateway(launch, env)
        await ingest.wait_for_line(INGESTING)

        # Always-on: the exchange is asked for it with no client anywhere, and for nothing else.
        await eventually(lambda: "btcusdt@bookTicker" in fake.subscribed(), timeout=5, what="always-on subscribe")
        assert fake.subscribed() == {"btcusdt@bookTicker"}

        # exchangeInfo: the exchange's document (its symbols and layout), cached by ingest, served by the gateway.
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:

            async def info_served() -> bool:
                return (await client.get("/api/v3/exchangeInfo")).status_code == 200

            await eventually(info_served, timeout=5, interval=0.1, what="exchangeInfo from the gateway")
            reply = await client.get("/api/v3/exchangeInfo")
            exchange = (await client.get(f"{fake.rest_url}/api/v3/exchangeInfo")).json()
        served = reply.json()
        assert [entry["symbol"] for entry in served["symbols"]] == list(symbols)
        assert {**served, "serverTime": 0} == {**exchange, "serverTime": 0}

        stream = "dogeusdt@trade"  # configured nowhere: it flows only because a client asks for it
        async with connect(f"ws://127.0.0.1:{port}/ws") as ws:
            asked = time.monotonic()
            await ws.send(json.dumps({"method": "SUBSCRIBE", "params": [stream], "id": 1}))
            assert json.loads(await ws.recv()) == {"result": None, "id": 1}
            first = await receive(ws, 1, within_s=5)
            assert time.monotonic() - asked < 3.0, "demand took too long to reach the exchange"
            received = first + await receive(ws, 15, within_s=5)
            # Byte for byte what the exchange sent (spaced JSON: a re-encoded payload would differ), in order,
            # nothing skipped.
            assert_run_of(received, fake.sent[stream], looping=False)
            assert b", " in received[0]

            # A network failure upstream: ingest reconnects and resubscribes; the client keeps receiving.
            attempts = fake.connection_attempts
            assert fake.drop_all() == 1
            sent_before_drop = len(fake.sent[stream])
            await eventually(
                lambda: fake.connection_attempts > attempts and fake.subscribed() == {"btcusdt@bookTicker", stream},
                timeout=5,
                what="reconnect and resubscribe",
            )
            async with asyncio.timeout(5):
                while True:
                    payload = await ws.recv(decode=False)
                    assert isinstance(payload, bytes)
                    if payload in fake.sent[stream][sent_before_drop:]:
                        break
            after = [payload, *await receive(ws, 5, within_s=5)]
            assert_run_of(after, fake.sent[stream], looping=False)
            assert ingest.process.returncode is None
        left = time.monotonic()

        # The client left: the exchange keeps the stream for the linger (1 s), then gets an UNSUBSCRIBE.
        await asyncio.sleep(max(0.0, left + 0.9 - time.monotonic()))
        assert unsubscribes(fake, stream) == [], "unsubscribed before the linger was over"
        assert stream in fake.subscribed()
        await eventually(lambda: bool(unsubscribes(fake, stream)), timeout=5, what="UNSUBSCRIBE after the linger")
        assert time.monotonic() - left >= 1.0
        assert fake.subscribed() == {"btcusdt@bookTicker"}  # always-on stays
        assert unsubscribes(fake, "btcusdt@bookTicker") == []

        await stop_cleanly(ingest)
        await stop_cleanly(gateway)
        assert "Traceback" not in "".join(ingest.output + gateway.output)


# ---- replay source --------------------------------------------------------------------------------------------


def recorded_payloads(path: Path, stream: str) -> list[bytes]:
    return [frame.payload for frame in read_recording(path) if frame.stream == stream]


async def test_replay_source_through_redis_in_recorded_order(redis_url: str, key_prefix: str, launch: Launch) -> None:
    env = scaled_env(redis_url, key_prefix)
    ingest = await launch("ingest", "--source", "replay", str(SAMPLE_PATH), "--speed", "20", env=env)
    gateway, port = await start_gateway(launch, env)
    await ingest.wait_for_line(INGESTING)
    streams = ["btcusdt@trade", "ethusdt@depth"]
    async with connect(f"ws://127.0.0.1:{port}/stream?streams={'/'.join(streams)}") as ws:
        await receive(ws, 1, within_s=5)  # flowing
        # The 22 s sample lasts 1.1 s at speed 20: this spans about two passes.
        by_stream = split_combined(await receive_for(ws, 2.5))
    for stream in streams:
        _, wrapped = assert_run_of(by_stream[stream], recorded_payloads(SAMPLE_PATH, stream), looping=True)
        assert wrapped >= 1, f"{stream}: the replay did not loop"
    await stop_cleanly(ingest)
    await stop_cleanly(gateway)


async def test_demo_serves_the_replay(launch: Launch) -> None:
    port = free_port()
    demo = await launch("demo", "--source", "replay", "--speed", "20", "--port", str(port), env={})
    await demo.wait_for_line(SERVING)
    assert any("replay of the bundled sample" in line for line in demo.output)
    async with connect(f"ws://127.0.0.1:{port}/ws/ethusdt@trade") as ws:
        received = await receive_for(ws, 2.0)
        assert_run_of(received, recorded_payloads(SAMPLE_PATH, "ethusdt@trade"), looping=True)
        demo.process.send_signal(signal.SIGTERM)
        with pytest.raises(ConnectionClosed) as closed:
            async with asyncio.timeout(STOP_WITHIN_S):
                while True:
                    await ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
    await stop_cleanly(demo)


# ---- record, then replay what was recorded ----------------------------------------------------------------------

LINE = re.compile(rb'\{"ts":(\d+),"frame":(\{"stream":"([^"]+)","data":(.*)\})\}')


async def test_record_then_replay_the_recording(
    redis_url: str, key_prefix: str, launch: Launch, tmp_path: Path
) -> None:
    out = tmp_path / "session.jsonl"
    streams = ["btcusdt@trade", "ethusdt@bookTicker"]
    async with FakeBinance(spaced_payloads=True) as fake:
        before_ms = int(time.time() * 1000)
        code, output = await run_pricegate(
            "record", "--streams", ",".join(streams), "--out", str(out), "--max-messages", "20",
            "--binance-ws-url", fake.ws_url,
        )  # fmt: skip
        after_ms = int(time.time() * 1000)
        assert code == 0, output
        assert f"recorded 20 frames to {out}" in output
        assert "Traceback" not in output
        lines = out.read_bytes().split(b"\n")
        assert lines[-1] == b"" and len(lines) == 21  # 20 complete lines
        recorded: dict[str, list[bytes]] = {}
        for line in lines[:-1]:
            match = LINE.fullmatch(line)
            assert match is not None, line[:200]
            ts, frame, stream, data = match.groups()
            assert before_ms <= int(ts) <= after_ms
            assert stream.decode() in streams
            assert frame == combined_frame(stream.decode(), data)  # the combined frame exactly as received
            recorded.setdefault(stream.decode(), []).append(data)
        assert set(recorded) == set(streams)
        for stream, payloads in recorded.items():
            # Exactly the exchange's bytes, from its first payload on, in order.
            assert payloads == fake.sent[stream][: len(payloads)]
        # The product reads its own format back to the same bytes.
        assert [(f.stream, f.payload) for f in read_recording(out)] == [
            (match.group(3).decode(), match.group(4))
            for match in (LINE.fullmatch(line) for line in lines[:-1])
            if match is not None
        ]

    # Close the loop: replay the file through ingest and a gateway to a client (the exchange is gone).
    env = scaled_env(redis_url, key_prefix)
    ingest = await launch("ingest", "--source", "replay", str(out), env=env)
    gateway, port = await start_gateway(launch, env)
    await ingest.wait_for_line(INGESTING)
    trades = recorded["btcusdt@trade"]
    async with connect(f"ws://127.0.0.1:{port}/ws/btcusdt@trade") as ws:
        received = await receive(ws, 2 * len(trades) + 3, within_s=10)  # the file lasts ~0.5 s: it loops
    _, wrapped = assert_run_of(received, trades, looping=True)
    assert wrapped >= 1
    assert b", " in received[0]  # still the exchange's own (spaced) bytes
    await stop_cleanly(ingest)
    await stop_cleanly(gateway)


async def test_record_stops_on_sigterm_with_a_complete_file(launch: Launch, tmp_path: Path) -> None:
    out = tmp_path / "open-ended.jsonl"
    async with FakeBinance() as fake:
        recorder = await launch(
            "record", "--streams", "btcusdt@trade", "--out", str(out), "--binance-ws-url", fake.ws_url, env={}
        )
        await eventually(lambda: len(fake.sent.get("btcusdt@trade", [])) >= 5, timeout=10, what="recording")
        await stop_cleanly(recorder)
    output = "".join(recorder.output)
    match = re.search(r"recorded (\d+) frames to (\S+)", output)
    assert match is not None, output
    assert match.group(2) == str(out)
    payloads = [frame.payload for frame in read_recording(out)]
    assert len(payloads) == int(match.group(1)) >= 1  # every frame it counted is in the file, complete
    assert payloads == fake.sent["btcusdt@trade"][: len(payloads)]


# ---- SIGTERM --------------------------------------------------------------------------------------------------


async def test_sigterm_ingest_exits_0_and_gateway_closes_clients_with_1001(
    redis_url: str, key_prefix: str, launch: Launch
) -> None:
    env = scaled_env(redis_url, key_prefix, PRICEGATE_SYNTHETIC_TRADE_RATE="50")
    ingest = await launch("ingest", env=env)  # the default source: synthetic
    gateway, port = await start_gateway(launch, env)
    await ingest.wait_for_line(INGESTING)
    base = f"ws://127.0.0.1:{port}"
    async with (
        connect(f"{base}/ws/btcusdt@trade") as raw,
        connect(f"{base}/stream?streams=ethusdt@trade/btcusdt@bookTicker") as combined,
    ):
        for ws in (raw, combined):
            await receive(ws, 3, within_s=5)
        # Ingest stops while publishing busily; the gateway keeps its clients (data resumes when ingest returns).
        await stop_cleanly(ingest)
        await asyncio.sleep(0.3)
        for ws in (raw, combined):
            await receive_for(ws, 0.1)  # drain what was in flight: the connection must still be open

        gateway.process.send_signal(signal.SIGTERM)
        for ws in (raw, combined):
            with pytest.raises(ConnectionClosed) as closed:
                async with asyncio.timeout(STOP_WITHIN_S):
                    while True:
                        await ws.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
    await stop_cleanly(gateway)
    assert "Traceback" not in "".join(ingest.output + gateway.output)


class SwallowingBroker(MemoryBroker):
    """A broker whose calls lose a cancellation that arrives while they run, as Python 3.11's ``asyncio.wait_for``
    does (redis-py wraps socket writes in it) when the cancel lands just as the write completes."""

    def __init__(self, swallow: str) -> None:
        super().__init__()
        self.swallow = swallow
        self.inside = asyncio.Event()

    async def _maybe_swallow(self, method: str) -> None:
        if method == self.swallow:
            self.inside.set()
            try:
                await asyncio.sleep(0.2)
            except asyncio.CancelledError:
                pass  # lost: the call returns normally

    async def publish(
        self, messages: Sequence[OutgoingMessage], *, fencing_token: str | None = None
    ) -> list[Publication]:
        await self._maybe_swallow("publish")
        return await super().publish(messages, fencing_token=fencing_token)

    async def publish_heartbeat(self, now_ms: int) -> None:
        await self._maybe_swallow("publish_heartbeat")
        await super().publish_heartbeat(now_ms)

    async def read_demand(self, now_s: float) -> set[str]:
        await self._maybe_swallow("read_demand")
        return await super().read_demand(now_s)

    async def put_exchange_info(self, document: bytes) -> None:
        await self._maybe_swallow("put_exchange_info")
        await super().put_exchange_info(document)


@pytest.mark.parametrize("swallow", ["publish", "publish_heartbeat", "read_demand", "put_exchange_info"])
async def test_ingest_stops_even_when_a_broker_call_loses_the_cancellation(swallow: str) -> None:
    # Before the fix, ``pricegate ingest`` hung forever on SIGTERM about once in 30 stops with real Redis.
    broker = SwallowingBroker(swallow)
    source = SyntheticSource(["BTCUSDT"], seed=1, trade_rate_per_s=100)
    service = IngestService(Settings(always_on_streams=("btcusdt@trade",)), broker, source)
    others = asyncio.all_tasks()
    running = asyncio.create_task(service.run())
    try:
        await asyncio.wait_for(broker.inside.wait(), 5)
        running.cancel()
        done, _ = await asyncio.wait({running}, timeout=2)
        assert running in done, f"ingest did not stop: a cancelled {swallow} call kept its loop going"
        assert running.cancelled()
    finally:
        broker.swallow = ""  # on failure: lose no more cancellations, and stop what is still running
        leftovers = asyncio.all_tasks() - others - {asyncio.current_task()}
        for task in leftovers:
            task.cancel()
        await asyncio.wait(leftovers or {running}, timeout=2)


# ---- bad configuration ----------------------------------------------------------------------------------------


async def test_bad_ingest_and_record_configuration_is_one_line_and_exit_2(
    redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    env = scaled_env(redis_url, key_prefix)
    not_a_recording = tmp_path / "notes.txt"
    not_a_recording.write_text("hello, this is not a recording\n")
    out = tmp_path / "never.jsonl"
    cases: list[tuple[tuple[str, ...], dict[str, str], list[str]]] = [
        (("ingest", "--source", "replay", "/nonexistent"), env, ["PRICEGATE_REPLAY_FILE", "/nonexistent"]),
        (("ingest", "--source", "replay", str(not_a_recording)), env, ["PRICEGATE_REPLAY_FILE", "not valid JSON"]),
        (("ingest", "--source", "nonsense"), env, ["PRICEGATE_SOURCE", "nonsense"]),
        (
            ("ingest",),
            {**env, "PRICEGATE_ALWAYS_ON_STREAMS": "btcusdt@trade,btcusdt@nonsense"},
            ["PRICEGATE_ALWAYS_ON_STREAMS", "btcusdt@nonsense"],
        ),
        (
            ("ingest", "--source", "binance"),
            {**env, "PRICEGATE_ALWAYS_ON_STREAMS": "btcusdt@nonsense"},
            ["PRICEGATE_ALWAYS_ON_STREAMS", "btcusdt@nonsense"],
        ),
        (("record", "--streams", "btcusdt@nonsense", "--out", str(out)), {}, ["--streams", "btcusdt@nonsense"]),
        (("record", "--streams", "btcusdt@trade", "--out", str(out), "--max-messages", "0"), {}, ["--max-messages"]),
    ]
    results = await asyncio.gather(*(run_pricegate(*args, env=case_env) for args, case_env, _ in cases))
    for (args, _, words), (code, output) in zip(cases, results, strict=True):
        lines = output.strip().splitlines()
        assert code == 2, (args, output)
        assert len(lines) == 1 and lines[0].startswith("pricegate: configuration error: "), (args, output)
        for word in words:
            assert word in lines[0], (args, word, output)
    assert not out.exists()  # a bad record command never creates its output file


def test_sample_payloads_are_distinct_per_stream() -> None:
    """The order checks above locate frames by payload; that needs each stream's payloads to be distinct."""
    for stream in ("btcusdt@trade", "ethusdt@depth", "ethusdt@trade"):
        payloads = recorded_payloads(SAMPLE_PATH, stream)
        assert len(payloads) > 20 and len(set(payloads)) == len(payloads)
        assert all(orjson.loads(payload) for payload in payloads)
