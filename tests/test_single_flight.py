"""SingleFlight over the in-memory cache and over real Redis: one computation per key for concurrent misses,
stale bodies only for backend failures, a dead cache never failing a request, and a lock holder that never
delivers not blocking the others for longer than the lock's lifetime."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.rest.cache import MemoryResponseCache, RedisResponseCache, SingleFlight
from shared.errors import UpstreamError
from tests.processes import free_port


class Backend:
    """Counts calls; fails while ``failing`` is set; takes ``delay_s`` per call."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.calls = 0
        self.delay_s = delay_s
        self.failing: BaseException | None = None

    async def __call__(self) -> bytes:
        self.calls += 1
        await asyncio.sleep(self.delay_s)
        if self.failing is not None:
            raise self.failing
        return b"body-%d" % self.calls


async def test_concurrent_misses_compute_once_then_hit() -> None:
    flights = SingleFlight(MemoryResponseCache(), stale_s=60, lock_ttl_ms=1000)
    backend = Backend(delay_s=0.05)
    served = await asyncio.gather(*(flights.get("e", "k", 10, backend) for _ in range(25)))
    assert backend.calls == 1
    assert {s.body for s in served} == {b"body-1"}
    assert sorted(s.result for s in served) == ["coalesced"] * 24 + ["miss"]
    assert (await flights.get("e", "k", 10, backend)).result == "hit"


async def test_backend_failure_serves_stale_but_a_refusal_is_passed_through() -> None:
    now = [1000.0]
    flights = SingleFlight(
        MemoryResponseCache(clock=lambda: now[0]), stale_s=60, lock_ttl_ms=1000, passthrough=(ValueError,),
        clock=lambda: now[0],
    )  # fmt: skip
    backend = Backend()
    assert (await flights.get("e", "k", 5, backend)).body == b"body-1"
    now[0] += 6  # no longer fresh, still kept
    backend.failing = UpstreamError("exchange down")
    stale = await flights.get("e", "k", 5, backend)
    assert (stale.result, stale.body, stale.age_s) == ("stale", b"body-1", 6.0)
    backend.failing = ValueError("the request itself is bad")
    with pytest.raises(ValueError):
        await flights.get("e", "k", 5, backend)
    now[0] += 60  # past freshness + stale retention: the body is gone
    backend.failing = UpstreamError("exchange down")
    with pytest.raises(UpstreamError):
        await flights.get("e", "k", 5, backend)


async def test_an_unreachable_redis_cache_is_skipped_not_fatal() -> None:
    cache = RedisResponseCache(f"redis://127.0.0.1:{free_port()}/0", "pgtest")
    flights = SingleFlight(cache, stale_s=60, lock_ttl_ms=1000)
    backend = Backend(delay_s=0.05)
    try:
        served = await asyncio.gather(*(flights.get("e", "k", 10, backend) for _ in range(5)))
        assert {s.body for s in served} == {b"body-1"} and backend.calls == 1  # still coalesced in the process
        assert (await flights.get("e", "k", 10, backend)).body == b"body-2"  # nothing cached, computed again
    finally:
        await cache.aclose()


@pytest.mark.integration
async def test_a_lock_holder_that_never_delivers_delays_others_only_for_the_lock_lifetime(
    redis_url: str, key_prefix: str
) -> None:
    holder = RedisResponseCache(redis_url, key_prefix)
    cache = RedisResponseCache(redis_url, key_prefix)
    try:
        assert await holder.try_lock("k", 400) is not None  # another replica took the key and then died
        flights = SingleFlight(cache, stale_s=60, lock_ttl_ms=400)
        backend = Backend()
        started = time.monotonic()
        served = await flights.get("e", "k", 10, backend)
        waited = time.monotonic() - started
        assert served.result == "miss" and backend.calls == 1
        assert 0.35 <= waited < 2.0
        # and the result is now shared through Redis with every replica
        other = SingleFlight(RedisResponseCache(redis_url, key_prefix), stale_s=60, lock_ttl_ms=400)
        assert (await other.get("e", "k", 10, backend)).result == "hit"
        await other.cache.aclose()
    finally:
        await holder.aclose()
        await cache.aclose()


@pytest.mark.integration
async def test_a_replica_waiting_on_the_lock_takes_the_holders_result(redis_url: str, key_prefix: str) -> None:
    first = SingleFlight(RedisResponseCache(redis_url, key_prefix), stale_s=60, lock_ttl_ms=5000)
    second = SingleFlight(RedisResponseCache(redis_url, key_prefix), stale_s=60, lock_ttl_ms=5000)
    backend = Backend(delay_s=0.3)
    try:
        one, two = await asyncio.gather(first.get("e", "k", 10, backend), second.get("e", "k", 10, backend))
        assert backend.calls == 1 and one.body == two.body == b"body-1"
        assert sorted([one.result, two.result]) == ["coalesced", "miss"]
    finally:
        await first.cache.aclose()
        await second.cache.aclose()
