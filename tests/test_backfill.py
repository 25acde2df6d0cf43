"""Trades missed in an unplanned upstream drop come back from REST, in order, before live trades resume — within
REST weight limits and Binance's 429/418 rules; what cannot be fetched is counted and logged with its ids.
Real sockets (the fake exchange drops the connection mid-burst and answers REST with scripted faults), real
Redis (what a gateway would read: the channels' history)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
from collections.abc import AsyncIterator, Iterator

import httpx
import orjson
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ingest.metrics import IngestMetrics, UpstreamCollector
from ingest.publish.backfill import TradeBackfiller
from ingest.publish.continuity import IdRange
from ingest.publish.leader import LeaderLease
from ingest.service import IngestService
from ingest.sources.binance.source import BinanceSource
from shared.binance.rest import BinanceRest, RestUnavailable
from shared.broker.redis import RedisBroker
from shared.settings import Settings
from shared.streams import StreamKind
from tests.fake_binance import FakeBinance
from tests.polling import eventually

pytestmark = [pytest.mark.timeout(40), pytest.mark.integration]

AGG = "btcusdt@aggTrade"
TRADE = "btcusdt@trade"
ID_KEY = {AGG: "a", TRADE: "t"}


def fast_backoff() -> Iterator[float]:
    while True:
        yield 0.05


@contextlib.asynccontextmanager
async def ingest(
    fake: FakeBinance, redis_url: str, key_prefix: str, *, leased: bool = False, **settings: object
) -> AsyncIterator[tuple[IngestService, RedisBroker, IngestMetrics]]:
    source = BinanceSource(fake.ws_url, fake.rest_url, backoff=fast_backoff)
    broker = RedisBroker(redis_url, prefix=key_prefix)
    await broker.start()
    metrics = IngestMetrics()
    metrics.registry.register(UpstreamCollector(source))
    config = Settings(always_on_streams=(AGG, TRADE)).with_overrides(settings)
    lease = None
    if leased:
        lease = LeaderLease(redis_url, broker.namer.leader_key, ttl_s=1.0, renew_s=0.25)
    service = IngestService(
        config,
        broker,
        source,
        metrics,
        lease=lease,
        fetcher=TradeBackfiller(source.rest, trades=config.backfill_trades),
    )
    task = asyncio.create_task(service.run())
    try:
        yield service, broker, metrics
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await broker.close()


async def published_ids(broker: RedisBroker, stream: str) -> list[int]:
    return [orjson.loads(p.payload)[ID_KEY[stream]] for p in await broker.history(stream, 0)]


def sent_ids(fake: FakeBinance, stream: str) -> list[int]:
    return [orjson.loads(payload)[ID_KEY[stream]] for payload in fake.sent[stream]]


async def test_a_drop_mid_burst_is_backfilled_in_order_through_429_and_418(redis_url: str, key_prefix: str) -> None:
    async with (
        FakeBinance(keep_trading=True, data_interval_s=0.05) as fake,
        ingest(fake, redis_url, key_prefix) as (service, broker, metrics),
    ):
        await eventually(lambda: _has(broker, 5), timeout=5, what="live trades")
        fake.script_rest(429, 418, retry_after_s=1)  # the exchange is rate limiting, then bans
        await fake.drop_mid_burst([AGG, TRADE], count=40, delivered=10)  # 30 of each never delivered
        missed_up_to = {stream: sent_ids(fake, stream)[-1] for stream in (AGG, TRADE)}
        for stream in (AGG, TRADE):
            await eventually(
                functools.partial(_reaches, broker, stream, missed_up_to[stream] + 5),
                timeout=15,
                what=f"{stream} past the drop",
            )
        for stream in (AGG, TRADE):
            ids = await published_ids(broker, stream)
            # Every trade exactly once and in order: the backfilled ones, then the held-back live ones.
            assert ids == list(range(ids[0], ids[-1] + 1)), stream
            published = [p.payload for p in await broker.history(stream, 0)]
            backfilled = [p for p in published if p not in fake.sent[stream]]
            assert len(backfilled) >= 30  # rebuilt from REST rows (the live ones are the exchange's bytes)
            assert orjson.loads(backfilled[0])["e"] == ("aggTrade" if stream == AGG else "trade")
        assert metrics.backfilled.labels(kind="aggTrade")._value.get() >= 30
        assert metrics.backfilled.labels(kind="trade")._value.get() >= 30
        assert metrics.unrecoverable.labels(kind="aggTrade")._value.get() == 0
        # Retry-After was obeyed: nothing went to the exchange for a second after the 429, nor after the 418.
        calls = [(at, status) for at, path, status in fake.rest_log if "Trades" in path or "aggTrades" in path]
        statuses = [status for _, status in calls]
        assert statuses[:2] == [429, 418] and set(statuses[2:]) == {200}
        # (The two backfills asked at once, so the 418 answered a request already on its way when the 429 came.)
        assert calls[2][0] - max(calls[0][0], calls[1][0]) >= 0.95
        # Weight as the exchange reports it (X-MBX-USED-WEIGHT-1M), never past our share.
        source = service.source
        assert isinstance(source, BinanceSource)
        assert source.rest.budget.used >= 4 + 25
        assert source.rest.rate_limited == {429: 1, 418: 1}
        # All of it is visible on ingest's /metrics.
        scraped = scrape(metrics)
        assert scraped[("pricegate_ingest_is_leader", ())] == 1
        assert scraped[("pricegate_ingest_upstream_connections", ())] == 1
        assert scraped[("pricegate_ingest_upstream_connection_streams", (("connection", "0"),))] == 2
        assert scraped[("pricegate_ingest_upstream_messages_total", (("kind", "aggTrade"),))] > 10
        assert scraped[("pricegate_ingest_upstream_reconnects_total", (("reason", "closed"),))] == 1
        assert scraped[("pricegate_ingest_backfilled_trades_total", (("kind", "aggTrade"),))] >= 30
        assert scraped[("pricegate_ingest_sequence_gaps_total", (("kind", "trade"),))] == 1
        assert scraped[("pricegate_ingest_rest_weight_used", ())] >= 29
        assert scraped[("pricegate_ingest_rest_requests_total", (("status", "429"),))] == 1
        assert scraped[("pricegate_ingest_event_lag_seconds_count", (("kind", "trade"),))] > 10
        assert scraped[("pricegate_ingest_published_messages_total", (("kind", "aggTrade"),))] > 40


def scrape(metrics: IngestMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text scrape of ``metrics``, by (name, sorted labels)."""
    text = generate_latest(metrics.registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def _has(broker: RedisBroker, count: int) -> bool:
    return all([len(await broker.history(stream, 0)) >= count for stream in (AGG, TRADE)])


async def _reaches(broker: RedisBroker, stream: str, trade_id: int) -> bool:
    ids = await published_ids(broker, stream)
    return bool(ids) and ids[-1] >= trade_id


@pytest.mark.parametrize("case", ["banned", "capped"])
async def test_what_cannot_be_backfilled_is_counted_and_logged(
    redis_url: str, key_prefix: str, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="pricegate.ingest.publisher")
    overrides: dict[str, object] = {"backfill_max_wait_s": 1.0, "backfill_trades": False}
    if case == "capped":
        overrides = {"backfill_max_trades": 10, "backfill_trades": False}
    async with (
        FakeBinance(keep_trading=True, data_interval_s=0.05) as fake,
        ingest(fake, redis_url, key_prefix, leased=False, **overrides) as (_, broker, metrics),
    ):
        await eventually(lambda: _has(broker, 5), timeout=5, what="live trades")
        if case == "banned":
            fake.script_rest(418, retry_after_s=60)  # banned for longer than the backfill may wait
        last_live = {stream: sent_ids(fake, stream)[-1] for stream in (AGG, TRADE)}
        await fake.drop_mid_burst([AGG, TRADE], count=40, delivered=0)
        for stream in (AGG, TRADE):
            reached = functools.partial(_reaches, broker, stream, last_live[stream] + 50)
            await eventually(reached, timeout=10, what=stream)
        for stream, kind in ((AGG, "aggTrade"), (TRADE, "trade")):
            ids = await published_ids(broker, stream)
            holes = [(a + 1, b - 1) for a, b in itertools.pairwise(ids) if b != a + 1]
            assert len(holes) == 1, holes  # one hole, nothing duplicated or reordered around it
            lost = metrics.unrecoverable.labels(kind=kind)._value.get()
            assert lost == holes[0][1] - holes[0][0] + 1 >= 30
            assert f"{stream}: {int(lost)} trades lost (ids {holes[0][0]}..{holes[0][1]})" in caplog.text
            if case == "banned":
                assert fake.rest_statuses("aggTrades") == [418]  # nothing more was asked during the ban
            if case == "capped" and stream == AGG:
                assert metrics.backfilled.labels(kind=kind)._value.get() == 10  # the newest 10 of the gap
            else:
                assert metrics.backfilled.labels(kind=kind)._value.get() == 0  # @trade: off here; banned: nothing


async def test_rest_stays_within_its_weight_share_using_the_exchanges_count() -> None:
    async with FakeBinance(rest_weight_limit=100) as fake:
        fake.wall_clock = lambda: 600.0  # one wall-clock minute for the whole test
        rest = BinanceRest(fake.rest_url, weight_limit_per_min=60, wall_clock=lambda: 600.0)
        # Someone else on the same IP (a gateway's exchange fallback) already used 40 of the minute's weight.
        async with httpx.AsyncClient() as other:
            for _ in range(2):
                assert (await other.get(f"{fake.rest_url}/api/v3/exchangeInfo")).status_code == 200
        loop = asyncio.get_running_loop()
        document, _ = await rest.get_json(
            "/api/v3/aggTrades", {"symbol": "BTCUSDT", "limit": 1}, 4, deadline=loop.time() + 5
        )
        assert document == [] and rest.budget.used == 44  # the exchange's figure for the IP, not just ours
        for _ in range(4):
            await rest.get_json("/api/v3/aggTrades", {"symbol": "BTCUSDT", "limit": 1}, 4, deadline=loop.time() + 5)
        assert rest.budget.used == 60
        with pytest.raises(RestUnavailable, match="budget"):
            await rest.get_json("/api/v3/aggTrades", {"symbol": "BTCUSDT", "limit": 1}, 4, deadline=loop.time() + 5)
        # Our share is spent: nothing was sent, so the exchange never had to say 429.
        assert fake.rest_statuses("aggTrades") == [200] * 5 and fake.rest_used_weight == 60


async def test_trade_gaps_are_no_longer_fetched_once_the_exchange_wants_an_api_key() -> None:
    async with FakeBinance() as fake:
        backfiller = TradeBackfiller(BinanceRest(fake.rest_url))
        deadline = asyncio.get_running_loop().time() + 5
        fake.fail_next_rest(1, 500)  # a failure of the exchange stops this backfill only
        failed = await backfiller.fetch_trades(StreamKind.TRADE, TRADE, "BTCUSDT", IdRange(1, 5), deadline)
        assert failed.messages == [] and failed.missing == [IdRange(1, 5)] and backfiller.trades
        fake.fail_next_rest(1, 401)  # a refusal of historicalTrades itself (Binance's -2014/-2015 need a key)
        refused = await backfiller.fetch_trades(StreamKind.TRADE, TRADE, "BTCUSDT", IdRange(1, 5), deadline)
        assert refused.missing == [IdRange(1, 5)] and not backfiller.can_fill(StreamKind.TRADE)
        assert backfiller.can_fill(StreamKind.AGG_TRADE)
        await backfiller.fetch_trades(StreamKind.TRADE, TRADE, "BTCUSDT", IdRange(1, 5), deadline)
        assert fake.rest_statuses("historicalTrades") == [500, 401]  # not asked again


async def test_a_restarted_ingest_backfills_what_was_missed_while_it_was_down(redis_url: str, key_prefix: str) -> None:
    """A cold start has nothing in its standby buffer: the last identities published before it (read from Redis
    for every stream it carries) still reveal the gap, and REST fills it."""
    async with FakeBinance(keep_trading=True, data_interval_s=0.05) as fake:
        async with ingest(fake, redis_url, key_prefix, leased=True) as (_, broker, _):
            await eventually(lambda: _has(broker, 5), timeout=5, what="live trades")
        await asyncio.sleep(1.0)  # ingest is down; the exchange trades on (about 20 trades per stream)
        async with ingest(fake, redis_url, key_prefix, leased=True) as (_, broker, metrics):
            targets = {stream: sent_ids(fake, stream)[-1] + 5 for stream in (AGG, TRADE)}
            for stream in (AGG, TRADE):
                await eventually(functools.partial(_reaches, broker, stream, targets[stream]), timeout=10, what=stream)
                ids = await published_ids(broker, stream)
                assert ids == list(range(ids[0], ids[-1] + 1)), stream
            assert metrics.backfilled.labels(kind="aggTrade")._value.get() >= 15
            assert metrics.backfilled.labels(kind="trade")._value.get() >= 15
