"""Market sources on a real event loop: the synthetic source publishes only wanted streams with the right
keep-last flag and catches up after a stall; the replay source paces frames by speed, keeps payload bytes
verbatim, batches frames due together, loops, and both stop cleanly when cancelled."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import orjson
import pytest

from ingest.sources.base import MarketSource
from ingest.sources.replay import source as replay_source
from ingest.sources.replay.recording import SAMPLE_PATH, RecordingWriter, read_recording
from ingest.sources.replay.source import ReplaySource
from ingest.sources.synthetic.source import SyntheticSource
from shared.binance.exchange_info import symbols_from_exchange_info
from shared.broker.contract import OutgoingMessage
from shared.frames import combined_frame
from shared.streams import MINI_TICKER_ARR, parse_stream
from tests.polling import eventually

BASE_MS = 1_767_225_600_000
ODD_TRADE = b'{ "e":"trade", "E":1767225600123 ,"s":"BTCUSDT","p":"1.50"}'  # not what an encoder would write


class Collector:
    """A publish callable that records each batch and when it arrived."""

    def __init__(self) -> None:
        self.batches: list[list[OutgoingMessage]] = []
        self.times: list[float] = []

    async def __call__(self, messages: Sequence[OutgoingMessage]) -> None:
        self.batches.append(list(messages))
        self.times.append(time.monotonic())

    @property
    def messages(self) -> list[OutgoingMessage]:
        return [message for batch in self.batches for message in batch]


async def run_until(source: MarketSource, collector: Collector, condition: Callable[[], bool], *, what: str) -> None:
    """Run a source until the condition holds, then cancel it and check it stopped cleanly."""
    task = asyncio.create_task(source.run(collector))
    try:
        await eventually(condition, what=what)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert task.cancelled()


def fast_clock(speedup: float) -> Callable[[], int]:
    """A clock that runs ``speedup`` times faster than real time, so seconds of market pass in milliseconds."""
    started = time.monotonic()
    return lambda: BASE_MS + int((time.monotonic() - started) * 1000 * speedup)


def write_recording(path: Path, frames: list[tuple[int, str, bytes]]) -> None:
    with RecordingWriter(path) as writer:
        for received_at, stream, payload in frames:
            writer.write(received_at, combined_frame(stream, payload))


def trade_payload(index: int) -> bytes:
    return orjson.dumps({"e": "trade", "E": BASE_MS + index, "s": "BTCUSDT", "t": index})


# ---- synthetic ----


async def test_synthetic_source_publishes_only_wanted_streams_with_keep_last() -> None:
    source = SyntheticSource(
        ["BTCUSDT", "ETHUSDT"], seed=1, trade_rate_per_s=20, tick_interval_s=0.01, clock=fast_clock(20)
    )
    wanted = frozenset({"btcusdt@trade", "btcusdt@depth5@100ms", "ethusdt@ticker", MINI_TICKER_ARR})
    source.set_wanted(wanted)
    collector = Collector()

    def seen_all() -> bool:
        return {message.stream for message in collector.messages} == wanted

    await run_until(source, collector, seen_all, what="every wanted stream")
    assert all(batch for batch in collector.batches), "empty batches are not published"
    for message in collector.messages:
        assert message.stream in wanted
        assert message.keep_last is parse_stream(message.stream).is_state
        orjson.loads(message.payload)
    assert {m.stream: m.keep_last for m in collector.messages} == {
        "btcusdt@trade": False,
        "btcusdt@depth5@100ms": True,
        "ethusdt@ticker": True,
        MINI_TICKER_ARR: False,
    }


async def test_synthetic_source_follows_changes_of_the_wanted_set() -> None:
    source = SyntheticSource(["BTCUSDT"], seed=2, tick_interval_s=0.01, clock=fast_clock(20))
    collector = Collector()
    source.set_wanted(frozenset({"btcusdt@depth5@100ms"}))
    task = asyncio.create_task(source.run(collector))
    try:
        await eventually(lambda: len(collector.batches) >= 2, what="two batches")
        source.set_wanted(frozenset({"btcusdt@ticker"}))
        switched_at = len(collector.batches)
        await eventually(lambda: any(m.stream == "btcusdt@ticker" for m in collector.messages), what="the new stream")
        # At most the batch in flight when the set changed can still carry the old stream.
        later = [m.stream for batch in collector.batches[switched_at + 1 :] for m in batch]
        assert set(later) <= {"btcusdt@ticker"}
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_synthetic_source_catches_up_after_a_stall_in_bounded_slices() -> None:
    now = [BASE_MS]
    source = SyntheticSource(["BTCUSDT"], seed=3, tick_interval_s=0.01, clock=lambda: now[0])
    source.set_wanted(frozenset({"btcusdt@ticker"}))
    collector = Collector()
    task = asyncio.create_task(source.run(collector))
    try:
        await asyncio.sleep(0.03)
        assert collector.batches == []  # the clock has not moved
        now[0] += 5000
        await eventually(
            lambda: source.market.now_ms == now[0] and len(collector.messages) == 5, what="the caught-up market"
        )
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert len(collector.batches) == 5, "one slice of at most a second per publish call"
    assert [orjson.loads(m.payload)["E"] for m in collector.messages] == [BASE_MS + 1000 * i for i in range(1, 6)]


async def test_synthetic_source_exchange_info_lists_its_symbols() -> None:
    source = SyntheticSource(["btcusdt", "XRPUSDT"], seed=1)
    assert symbols_from_exchange_info(await source.exchange_info()) == ["BTCUSDT", "XRPUSDT"]
    with pytest.raises(ValueError, match="tick_interval_s"):
        SyntheticSource(["BTCUSDT"], seed=1, tick_interval_s=0)


# ---- replay ----


async def test_replay_publishes_payload_bytes_verbatim_under_canonical_names(tmp_path: Path) -> None:
    path = tmp_path / "rec.jsonl"
    write_recording(
        path,
        [
            (BASE_MS, "btcusdt@trade", ODD_TRADE),
            (BASE_MS + 1, "BTCUSDT@depth5@1000ms", b'{"lastUpdateId":1,"bids":[],"asks":[]}'),
            (BASE_MS + 2, "btcusdt@ticker_1h", b'{"e":"1hTicker"}'),  # a stream we do not serve: skipped
            (BASE_MS + 3, "btcusdt@bookTicker", b'{"u":5}'),
        ],
    )
    source = ReplaySource(path, speed=math.inf, loop=False)
    collector = Collector()
    await source.run(collector)
    assert [(m.stream, m.payload, m.keep_last) for m in collector.messages] == [
        ("btcusdt@trade", ODD_TRADE, False),
        ("btcusdt@depth5", b'{"lastUpdateId":1,"bids":[],"asks":[]}', True),
        ("btcusdt@bookTicker", b'{"u":5}', True),
    ]
    assert source.passes_completed == 1


@pytest.mark.parametrize(("speed", "low", "high"), [(1.0, 0.38, 0.9), (4.0, 0.09, 0.35)])
async def test_replay_pacing_is_scaled_by_speed(tmp_path: Path, speed: float, low: float, high: float) -> None:
    path = tmp_path / "rec.jsonl"
    write_recording(path, [(BASE_MS + 100 * i, "btcusdt@trade", trade_payload(i)) for i in range(5)])
    source = ReplaySource(path, speed=speed, loop=False)
    collector = Collector()
    started = time.monotonic()
    await source.run(collector)
    elapsed = time.monotonic() - started
    assert low <= elapsed <= high, f"400 ms of recording at speed {speed} took {elapsed:.3f} s"
    gaps = [b - a for a, b in zip(collector.times, collector.times[1:], strict=False)]
    assert len(gaps) == 4 and all(gap >= 0.1 / speed * 0.7 for gap in gaps)


async def test_replay_batches_frames_due_at_the_same_time(tmp_path: Path) -> None:
    path = tmp_path / "rec.jsonl"
    write_recording(
        path,
        [
            (BASE_MS, "btcusdt@trade", trade_payload(0)),
            (BASE_MS + 50, "btcusdt@trade", trade_payload(1)),
            (BASE_MS + 50, "btcusdt@aggTrade", trade_payload(2)),
            (BASE_MS + 50, "ethusdt@trade", trade_payload(3)),
            (BASE_MS + 100, "btcusdt@trade", trade_payload(4)),
        ],
    )
    collector = Collector()
    await ReplaySource(path, loop=False).run(collector)
    assert [len(batch) for batch in collector.batches] == [1, 3, 1]


async def test_replay_as_fast_as_possible_loops_until_cancelled(tmp_path: Path) -> None:
    path = tmp_path / "rec.jsonl"
    frames = [(BASE_MS + 60_000 * i, "btcusdt@trade", trade_payload(i)) for i in range(4)]
    write_recording(path, frames)
    source = ReplaySource(path, speed=math.inf)
    collector = Collector()
    await run_until(source, collector, lambda: len(collector.messages) >= 10, what="ten frames")
    payloads = [message.payload for message in collector.messages]
    assert payloads[:10] == [frames[i % 4][2] for i in range(10)]
    assert source.passes_completed >= 2


async def test_replay_cancels_promptly_while_waiting_for_a_frame(tmp_path: Path) -> None:
    path = tmp_path / "rec.jsonl"
    write_recording(
        path,
        [
            (BASE_MS, "btcusdt@trade", trade_payload(0)),
            (BASE_MS + 3_600_000, "btcusdt@trade", trade_payload(1)),
        ],
    )
    collector = Collector()
    started = time.monotonic()
    await run_until(ReplaySource(path), collector, lambda: len(collector.messages) == 1, what="the first frame")
    assert time.monotonic() - started < 1.0


async def test_replay_of_the_shipped_sample(tmp_path: Path) -> None:
    source = ReplaySource(SAMPLE_PATH, speed=math.inf, loop=False)
    collector = Collector()
    await source.run(collector)
    recorded = list(read_recording(SAMPLE_PATH))
    assert [(m.stream, m.payload) for m in collector.messages] == [(f.stream, f.payload) for f in recorded]
    assert symbols_from_exchange_info(await source.exchange_info()) == ["BTCUSDT", "ETHUSDT"]


async def test_replay_exchange_info_includes_symbols_only_seen_in_arrays(tmp_path: Path) -> None:
    path = tmp_path / "rec.jsonl"
    array = orjson.dumps([{"e": "24hrMiniTicker", "s": "SOLUSDT"}, {"e": "24hrMiniTicker", "s": "BTCUSDT"}])
    write_recording(path, [(BASE_MS, "btcusdt@trade", ODD_TRADE), (BASE_MS, MINI_TICKER_ARR, array)])
    assert symbols_from_exchange_info(await ReplaySource(path).exchange_info()) == ["BTCUSDT", "SOLUSDT"]


async def test_replay_rejects_bad_arguments_and_empty_recordings(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        ReplaySource(tmp_path / "missing.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    for speed in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError, match="speed"):
            ReplaySource(empty, speed=speed)
    with pytest.raises(ValueError, match="no frame"):
        await ReplaySource(empty).run(Collector())


async def test_replay_surfaces_a_malformed_line(tmp_path: Path) -> None:
    path = tmp_path / "rec.jsonl"
    write_recording(path, [(BASE_MS, "btcusdt@trade", ODD_TRADE)])
    with path.open("ab") as file:
        file.write(b"{broken\n")
    with pytest.raises(ValueError, match=r"rec.jsonl:2:"):
        await ReplaySource(path, speed=math.inf).run(Collector())


def test_sources_satisfy_the_protocol(tmp_path: Path) -> None:
    path = tmp_path / "rec.jsonl"
    write_recording(path, [(BASE_MS, "btcusdt@trade", ODD_TRADE)])
    sources: list[MarketSource] = [SyntheticSource(["BTCUSDT"], seed=1), ReplaySource(path)]
    assert [source.name for source in sources] == ["synthetic", "replay"]


async def test_replay_reads_past_a_chunk_of_blank_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(replay_source, "REPLAY_READ_LINES", 2)
    path = tmp_path / "rec.jsonl"
    write_recording(path, [(BASE_MS, "btcusdt@trade", trade_payload(0))])
    with path.open("ab") as file:
        file.write(b"\n\n\n\n\n")
    with RecordingWriter(path, append=True) as writer:
        writer.write(BASE_MS + 1, combined_frame("btcusdt@trade", trade_payload(1)))
    collector = Collector()
    await ReplaySource(path, speed=math.inf, loop=False).run(collector)
    assert [message.payload for message in collector.messages] == [trade_payload(0), trade_payload(1)]
