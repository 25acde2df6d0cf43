"""The recording file format: JSON lines, one received combined frame per line, written as
``{"ts":<receive time, unix ms>,"frame":<the combined frame exactly as received>}`` by byte concatenation, so
a payload is stored with the exchange's own bytes and replayed verbatim. ``RecordingWriter`` writes such a file
(the live ``pricegate record`` command uses it), ``read_recording`` reads one back as ``RecordedFrame`` values,
and ``generate_sample`` writes a recording of the synthetic market over simulated time; the shipped
``ingest/sources/replay/data/synthetic-sample.jsonl`` is made with
``python -m ingest.sources.replay.recording --generate PATH``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import orjson

from ingest.sources.synthetic.market import SyntheticMarket
from shared.frames import combined_frame, split_combined_frame
from shared.streams import MINI_TICKER_ARR

SAMPLE_PATH = Path(__file__).with_name("data") / "synthetic-sample.jsonl"
SAMPLE_SYMBOLS: tuple[str, ...] = ("BTCUSDT", "ETHUSDT")
# Two symbols for 22 s keep the sample near 300 KB.
SAMPLE_SECONDS = 22
SAMPLE_SEED = 20260101
# 2025-12-31T23:59:50Z: the sample includes closing 1m, 1h, 1d, 1w and 1M candles at the new year.
SAMPLE_START_MS = 1_767_225_590_000
SAMPLE_STREAM_KINDS: tuple[str, ...] = (
    "trade",
    "aggTrade",
    "kline_1m",
    "kline_1s",
    "miniTicker",
    "ticker",
    "bookTicker",
    "depth5",
    "depth",
    "avgPrice",
)

# A crash loses at most about a second or a thousand frames of a recording.
FLUSH_EVERY_MS = 1000
FLUSH_EVERY_FRAMES = 1000

_LINE_HEAD = b'{"ts":'
_FRAME_KEY = b',"frame":'
_LINE_TAIL = b"}\n"


@dataclass(frozen=True, slots=True)
class RecordedFrame:
    """One recorded frame: when it was received, its stream and its payload bytes."""

    received_at_ms: int
    stream: str
    payload: bytes


def _checked_frame(frame: bytes) -> bytes:
    """The frame to embed: it must be a combined-stream object. Valid JSON can only hold a line break as
    whitespace between tokens, which would split the line; such a frame is re-encoded compactly instead."""
    try:
        parsed = orjson.loads(frame)
    except orjson.JSONDecodeError as error:
        raise ValueError(f"frame is not valid JSON: {error}") from error
    if not isinstance(parsed, dict) or not isinstance(parsed.get("stream"), str) or "data" not in parsed:
        raise ValueError(f'frame must be a JSON object with a string "stream" and a "data": {frame[:120]!r}')
    if b"\n" in frame or b"\r" in frame:
        return orjson.dumps(parsed)
    return frame


class RecordingWriter:
    """Appends received combined frames to a recording file (created or truncated, unless ``append``)."""

    def __init__(self, path: str | Path, *, append: bool = False) -> None:
        self.path = Path(path)
        self._file: BinaryIO | None = self.path.open("ab" if append else "wb")
        self._unflushed = 0
        self._last_flush_ms: int | None = None

    def write(self, received_at_ms: int, combined_frame: bytes) -> None:
        """Record one frame; raises ValueError for a frame that is not a combined-stream JSON object or a
        receive time that is not a non-negative integer."""
        if self._file is None:
            raise ValueError(f"recording {self.path} is closed")
        if isinstance(received_at_ms, bool) or not isinstance(received_at_ms, int) or received_at_ms < 0:
            raise ValueError(f"received_at_ms must be a non-negative int, got {received_at_ms!r}")
        frame = _checked_frame(combined_frame)
        self._file.write(_LINE_HEAD + str(received_at_ms).encode() + _FRAME_KEY + frame + _LINE_TAIL)
        self._unflushed += 1
        if self._last_flush_ms is None:
            self._last_flush_ms = received_at_ms
        if self._unflushed >= FLUSH_EVERY_FRAMES or received_at_ms - self._last_flush_ms >= FLUSH_EVERY_MS:
            self.flush(received_at_ms)

    def flush(self, now_ms: int | None = None) -> None:
        if self._file is None:
            return
        self._file.flush()
        self._unflushed = 0
        self._last_flush_ms = now_ms

    def close(self) -> None:
        """Flush and close; closing twice is harmless."""
        if self._file is not None:
            self._file.flush()
            self._file.close()
            self._file = None

    def __enter__(self) -> RecordingWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def parse_recording_line(line: bytes, line_number: int, source: str | Path = "recording") -> RecordedFrame | None:
    """One line of a recording as a RecordedFrame, None for a blank line. The payload is sliced out of the
    line's bytes when it has the layout the writer produces, else re-encoded from the parsed ``data``.
    Raises ValueError naming ``source`` and ``line_number`` for anything else."""
    stripped = line.strip()
    if not stripped:
        return None
    where = f"{source}:{line_number}"
    try:
        parsed: Any = orjson.loads(stripped)
    except orjson.JSONDecodeError as error:
        raise ValueError(f"{where}: line is not valid JSON ({error})") from error
    if not isinstance(parsed, dict):
        raise ValueError(f'{where}: line must be a JSON object {{"ts":..,"frame":..}}')
    received_at_ms = parsed.get("ts")
    frame = parsed.get("frame")
    if isinstance(received_at_ms, bool) or not isinstance(received_at_ms, int):
        raise ValueError(f'{where}: "ts" must be an integer (unix ms), got {received_at_ms!r}')
    if not isinstance(frame, dict) or not isinstance(frame.get("stream"), str) or "data" not in frame:
        raise ValueError(f'{where}: "frame" must be an object with a string "stream" and a "data"')
    stream: str = frame["stream"]
    frame_at = stripped.find(_FRAME_KEY)
    if stripped.startswith(_LINE_HEAD) and frame_at > 0 and stripped.endswith(b"}"):
        sliced = split_combined_frame(stripped[frame_at + len(_FRAME_KEY) : -1])
        if sliced is not None and sliced[0] == stream:
            return RecordedFrame(received_at_ms, stream, sliced[1])
    return RecordedFrame(received_at_ms, stream, orjson.dumps(frame["data"]))


def read_recording(path: str | Path) -> Iterator[RecordedFrame]:
    """The frames of a recording, in file order; raises ValueError naming the line of a malformed line."""
    source = Path(path)
    with source.open("rb") as file:
        for line_number, line in enumerate(file, start=1):
            frame = parse_recording_line(line, line_number, source)
            if frame is not None:
                yield frame


def sample_streams(symbols: Sequence[str]) -> list[str]:
    """The streams a generated sample records: SAMPLE_STREAM_KINDS per symbol plus ``!miniTicker@arr``."""
    streams = [f"{symbol.lower()}@{kind}" for symbol in symbols for kind in SAMPLE_STREAM_KINDS]
    streams.append(MINI_TICKER_ARR)
    return streams


def generate_sample(
    path: str | Path,
    symbols: Sequence[str] = SAMPLE_SYMBOLS,
    seconds: float = SAMPLE_SECONDS,
    seed: int = SAMPLE_SEED,
    *,
    start_ms: int = SAMPLE_START_MS,
    trade_rate_per_s: float = 5.0,
) -> int:
    """Run the synthetic market over ``seconds`` of simulated time (no sleeping) and record the
    ``sample_streams`` as if each frame arrived at its event millisecond. Deterministic; returns the number
    of frames written."""
    market = SyntheticMarket(symbols, seed=seed, trade_rate_per_s=trade_rate_per_s, start_ms=start_ms)
    wanted = frozenset(sample_streams(market.symbols))
    written = 0
    with RecordingWriter(path) as writer:
        # One millisecond per step, so every frame's receive time is its own event time.
        for now_ms in range(start_ms + 1, start_ms + round(seconds * 1000) + 1):
            for stream, payload in market.advance(now_ms, wanted):
                writer.write(now_ms, combined_frame(stream, payload))
                written += 1
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ingest.sources.replay.recording",
        description="Generate a recording of the synthetic market (the shipped sample by default).",
    )
    parser.add_argument("--generate", metavar="PATH", type=Path, default=SAMPLE_PATH, help="file to write")
    parser.add_argument("--symbols", default=",".join(SAMPLE_SYMBOLS), help="comma-separated symbols")
    parser.add_argument("--seconds", type=float, default=SAMPLE_SECONDS, help="simulated seconds")
    parser.add_argument("--seed", type=int, default=SAMPLE_SEED)
    parser.add_argument("--start-ms", type=int, default=SAMPLE_START_MS, help="simulated start, unix ms")
    args = parser.parse_args(argv)
    symbols = [symbol.strip().upper() for symbol in args.symbols.split(",") if symbol.strip()]
    count = generate_sample(args.generate, symbols, args.seconds, args.seed, start_ms=args.start_ms)
    size = args.generate.stat().st_size
    print(f"wrote {count} frames ({size} bytes) to {args.generate}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
