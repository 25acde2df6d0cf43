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
- **Redis unreachable** (a publish fails for any reason but the fencing refusal): nothing is lost and the process
  does not stop. The messages Redis did not confirm, and every later one, wait in the same buffer, now *holding*
  (everything, identity-less messages included, no time window, at most ``outage_buffer_messages``), and a retry
  task publishes them in order with backoff (``shared.backoff``) while the lease holds. When the lease goes with
  Redis (its renewal fails), the buffer keeps holding; Redis back, the lease is free (a restarted Redis lost it)
  and the process takes it again like any takeover, publishing the buffer first. A restarted Redis also lost each
  stream's epoch, so the publish script starts a new one and gateways repair from it. If another process is seen
  holding the lease meanwhile, the buffer returns to the standby regime (the identity-less messages go: the new
  leader publishes its own feed; exchange events stay, judged at a later takeover). Messages the bound pushed
  out are counted by kind (``pricegate_ingest_outage_dropped_messages_total``) and logged once per outage, with a
  summary when the buffer is published. Only the batch in flight when a connection broke is in doubt: its
  replies are read one by one, so what Redis confirmed is never sent again, and what it did not confirm was not
  run by a Redis that was killed; after a mere network cut it may have been, and is then dropped as a duplicate
  if it carries an exchange identity (a synthetic or replayed message would go out twice).

- **Publish calls in flight** (``pipeline``; ``pricegate ingest`` runs :data:`LIVE_PIPELINE`, 4): a live batch goes
  out while earlier calls still wait for Redis' answers, provided it carries none of their streams (a stream is in
  one call at a time, so its messages reach Redis in order; a batch that shares a stream waits for that call).
  One call at a time, Redis' time per call and ingest's work between two calls add up and cap the rate well below
  what either can do (BENCHMARKS.md, "Ingest firehose"). A call that fails hands back what Redis did not confirm,
  ahead of anything newer of its streams (which queues behind it, as above); the retry of held messages, a takeover
  and shutdown first wait for every call in flight. ``publish`` then returns once its batch is sent, not answered.

Without a lease (the single-process demo) the publisher leads from the start and never fences.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Protocol, runtime_checkable

from prometheus_client import Counter, Histogram

from ingest.broker_health import BrokerHealth, first_calls
from ingest.metrics import IngestMetrics
from ingest.publish.backfill import Backfilled
from ingest.publish.continuity import NEW, BackfillPlan, Continuity, IdRange, Verdict, plan_backfill
from ingest.publish.standby import StandbyBuffer
from shared.backoff import backoff_delays
from shared.binance.identity import BACKFILL_KINDS, CONTIGUOUS_KINDS
from shared.broker.contract import Broker, OutgoingMessage
from shared.broker.outcome import PartiallyPublished
from shared.errors import BrokerError, NotLeaderError, PublishIncomplete
from shared.streams import StreamKind, parse_stream

logger = logging.getLogger("pricegate.ingest.publisher")

PUBLISHING = "publishing"  # the BrokerHealth operation name of publishing
RETRY_CHUNK = 1000  # most messages per publish call (one pipeline); other work runs between two of them
LIVE_PIPELINE = 4  # pricegate ingest: live publish calls in flight at once (on disjoint streams)


class Leadership(Protocol):
    """What the publisher needs of the leader lease."""

    token: str

    def holds(self) -> bool:
        """True while the lease is ours and cannot have expired by the local clock."""
        ...


@runtime_checkable
class LeaseHistory(Protocol):
    """What a lease can tell of other leaders (``LeaderLease`` does): whether to keep what only we could publish."""

    holder: str | None  # the token in the lease at the last look: ours, another process's, or unknown (None)
    seen_others: int  # how many looks found another process holding the lease
    previous: str | None  # at the last acquisition, who had taken the lease before (None: unknown)


class _Outage:
    """What one broker outage has cost so far, for the log lines at its start, first loss and end."""

    __slots__ = ("began", "held", "lost", "lost_logged")

    def __init__(self, began: float) -> None:
        self.began = began
        self.held = 0  # messages put in the buffer while it lasted
        self.lost = 0  # of those, pushed out by the bound
        self.lost_logged = False


class TradeFetcher(Protocol):
    """Fetches missed trades by id (``ingest.publish.backfill.TradeBackfiller``)."""

    def can_fill(self, kind: StreamKind) -> bool: ...

    async def fetch_trades(
        self, kind: StreamKind, stream: str, symbol: str, wanted: IdRange, deadline: float
    ) -> Backfilled: ...


