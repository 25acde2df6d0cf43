"""Response cache with single-flight: one backend call per key however many clients miss at once.

:class:`SingleFlight` serves a fresh cached body (``hit``); otherwise exactly one coroutine per replica computes
it (``miss``) while concurrent requests for the same key wait for that result (``coalesced``). Across replicas a
short Redis lock (``SET NX PX``) elects one computing replica; the others poll the cache for its result and
compute themselves only if the lock holder does not deliver within the lock's lifetime. Entries outlive their
freshness by ``stale_s``: when the backend fails, the last good body is served marked ``stale`` instead of an
error. Cache trouble (Redis down) never fails a request: the cache is skipped and the backend asked directly.

Keys are namespaced and versioned (``<prefix>:cache:v<N>:<key>``); bump :data:`CACHE_VERSION` whenever a cached
response's format changes, so replicas of different versions never read each other's bodies. A key's lock,
``<prefix>:cache:v<N>:lock:{<its entry's name>}``, has the entry's name as hash tag: the two live in one slot on a
Redis Cluster. Redis is whatever ``PRICEGATE_REDIS_URL`` names, one server, a Sentinel-watched master or a cluster
(:func:`shared.redis.clients.state_client`). The in-memory cache (embedded demo) has the same semantics within one
process.

Memory is bounded whatever the keys: the in-memory cache evicts least recently used entries beyond
``max_bytes`` (bodies, keys and a per-entry overhead counted) and ``max_entries``; either cache refuses to store
one body larger than ``max_entry_bytes`` (it is still served, only not kept; an older entry stays). Per key, the
process keeps nothing else once a request is answered: :class:`SingleFlight` holds a key only while its
computation runs, and the Redis cache keeps its entries in Redis, under a TTL.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import Counter

from shared.redis.clients import state_client
from shared.settings import Settings

logger = logging.getLogger("pricegate.gateway.cache")

CACHE_VERSION = 1
LOCK_POLL_S = 0.02
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
ENTRY_FRACTION = 16  # one body may take at most 1/16 of the byte bound, so the LRU always holds several
# What one in-memory entry costs beside its body and key: the OrderedDict node, the tuple, the CachedBody, the
# float and the object headers of the key and body (measured with sys.getsizeof on CPython 3.11, rounded up).
ENTRY_OVERHEAD_BYTES = 320
_UNLOCK = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


@dataclass(frozen=True, slots=True)
class CachedBody:
    body: bytes
    stored_at_ms: int


@dataclass(frozen=True, slots=True)
class Served:
    body: bytes
    result: str  # "hit", "miss", "coalesced" or "stale"
    age_s: float


class ResponseCache(Protocol):
    async def get(self, key: str) -> CachedBody | None: ...

    async def put(self, key: str, body: bytes, stored_at_ms: int, keep_s: float) -> None: ...

    async def try_lock(self, key: str, ttl_ms: int) -> str | None:
        """A token when this caller now holds ``key``'s compute lock, None when someone else does."""
        ...

    async def unlock(self, key: str, token: str) -> None: ...

    async def aclose(self) -> None: ...


