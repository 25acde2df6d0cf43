"""API keys validated without touching PostgreSQL per connection: this process's cache, then Redis, then the table.

:meth:`KeyValidator.check` answers at once (no I/O, no await) for a key this process validated less than
``auth_cache_ttl_s`` ago, or refused a few seconds ago, or whose format is wrong. Otherwise it returns an
awaitable: one lookup per key digest however many handshakes wait for it (single flight), which reads the
shared Redis entry ``<prefix>:auth:key:<sha256 hex>`` (written by whichever replica asked the database, TTL =
what is left of ``auth_cache_ttl_s``) and asks PostgreSQL only when Redis has nothing. So a reconnect storm of
any size costs one database lookup per distinct key, per cache lifetime, across all replicas.

PostgreSQL down (or slower than :data:`LOOKUP_TIMEOUT_S`): keys validated before stay valid, served *stale* past
their TTL until the database answers again (it alone can say a key was revoked, and it cannot be revoked while
it is down); unknown keys are refused with 503 (fail closed). One probe at a time asks the database while it is
down, at most every :data:`DB_RETRY_S`, so a dead database is not hammered. Redis down: skipped, the database is
asked directly. :meth:`KeyValidator.status` says which for ``/readyz``.

Redis is whatever ``PRICEGATE_REDIS_URL`` names: one server, a Sentinel-watched master or a Redis Cluster
(:func:`shared.redis.clients.state_client`). A key's lookup lock ``<prefix>:auth:lock:{<entry>}`` carries its entry's
name as hash tag, so the two live in one slot and are read in one round trip on a cluster too.

A cache entry is fresh until ``auth_cache_ttl_s`` after the database check it comes from, and
``pricegate keys revoke`` deletes the Redis entry, so a revoked key stops working here within that TTL (plus the
lookup). Open connections are re-validated the same way by :class:`gateway.auth.service.Authenticator`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from redis.exceptions import RedisError

from gateway.auth.api_keys import KeyRecord
from gateway.auth.key_cache import (
    FRESH,
    REFUSED,
    KeyCache,
    KeyEntry,
    parse_key,
    parse_redis_value,
    redis_value,
)
from gateway.auth.principal import AuthRefusal, Principal, refused
from shared.errors import DatabaseError
from shared.redis.clients import StateClient, state_client

logger = logging.getLogger("pricegate.gateway.auth")

LOOKUP_TIMEOUT_S = 3.0  # a database slower than this counts as down for this lookup
DB_RETRY_S = 1.0  # while the database is down, ask it at most this often
MAX_PENDING = 1024  # distinct keys being looked up at once; beyond, unknown keys are refused (503) for now
REDIS_TIMEOUT_S = 1.0
LOCK_POLL_S = 0.02  # how often a replica waiting for another's lookup looks for the answer
_UNLOCK = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"

INVALID = refused("invalid", "invalid API key")
REVOKED = refused("revoked", "API key revoked")
UNAVAILABLE = refused(
    "unavailable", "API keys cannot be verified right now (the key database is unavailable); retry shortly"
)
BUSY = refused("unavailable", "too many API keys are being verified at once; retry shortly")

Outcome = Principal | AuthRefusal


class KeyStore(Protocol):
    """What the validator needs of the key table (:class:`gateway.auth.api_keys.ApiKeys`)."""

    async def lookup_digest(self, key_digest: bytes) -> KeyRecord | None: ...


def redis_key(prefix: str, digest: str) -> str:
    """The shared cache entry of a key digest (also deleted by ``pricegate keys revoke``)."""
    return f"{prefix}:auth:key:{digest}"


def lock_key(prefix: str, digest: str) -> str:
    """Held (``SET NX PX``) by the one replica asking the database about a key; the others wait for its answer.
    Its hash tag is the entry's name (which holds no brace: a cluster's prefix may not), so both share a slot."""
    return f"{prefix}:auth:lock:{{{redis_key(prefix, digest)}}}"


def auth_redis(url: str) -> StateClient:
    """A small client for authentication's shared state on any deployment: short timeouts, so a dead Redis costs a
    handshake about a second (a couple with the retries) before the database is asked instead."""
    return state_client(url, max_connections=16, timeout_s=REDIS_TIMEOUT_S)


class KeyValidator:
    def __init__(
        self,
        store: KeyStore | None,
        *,
        ttl_s: float,
        redis: StateClient | None = None,
        prefix: str = "pg:md",
        cache_result: Callable[[str], None] = lambda result: None,
        lookup_result: Callable[[str], None] = lambda result: None,
        clock: Callable[[], float] = time.time,
        cache: KeyCache | None = None,
        lookup_timeout_s: float = LOOKUP_TIMEOUT_S,
        max_pending: int = MAX_PENDING,
    ) -> None:
        self.store = store  # None until the pool exists (the lifespan sets it): keys not cached are then refused
        self.redis = redis
        self.prefix = prefix
        self.ttl_s = ttl_s
        self.cache = cache or KeyCache(ttl_s)
        self.clock = clock
        self.cache_result = cache_result  # counts hit | shared | miss | coalesced | stale | refused
        self.lookup_result = lookup_result  # counts database lookups: found | unknown | revoked | error
        self.lookup_timeout_s = lookup_timeout_s
        self.max_pending = max_pending
        self.db_lookups = 0  # database lookups made (the reconnect-storm bound is checked against it)
        self.db_down_since: float | None = None  # unix seconds of the first failure of the current outage
        self.db_error = ""  # the failure's exception class (never its text: it may name a host or user)
        self._db_retry_at = 0.0
        self._probing = False
        self._pending: dict[str, asyncio.Task[Outcome]] = {}
        self._redis_failing = False

    # ---- admission ----
    def check(self, key: str) -> Outcome | Awaitable[Outcome]:
        digest = parse_key(key)
        if isinstance(digest, AuthRefusal):
            return digest
        state, found = self.cache.get(digest, self.clock())
        if state == FRESH:
            assert isinstance(found, KeyEntry)
            self.cache_result("hit")
            return found.principal
        if state == REFUSED:
            assert isinstance(found, AuthRefusal)
            self.cache_result("refused")
            return found
        return self.resolve(digest)

    def resolve(self, digest: str) -> Outcome | Awaitable[Outcome]:
        """Look ``digest`` up past this process's cache, sharing the lookup already running for it, if any."""
        task = self._pending.get(digest)
        if task is not None:
            self.cache_result("coalesced")
        elif len(self._pending) >= self.max_pending:
            return self._unverifiable(digest)
        else:
            task = asyncio.get_running_loop().create_task(self._lookup(digest))
            self._pending[digest] = task
            task.add_done_callback(lambda _: self._pending.pop(digest, None))
        # Shielded: a client that hangs up while waiting must not cancel the lookup others wait for.
        return asyncio.shield(task)

    def is_fresh(self, digest: str) -> bool:
        entry = self.cache.entry(digest)
        return entry is not None and self.clock() < entry.fresh_until

    # ---- the lookup ----
    async def _lookup(self, digest: str) -> Outcome:
        shared = await self._from_redis(digest)
        if shared is not None:
            return shared
        if self.store is None or not self._may_ask_database():
            return self._unverifiable(digest)
        others_ask, lock = await self._lock(digest)
        if others_ask:
            # Another replica is asking the database about this key: its answer lands in Redis.
            shared = await self._wait_for_other(digest)
            if shared is not None:
                return shared
            if not self._may_ask_database():
                return self._unverifiable(digest)
        try:
            return await self._ask_database(digest)
        finally:
            if lock is not None:
                await self._unlock(digest, lock)

    async def _ask_database(self, digest: str) -> Outcome:
        assert self.store is not None
        self._probing = self.db_down_since is not None
        checked_at = self.clock()  # before the query: an entry must not outlive a revocation it raced with
        try:
            async with asyncio.timeout(self.lookup_timeout_s):
                self.db_lookups += 1
                record = await self.store.lookup_digest(bytes.fromhex(digest))
        except (DatabaseError, TimeoutError, OSError) as error:
            self.lookup_result("error")
            self._database_failed(error)
            return self._unverifiable(digest)
        finally:
            self._probing = False
        self._database_answered()
        if record is None or record.revoked_at is not None:
            reason = "unknown" if record is None else "revoked"
            self.lookup_result(reason)
            refusal = INVALID if record is None else REVOKED
            self.cache.put_refused(digest, refusal, self.clock())
            await self._to_redis(digest, redis_value(None, checked_at, refusal.reason), self.cache.unknown_ttl_s)
            self.cache_result("miss")
            return refusal
        self.lookup_result("found")
        entry = self.cache.put_valid(digest, record.label, checked_at)
        await self._to_redis(digest, redis_value(record.label, checked_at), entry.fresh_until - self.clock())
        self.cache_result("miss")
        return entry.principal

    def _unverifiable(self, digest: str) -> Outcome:
        """The database cannot say: a key validated before keeps working (stale), any other is refused (503)."""
        entry = self.cache.entry(digest)
        if entry is not None:
            self.cache_result("stale")
            return entry.principal
        self.cache_result("unavailable")
        return UNAVAILABLE if self.store is None or self.db_down_since is not None else BUSY

    def _may_ask_database(self) -> bool:
        if self.db_down_since is None:
            return True
        return not self._probing and self.clock() >= self._db_retry_at

    def _database_failed(self, error: BaseException) -> None:
        now = self.clock()
        if self.db_down_since is None:
            self.db_down_since = now
            logger.warning(
                "API key database unavailable (%s): validated keys keep working from the cache, unknown keys are "
                "refused with 503 until it answers",
                type(error).__name__,
            )
        self.db_error = type(error).__name__
        self._db_retry_at = now + DB_RETRY_S

    def _database_answered(self) -> None:
        if self.db_down_since is not None:
            logger.warning("API key database answers again after %.1f s", self.clock() - self.db_down_since)
        self.db_down_since = None
        self.db_error = ""

    # ---- the shared cache ----
    async def _from_redis(self, digest: str) -> Outcome | None:
        if self.redis is None:
            return None
        try:
            async with self.redis.turn() as redis:
                raw = await redis.get(redis_key(self.prefix, digest))
        except (RedisError, OSError, TimeoutError) as error:
            self._redis_failed(error)
            return None
        self._redis_answered()
        return self._shared(digest, raw)

    async def _lock(self, digest: str) -> tuple[bool, str | None]:
        """(another replica holds the lookup lock, our lock token). Without Redis: nobody else, no token."""
        if self.redis is None:
            return False, None
        token = secrets.token_hex(8)
        ttl_ms = int((self.lookup_timeout_s + 1.0) * 1000)
        try:
            async with self.redis.turn() as redis:
                taken = await redis.set(lock_key(self.prefix, digest), token, nx=True, px=ttl_ms)
        except (RedisError, OSError, TimeoutError) as error:
            self._redis_failed(error)
            return False, None
        self._redis_answered()
        return (False, token) if taken else (True, None)

    async def _unlock(self, digest: str, token: str) -> None:
        assert self.redis is not None
        try:
            async with self.redis.turn() as redis:
                await redis.eval(_UNLOCK, 1, lock_key(self.prefix, digest), token)
        except (RedisError, OSError, TimeoutError) as error:
            self._redis_failed(error)  # it expires by itself
            return
        self._redis_answered()

    async def _wait_for_other(self, digest: str) -> Outcome | None:
        """The answer another replica's lookup writes to Redis; None when it gave up (its lock is gone without
        an answer) or took longer than a lookup may."""
        assert self.redis is not None
        deadline = asyncio.get_running_loop().time() + self.lookup_timeout_s + 1.0
        while asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(LOCK_POLL_S)
            try:
                async with self.redis.turn() as redis:
                    # One slot (the lock's hash tag is the entry's name): one node's round trip on a cluster too.
                    pipe = redis.pipeline(transaction=False)
                    pipe.get(redis_key(self.prefix, digest))
                    pipe.exists(lock_key(self.prefix, digest))
                    raw, locked = await pipe.execute()
            except (RedisError, OSError, TimeoutError) as error:
                self._redis_failed(error)
                return None
            self._redis_answered()
            shared = self._shared(digest, raw)
            if shared is not None or not locked:
                return shared
        return None

    def _shared(self, digest: str, raw: bytes | str | None) -> Outcome | None:
        """A Redis entry taken into this process's cache, if it is one and still fresh."""
        parsed = parse_redis_value(raw.encode() if isinstance(raw, str) else bytes(raw)) if raw is not None else None
        if parsed is None:
            return None
        label, reason, checked_at = parsed
        now = self.clock()
        if label is None:
            if now >= checked_at + self.cache.unknown_ttl_s:
                return None
            refusal = REVOKED if reason == "revoked" else INVALID
            self.cache.put_refused(digest, refusal, now, checked_at + self.cache.unknown_ttl_s - now)
            self.cache_result("shared")
            return refusal
        if now >= checked_at + self.ttl_s:
            return None  # another replica's clock, or a value about to expire: ask the database
        entry = self.cache.put_valid(digest, label, checked_at)
        self.cache_result("shared")
        return entry.principal

    async def _to_redis(self, digest: str, value: bytes, ttl_s: float) -> None:
        if self.redis is None or ttl_s <= 0:
            return
        try:
            async with self.redis.turn() as redis:
                await redis.set(redis_key(self.prefix, digest), value, px=max(1, math.floor(ttl_s * 1000)))
        except (RedisError, OSError, TimeoutError) as error:
            self._redis_failed(error)
            return
        self._redis_answered()

    def _redis_failed(self, error: BaseException) -> None:
        if not self._redis_failing:
            self._redis_failing = True
            logger.warning("auth cache in Redis unavailable (%s): asking the database directly", type(error).__name__)

    def _redis_answered(self) -> None:
        # Any round trip that worked: /readyz reports the shared cache as it is now, not the first command that met
        # a pooled connection to a master that has since been replaced.
        if self._redis_failing:
            self._redis_failing = False
            logger.warning("auth cache in Redis answers again")

    # ---- health ----
    def status(self) -> dict[str, Any]:
        """For ``/readyz``: whether keys can be verified, and what happens meanwhile."""
        if self.store is None:
            database, detail = "not_connected", "keys not in the cache are refused with 503 until it connects"
        elif self.db_down_since is not None:
            down_s = round(self.clock() - self.db_down_since, 1)
            database = "unavailable"
            detail = (
                f"PostgreSQL has not answered for {down_s} s ({self.db_error}): validated keys keep working from "
                "the cache, unknown keys are refused with 503"
            )
        else:
            database, detail = "ok", None
        return {
            "key_database": database,
            "detail": detail,
            "cached_keys": len(self.cache),
            "shared_cache": None if self.redis is None else ("unavailable" if self._redis_failing else "ok"),
        }

    async def aclose(self) -> None:
        for task in list(self._pending.values()):
            task.cancel()
        await asyncio.gather(*self._pending.values(), return_exceptions=True)
        if self.redis is not None:
            await self.redis.aclose()