class _Stream:
    """What the publisher needs to know of a stream, parsed once: its kind, symbol, whether its ids are contiguous,
    and its kind's published counter and lag histogram children."""

    __slots__ = ("contiguous", "kind", "lag", "published", "symbol")

    def __init__(
        self, kind: StreamKind, symbol: str | None, contiguous: bool, published: Counter, lag: Histogram
    ) -> None:
        self.kind = kind
        self.symbol = symbol
        self.contiguous = contiguous
        self.published = published
        self.lag = lag


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
        outage_buffer_messages: int = 100_000,
        retry_initial_s: float = 0.05,
        retry_max_s: float = 1.0,
        observe: Callable[[Sequence[OutgoingMessage]], None] | None = None,
        carried: Callable[[], Collection[str]] = frozenset,
        clock: Callable[[], float] = time.monotonic,
        pipeline: int = 1,
    ) -> None:
        """``carried`` says which streams are flowing upstream now: at a takeover their last published identities
        are read too, so a gap is found even on a stream the standby buffer holds nothing of (a cold start).
        ``outage_buffer_messages`` bounds what is held while Redis is unreachable; publishing is retried after
        backoff delays from ``retry_initial_s`` up to ``retry_max_s`` (below the lease TTL: while the lease
        holds, a retry must come before it lapses)."""
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
        self.standby = StandbyBuffer(standby_window_s, outage_max_events=outage_buffer_messages)
        self.health = BrokerHealth(metrics.broker_up, clock=clock)
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self._outage: _Outage | None = None
        self._retry: asyncio.Task[None] | None = None
        self._history = leadership if isinstance(leadership, LeaseHistory) else None
        self._sightings = 0 if self._history is None else self._history.seen_others  # as of our last leadership
        self.pipeline = pipeline  # live publish calls in flight at once, on disjoint streams (1: one at a time)
        self._in_flight: dict[asyncio.Task[None], frozenset[str]] = {}
        self._holding: dict[str, list[OutgoingMessage]] = {}
        self._backfills: dict[str, asyncio.Task[None]] = {}
        self._failure: BaseException | None = None
        self._streams: dict[str, _Stream] = {}
        self._kind_metrics: dict[StreamKind, tuple[Counter, Histogram]] = {}
        self._leading = asyncio.Event()
        if self.active:
            self._leading.set()
            self.standby.hold()  # without a lease nobody else publishes: whatever Redis misses is ours to resend
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
                # Standing by, the buffer keeps only events with an exchange identity (on takeover the broker drops
                # those the old leader already published; a synthetic or replayed feed has none and differs per
                # process). Holding (we led and lost Redis), it keeps everything.
                if self.standby.holding and self._deposed():
                    self._stand_by()
                self._keep(batch)
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
            await self._quiesce()  # calls sent while we led before: answered (and accounted for) first
            history = self._history
            if self.standby.holding and (
                self._deposed() or (history is not None and history.previous not in (None, self._token()))
            ):
                self._stand_by()  # another process led since we did: what only we held is not ours to publish
            streams = self.standby.streams() | set(self.carried())
            # What the previous leader published last: its duplicates are dropped, its gaps found.
            self._continuity.clear()
            self._continuity.prime(await self._last_event_ids(streams))
            self.active = True
            self.takeovers += 1
            self._leading.set()
            self.metrics.is_leader.set(1)
            self.metrics.leader_changes.labels(event="acquired").inc()
            buffered = self.standby.drain(self._clock())
            self.standby.hold()  # leading: what Redis does not take from now on is ours to resend
            self.metrics.standby_buffered.set(0)
            started = time.perf_counter()
            await self._lead(buffered)
            logger.info(
                "leading: %d buffered messages judged and the new ones published in %.0f ms",
                len(buffered),
                (time.perf_counter() - started) * 1000,
            )

    async def _last_event_ids(self, streams: Collection[str]) -> dict[str, int]:
        """The broker's last identities, tried a few times: the lease was just taken, so Redis answers, but the
        first command after a Redis restart may meet a pooled connection to the old one. Still failing, the error
        makes the lease loop give the lease up and try again (nothing buffered is lost)."""
        delays = backoff_delays(self.retry_initial_s, self.retry_max_s)
        return await first_calls(lambda: self.broker.last_event_ids(streams), delays)

    def step_down(self, reason: str) -> None:
        """Stop publishing at once (synchronous: nothing can be published between the decision and the stop)."""
        if not self.active:
            return
        self.active = False
        self._leading.clear()
        self.metrics.is_leader.set(0)
        self.metrics.leader_changes.labels(event=reason if reason in ("fenced", "stopped") else f"lost_{reason}").inc()
        if reason == "stopped":
            logger.info("publishing stopped: shutting down")  # not a standby: the process is ending
        else:
            logger.warning("no longer leading (%s): publishing stopped, buffering as a standby", reason)
        # The buffer keeps holding (everything, for this process to publish when it leads again) until another
        # process is seen leading: losing the lease to a Redis restart looks exactly like losing it to a standby.
        if self._history is not None:
            self._sightings = self._history.seen_others
        now = self._clock()
        for stream, task in list(self._backfills.items()):
            task.cancel()
            self.standby.add(self._holding.pop(stream, []), now)
        self._backfills.clear()
        self._holding.clear()
        self._continuity.clear()
        self._account(now)

    # ---- leading ----

    def _describe(self, stream: str) -> _Stream:
        known = self._streams.get(stream)
        if known is None:
            parsed = parse_stream(stream)
            published, lag = self._per_kind(parsed.kind)
            known = self._streams[stream] = _Stream(
                parsed.kind, parsed.symbol, parsed.kind in CONTIGUOUS_KINDS, published, lag
            )
        return known

    async def _lead(self, batch: Sequence[OutgoingMessage]) -> None:
        """Judge each event and publish what is new (under the lock, while active)."""
        ready: list[OutgoingMessage] = []
        append = ready.append
        continuity = self._continuity
        judge = continuity.judge
        advance = continuity.advance
        holding = self._holding
        streams = self._streams
        for message in batch:
            event = message.event
            if event is None:
                append(message)
                continue
            stream = message.stream
            if holding:
                held = holding.get(stream)
                if held is not None:
                    held.append(message)  # a backfill of this stream is running: everything after it waits
                    continue
            info = streams.get(stream) or self._describe(stream)
            judgement = judge(stream, event, contiguous=info.contiguous)
            if judgement is not NEW:
                if judgement.verdict is Verdict.DUPLICATE:
                    self.metrics.duplicates.labels(kind=info.kind.value).inc()
                    continue
                if judgement.verdict is Verdict.GAP and judgement.missing is not None:
                    kind, symbol = info.kind, info.symbol
                    self.metrics.sequence_gaps.labels(kind=kind.value).inc()
                    if kind in BACKFILL_KINDS and symbol is not None:
                        if self.fetcher is not None and self.fetcher.can_fill(kind):
                            self._start_backfill(stream, kind, symbol, judgement.missing, message)
                            continue
                        self._count_lost(stream, kind, [judgement.missing], "no REST backfill for this stream")
                    else:
                        logger.info("%s: update ids %s missed upstream", stream, judgement.missing)
            advance(stream, event.last)
            append(message)
        if ready:
            await self._send(ready)

    async def _send(self, messages: list[OutgoingMessage], *, backfilled: bool = False) -> None:
        if not self.active:
            self._keep(messages)
            return
        if self.observe is not None:
            # Before the broker: closed candles reach the store even while the broker is unreachable.
            self.observe(messages)
        # In chunks: a takeover's buffer may hold 100 000 messages, and one pipeline of them all would hold the
        # whole batch's commands and replies in memory at once.
        pipelined = self.pipeline > 1 and not backfilled
        for start in range(0, len(messages), RETRY_CHUNK):
            chunk = messages[start : start + RETRY_CHUNK]
            streams = frozenset(message.stream for message in chunk)
            # A stream is in one publish call at a time, so its messages reach Redis in order; pipelined, other
            # calls may be in flight meanwhile (module docstring).
            await self._clear_of(streams, room=pipelined)
            if len(self.standby) or not self.active:
                # Held messages wait to be published (Redis was unreachable): newer ones queue behind them, in order.
                self._keep(messages[start:])
                if self.active:
                    self._retry_later()
                return
            if pipelined:
                task = asyncio.create_task(self._publish_in_flight(chunk, backfilled))
                self._in_flight[task] = streams
                task.add_done_callback(self._landed)
                continue
            if await self._publish_now(chunk, backfilled=backfilled, held=False) < len(chunk):
                self._keep(messages[start + RETRY_CHUNK :])
                if self.active:
                    self._retry_later()
                return

    async def _clear_of(self, streams: frozenset[str], *, room: bool) -> None:
        """Until no publish call in flight carries any of ``streams`` (and, with ``room``, fewer than ``pipeline`` are
        in flight)."""
        in_flight = self._in_flight
        while in_flight:
            busy = [task for task, carried in in_flight.items() if not carried.isdisjoint(streams)]
            if not busy and not (room and len(in_flight) >= self.pipeline):
                return
            await asyncio.wait(busy or list(in_flight), return_when=asyncio.FIRST_COMPLETED)

    async def _quiesce(self) -> None:
        """Until every publish call in flight has its answer (and has been accounted for)."""
        while self._in_flight:
            await asyncio.wait(list(self._in_flight))

    async def _publish_in_flight(self, chunk: list[OutgoingMessage], backfilled: bool) -> None:
        if await self._publish_now(chunk, backfilled=backfilled, held=False) < len(chunk) and self.active:
            self._retry_later()  # what Redis did not confirm is held (in order, before anything newer of its streams)

    def _landed(self, task: asyncio.Task[None]) -> None:
        self._in_flight.pop(task, None)
        if not task.cancelled() and task.exception() is not None and self._failure is None:
            # Surfaces on the next publish() call, which fails the source like any unexpected error.
            self._failure = task.exception()

    async def _publish_now(self, messages: list[OutgoingMessage], *, held: bool, backfilled: bool = False) -> int:
        """Publish, and count what went out. On failure what Redis did not confirm goes (back: ``held``, they were
        taken from it) to the front of the buffer; returns how many were confirmed. Refused by the fencing check,
        steps down."""
        started = time.perf_counter()
        try:
            if self.leadership is None:
                await self.broker.publish(messages)
            else:
                await self.broker.publish(messages, fencing_token=self.leadership.token)
        except NotLeaderError as error:
            logger.warning("%s", error)
            self.step_down("fenced")
            self._hold_back(messages, held=held)
            return 0
        except BrokerError as error:
            # Redis unreachable, the connection broken mid-batch, or a call refused: keep what was not confirmed
            # and retry; the process goes on. On a cluster the confirmed calls need not be a prefix (one shard may
            # be failing over): per stream, though, the unconfirmed ones are always the last, so order holds.
            if isinstance(error, PartiallyPublished):
                done, undone = error.split(messages)
            else:
                confirmed = error.confirmed if isinstance(error, PublishIncomplete) else 0
                done, undone = messages[:confirmed], messages[confirmed:]
            self.metrics.publish_errors.inc()
            self.health.failed(PUBLISHING, error)
            self._hold_back(undone, held=held)
            self._count_published(done, started, backfilled)
            return len(done)
        self.health.succeeded(PUBLISHING)
        self._count_published(messages, started, backfilled)
        if self._outage is not None and not len(self.standby):
            self._end_outage()
        return len(messages)

    def _count_published(self, messages: Sequence[OutgoingMessage], started: float, backfilled: bool) -> None:
        if not messages:
            return
        metrics = self.metrics
        metrics.publish_duration.observe(time.perf_counter() - started)
        now = time.time()
        metrics.last_event.set(now)
        now_ms = now * 1000
        streams = self._streams
        tally: dict[Counter, int] = {}  # one inc per kind and batch: each inc takes the metric's lock
        for message in messages:
            info = streams.get(message.stream) or self._describe(message.stream)
            published = info.published
            tally[published] = tally.get(published, 0) + 1
            event = message.event
            if event is not None and event.time_ms is not None and not backfilled:
                lag = now_ms - event.time_ms
                info.lag.observe(lag / 1000 if lag > 0 else 0.0)
        for published, count in tally.items():
            published.inc(count)

    def _per_kind(self, kind: StreamKind) -> tuple[Counter, Histogram]:
        """The kind's published counter and lag histogram children (a labels() lookup per message is not free)."""
        children = self._kind_metrics.get(kind)
        if children is None:
            children = self._kind_metrics[kind] = (
                self.metrics.published.labels(kind=kind.value),
                self.metrics.event_lag.labels(kind=kind.value),
            )
        return children

    # ---- what cannot be published now ----

    def _deposed(self) -> bool:
        """Another process was seen holding the lease since we last led (the lease loop looks every renewal)."""
        return self._history is not None and self._history.seen_others != self._sightings

    def _token(self) -> str | None:
        return None if self.leadership is None else self.leadership.token

    def _stand_by(self) -> None:
        dropped = self.standby.stand_by(self._clock())
        logger.warning(
            "another ingest leads or led since we did (%s): %d held messages without an exchange identity dropped "
            "(it publishes its own feed); exchange events kept as a standby",
            self._history.holder if self._history is not None else "?",
            dropped,
        )
        self._account(self._clock())
        if self._outage is not None:
            self._end_outage(handed_over=True)

    def _hold_back(self, messages: Sequence[OutgoingMessage], *, held: bool) -> None:
        """Unpublished messages back to the front of the buffer (``held``: they were taken from it, so already
        counted)."""
        now = self._clock()
        if not held and self.standby.holding and messages:
            if self._outage is None:
                self._outage = _Outage(now)
            self._outage.held += len(messages)
        self.standby.restore(messages, now)
        self._account(now)

    def _keep(self, messages: Sequence[OutgoingMessage]) -> None:
        """Into the buffer: standing by, the exchange events; holding, everything (and the outage is counted)."""
        now = self._clock()
        if self.standby.holding and messages:
            if self._outage is None:
                self._outage = _Outage(now)
            self._outage.held += len(messages)
        self.standby.add(messages, now)
        self._account(now)

    def _account(self, now: float) -> None:
        """Count what the buffer's bound pushed out (holding: those messages are lost) and log it once an outage."""
        self.metrics.standby_buffered.set(len(self.standby))
        lost = self.standby.take_lost()
        if not lost:
            return
        total = 0
        for stream, count in lost.items():
            kind = self._describe(stream).kind
            self.metrics.outage_dropped.labels(kind=kind.value).inc(count)
            total += count
        outage = self._outage
        if outage is None:
            outage = self._outage = _Outage(now)
        outage.lost += total
        if not outage.lost_logged:
            outage.lost_logged = True
            logger.warning(
                "not published for %.1f s and the buffer is full (PRICEGATE_OUTAGE_BUFFER_MESSAGES=%d): dropping the "
                "oldest held messages from now on, counted in pricegate_ingest_outage_dropped_messages_total (logged "
                "once per outage)",
                now - outage.began,
                self.standby.outage_max_events,
            )

    def _end_outage(self, *, handed_over: bool = False) -> None:
        outage, self._outage = self._outage, None
        if outage is None:
            return
        how = "another ingest led meanwhile" if handed_over else "published again, the held messages first, in order"
        log = logger.warning if outage.lost else logger.info
        log(
            "outage over after %.1f s (%s): %d messages held, %d of them dropped (buffer full)",
            self._clock() - outage.began,
            how,
            outage.held,
            outage.lost,
        )

    def _retry_later(self) -> None:
        if self._retry is None or self._retry.done():
            self._retry = asyncio.create_task(self._publish_held(), name="pricegate-publish-retry")

    async def _publish_held(self) -> None:
        """Publish the buffer, in order and in chunks, after backoff delays, while leading; new batches queue
        behind it meanwhile (``_send``). Ends when the buffer is empty, or when leadership is lost (a takeover
        publishes it then)."""
        delays = backoff_delays(self.retry_initial_s, self.retry_max_s)
        try:
            while True:
                await asyncio.sleep(next(delays))
                while True:
                    async with self._lock:
                        leadership = self.leadership
                        if self.active and leadership is not None and not leadership.holds():
                            self.step_down("expired")
                        if not self.active or not len(self.standby):
                            return
                        await self._quiesce()  # a call in flight may still hand its unconfirmed messages back
                        if not self.active or not len(self.standby):
                            return
                        chunk = self.standby.take(RETRY_CHUNK)
                        confirmed = await self._publish_now(chunk, held=True)
                    if confirmed < len(chunk):
                        break  # failed again: back off
                    delays = backoff_delays(self.retry_initial_s, self.retry_max_s)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            # Surfaces on the next publish() call, which fails the source like any unexpected error.
            logger.exception("publishing the held messages failed")
            self._failure = error

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
        """Cancel running backfills and the retry of held messages (on shutdown)."""
        await self._quiesce()  # calls in flight are answered (or fail) within the broker's socket timeout
        tasks = list(self._backfills.values())
        if self._retry is not None and not self._retry.done():
            tasks.append(self._retry)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        self._backfills.clear()