class MemoryResponseCache:
    """One process's cache (no cross-replica locking needed): LRU-bounded by bytes and by entries, entries
    expire after ``keep_s``."""

    def __init__(
        self,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.time,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_entry_bytes: int | None = None,
    ) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.max_entry_bytes = max_bytes // ENTRY_FRACTION if max_entry_bytes is None else max_entry_bytes
        self._clock = clock
        self._entries: OrderedDict[str, tuple[CachedBody, float]] = OrderedDict()
        self.bytes = 0  # what the entries cost, by entry_cost

    @staticmethod
    def entry_cost(key: str, body: bytes) -> int:
        return len(key) + len(body) + ENTRY_OVERHEAD_BYTES

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, key: str) -> CachedBody | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[1] <= self._clock():
            self._remove(key)
            return None
        self._entries.move_to_end(key)
        return entry[0]

    async def put(self, key: str, body: bytes, stored_at_ms: int, keep_s: float) -> None:
        if len(body) > self.max_entry_bytes:
            return  # as in Redis: the previous entry, if any, stays to be served stale
        self._remove(key)
        self._entries[key] = (CachedBody(body, stored_at_ms), self._clock() + keep_s)
        self.bytes += self.entry_cost(key, body)
        while self._entries and (len(self._entries) > self.max_entries or self.bytes > self.max_bytes):
            oldest, (cached, _) = self._entries.popitem(last=False)
            self.bytes -= self.entry_cost(oldest, cached.body)

    def _remove(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.bytes -= self.entry_cost(key, entry[0].body)

    async def try_lock(self, key: str, ttl_ms: int) -> str | None:
        return "local"  # SingleFlight already coalesces within the process

    async def unlock(self, key: str, token: str) -> None:
        """Nothing to release."""

    async def aclose(self) -> None:
        self._entries.clear()
        self.bytes = 0


class RedisResponseCache:
    """Bodies stored as ``<stored_at_ms>:<body>`` with a TTL of freshness + stale retention; a body larger
    than ``max_entry_bytes`` is not stored. Nothing is kept in the process per key. ``url`` is any form of
    ``PRICEGATE_REDIS_URL`` (one server, Sentinel, Cluster)."""

    def __init__(
        self,
        url: str,
        prefix: str,
        *,
        socket_timeout_s: float = 2.0,
        max_connections: int = 64,
        max_entry_bytes: int = DEFAULT_MAX_BYTES // ENTRY_FRACTION,
    ) -> None:
        self.prefix = f"{prefix}:cache:v{CACHE_VERSION}:"
        self.max_entry_bytes = max_entry_bytes
        # Bounded: a burst of requests waits for a connection instead of opening thousands.
        self._redis = state_client(url, max_connections=max_connections, timeout_s=socket_timeout_s)
        self._unlock = self._redis.client.register_script(_UNLOCK)

    def entry_key(self, key: str) -> str:
        """Where ``key``'s body lives. Its name is the hash tag of its lock's, so it must hold no brace: the keys
        pricegate makes hold none (symbols, intervals, numbers), and one that did is named by its SHA-256."""
        if "{" in key or "}" in key:
            key = "sha256:" + hashlib.sha256(key.encode()).hexdigest()
        return self.prefix + key

    def lock_key(self, key: str) -> str:
        """``key``'s compute lock, in the slot of its entry (the entry's name is the hash tag)."""
        return f"{self.prefix}lock:{{{self.entry_key(key)}}}"

    async def get(self, key: str) -> CachedBody | None:
        async with self._redis.turn() as redis:
            data = await redis.get(self.entry_key(key))
        if data is None:
            return None
        raw = data.encode() if isinstance(data, str) else bytes(data)
        stamp, _, body = raw.partition(b":")
        return CachedBody(body, int(stamp))

    async def put(self, key: str, body: bytes, stored_at_ms: int, keep_s: float) -> None:
        if len(body) > self.max_entry_bytes:
            return
        value = b"%d:%b" % (stored_at_ms, body)
        async with self._redis.turn() as redis:
            await redis.set(self.entry_key(key), value, ex=max(1, math.ceil(keep_s)))

    async def try_lock(self, key: str, ttl_ms: int) -> str | None:
        token = secrets.token_hex(8)
        async with self._redis.turn() as redis:
            acquired = await redis.set(self.lock_key(key), token, nx=True, px=ttl_ms)
        return token if acquired else None

    async def unlock(self, key: str, token: str) -> None:
        # Delete only our own lock: if it expired and another replica took it, leave theirs alone.
        async with self._redis.turn() as redis:
            await self._unlock(keys=[self.lock_key(key)], args=[token], client=redis)

    async def aclose(self) -> None:
        await self._redis.aclose()


def response_cache(settings: Settings) -> ResponseCache:
    """Redis when ``PRICEGATE_REDIS_URL`` is set (shared by replicas), else this process's memory; either way
    bounded by ``PRICEGATE_CACHE_MAX_BYTES``."""
    max_entry_bytes = settings.cache_max_bytes // ENTRY_FRACTION
    if settings.redis_url:
        return RedisResponseCache(settings.redis_url, settings.channel_prefix, max_entry_bytes=max_entry_bytes)
    return MemoryResponseCache(max_bytes=settings.cache_max_bytes, max_entry_bytes=max_entry_bytes)


class SingleFlight:
    def __init__(
        self,
        cache: ResponseCache,
        *,
        stale_s: float,
        lock_ttl_ms: int,
        results: Counter | None = None,
        passthrough: tuple[type[BaseException], ...] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``results`` counts outcomes by (endpoint, result); ``passthrough`` errors (bad requests the backend
        refused) are raised as they are, never answered with a stale body."""
        self.cache = cache
        self.stale_s = stale_s
        self.lock_ttl_ms = lock_ttl_ms
        self.results = results
        self.passthrough = passthrough
        self._clock = clock
        self._flights: dict[str, asyncio.Task[Served]] = {}

    async def get(self, endpoint: str, key: str, ttl_s: float, compute: Callable[[], Awaitable[bytes]]) -> Served:
        """The body for ``key``: cached if younger than ``ttl_s``, else computed once for everyone asking."""
        entry = await self._read(key)
        now_ms = self._clock() * 1000
        if entry is not None and now_ms - entry.stored_at_ms < ttl_s * 1000:
            return self._count(endpoint, Served(entry.body, "hit", (now_ms - entry.stored_at_ms) / 1000))
        flight = self._flights.get(key)
        if flight is None:
            flight = asyncio.create_task(self._lead(key, ttl_s, compute, entry))
            self._flights[key] = flight
            flight.add_done_callback(lambda task: self._landed(key, task))
            served = await asyncio.shield(flight)
        else:
            served = await asyncio.shield(flight)
            if served.result == "miss":
                served = Served(served.body, "coalesced", served.age_s)
        return self._count(endpoint, served)

    def _landed(self, key: str, task: asyncio.Task[Served]) -> None:
        self._flights.pop(key, None)
        if not task.cancelled():
            task.exception()  # retrieved here too, so a flight whose waiters all left logs no "never retrieved"

    def _count(self, endpoint: str, served: Served) -> Served:
        if self.results is not None:
            self.results.labels(endpoint=endpoint, result=served.result).inc()
        return served

    async def _lead(
        self, key: str, ttl_s: float, compute: Callable[[], Awaitable[bytes]], entry: CachedBody | None
    ) -> Served:
        started_ms = self._clock() * 1000
        token = await self._lock(key)
        if token is None:
            # Another replica is computing this key: take its result when it lands in the cache.
            deadline = time.monotonic() + self.lock_ttl_ms / 1000
            while time.monotonic() < deadline:
                await asyncio.sleep(LOCK_POLL_S)
                fresh = await self._read(key)
                if fresh is not None and fresh.stored_at_ms >= started_ms - ttl_s * 1000:
                    return Served(fresh.body, "coalesced", max(0.0, self._clock() - fresh.stored_at_ms / 1000))
        try:
            body = await compute()
        except self.passthrough:
            raise
        except Exception as error:
            if entry is None:
                raise
            age_s = self._clock() - entry.stored_at_ms / 1000
            logger.warning("serving %s stale (%.0fs old): backend failed: %r", key, age_s, error)
            return Served(entry.body, "stale", age_s)
        finally:
            if token is not None:
                await self._unlock(key, token)
        stored_at_ms = int(self._clock() * 1000)
        await self._write(key, body, stored_at_ms, ttl_s + self.stale_s)
        return Served(body, "miss", 0.0)

    # Cache operations never fail a request: a broken cache behaves like an empty one.
    async def _read(self, key: str) -> CachedBody | None:
        try:
            return await self.cache.get(key)
        except Exception as error:
            logger.warning("cache read of %s failed: %r", key, error)
            return None

    async def _write(self, key: str, body: bytes, stored_at_ms: int, keep_s: float) -> None:
        try:
            await self.cache.put(key, body, stored_at_ms, keep_s)
        except Exception as error:
            logger.warning("cache write of %s failed: %r", key, error)

    async def _lock(self, key: str) -> str | None:
        try:
            return await self.cache.try_lock(key, self.lock_ttl_ms)
        except Exception as error:
            logger.warning("cache lock of %s failed: %r", key, error)
            return "unlocked"

    async def _unlock(self, key: str, token: str) -> None:
        try:
            await self.cache.unlock(key, token)
        except Exception as error:
            logger.warning("cache unlock of %s failed: %r", key, error)
