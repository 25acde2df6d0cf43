"""The ingest process: run one market source, publish what it produces, follow gateway demand, lead or stand by.

Wanted streams = the configured always-on set plus the streams some gateway announced in the broker's demand set,
kept for ``demand_linger_s`` after the last announcement so a client that reconnects does not make ingest
churn its upstream subscriptions. At most ``max_upstream_streams`` are wanted: beyond it the always-on streams
and the most recently announced demand are kept (a stream announced in the latest poll before one only lingering;
among equally recent ones, those already flowing first, so a full set does not churn) and the rest is refused:
never subscribed upstream, logged when the refused set changes, counted in ``pricegate_ingest_refused_streams``.
A heartbeat is published every second (gateways use it to show whether data is flowing), and the source's
exchangeInfo is cached in the broker for gateways to validate symbols.
With a candle recorder, every published batch also passes through it (closed candles go to the candle store)
and its kline streams are part of the always-on set.

With a leader lease (``pricegate ingest``) several processes run side by side: all of them follow demand and
keep their upstream connections warm, only the lease holder publishes (and heartbeats, refreshes exchangeInfo,
records candles); the others buffer the last seconds of the feed to publish on takeover (``ingest.publish.publisher``).

Stopping: every loop here checks, after each broker call, whether its task was asked to stop while the call ran
(see ``_stop_if_cancel_was_lost``), so a cancellation lost inside a client library cannot keep ingest running.

A Redis outage stops none of this: each loop retries on its own schedule and reports to the publisher's
``BrokerHealth`` (one log line per operation and outage, ``pricegate_ingest_broker_up``), and the publisher holds
what it could not publish until Redis is back (``ingest.publish.publisher``).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Iterable, Sequence

from ingest.metrics import IngestMetrics
from ingest.publish.candle_writer import CandleRecorder
from ingest.publish.leader import LeaderLease
from ingest.publish.publisher import LIVE_PIPELINE, Publisher, TradeFetcher
from ingest.sources.base import MarketSource
from shared.backoff import backoff_delays
from shared.broker.contract import Broker, OutgoingMessage
from shared.cancellation import raise_if_cancel_was_lost
from shared.errors import BrokerError, ConfigError, ProtocolError
from shared.runtime_metrics import GcPauseMonitor, LoopLagMonitor
from shared.settings import Settings, env_name
from shared.streams import parse_stream

__all__ = ["IngestMetrics", "IngestService", "always_on_streams"]

logger = logging.getLogger("pricegate.ingest")

DEMAND_POLL_S = 0.5
HEARTBEAT_S = 1.0
REFUSED_EXAMPLES = 5  # refused streams named in the log line (the count says how many)
STANDBY_POLL_S = 0.5  # how often leader-only loops look whether this process leads now
GC_FREEZE_AFTER_S = (5.0, 55.0)  # pauses before each freeze of the long-lived state (``_freeze_long_lived``)


def always_on_streams(names: Iterable[str]) -> frozenset[str]:
    """Canonical names of the configured always-on streams; a ConfigError naming PRICEGATE_ALWAYS_ON_STREAMS
    (and the first invalid entry) otherwise."""
    canonical: set[str] = set()
    for name in names:
        try:
            canonical.add(parse_stream(name).name)
        except ProtocolError as error:
            raise ConfigError(env_name("always_on_streams"), name, error.reason) from None
    return frozenset(canonical)


class IngestService:
    def __init__(
        self,
        settings: Settings,
        broker: Broker,
        source: MarketSource,
        metrics: IngestMetrics | None = None,
        *,
        candles: CandleRecorder | None = None,
        lease: LeaderLease | None = None,
        fetcher: TradeFetcher | None = None,
        gc_freeze: bool = False,
    ) -> None:
        """``gc_freeze``: freeze the long-lived state after start-up (``_freeze_long_lived``; for the process that
        runs nothing else: ``pricegate ingest``)."""
        self.settings = settings
        self.broker = broker
        self.source = source
        self.metrics = metrics or IngestMetrics()
        self.candles = candles
        self.lease = lease
        self.gc_freeze = gc_freeze
        # What stands the loop still delays every message behind it: exported like the gateway's.
        self.loop_lag = LoopLagMonitor(self.metrics.registry, "ingest")
        self.gc_pauses = GcPauseMonitor(self.metrics.registry, "ingest")
        self.always_on = always_on_streams(settings.always_on_streams)
        if candles is not None:
            self.always_on |= candles.streams
        self._last_demanded: dict[str, float] = {}
        self.wanted: frozenset[str] = self.always_on
        self.refused: frozenset[str] = frozenset()  # demanded, but beyond max_upstream_streams
        self.publisher = Publisher(
            broker,
            self.metrics,
            leadership=lease,
            fetcher=fetcher,
            backfill_max_ids=settings.backfill_max_trades,
            backfill_max_wait_s=settings.backfill_max_wait_s,
            standby_window_s=settings.standby_buffer_s,
            outage_buffer_messages=settings.outage_buffer_messages,
            observe=candles.observe if candles is not None else None,
            carried=lambda: self.wanted,
            pipeline=LIVE_PIPELINE,
        )

    @property
    def leading(self) -> bool:
        return self.publisher.leads()

    async def run(self) -> None:
        self.source.set_wanted(self.wanted)
        self.loop_lag.start()
        self.gc_pauses.start()
        try:
            async with asyncio.TaskGroup() as group:
                if self.lease is not None:
                    group.create_task(self.lease.run(self.publisher.take_over, self.publisher.step_down))
                group.create_task(self._refresh_exchange_info_forever())
                group.create_task(self._follow_demand_forever())
                group.create_task(self._heartbeat_forever())
                if self.candles is not None:
                    group.create_task(self.candles.run())
                if self.gc_freeze:
                    group.create_task(self._freeze_long_lived())
                group.create_task(self.source.run(self.publish))
        finally:
            self.loop_lag.stop()
            self.gc_pauses.stop()
            self.publisher.step_down("stopped")
            await self.publisher.aclose()
            if self.lease is not None:
                await self.lease.release()  # a standby takes over within one renewal period, not a TTL

    async def _freeze_long_lived(self) -> None:
        """Hide what start-up built from the garbage collector, once it is built: modules, clients and the per-stream
        state of every carried stream (its connections, continuity, metric children, packed keys). Otherwise every
        full collection scans it all, and at tens of thousands of messages a second young objects reach the oldest
        generation often enough for full collections of 20-30 ms (BENCHMARKS.md, "Ingest firehose"). Garbage made
        later, cyclic or not, is collected as before; a collection first clears what is garbage by then."""
        for delay in GC_FREEZE_AFTER_S:
            await asyncio.sleep(delay)
            gc.collect()
            gc.freeze()

    async def publish(self, messages: Sequence[OutgoingMessage]) -> None:
        await self.publisher.publish(messages)
        raise_if_cancel_was_lost()  # sources call publish in a loop

    def update_wanted(self, demanded: set[str], now: float) -> frozenset[str]:
        """Fold a demand reading into the wanted set, keeping streams for the linger period and at most
        ``max_upstream_streams`` in all (what is left out is :attr:`refused`; see the module docstring)."""
        for stream in demanded:
            self._last_demanded[stream] = now
        linger = self.settings.demand_linger_s
        for stream, seen in list(self._last_demanded.items()):
            if now - seen > linger:
                del self._last_demanded[stream]
        candidates = [stream for stream in self._last_demanded if stream not in self.always_on]
        room = max(0, self.settings.max_upstream_streams - len(self.always_on))
        if len(candidates) <= room:
            self.refused = frozenset()
            return self.always_on | frozenset(candidates)
        flowing = self.wanted
        candidates.sort(key=lambda stream: (-self._last_demanded[stream], stream not in flowing, stream))
        refused = candidates[room:]
        for stream in refused:
            if self._last_demanded[stream] < now:
                del self._last_demanded[stream]  # lingering and refused: nothing to remember it for
        self.refused = frozenset(refused)
        return self.always_on | frozenset(candidates[:room])

    def _report_refused(self, before: frozenset[str]) -> None:
        """Log a change of the refused set (once, not per poll) and count the newly refused streams."""
        self.metrics.refused_streams.set(len(self.refused))
        if self.refused == before:
            return
        newly = self.refused - before
        for stream in newly:
            self.metrics.stream_refusals.labels(kind=parse_stream(stream).kind.value).inc()
        if not self.refused:
            logger.info("demand within PRICEGATE_MAX_UPSTREAM_STREAMS (%d) again", self.settings.max_upstream_streams)
            return
        examples = ", ".join(sorted(newly or self.refused)[:REFUSED_EXAMPLES])
        logger.warning(
            "demand beyond PRICEGATE_MAX_UPSTREAM_STREAMS (%d): refusing %d stream(s) (+%d -%d), e.g. %s",
            self.settings.max_upstream_streams,
            len(self.refused),
            len(newly),
            len(before - self.refused),
            examples,
        )

    async def _follow_demand_forever(self) -> None:
        while True:
            try:
                demanded = await self.broker.read_demand(time.time())
            except Exception as error:  # the next poll retries; publishing goes on meanwhile
                self.publisher.health.failed("reading demand", error)
            else:
                self.publisher.health.succeeded("reading demand")
                valid = set()
                for name in demanded:
                    try:
                        valid.add(parse_stream(name).name)
                    except Exception:  # a malformed demand entry must not stop the others
                        logger.warning("ignoring malformed demand entry %r", name)
                refused_before = self.refused
                wanted = self.update_wanted(valid, time.monotonic())
                self._report_refused(refused_before)
                if wanted != self.wanted:
                    added, removed = wanted - self.wanted, self.wanted - wanted
                    logger.info("wanted streams: +%d -%d (now %d)", len(added), len(removed), len(wanted))
                    self.wanted = wanted
                    self.source.set_wanted(wanted)
                    self.publisher.forget(removed)
                self.metrics.wanted_streams.set(len(self.wanted))
            raise_if_cancel_was_lost()
            await asyncio.sleep(DEMAND_POLL_S)

    async def _heartbeat_forever(self) -> None:
        # Only the leader: a standby's heartbeat would tell gateways data flows while nobody publishes.
        while True:
            await self.publisher.until_leading()
            if self.publisher.leads():
                try:
                    await self.broker.publish_heartbeat(int(time.time() * 1000))
                except Exception as error:
                    self.publisher.health.failed("the heartbeat", error)
                else:
                    self.publisher.health.succeeded("the heartbeat")
                raise_if_cancel_was_lost()
            await asyncio.sleep(HEARTBEAT_S)

    async def _refresh_exchange_info_forever(self) -> None:
        # Only the leader spends REST weight on it; the document stays in the broker across a failover, and a
        # new leader refreshes it at once.
        due = 0.0
        takeovers = self.publisher.takeovers
        broker_retry = backoff_delays(0.25, 5.0)
        while True:
            await self.publisher.until_leading()
            if self.publisher.takeovers != takeovers:
                takeovers, due = self.publisher.takeovers, 0.0
            if self.publisher.leads() and time.monotonic() >= due:
                try:
                    document = await self.source.exchange_info()
                    await self.broker.put_exchange_info(document)
                    due = time.monotonic() + self.settings.exchange_info_refresh_s
                except BrokerError as error:
                    self.publisher.health.failed("writing exchangeInfo", error)
                    due = time.monotonic() + next(broker_retry)  # Redis back soon: a cheap SET, retried sooner
                except Exception as error:
                    logger.warning("exchangeInfo refresh failed: %r", error)
                    due = time.monotonic() + 5.0
                else:
                    self.publisher.health.succeeded("writing exchangeInfo")
                    broker_retry = backoff_delays(0.25, 5.0)
                raise_if_cancel_was_lost()
            await asyncio.sleep(min(STANDBY_POLL_S, max(0.0, due - time.monotonic())))
