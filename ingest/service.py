"""The ingest process: run one market source, publish what it produces, follow gateway demand.

Wanted streams = the configured always-on set plus the streams some gateway announced in the broker's demand set,
kept for ``demand_linger_s`` after the last announcement so a client that reconnects does not make ingest
churn its upstream subscriptions. A heartbeat is published every second (gateways use it to show whether
data is flowing), and the source's exchangeInfo is cached in the broker for gateways to validate symbols.
With a candle recorder, every published batch also passes through it (closed candles go to the candle store)
and its kline streams are part of the always-on set.

Stopping: every loop here checks, after each broker call, whether its task was asked to stop while the call ran
(see ``_stop_if_cancel_was_lost``), so a cancellation lost inside a client library cannot keep ingest running.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ingest.candles import CandleRecorder
from ingest.sources import MarketSource
from shared.broker import Broker, OutgoingMessage
from shared.cancellation import raise_if_cancel_was_lost
from shared.errors import ConfigError, ProtocolError
from shared.settings import Settings, env_name
from shared.streams import parse_stream

logger = logging.getLogger("pricegate.ingest")

DEMAND_POLL_S = 0.5
HEARTBEAT_S = 1.0


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


class IngestMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.published = Counter("pricegate_ingest_published_messages", "Messages published", ["kind"], registry=r)
        self.publish_errors = Counter("pricegate_ingest_publish_errors", "Failed publish batches", registry=r)
        self.publish_duration = Histogram(
            "pricegate_ingest_publish_duration_seconds", "Time to publish one batch", registry=r
        )
        self.wanted_streams = Gauge("pricegate_ingest_wanted_streams", "Streams ingest keeps flowing", registry=r)
        self.last_event = Gauge(
            "pricegate_ingest_last_event_timestamp_seconds", "Wall clock of the last published message", registry=r
        )
        self.is_leader = Gauge("pricegate_ingest_is_leader", "1 while this process publishes", registry=r)


class IngestService:
    def __init__(
        self,
        settings: Settings,
        broker: Broker,
        source: MarketSource,
        metrics: IngestMetrics | None = None,
        *,
        candles: CandleRecorder | None = None,
    ) -> None:
        self.settings = settings
        self.broker = broker
        self.source = source
        self.metrics = metrics or IngestMetrics()
        self.candles = candles
        self.always_on = always_on_streams(settings.always_on_streams)
        if candles is not None:
            self.always_on |= candles.streams
        self._last_demanded: dict[str, float] = {}
        self.wanted: frozenset[str] = self.always_on
        self._kind_cache: dict[str, str] = {}

    async def run(self) -> None:
        self.source.set_wanted(self.wanted)
        self.metrics.is_leader.set(1)
        async with asyncio.TaskGroup() as group:
            group.create_task(self._refresh_exchange_info_forever())
            group.create_task(self._follow_demand_forever())
            group.create_task(self._heartbeat_forever())
            if self.candles is not None:
                group.create_task(self.candles.run())
            group.create_task(self.source.run(self.publish))

    async def publish(self, messages: Sequence[OutgoingMessage]) -> None:
        if self.candles is not None:
            # Before the broker: closed candles reach the store even while the broker is unreachable.
            self.candles.observe(messages)
        started = time.perf_counter()
        try:
            await self.broker.publish(messages)
        except Exception:
            self.metrics.publish_errors.inc()
            raise
        self.metrics.publish_duration.observe(time.perf_counter() - started)
        self.metrics.last_event.set(time.time())
        for message in messages:
            kind = self._kind_cache.get(message.stream)
            if kind is None:
                kind = self._kind_cache[message.stream] = parse_stream(message.stream).kind.value
            self.metrics.published.labels(kind=kind).inc()
        raise_if_cancel_was_lost()  # sources call publish in a loop

    def update_wanted(self, demanded: set[str], now: float) -> frozenset[str]:
        """Fold a demand reading into the wanted set, keeping streams for the linger period."""
        for stream in demanded:
            self._last_demanded[stream] = now
        linger = self.settings.demand_linger_s
        for stream, seen in list(self._last_demanded.items()):
            if now - seen > linger:
                del self._last_demanded[stream]
        return self.always_on | frozenset(self._last_demanded)

    async def _follow_demand_forever(self) -> None:
        while True:
            try:
                demanded = await self.broker.read_demand(time.time())
            except Exception as error:  # the next poll retries; publishing goes on meanwhile
                logger.warning("reading demand failed: %r", error)
            else:
                valid = set()
                for name in demanded:
                    try:
                        valid.add(parse_stream(name).name)
                    except Exception:  # a malformed demand entry must not stop the others
                        logger.warning("ignoring malformed demand entry %r", name)
                wanted = self.update_wanted(valid, time.monotonic())
                if wanted != self.wanted:
                    added, removed = wanted - self.wanted, self.wanted - wanted
                    logger.info("wanted streams: +%d -%d (now %d)", len(added), len(removed), len(wanted))
                    self.wanted = wanted
                    self.source.set_wanted(wanted)
                self.metrics.wanted_streams.set(len(self.wanted))
            raise_if_cancel_was_lost()
            await asyncio.sleep(DEMAND_POLL_S)

    async def _heartbeat_forever(self) -> None:
        while True:
            try:
                await self.broker.publish_heartbeat(int(time.time() * 1000))
            except Exception as error:
                logger.warning("heartbeat failed: %r", error)
            raise_if_cancel_was_lost()
            await asyncio.sleep(HEARTBEAT_S)

    async def _refresh_exchange_info_forever(self) -> None:
        while True:
            try:
                document = await self.source.exchange_info()
                await self.broker.put_exchange_info(document)
                delay = self.settings.exchange_info_refresh_s
            except Exception as error:
                logger.warning("exchangeInfo refresh failed: %r", error)
                delay = 5.0
            raise_if_cancel_was_lost()
            await asyncio.sleep(delay)
