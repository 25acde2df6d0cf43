"""ingest.sources.replay.recorder.record against the local fake Binance: frames land in the documented line format,
recording survives a dropped connection, and it stops on each of its conditions."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest

from ingest.sources.replay.recorder import record
from ingest.sources.replay.recording import read_recording
from shared.errors import ConfigError
from tests.fake_binance import FakeBinance
from tests.polling import eventually

pytestmark = pytest.mark.timeout(30)


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines()


async def test_records_frames_in_the_documented_format(tmp_path: Path) -> None:
    out = tmp_path / "capture.jsonl"
    async with FakeBinance(spaced_payloads=True, data_interval_s=0.01) as fake:
        written = await record(fake.ws_url, ["BTCUSDT@trade", "ethusdt@bookTicker"], out, max_messages=20)
        assert fake.connections[0].path == "/stream?streams=btcusdt@trade/ethusdt@bookTicker"
    assert written == 20
    lines = lines_of(out)
    assert len(lines) == 20
    sent = {stream: list(payloads) for stream, payloads in fake.sent.items()}
    seen: dict[str, int] = {}
    for line in lines:
        assert line.startswith(b'{"ts":') and line.endswith(b"}")
        document = orjson.loads(line)
        assert set(document) == {"ts", "frame"}
        assert isinstance(document["ts"], int) and document["ts"] > 1_700_000_000_000
        # The frame is embedded byte for byte: the payload's spaces survive.
        stream = document["frame"]["stream"]
        index = seen.get(stream, 0)
        frame = b'{"stream":"' + stream.encode() + b'","data":' + sent[stream][index] + b"}"
        assert line == b'{"ts":' + str(document["ts"]).encode() + b',"frame":' + frame + b"}"
        seen[stream] = index + 1
    assert set(seen) == {"btcusdt@trade", "ethusdt@bookTicker"}
    assert [frame.stream for frame in read_recording(out)] == [orjson.loads(line)["frame"]["stream"] for line in lines]


async def test_survives_a_dropped_connection(tmp_path: Path) -> None:
    out = tmp_path / "capture.jsonl"
    async with FakeBinance(data_interval_s=0.01) as fake:
        recording = asyncio.create_task(record(fake.ws_url, ["btcusdt@trade"], out, max_messages=60))
        await eventually(lambda: len(fake.sent.get("btcusdt@trade", [])) >= 10, what="some frames sent")
        assert fake.drop_all() == 1
        written = await asyncio.wait_for(recording, 10)
    assert written == 60
    assert fake.connection_attempts == 2
    trade_ids = [orjson.loads(line)["frame"]["data"]["t"] for line in lines_of(out)]
    assert len(trade_ids) == 60
    assert trade_ids == sorted(trade_ids)  # in order, across the reconnect


async def test_stops_after_duration_and_on_stop(tmp_path: Path) -> None:
    async with FakeBinance(data_interval_s=0.02) as fake:
        loop = asyncio.get_running_loop()
        started = loop.time()
        written = await record(fake.ws_url, ["btcusdt@trade"], tmp_path / "a.jsonl", duration_s=0.4)
        assert 0.35 < loop.time() - started < 2.0
        assert written > 0
        assert len(lines_of(tmp_path / "a.jsonl")) == written

        stop = asyncio.Event()
        recording = asyncio.create_task(record(fake.ws_url, ["btcusdt@trade"], tmp_path / "b.jsonl", stop=stop))
        await eventually(lambda: len(fake.open_connections) == 1, what="connected")
        await asyncio.sleep(0.1)
        stop.set()
        written = await asyncio.wait_for(recording, 5)
        assert written == len(lines_of(tmp_path / "b.jsonl")) > 0

        recording = asyncio.create_task(record(fake.ws_url, ["btcusdt@trade"], tmp_path / "c.jsonl"))
        await eventually(lambda: len(fake.open_connections) == 1, what="connected")
        await asyncio.sleep(0.1)
        recording.cancel()
        with pytest.raises(asyncio.CancelledError):
            await recording
        assert all(orjson.loads(line) for line in lines_of(tmp_path / "c.jsonl"))  # closed cleanly
        await eventually(lambda: not fake.open_connections, what="connection closed")


async def test_skips_frames_the_format_cannot_hold(tmp_path: Path) -> None:
    out = tmp_path / "capture.jsonl"
    async with FakeBinance(data_interval_s=0.05) as fake:
        recording = asyncio.create_task(record(fake.ws_url, ["btcusdt@trade"], out, max_messages=5))
        await eventually(lambda: len(fake.open_connections) == 1, what="connected")
        await fake.send_garbage()
        written = await asyncio.wait_for(recording, 10)
    assert written == 5
    assert all(orjson.loads(line)["frame"]["stream"] == "btcusdt@trade" for line in lines_of(out))


async def test_invalid_arguments_fail_before_connecting(tmp_path: Path) -> None:
    async with FakeBinance() as fake:
        with pytest.raises(ConfigError, match="btcusdt@nonsense"):
            await record(fake.ws_url, ["btcusdt@trade", "btcusdt@nonsense"], tmp_path / "x.jsonl")
        with pytest.raises(ConfigError, match="streams"):
            await record(fake.ws_url, [], tmp_path / "x.jsonl")
        with pytest.raises(ConfigError, match="max_messages"):
            await record(fake.ws_url, ["btcusdt@trade"], tmp_path / "x.jsonl", max_messages=0)
        with pytest.raises(ConfigError, match="ws_url"):
            await record(fake.rest_url, ["btcusdt@trade"], tmp_path / "x.jsonl")
        assert fake.connection_attempts == 0
