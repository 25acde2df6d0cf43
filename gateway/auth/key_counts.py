"""Open connections per credential across replicas, without a Redis round trip per handshake.

Each replica counts its own connections exactly (:meth:`ConnectionCounts.opened` / :meth:`closed`, no I/O) and,
once a second, publishes them and reads the others' back in one pipeline: a hash per credential,
``<prefix>:auth:conns:<kind>:<subject>``, one field per replica holding ``<count>:<unix ms>``. A field older than
:data:`FIELD_MAX_AGE_S` is ignored (its replica stopped publishing: it died or lost Redis) and deleted; the hash
itself expires when no replica refreshes it. :meth:`allows` compares local + others' last published counts with
the limit, so the limit holds across replicas within about a second (each replica may admit what arrives in
that second). A replica reads the hashes of credentials it has connections of, or saw recently; a credential it
has not seen before makes it sync at once, so its first handshakes here learn the others' counts within a
round trip instead of a second. Without Redis
(the demo), or while Redis does not answer, the limit is this process's own.

Redis is whatever ``PRICEGATE_REDIS_URL`` names (:class:`shared.redis.clients.StateClient`): one server, a
Sentinel-watched master or a Redis Cluster. Every command touches one hash; on a cluster the round's pipeline is
sent to each node holding some of them (redis-py's non-transactional cluster pipeline).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable

from redis.exceptions import RedisError

from shared.redis.clients import StateClient

logger = logging.getLogger("pricegate.gateway.auth")

SYNC_INTERVAL_S = 1.0
FIELD_MAX_AGE_S = 3.0  # a replica's count older than this no longer counts (three missed publications)
HASH_TTL_MS = 10_000
INTEREST_S = 60.0  # keep reading a credential's hash this long after its last connection or handshake here


def replica_id() -> str:
    """This process's field name: host, pid and a random part (a restarted pod never reuses its old field)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class ConnectionCounts:
    def __init__(
        self,
        limit: int,
        *,
        redis: StateClient | None = None,
        prefix: str = "pg:md",
        replica: str | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.redis = redis
        self.prefix = prefix
        self.replica = replica or replica_id()
        self.clock = clock
        self.monotonic = monotonic
        self.local: dict[str, int] = {}  # credential (kind:subject) -> open connections here
        self.remote: dict[str, int] = {}  # credential -> open connections on other replicas, as last read
        self._interest: dict[str, float] = {}  # credential -> monotonic time it was last seen here
        self._dirty: set[str] = set()  # credentials whose count here changed since the last publication
        self._remote_read_at = 0.0
        self._failing = False
        self._wake = asyncio.Event()  # set: sync now (a credential new here), not at the next tick

    def hash_key(self, credential: str) -> str:
        return f"{self.prefix}:auth:conns:{credential}"

    # ---- the hot side: handshakes and closes, no I/O ----
    def allows(self, credential: str) -> bool:
        """May one more connection of ``credential`` be opened?"""
        if credential not in self._interest and self.redis is not None:
            self._wake.set()
        self._interest[credential] = self.monotonic()
        return self.local.get(credential, 0) + self.remote.get(credential, 0) < self.limit

    def opened(self, credential: str) -> None:
        self.local[credential] = self.local.get(credential, 0) + 1
        self._dirty.add(credential)

    def closed(self, credential: str) -> None:
        count = self.local.get(credential, 0) - 1
        if count > 0:
            self.local[credential] = count
        else:
            self.local.pop(credential, None)
            self._interest[credential] = self.monotonic()
        self._dirty.add(credential)

    def total(self, credential: str) -> int:
        return self.local.get(credential, 0) + self.remote.get(credential, 0)

    # ---- once a second ----
    async def run(self, interval_s: float = SYNC_INTERVAL_S) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), interval_s)
            self._wake.clear()
            try:
                await self.sync()
            except Exception:  # one bad round must not end sharing for good
                logger.exception("sharing per-key connection counts failed")

    async def sync(self) -> None:
        """Publish this replica's counts and read the others' (one pipeline)."""
        now_mono = self.monotonic()
        for credential, seen in list(self._interest.items()):
            if now_mono - seen > INTEREST_S and credential not in self.local:
                del self._interest[credential]
                self.remote.pop(credential, None)
        if self.redis is None:
            return
        if now_mono - self._remote_read_at > FIELD_MAX_AGE_S:
            self.remote.clear()  # Redis has not answered for a while: what we read is too old to refuse with
        now_ms = int(self.clock() * 1000)
        writes = self._dirty | self.local.keys()
        reads = list(self._interest)
        try:
            async with self.redis.turn() as redis:
                pipe = redis.pipeline(transaction=False)
                for credential in writes:
                    key = self.hash_key(credential)
                    count = self.local.get(credential, 0)
                    if count:
                        pipe.hset(key, self.replica, f"{count}:{now_ms}")
                        pipe.pexpire(key, HASH_TTL_MS)
                    else:
                        pipe.hdel(key, self.replica)
                for credential in reads:
                    pipe.hgetall(self.hash_key(credential))
                results = await pipe.execute()
        except (RedisError, OSError, TimeoutError) as error:
            if not self._failing:
                self._failing = True
                logger.warning(
                    "per-key connection counts: Redis unavailable (%s); limits are per replica meanwhile",
                    type(error).__name__,
                )
            return
        self._failing = False
        self._dirty.clear()
        self._remote_read_at = now_mono
        hashes = results[len(results) - len(reads) :] if reads else []
        expired: list[tuple[str, list[bytes]]] = []
        for credential, fields in zip(reads, hashes, strict=True):
            total, old = self._others(fields, now_ms)
            if total:
                self.remote[credential] = total
            else:
                self.remote.pop(credential, None)
            if old:
                expired.append((self.hash_key(credential), old))
        if expired:
            await self._delete_fields(expired)

    def _others(self, fields: dict[bytes, bytes], now_ms: int) -> tuple[int, list[bytes]]:
        """(connections of live other replicas, fields of replicas that stopped publishing)."""
        total = 0
        old: list[bytes] = []
        me = self.replica.encode()
        for field, value in fields.items():
            if field == me:
                continue
            count, _, stamp = value.partition(b":")
            try:
                age_ms = now_ms - int(stamp)
                connections = int(count)
            except ValueError:
                old.append(field)
                continue
            if age_ms > FIELD_MAX_AGE_S * 1000:
                old.append(field)
            else:
                total += max(0, connections)
        return total, old

    async def _delete_fields(self, expired: list[tuple[str, list[bytes]]]) -> None:
        assert self.redis is not None
        try:
            async with self.redis.turn() as redis:
                pipe = redis.pipeline(transaction=False)
                for key, fields in expired:
                    pipe.hdel(key, *fields)
                await pipe.execute()
        except (RedisError, OSError, TimeoutError):
            pass  # the next reader deletes them

    async def aclose(self) -> None:
        """Withdraw this replica's counts (best effort: they expire anyway)."""
        if self.redis is None or not self.local:
            return
        try:
            async with self.redis.turn() as redis:
                pipe = redis.pipeline(transaction=False)
                for credential in self.local:
                    pipe.hdel(self.hash_key(credential), self.replica)
                await pipe.execute()
        except (RedisError, OSError, TimeoutError):
            pass
        self.local.clear()
