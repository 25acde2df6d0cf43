"""``ReplaySource``: plays a recording (:mod:`ingest.sources.replay.recording`) back with its original pacing,
scaled by a speed factor, payload bytes untouched."""

from __future__ import annotations

import asyncio
import logging
import math
from pathlib import Path

import orjson

from ingest.sources.base import Publish, wall_clock_ms
from ingest.sources.replay.recording import RecordedFrame, parse_recording_line, read_recording
from ingest.sources.synthetic.symbols import symbol_spec
from shared.binance.exchange_info import build_exchange_info
from shared.broker.contract import OutgoingMessage
from shared.errors import ProtocolError
from shared.streams import MINI_TICKER_ARR, parse_stream

logger = logging.getLogger(__name__)

REPLAY_READ_LINES = 2000  # lines read per worker-thread call
REPLAY_MAX_BATCH = 500  # frames per publish call when replaying behind schedule or as fast as possible


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
