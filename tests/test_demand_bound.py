"""Ingest refuses demand beyond PRICEGATE_MAX_UPSTREAM_STREAMS: it keeps the always-on streams plus the most
recently announced demand up to the bound, never subscribes the rest upstream, logs once per change of the
refused set (not per poll) and counts refusals by stream kind. The ranking rules on the service itself; then end
to end with demand announced in real Redis (as gateways announce it) and a Binance source on the fake exchange,
whose SUBSCRIBE messages show what went upstream."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterable

import pytest

from ingest.metrics import IngestMetrics
from ingest.service import IngestService
from ingest.sources.binance.source import BinanceSource
from ingest.sources.synthetic.source import SyntheticSource
from shared.broker.memory import MemoryBroker
from shared.broker.redis import RedisBroker
from shared.settings import Settings
from tests.fake_binance import FakeBinance
from tests.polling import eventually

ALWAYS_ON = ("btcusdt@trade", "ethusdt@trade")
KINDS = ("aggTrade", "bookTicker", "miniTicker", "ticker", "kline_1m", "depth5")


def streams(symbols: Iterable[str], kinds: Iterable[str] = KINDS) -> list[str]:
    return [f"{symbol}@{kind}" for symbol in symbols for kind in kinds]


def metric(metrics: IngestMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def service_with(bound: int, *, linger_s: float = 60.0) -> IngestService:
    settings = Settings(max_upstream_streams=bound, always_on_streams=ALWAYS_ON, demand_linger_s=linger_s)
    return IngestService(settings, MemoryBroker(), SyntheticSource(["BTCUSDT"], seed=1))


def test_within_the_bound_everything_demanded_is_wanted() -> None:
    service = service_with(10)
    demanded = set(streams(["bnbusdt"]))
    assert service.update_wanted(demanded, now=1.0) == frozenset(ALWAYS_ON) | demanded
    assert service.refused == frozenset()


def test_beyond_the_bound_always_on_stays_and_the_newest_demand_wins() -> None:
    service = service_with(6, linger_s=60.0)
    older = set(streams(["bnbusdt"], KINDS[:4]))
    service.wanted = service.update_wanted(older, now=1.0)  # 2 always-on + 4: exactly the bound
    assert service.wanted == frozenset(ALWAYS_ON) | older and service.refused == frozenset()
    newer = set(streams(["solusdt"], KINDS[:3]))
    # The older demand is no longer announced (it lingers): the three newer streams take its places.
    service.wanted = service.update_wanted(newer, now=2.0)
    assert newer <= service.wanted and set(ALWAYS_ON) <= service.wanted and len(service.wanted) == 6
    assert len(service.wanted & older) == 1 and len(service.refused) == 3 and service.refused <= older
    # Lingering and refused: forgotten at once (memory stays bounded by the bound plus what is announced now).
    assert not (service.refused & set(service._last_demanded))


def test_among_equally_recent_demand_what_already_flows_keeps_its_place() -> None:
    service = service_with(4)
    first = set(streams(["bnbusdt"], KINDS[:2]))
    service.wanted = service.update_wanted(first, now=1.0)
    more = set(streams(["aaausdt"], KINDS[:2]))  # sorts before bnbusdt: would win a tie on the name alone
    for poll in range(2, 6):  # both announced at every poll: no churn, the same refusal each time
        service.wanted = service.update_wanted(first | more, now=float(poll))
        assert service.wanted == frozenset(ALWAYS_ON) | first and service.refused == frozenset(more)


def test_the_always_on_set_is_never_refused_even_above_the_bound() -> None:
    service = service_with(1)
    demanded = set(streams(["bnbusdt"], KINDS[:2]))
    assert service.update_wanted(demanded, now=1.0) == frozenset(ALWAYS_ON)
    assert service.refused == frozenset(demanded)


class Announcer:
    """What a gateway does for its clients' streams: ZADD GT into the demand set, renewed every TTL / 3."""

    def __init__(self, broker: RedisBroker, ttl_s: float) -> None:
        self.broker = broker
        self.ttl_s = ttl_s
        self.streams: set[str] = set()

    async def run(self) -> None:
        while True:
            if self.streams:
                await self.broker.announce_demand(sorted(self.streams), time.time() + self.ttl_s)
            await asyncio.sleep(self.ttl_s / 3)


@contextlib.asynccontextmanager
async def ingest_on_fake_binance(
    redis_url: str, key_prefix: str, settings: Settings
) -> AsyncIterator[tuple[IngestService, FakeBinance, Announcer]]:
    ingest_broker = RedisBroker(redis_url, prefix=key_prefix)
    gateway_broker = RedisBroker(redis_url, prefix=key_prefix)
    await ingest_broker.start()
    await gateway_broker.start()
    async with FakeBinance(data_interval_s=0.2) as fake:
        service = IngestService(settings, ingest_broker, BinanceSource(fake.ws_url, fake.rest_url))
        announcer = Announcer(gateway_broker, ttl_s=1.5)
        tasks = [asyncio.create_task(service.run()), asyncio.create_task(announcer.run())]
        try:
            yield service, fake, announcer
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await gateway_broker.close()
            await ingest_broker.close()


@pytest.mark.integration
async def test_demand_beyond_the_bound_is_refused_upstream_logged_once_and_counted(
    redis_url: str, key_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pricegate.ingest")
    settings = Settings(
        max_upstream_streams=8, always_on_streams=ALWAYS_ON, demand_linger_s=1.0, channel_prefix=key_prefix
    )
    first = streams(["bnbusdt", "xrpusdt"])[:10]
    later = streams(["solusdt"])[:3]
    async with ingest_on_fake_binance(redis_url, key_prefix, settings) as (service, fake, announcer):
        metrics = service.metrics
        announcer.streams = set(first)  # 2 always-on + 10 demanded > 8
        await eventually(lambda: len(service.refused) == 4, what="4 of 10 demanded streams refused")
        admitted = service.wanted - set(ALWAYS_ON)
        assert len(admitted) == 6 and admitted | service.refused == set(first)
        await eventually(lambda: fake.subscribed() == service.wanted, what="upstream = the bounded wanted set")
        await asyncio.sleep(2.0)  # four more polls of the same demand
        assert fake.subscribed() == service.wanted and not (fake.subscribed() & service.refused)
        refusals = [r.getMessage() for r in caplog.records if "beyond PRICEGATE_MAX_UPSTREAM_STREAMS" in r.message]
        assert len(refusals) == 1 and "refusing 4 stream(s)" in refusals[0], refusals
        assert metric(metrics, "pricegate_ingest_refused_streams") == 4
        assert metric(metrics, "pricegate_ingest_wanted_streams") == 8
        counted = sum(metric(metrics, "pricegate_ingest_stream_refusals_total", kind=k) for k in KINDS)
        assert counted == 4

        # The first demand stops (its clients left); newer demand arrives: it is admitted as soon as the old
        # demand merely lingers, and once that has passed only the always-on set and the new demand flow.
        announcer.streams = set(later)
        await eventually(lambda: set(later) <= fake.subscribed(), what="the newest demand upstream", timeout=15)
        final = set(ALWAYS_ON) | set(later)
        await eventually(lambda: fake.subscribed() == final, what="lingering demand gone upstream", timeout=15)
        assert service.refused == frozenset() and metric(metrics, "pricegate_ingest_refused_streams") == 0
        assert any("within PRICEGATE_MAX_UPSTREAM_STREAMS (8) again" in r.getMessage() for r in caplog.records)
        assert sum(fake.subscription_counts()) == len(final) <= 8
