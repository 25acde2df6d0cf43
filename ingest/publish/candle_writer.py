"""Closed candles from the kline streams into the candle store, in batches.

Ingest hands every published batch to :meth:`CandleRecorder.observe` (synchronous, on the publish path): only
kline payloads are parsed, once, and those with ``"x": true`` (the candle closed) are queued, de-duplicated by
(symbol, interval, open time). :meth:`CandleRecorder.run` writes the queue in batches of ``batch_size`` at least
every ``flush_interval_s``; a failed write is retried with jittered backoff and nothing is removed from the
queue until the store confirmed it. The queue is bounded (``max_pending``): during a long outage the oldest
candles are dropped and counted rather than letting memory grow. ``streams`` are the kline streams the recorder
wants kept flowing (configured symbols x intervals), which ingest adds to its always-on set.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from shared.backoff import backoff_delays
from shared.broker.contract import OutgoingMessage
from shared.cancellation import raise_if_cancel_was_lost
from shared.candles.model import Candle, CandleStore, MalformedKline, candle_from_event, kline_stream

logger = logging.getLogger("pricegate.ingest.candles")

FINAL_FLUSH_TIMEOUT_S = 2.0


class CandleMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.written = Counter("pricegate_ingest_candles_written", "Closed candles written to the store", registry=r)
        self.write_errors = Counter(
            "pricegate_ingest_candle_write_errors", "Failed candle batch writes (retried)", registry=r
        )
        self.dropped = Counter(
            "pricegate_ingest_candles_dropped", "Closed candles dropped because the queue was full", registry=r
        )
        self.malformed = Counter(
            "pricegate_ingest_malformed_klines", "Kline payloads that did not parse (skipped)", registry=r
        )
        self.pending = Gauge("pricegate_ingest_candles_pending", "Closed candles waiting to be written", registry=r)
        self.write_duration = Histogram(
            "pricegate_ingest_candle_write_duration_seconds", "Time to write one candle batch", registry=r
        )


class CandleRecorder:
    def __init__(
        self,
        store: CandleStore,
        *,
        symbols: Iterable[str] = (),
        intervals: Iterable[str] = (),
        batch_size: int = 500,
        flush_interval_s: float = 1.0,
        max_pending: int = 100_000,
        registry: CollectorRegistry | None = None,
    ) -> None:
        if batch_size < 1 or max_pending < batch_size or flush_interval_s <= 0:
            raise ValueError("need batch_size >= 1, max_pending >= batch_size and flush_interval_s > 0")
        self.store = store
        intervals = tuple(intervals)
        self.streams = frozenset(kline_stream(symbol, interval) for symbol in symbols for interval in intervals)
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.max_pending = max_pending
        self.metrics = CandleMetrics(registry or CollectorRegistry(auto_describe=True))
        # Insertion-ordered: the oldest candle is first, which is the one dropped when the queue is full.
        self._pending: dict[tuple[str, str, int], Candle] = {}
        self._wake = asyncio.Event()
        self._write_lock = asyncio.Lock()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def observe(self, messages: Sequence[OutgoingMessage]) -> None:
        """Queue the closed candles among ``messages`` (called for every published batch; never blocks)."""
        for message in messages:
            if "@kline_" not in message.stream:
                continue
            try:
                candle, closed = candle_from_event(message.payload)
            except MalformedKline as error:
                self.metrics.malformed.inc()
                logger.warning("skipping malformed kline on %s: %s", message.stream, error)
                continue
            if closed:
                self.add(candle)

    def add(self, candle: Candle) -> None:
        self._pending.pop(candle.key, None)
        self._pending[candle.key] = candle
        if len(self._pending) > self.max_pending:
            del self._pending[next(iter(self._pending))]
            self.metrics.dropped.inc()
        self.metrics.pending.set(len(self._pending))
        if len(self._pending) >= self.batch_size:
            self._wake.set()

    async def run(self) -> None:
        """Write queued candles until cancelled; on cancellation, try once more to write what is left."""
        delays = backoff_delays(initial=0.5, maximum=30.0)
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.flush_interval_s):
                        await self._wake.wait()
                self._wake.clear()
                try:
                    await self.flush()
                except Exception as error:  # the store is down or slow: keep the queue and retry later
                    self.metrics.write_errors.inc()
                    delay = next(delays)
                    logger.warning(
                        "writing candles failed (%r); %d queued, retrying in %.1fs", error, self.pending, delay
                    )
                    await asyncio.sleep(delay)
                else:
                    delays = backoff_delays(initial=0.5, maximum=30.0)
                raise_if_cancel_was_lost()  # a driver call may have swallowed our stop request
        finally:
            if self._pending:
                try:
                    async with asyncio.timeout(FINAL_FLUSH_TIMEOUT_S):
                        await self.flush()
                except Exception as error:  # shutting down: report what is lost instead of hanging
                    logger.warning("%d closed candle(s) not written at shutdown: %r", self.pending, error)

    async def flush(self) -> int:
        """Write everything queued now, in batches; returns how many candles were written."""
        written = 0
        async with self._write_lock:
            while self._pending:
                batch = list(self._pending.values())[: self.batch_size]
                started = time.perf_counter()
                await self.store.upsert(batch)
                self.metrics.write_duration.observe(time.perf_counter() - started)
                for candle in batch:
                    # A newer version of the same candle may have been queued while the write was in flight.
                    if self._pending.get(candle.key) is candle:
                        del self._pending[candle.key]
                written += len(batch)
                self.metrics.written.inc(len(batch))
                self.metrics.pending.set(len(self._pending))
        return written
