"""Ingest's publish path: only while leading, each event once and in order, trade gaps filled from REST.

The source hands every batch to :meth:`Publisher.publish` (one caller, in arrival order). What happens to it:

- **Standby** (this process does not hold the leader lease): the batch's exchange events go into a
  :class:`~ingest.publish.standby.StandbyBuffer` (the last few seconds of events, the newest value of state
  streams), and nothing is published. (Messages without an exchange identity — a synthetic or replayed market,
  different in each process — are not kept: they could not be told apart from what the old leader published.)
- **Leader**: events carrying an exchange identity are judged by :class:`~ingest.publish.continuity.Continuity`:
  duplicates are dropped; on trade and aggTrade streams a jump in ids is a gap, and that stream's events are
  held back while the missed ids are fetched over REST (through a :class:`TradeFetcher`, within the REST budget
  and ``backfill_max_wait_s``); the fetched events go out first, in order, then the held ones, and whatever could
  not be fetched is counted and logged with its id range. Other streams flow on meanwhile. Everything is
  published with the lease's token as fencing token, so Redis refuses it if the lease was lost, atomically with
  the write (:class:`~shared.errors.NotLeaderError`): the publisher then steps down at once and buffers instead.
- **Takeover**: :meth:`take_over` (called when the lease is won) reads the identities the previous leader
  published last, then publishes the standby buffer through the leader path above: what the old leader already
  published is dropped, what it missed goes out, and a gap the buffer does not cover is backfilled. Only then do
  live batches flow, so nothing newer overtakes the buffer.

Without a lease (the single-process demo) the publisher leads from the start and never fences.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Protocol

from prometheus_client import Counter, Histogram

from ingest.metrics import IngestMetrics
from ingest.publish.backfill import Backfilled
from ingest.publish.continuity import BackfillPlan, Continuity, IdRange, Verdict, plan_backfill
from ingest.publish.standby import StandbyBuffer
from shared.binance.identity import BACKFILL_KINDS, CONTIGUOUS_KINDS
from shared.broker.contract import Broker, OutgoingMessage
from shared.errors import NotLeaderError
from shared.streams import StreamKind, parse_stream

logger = logging.getLogger("pricegate.ingest.publisher")


class Leadership(Protocol):
    """What the publisher needs of the leader lease."""

    token: str

    def holds(self) -> bool:
        """True while the lease is ours and cannot have expired by the local clock."""
        ...


class TradeFetcher(Protocol):
    """Fetches missed trades by id (``ingest.publish.backfill.TradeBackfiller``)."""

    def can_fill(self, kind: StreamKind) -> bool: ...

    async def fetch_trades(
        self, kind: StreamKind, stream: str, symbol: str, wanted: IdRange, deadline: float
    ) -> Backfilled: ...


class Publisher:
    def __init__(
        self,
        broker: Broker,
        metrics: IngestMetrics,
        *,
        leadership: Leadership | None = None,
        fetcher: TradeFetcher | None = None,
        backfill_max_ids: int = 10_000,
        backfill_max_wait_s: float = 30.0,
        standby_window_s: float = 15.0,
        observe: Callable[[Sequence[OutgoingMessage]], None] | None = None,
        carried: Callable[[], Collection[str]] = frozenset,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``carried`` says which streams are flowing upstream now: at a takeover their last published identities
        are read too, so a gap is found even on a stream the standby buffer holds nothing of (a cold start)."""
        self.broker = broker
        self.metrics = metrics
        self.leadership = leadership
        self.fetcher = fetcher
        self.backfill_max_ids = backfill_max_ids
        self.backfill_max_wait_s = backfill_max_wait_s
        self.observe = observe  # sees every batch about to be published (the candle recorder)
        self.carried = carried
        self._clock = clock
        self.active = leadership is None
        self._lock = asyncio.Lock()
        self._continuity = Continuity()
        self.standby = StandbyBuffer(standby_window_s)
        self._holding: dict[str, list[OutgoingMessage]] = {}
        self._backfills: dict[str, asyncio.Task[None]] = {}
        self._failure: BaseException | None = None
        self._streams: dict[str, tuple[StreamKind, str | None]] = {}
        self._kind_metrics: dict[StreamKind, tuple[Counter, Histogram]] = {}
        self._leading = asyncio.Event()
        if self.active:
            self._leading.set()
        self.takeovers = 0
        metrics.is_leader.set(1 if self.active else 0)

    def leads(self) -> bool:
        """Publishing now: active, and (with a lease) the lease cannot have lapsed by the local clock. What
        leader-only side jobs (heartbeat, exchangeInfo) check, since they publish without a fencing token."""
        return self.active and (self.leadership is None or self.leadership.holds())

    async def until_leading(self) -> None:
        """Return once this process is (or becomes) the leader."""
        await self._leading.wait()

    # ---- the source's side ----

    async def publish(self, batch: Sequence[OutgoingMessage]) -> None:
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure
        async with self._lock:
            leadership = self.leadership
            if self.active and leadership is not None and not leadership.holds():
                # The lease lapsed by our own clock before the lease loop could say so (a paused process).
                self.step_down("expired")
            if not self.active:
                # Only events with an exchange identity: on takeover the broker drops those the old leader already
                # published. A synthetic or replayed feed has none and differs per process, so nothing is kept.
                self.standby.add([m for m in batch if m.event is not None], self._clock())
                self.metrics.standby_buffered.set(len(self.standby))
                return
            await self._lead(batch)

    def forget(self, streams: Collection[str]) -> None:
        """Streams no longer carried upstream: drop their continuity (their return is not a gap), buffer and
        backfill."""
        self._continuity.forget(streams)
        self.standby.discard(streams)
        for stream in streams:
            task = self._backfills.pop(stream, None)
            if task is not None:
                task.cancel()
            self._holding.pop(stream, None)

    # ---- leadership transitions (called by the lease loop) ----

    async def take_over(self) -> None:
        async with self._lock:
            if self.active:
                return
            streams = self.standby.streams() | set(self.carried())
            # What the previous leader published last: its duplicates are dropped, its gaps found.
            self._continuity.clear()
            self._continuity.prime(await self.broker.last_event_ids(streams))
            self.active = True
            self.takeovers += 1
            self._leading.set()
            self.metrics.is_leader.set(1)
            self.metrics.leader_changes.labels(event="acquired").inc()
            buffered = self.standby.drain(self._clock())
            self.metrics.standby_buffered.set(0)
            started = time.perf_counter()
            await self._lead(buffered)
            logger.info(
                "leading: %d buffered messages judged and the new ones published in %.0f ms",
                len(buffered),
                (time.perf_counter() - started) * 1000,
            )

    def step_down(self, reason: str) -> None:
        """Stop publishing at once (synchronous: nothing can be published between the decision and the stop)."""
        if not self.active:
            return
        self.active = False
        self._leading.clear()
        self.metrics.is_leader.set(0)
        self.metrics.leader_changes.labels(event=reason if reason in ("fenced", "stopped") else f"lost_{reason}").inc()
        log = logger.info if reason == "stopped" else logger.warning
        log("no longer leading (%s): publishing stopped, buffering as a standby", reason)
        now = self._clock()
        for stream, task in list(self._backfills.items()):
            task.cancel()
            self.standby.add(self._holding.pop(stream, []), now)
        self._backfills.clear()
        self._holding.clear()
        self._continuity.clear()

    # ---- leading ----

    def _describe(self, stream: str) -> tuple[StreamKind, str | None]:
        known = self._streams.get(stream)
        if known is None:
            parsed = parse_stream(stream)
            known = self._streams[stream] = (parsed.kind, parsed.symbol)
        return known

    async def _lead(self, batch: Sequence[OutgoingMessage]) -> None:
        """Judge each event and publish what is new (under the lock, while active)."""
        ready: list[OutgoingMessage] = []
        continuity = self._continuity
        for message in batch:
            event = message.event
            if event is None:
                ready.append(message)
                continue
            stream = message.stream
            held = self._holding.get(stream)
            if held is not None:
                held.append(message)  # a backfill of this stream is running: everything after it waits
                continue
            kind, symbol = self._describe(stream)
            judgement = continuity.judge(stream, event, contiguous=kind in CONTIGUOUS_KINDS)
            if judgement.verdict is Verdict.DUPLICATE:
                self.metrics.duplicates.labels(kind=kind.value).inc()
                continue
            if judgement.verdict is Verdict.GAP and judgement.missing is not None:
                self.metrics.sequence_gaps.labels(kind=kind.value).inc()
                if kind in BACKFILL_KINDS and symbol is not None:
                    if self.fetcher is not None and self.fetcher.can_fill(kind):
                        self._start_backfill(stream, kind, symbol, judgement.missing, message)
                        continue
                    self._count_lost(stream, kind, [judgement.missing], "no REST backfill for this stream")
                else:
                    logger.info("%s: update ids %s missed upstream", stream, judgement.missing)
            continuity.advance(stream, event.last)
            ready.append(message)
        if ready:
            await self._send(ready)

    async def _send(self, messages: list[OutgoingMessage], *, backfilled: bool = False) -> None:
        if not self.active:
            self.standby.add(messages, self._clock())
            return
        if self.observe is not None:
            # Before the broker: closed candles reach the store even while the broker is unreachable.
            self.observe(messages)
        started = time.perf_counter()
        try:
            if self.leadership is None:
                await self.broker.publish(messages)
            else:
                await self.broker.publish(messages, fencing_token=self.leadership.token)
        except NotLeaderError as error:
            logger.warning("%s", error)
            self.step_down("fenced")
            self.standby.add(messages, self._clock())
            return
        except Exception:
            self.metrics.publish_errors.inc()
            raise
        metrics = self.metrics
        metrics.publish_duration.observe(time.perf_counter() - started)
        now = time.time()
        metrics.last_event.set(now)
        now_ms = now * 1000
        for message in messages:
            kind, _ = self._describe(message.stream)
            published, lag = self._per_kind(kind)
            published.inc()
            event = message.event
            if event is not None and event.time_ms is not None and not backfilled:
                lag.observe(max(0.0, now_ms - event.time_ms) / 1000)

    def _per_kind(self, kind: StreamKind) -> tuple[Counter, Histogram]:
        """The kind's published counter and lag histogram children (a labels() lookup per message is not free)."""
        children = self._kind_metrics.get(kind)
        if children is None:
            children = self._kind_metrics[kind] = (
                self.metrics.published.labels(kind=kind.value),
                self.metrics.event_lag.labels(kind=kind.value),
            )
        return children

    # ---- backfill ----

    def _start_backfill(
        self, stream: str, kind: StreamKind, symbol: str, missing: IdRange, first: OutgoingMessage
    ) -> None:
        plan = plan_backfill(missing, self.backfill_max_ids)
        logger.info("%s: trades %s missed upstream; fetching %s over REST", stream, missing, plan.fetch)
        self._holding[stream] = [first]
        task = asyncio.create_task(self._backfill(stream, kind, symbol, plan), name=f"pricegate-backfill-{stream}")
        self._backfills[stream] = task

    async def _backfill(self, stream: str, kind: StreamKind, symbol: str, plan: BackfillPlan) -> None:
        try:
            fetched = Backfilled([], [])
            if plan.fetch is not None and self.fetcher is not None:
                deadline = asyncio.get_running_loop().time() + self.backfill_max_wait_s
                fetched = await self.fetcher.fetch_trades(kind, stream, symbol, plan.fetch, deadline)
            async with self._lock:
                if self._backfills.get(stream) is not asyncio.current_task():
                    return  # stepped down (or the stream was dropped) meanwhile
                del self._backfills[stream]
                held = self._holding.pop(stream, [])
                lost = ([plan.give_up] if plan.give_up is not None else []) + fetched.missing
                if lost:
                    self._count_lost(stream, kind, lost, "not obtainable over REST in time")
                messages = [m for m in fetched.messages if m.event is not None]
                if messages:
                    self.metrics.backfilled.labels(kind=kind.value).inc(len(messages))
                    await self._send(messages, backfilled=True)
                gap_end = (plan.fetch or plan.give_up or IdRange(0, 0)).last
                self._continuity.advance(stream, gap_end)  # what is still missing is declared lost
                logger.info("%s: backfilled %d trades, %d lost", stream, len(messages), sum(r.count for r in lost))
                await self._lead(held)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            # Surfaces on the next publish() call, which fails the source like any publish error.
            logger.exception("backfill of %s failed", stream)
            self._failure = error

    def _count_lost(self, stream: str, kind: StreamKind, ranges: Iterable[IdRange], why: str) -> None:
        ranges = list(ranges)
        total = sum(r.count for r in ranges)
        self.metrics.unrecoverable.labels(kind=kind.value).inc(total)
        shown = ", ".join(str(r) for r in ranges[:5]) + (" ..." if len(ranges) > 5 else "")
        logger.warning("%s: %d trades lost (ids %s): %s", stream, total, shown, why)

    async def aclose(self) -> None:
        """Cancel running backfills (on shutdown)."""
        tasks = list(self._backfills.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        self._backfills.clear()
