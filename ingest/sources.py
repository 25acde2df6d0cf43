"""Market sources: what ingest publishes from. A source runs until cancelled and hands batches of
``OutgoingMessage`` (canonical stream, exchange payload bytes, keep-last flag) to a ``publish`` callable, in
order; it is told which streams clients want and can describe its symbols as a Binance exchangeInfo document.
``SyntheticSource`` drives the synthetic market on the wall clock; ``ReplaySource`` plays a recording back
with its original pacing (scaled by a speed factor), payload bytes untouched. The live Binance upstream
implements the same ``MarketSource`` protocol.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Protocol

import orjson

from ingest.exchange_info import build_exchange_info
from ingest.market import SyntheticMarket, symbol_spec
from ingest.recording import RecordedFrame, parse_recording_line, read_recording
from shared.broker import OutgoingMessage
from shared.errors import ProtocolError
from shared.streams import MINI_TICKER_ARR, parse_stream

logger = logging.getLogger(__name__)

Publish = Callable[[Sequence[OutgoingMessage]], Awaitable[None]]

# After a stall (a suspended machine, a blocked loop) the synthetic market catches up in slices this long, so
# no single batch is huge and other tasks run in between.
CATCH_UP_SLICE_MS = 1000
REPLAY_READ_LINES = 2000  # lines read per worker-thread call
REPLAY_MAX_BATCH = 500  # frames per publish call when replaying behind schedule or as fast as possible


class MarketSource(Protocol):
    """Where market data comes from (Binance upstream, replay, synthetic)."""

    name: str

    async def run(self, publish: Publish) -> None:
        """Publish batches in order until cancelled."""
        ...

    def set_wanted(self, streams: frozenset[str]) -> None:
        """Canonical stream names clients want (demand plus the always-on set)."""
        ...

    async def exchange_info(self) -> bytes:
        """A Binance-layout exchangeInfo document for the symbols this source serves."""
        ...


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class SyntheticSource:
    """The synthetic market on the wall clock: every ``tick_interval_s`` it advances the market to now and
    publishes what the wanted streams produced, one publish call per tick (empty ticks are skipped)."""

    def __init__(
        self,
        symbols: Sequence[str],
        *,
        seed: int,
        trade_rate_per_s: float = 5.0,
        tick_interval_s: float = 0.05,
        clock: Callable[[], int] = wall_clock_ms,
    ) -> None:
        if not tick_interval_s > 0 or math.isinf(tick_interval_s):
            raise ValueError(f"tick_interval_s must be a positive number of seconds, got {tick_interval_s!r}")
        self.name = "synthetic"
        self._clock = clock
        self._tick_interval_s = tick_interval_s
        self.market = SyntheticMarket(symbols, seed=seed, trade_rate_per_s=trade_rate_per_s, start_ms=clock())
        self._wanted: frozenset[str] = frozenset()
        self._keep_last: dict[str, bool] = {}

    def set_wanted(self, streams: frozenset[str]) -> None:
        self._wanted = frozenset(streams)

    async def exchange_info(self) -> bytes:
        return build_exchange_info(self.market.symbols_info(), self._clock())

    def _message(self, stream: str, payload: bytes) -> OutgoingMessage:
        keep_last = self._keep_last.get(stream)
        if keep_last is None:
            keep_last = self._keep_last[stream] = parse_stream(stream).is_state
        return OutgoingMessage(stream, payload, keep_last)

    async def run(self, publish: Publish) -> None:
        loop = asyncio.get_running_loop()
        next_tick = loop.time()
        while True:
            target_ms = self._clock()
            while self.market.now_ms < target_ms:
                step_ms = min(target_ms, self.market.now_ms + CATCH_UP_SLICE_MS)
                batch = self.market.advance(step_ms, self._wanted)
                if batch:
                    await publish([self._message(stream, payload) for stream, payload in batch])
                if step_ms < target_ms:
                    await asyncio.sleep(0)
            next_tick += self._tick_interval_s
            delay = next_tick - loop.time()
            if delay < 0:
                # Behind schedule: carry on from now rather than firing a burst of make-up ticks.
                next_tick = loop.time()
                delay = 0.0
            await asyncio.sleep(delay)


def _read_chunk(path: Path, offset: int, line_number: int) -> tuple[list[RecordedFrame], int, int]:
    """Up to REPLAY_READ_LINES frames from byte ``offset`` on; returns them with the next offset and line
    number. Opens and closes the file itself, so a cancelled caller never leaves a half-read file behind."""
    frames: list[RecordedFrame] = []
    with path.open("rb") as file:
        file.seek(offset)
        for _ in range(REPLAY_READ_LINES):
            line = file.readline()
            if not line:
                break
            line_number += 1
            frame = parse_recording_line(line, line_number, path)
            if frame is not None:
                frames.append(frame)
        return frames, file.tell(), line_number


def _symbols_in_recording(path: Path) -> list[str]:
    """Uppercase symbols that appear in a recording (stream names, and the entries of !miniTicker@arr)."""
    symbols: dict[str, None] = {}
    for frame in read_recording(path):
        try:
            stream = parse_stream(frame.stream)
        except ProtocolError:
            continue
        if stream.symbol is not None:
            symbols[stream.symbol] = None
        elif stream.name == MINI_TICKER_ARR:
            entries = orjson.loads(frame.payload)
            for entry in entries if isinstance(entries, list) else ():
                if isinstance(entry, dict) and isinstance(entry.get("s"), str):
                    symbols[entry["s"].upper()] = None
    return list(symbols)


class ReplaySource:
    """Plays a recording. Frames are published under their canonical stream names with the recorded payload
    bytes, paced by their receive times: the gap between two frames is the recorded gap divided by ``speed``
    (2.0 plays twice as fast; ``math.inf`` plays as fast as the publisher takes batches). Frames due at the
    same moment go out in one batch. With ``loop`` the recording restarts right after its last frame;
    timestamps inside payloads are not rewritten, so event times repeat on every pass. Without ``loop``,
    ``run`` returns at the end of the file. Every stream in the file is published whatever is wanted; frames
    of streams that ``shared.streams`` does not accept are skipped."""

    def __init__(self, path: str | Path, *, speed: float = 1.0, loop: bool = True) -> None:
        if math.isnan(speed) or speed <= 0:
            raise ValueError(f"replay speed must be > 0 (math.inf for as fast as possible), got {speed!r}")
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"recording {self.path} does not exist")
        self.name = "replay"
        self.speed = speed
        self.loop = loop
        self.passes_completed = 0
        # recorded stream name -> (canonical name, keep_last), or None for a name we do not serve
        self._streams: dict[str, tuple[str, bool] | None] = {}
        self._exchange_info_symbols: list[str] | None = None

    def set_wanted(self, streams: frozenset[str]) -> None:
        """Accepted for the protocol's sake: a replay publishes every stream it recorded."""

    async def exchange_info(self) -> bytes:
        if self._exchange_info_symbols is None:
            self._exchange_info_symbols = await asyncio.to_thread(_symbols_in_recording, self.path)
        infos = [symbol_spec(symbol).info() for symbol in self._exchange_info_symbols]
        return build_exchange_info(infos, wall_clock_ms())

    def _resolve(self, recorded_stream: str) -> tuple[str, bool] | None:
        try:
            parsed = parse_stream(recorded_stream)
        except ProtocolError as error:
            logger.warning("replay %s: skipping stream %r: %s", self.path, recorded_stream, error.reason)
            return None
        return parsed.name, parsed.is_state

    def _message(self, frame: RecordedFrame) -> OutgoingMessage | None:
        if frame.stream in self._streams:
            known = self._streams[frame.stream]
        else:
            known = self._streams[frame.stream] = self._resolve(frame.stream)
        if known is None:
            return None
        stream, keep_last = known
        return OutgoingMessage(stream, frame.payload, keep_last)

    async def run(self, publish: Publish) -> None:
        while True:
            if await self._play_once(publish) == 0:
                raise ValueError(f"recording {self.path} holds no frame of a stream this gateway serves")
            self.passes_completed += 1
            if not self.loop:
                return

    async def _play_once(self, publish: Publish) -> int:
        loop = asyncio.get_running_loop()
        as_fast_as_possible = math.isinf(self.speed)
        first_received_ms: int | None = None
        started_at = 0.0
        batch: list[OutgoingMessage] = []
        played = 0
        offset = line_number = 0
        while True:
            frames, next_offset, line_number = await asyncio.to_thread(_read_chunk, self.path, offset, line_number)
            if next_offset == offset:  # end of file
                break
            offset = next_offset
            for frame in frames:
                message = self._message(frame)
                if message is None:
                    continue
                if first_received_ms is None:
                    first_received_ms = frame.received_at_ms
                    started_at = loop.time()
                if not as_fast_as_possible:
                    due = started_at + (frame.received_at_ms - first_received_ms) / 1000.0 / self.speed
                    wait = due - loop.time()
                    if wait > 0:
                        if batch:
                            await publish(batch)
                            batch = []
                        await asyncio.sleep(wait)
                if len(batch) >= REPLAY_MAX_BATCH:
                    await publish(batch)
                    batch = []
                    await asyncio.sleep(0)
                batch.append(message)
                played += 1
        if batch:
            await publish(batch)
        return played
