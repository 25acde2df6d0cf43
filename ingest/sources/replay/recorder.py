"""``pricegate record``: capture Binance combined-stream frames into a recording file for later replay.

:func:`record` opens ``<ws_url>/stream?streams=a/b/c`` and writes every frame it receives, byte for byte and
stamped with the local receive time, through :class:`~ingest.sources.replay.recording.RecordingWriter` (one
``{"ts":<ms>,"frame":<combined frame>}`` line per frame). Nothing is filtered beyond what the format can
hold (frames that are not combined-stream JSON objects are skipped and logged), so a recording is a faithful
capture of what the exchange sent and replay reproduces it. A dropped
connection is reopened after a jittered backoff; recording stops after ``duration_s``, after
``max_messages`` frames, when ``stop`` is set, or on cancellation, and the file is always closed cleanly.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from ingest.sources.binance.wire import MAX_STREAMS_PER_CONNECTION
from ingest.sources.replay.recording import RecordingWriter
from shared.backoff import backoff_delays
from shared.errors import ConfigError, ProtocolError
from shared.streams import parse_stream

log = logging.getLogger(__name__)

_OPEN_TIMEOUT_S = 10.0
_CLOSE_TIMEOUT_S = 2.0
_MAX_FRAME_BYTES = 4 * 2**20


def stream_names(streams: Sequence[str]) -> list[str]:
    """Canonical names of ``streams`` in the order given (duplicates dropped); ConfigError naming the first
    invalid one, or when there are none or more than one connection can carry."""
    names: list[str] = []
    for raw in streams:
        try:
            name = parse_stream(raw).name
        except ProtocolError as error:
            raise ConfigError("streams", raw, error.reason) from error
        if name not in names:
            names.append(name)
    if not names:
        raise ConfigError("streams", list(streams), "name at least one stream to record")
    if len(names) > MAX_STREAMS_PER_CONNECTION:
        raise ConfigError("streams", len(names), f"at most {MAX_STREAMS_PER_CONNECTION} streams per recording")
    return names


async def record(
    ws_url: str,
    streams: Sequence[str],
    out: Path,
    *,
    duration_s: float | None = None,
    max_messages: int | None = None,
    stop: asyncio.Event | None = None,
    backoff: Callable[[], Iterator[float]] = backoff_delays,
) -> int:
    """Record ``streams`` from ``ws_url`` into ``out``; returns the number of frames written.

    Stops after ``duration_s`` seconds, after ``max_messages`` frames or when ``stop`` is set, whichever
    comes first (with none of them it runs until cancelled; cancellation propagates, with the file closed
    and complete up to the last frame). Stream names are validated before anything is opened.
    """
    names = stream_names(streams)
    if duration_s is not None and not duration_s > 0:
        raise ConfigError("duration_s", duration_s, "must be a positive number of seconds")
    if max_messages is not None and max_messages < 1:
        raise ConfigError("max_messages", max_messages, "must be at least 1")
    if not ws_url.startswith(("ws://", "wss://")):
        raise ConfigError("ws_url", ws_url, "must start with ws:// or wss://")
    url = f"{ws_url.rstrip('/')}/stream?streams={'/'.join(names)}"
    with RecordingWriter(out) as writer:
        recorder = _Recorder(url, writer, max_messages, backoff)
        recording = asyncio.create_task(recorder.run())
        waiters: set[asyncio.Task[None]] = {recording}
        if stop is not None:
            waiters.add(asyncio.create_task(_wait(stop)))
        try:
            await asyncio.wait(waiters, timeout=duration_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
            await asyncio.wait(waiters)
        error = None if recording.cancelled() else recording.exception()
        if error is not None:
            raise error
        log.info("recorded %d frames of %d streams into %s", recorder.written, len(names), out)
        return recorder.written


async def _wait(event: asyncio.Event) -> None:
    await event.wait()


class _Recorder:
    """The receive-and-write loop, reconnecting on failures; ``written`` survives cancellation."""

    def __init__(
        self,
        url: str,
        writer: RecordingWriter,
        max_messages: int | None,
        backoff: Callable[[], Iterator[float]],
    ) -> None:
        self.url = url
        self.writer = writer
        self.max_messages = max_messages
        self.backoff = backoff
        self.written = 0
        self.skipped = 0
        self.connections = 0

    async def run(self) -> None:
        delays: Iterator[float] | None = None
        while True:
            received = 0
            try:
                # websockets' keepalive pings (one per 20 s) find a dead link; they are far below
                # Binance's 5 messages/s.
                async with connect(
                    self.url, open_timeout=_OPEN_TIMEOUT_S, close_timeout=_CLOSE_TIMEOUT_S, max_size=_MAX_FRAME_BYTES
                ) as ws:
                    self.connections += 1
                    while True:
                        frame = await ws.recv(decode=False)
                        received += 1
                        try:
                            self.writer.write(int(time.time() * 1000), frame)
                        except ValueError as error:
                            # The format holds combined frames only; anything else cannot be replayed.
                            self.skipped += 1
                            log.warning("not recording a frame that is not a combined-stream frame: %s", error)
                            continue
                        self.written += 1
                        if self.max_messages is not None and self.written >= self.max_messages:
                            return
            except ConnectionClosed as error:
                log.warning("recording connection closed after %d frames: %s", received, error)
            except (OSError, TimeoutError, InvalidHandshake) as error:
                log.warning("recording connect to %s failed: %r", self.url, error)
            if received or delays is None:
                delays = self.backoff()  # the outage starts now: begin with a short delay again
            await asyncio.sleep(next(delays))
