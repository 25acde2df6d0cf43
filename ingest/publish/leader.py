"""Which ingest process publishes: a lease in Redis, held by at most one process at a time.

The lease is one key (``<prefix>:<venue>:ingest:leader``) holding the holder's token (host, pid and a random
part) with a TTL of ``ttl_s``. A process takes it with ``SET key token NX PX ttl``; the holder renews it every
``renew_s`` with a compare-and-extend script (only while the key still holds its own token). A standby tries to
take it every ``renew_s``; after a holder dies the key expires within ``ttl_s`` of its last renewal, so a standby
takes over within about ``ttl_s + renew_s``. A holder that stops (SIGTERM) deletes its own key (compare-and-delete),
so a standby takes over within ``renew_s``.

Stopping at once on loss: a renewal that fails, for whatever reason (refused because another process holds the key,
Redis unreachable, too slow), ends this process's leadership immediately, and :meth:`LeaderLease.holds` also turns
false as soon as the local clock passes the last successful renewal's start plus the TTL, even if this loop could
not run (a process paused by the OS). The guarantee does not rest on this process noticing, though: every publish
carries the lease token and Redis checks it in the same script that writes (``shared.redis.scripts``), so a process
that lost the lease cannot publish even once, however late it notices.

Redis unreachable or restarted: renewals fail and the holder steps down like any other loss; it keeps everything it
could not publish (``ingest.publish.publisher``) and takes the lease again once Redis answers. A restarted Redis is
empty, so the lease is free for anyone, but only the process that led before holds what Redis missed: a second key,
``<lease>:last`` (no TTL), names who took the lease last, and while it is missing (Redis lost its data) a process that
saw another one lead leaves the free lease alone for one TTL, so the previous leader takes it back first; if that
one is gone too, the lease is taken after the TTL as after a death. (``<lease>:grace``, set by the first such look
and deleted by the next acquisition, tells each loss of data apart, so a grace is never cut short by the memory of
an earlier one.) An acquisition also says who took the lease
before (``previous``), and each look that finds another process holding it is counted (``seen_others``): with those
the publisher tells whether anyone else led since it did, and drops what only it could publish if so.

Fencing epochs: each acquisition (but a holder keeping its own live lease; the acquire script below) draws a new
fencing epoch, higher than any before it: the larger of the stored counter + 1 and the Redis server's clock in
milliseconds, so it keeps growing even after the counter was lost with Redis' data. Before ``on_acquired`` runs the
epoch is announced through ``fence`` (the broker's ``take_fencing_epoch``: every slot of a cluster learns it), and
the publish script refuses any lower one: on a Redis Cluster, where a script cannot read the lease (another slot),
that is what stops a deposed or paused leader on every shard.

On a Redis Cluster the lease's other keys carry the lease key as hash tag (``{<lease>}:last``, ``{<lease>}:grace``,
``{<lease>}:fence``), so the scripts below touch one slot; the lease key keeps its name everywhere.

Why not redis-py's ``Lock``: its ``extend()`` adds to the remaining TTL by default (renewing every second with
``extend(ttl)`` lets the TTL grow, and failover slows down with it); its token is a bare uuid kept in thread-local
storage; and a holder that was briefly cut off cannot take back its own still-live key with ``acquire()``. The
three short scripts below do exactly what is needed, and the token names its holder for operators
(``GET <prefix>:<venue>:ingest:leader``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import redis.exceptions as redis_errors
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ingest.broker_health import first_calls
from shared.backoff import backoff_delays
from shared.cancellation import raise_if_cancel_was_lost
from shared.errors import BrokerError, ConfigError
from shared.redaction import redact_url
from shared.redis.clients import CommandClient, command_client
from shared.redis.cluster import ClusterClient
from shared.redis.urls import parse_redis_url

logger = logging.getLogger("pricegate.ingest.leader")

# Take the lease if it is free, or keep it if it is already ours (a holder cut off briefly gets it back).
# KEYS: the lease, the last leader (no TTL: it vanishes only when Redis loses its data), the grace marker, the
# fencing epoch counter. ARGV: token, TTL ms, '1' = defer to the previous leader. Returns {1, the last leader before
# us ('' = unknown), fencing epoch}, {0, the holder}, or {2, 'new' | ''} when asked to defer and Redis has lost its
# data: the lease is free only because Redis restarted empty, and the process that led before holds what Redis missed
# meanwhile. 'new': the grace begins now (the marker was missing: this is a new loss of data, whatever a process
# remembers of an earlier one). A holder keeping its own lease keeps its epoch (nobody else led meanwhile); any
# other acquisition draws a new one above every earlier one (module docstring).
_ACQUIRE = """
local current = redis.call('GET', KEYS[1])
local function next_epoch()
  local now = redis.call('TIME')
  local epoch = math.max(tonumber(redis.call('GET', KEYS[4]) or '0') + 1, now[1] * 1000 + math.floor(now[2] / 1000))
  redis.call('SET', KEYS[4], string.format('%d', epoch))
  return epoch
end
if current == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  local epoch = tonumber(redis.call('GET', KEYS[4]) or '')
  if not epoch then
    epoch = next_epoch()
  end
  return {1, ARGV[1], epoch}
end
if current then
  return {0, current}
end
local last = redis.call('GET', KEYS[2])
if not last and ARGV[3] == '1' then
  if redis.call('SET', KEYS[3], '1', 'NX') then
    return {2, 'new'}
  end
  return {2, ''}
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('SET', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[3])
return {1, last or '', next_epoch()}
"""
# Extend only our own lease: after it expired and someone else took it, renewing must fail, not steal it back.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

Callback = Callable[[], Awaitable[None]]
Fence = Callable[[int], Awaitable[None]]
LEASE_TRIES_S = (0.0, 0.0, 0.05)  # on a cluster: the pauses before each try of a lease call


def holder_token() -> str:
    """A token unique to this process and start, readable by an operator: ``<host>:<pid>:<random>``."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


class LeaderLease:
    """The lease loop: ``run(on_acquired, on_lost)`` until cancelled. Counters for metrics: ``acquired``,
    ``lost`` (by reason: ``refused``, ``error``, ``expired``), ``renewals``."""

    def __init__(
        self,
        redis_url: str,
        key: str,
        *,
        ttl_s: float = 3.0,
        renew_s: float = 1.0,
        token: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        fence: Fence | None = None,
    ) -> None:
        """``fence`` announces a new holder's fencing epoch before ``on_acquired`` runs (the broker's
        ``take_fencing_epoch``); if it fails, the lease is given up again and taken at a later look."""
        if not ttl_s > 0:
            raise ConfigError("leader_ttl_s", ttl_s, "must be a positive number of seconds")
        if not 0 < renew_s <= ttl_s / 2:
            # Two renewals fit in one TTL: one slow or lost renewal does not let the lease lapse under a live leader.
            raise ConfigError("leader_renew_s", renew_s, f"must be positive and at most half the TTL ({ttl_s} s)")
        self.redis_url = redis_url
        self.key = key
        self.ttl_s = ttl_s
        self.renew_s = renew_s
        self.token = token or holder_token()
        self._clock = clock
        self._leader = False
        self._valid_until = 0.0
        self._client: CommandClient | None = None
        self._cluster: ClusterClient | None = None
        self._fence = fence
        self.fencing_epoch: int | None = None  # this holder's, from the last acquisition
        self.acquired = 0
        self.lost: dict[str, int] = {"refused": 0, "error": 0, "expired": 0}
        self.renewals = 0
        self.holder: str | None = None  # the token in the key at the last look (ours or another process's)
        # On a cluster the other keys share the lease's slot (the lease key is their hash tag).
        aux = f"{{{key}}}" if parse_redis_url(redis_url).kind == "cluster" else key
        self.last_key = f"{aux}:last"  # who took the lease last (no TTL): gone only when Redis lost its data
        self.grace_key = f"{aux}:grace"  # set while standbys leave a free lease to the previous leader
        self.fence_key = f"{aux}:fence"  # the fencing epoch counter (no TTL)
        # At the last acquisition, the process that had taken the lease before us: ourselves (we kept it), another
        # process, or None (Redis had lost its data, or nobody ever led).
        self.previous: str | None = None
        self._defer_until = 0.0
        # Looks that found another process holding the key: a process that lost the lease to a Redis outage keeps
        # what it could not publish until this moves (ingest.publish.publisher).
        self.seen_others = 0

    # ---- state ----

    @property
    def is_leader(self) -> bool:
        return self._leader

    def holds(self) -> bool:
        """True while this process leads and its lease cannot have expired yet by the local clock."""
        return self._leader and self._clock() < self._valid_until

    # ---- loop ----

    async def _eval(self, script: str, keys: list[str], *args: Any) -> Any:
        """Run a lease script. Its own connections, so renewals never queue behind large publish pipelines; every call
        must end well within the TTL, and no hidden retries (the loop is the retry). On a cluster, on the primary of
        the lease's slot (its keys share it), redirections handled."""
        timeout = max(0.05, min(self.renew_s, self.ttl_s / 3))
        options: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
        target = parse_redis_url(self.redis_url)
        if target.kind == "cluster":
            if self._cluster is None:
                if target.password is not None:
                    options["password"] = target.password
                if target.username is not None:
                    options["username"] = target.username
                self._cluster = ClusterClient(
                    target.nodes, {**options, "retry": Retry(NoBackoff(), 0)}, safe_url=redact_url(self.redis_url)
                )
            # Few tries: a lease call must end well within the TTL (a redirection is followed, an outage is not waited).
            return await self._cluster.execute(keys[0], "EVAL", script, len(keys), *keys, *args, delays=LEASE_TRIES_S)
        if self._client is None:
            self._client = command_client(self.redis_url, retry=Retry(NoBackoff(), 0), **options)
        return await self._client.client.eval(script, len(keys), *keys, *args)

    async def run(self, on_acquired: Callback, on_lost: Callable[[str], None]) -> None:
        """Hold or wait for the lease forever. ``on_acquired`` runs after the lease was taken (an exception in it
        gives the lease up again); ``on_lost(reason)`` runs the moment it is lost."""
        ttl_ms = int(self.ttl_s * 1000)
        try:
            while True:
                started = self._clock()
                if self._leader:
                    if started >= self._valid_until:
                        self._lose(on_lost, "expired")  # this loop could not run in time (a paused process)
                    else:
                        await self._renew(ttl_ms, started, on_lost)
                if not self._leader:
                    await self._try_acquire(ttl_ms, started, on_acquired, on_lost)
                # redis-py calls can swallow a cancellation (see shared.cancellation): stopping must not hang here.
                raise_if_cancel_was_lost()
                delay = self.renew_s - (self._clock() - started)
                await asyncio.sleep(max(0.0, delay))
        finally:
            if self._leader:
                self._lose(on_lost, "stopped")

    async def _renew(self, ttl_ms: int, started: float, on_lost: Callable[[str], None]) -> None:
        try:
            renewed = await self._eval(_RENEW, [self.key], self.token, ttl_ms)
        except (redis_errors.RedisError, OSError, BrokerError) as error:
            logger.warning("leader lease renewal failed (%r): stepping down at once", error)
            self._lose(on_lost, "error")
            return
        if renewed == 1:
            self.renewals += 1
            self._valid_until = started + self.ttl_s
        else:
            logger.warning("leader lease was taken over or expired: stepping down")
            self._lose(on_lost, "refused")

    async def _try_acquire(
        self, ttl_ms: int, started: float, on_acquired: Callback, on_lost: Callable[[str], None]
    ) -> None:
        defer = self._defers(started)
        try:
            taken, other, *epoch = await self._eval(
                _ACQUIRE,
                [self.key, self.last_key, self.grace_key, self.fence_key],
                self.token,
                ttl_ms,
                "1" if defer else "0",
            )
        except (redis_errors.RedisError, OSError, BrokerError) as error:
            logger.debug("leader lease not taken (%r)", error)
            return
        other = other.decode(errors="replace") if isinstance(other, bytes) else str(other)
        if taken == 2:
            if other == "new" or not self._defer_until:
                self._defer_until = started + self.ttl_s
                logger.info(
                    "Redis lost its data (restarted empty): leaving the lease to %s, which led before, for %.1f s",
                    self.holder,
                    self.ttl_s,
                )
            return
        if taken != 1:
            self.holder = other
            self._defer_until = 0.0
            if other != self.token:
                self.seen_others += 1
            return
        self.previous = other or None
        self._defer_until = 0.0
        self._leader = True
        self._valid_until = started + self.ttl_s
        self.holder = self.token
        self.acquired += 1
        self.fencing_epoch = int(epoch[0]) if epoch else None
        logger.info(
            "took the leader lease %s as %s (fencing epoch %s): publishing", self.key, self.token, self.fencing_epoch
        )
        try:
            if self._fence is not None and self.fencing_epoch is not None:
                # Idempotent (ZADD GT), and the first command after a Redis restart may meet a stale connection:
                # giving the lease up for that would hand it to a standby, not to us who hold what Redis missed.
                fence, epoch = self._fence, self.fencing_epoch
                await first_calls(lambda: fence(epoch), backoff_delays(0.05, 0.2))
            await on_acquired()
        except asyncio.CancelledError:
            raise
        except BrokerError as error:  # Redis went away again: nothing to debug, the next look retries
            logger.warning("taking over failed (%s); giving the leader lease up", error)
            self._lose(on_lost, "error")
            await self.release()
        except Exception:
            logger.exception("taking over failed; giving the leader lease up")
            self._lose(on_lost, "error")
            await self.release()

    def _defers(self, now: float) -> bool:
        """Whether a free lease in a Redis that lost its data is left alone for now: only by a process that saw
        another one lead (a first start takes it at once), for one TTL, so that leader takes it back first and
        publishes what it held; if it does not come back, the lease is taken after the TTL, as after its death."""
        if self.holder is None or self.holder == self.token:
            return False
        return not self._defer_until or now < self._defer_until

    def _lose(self, on_lost: Callable[[str], None], reason: str) -> None:
        self._leader = False
        self._valid_until = 0.0
        if reason in self.lost:
            self.lost[reason] += 1
        on_lost(reason)

    async def release(self) -> None:
        """Delete the key if it still holds our token (so a standby takes over at once), and close the connection.
        Bounded in time: stopping must not hang on an unreachable Redis."""
        if self._client is None and self._cluster is None:
            return
        try:
            async with asyncio.timeout(max(0.5, self.ttl_s / 3)):
                await self._eval(_RELEASE, [self.key], self.token)
        except (redis_errors.RedisError, OSError, TimeoutError, BrokerError) as error:
            logger.warning("could not release the leader lease at %s (%r); it expires by itself", self.key, error)
        finally:
            client, self._client = self._client, None
            cluster, self._cluster = self._cluster, None
            if client is not None:
                await client.aclose()
            if cluster is not None:
                await cluster.aclose()

    def describe(self) -> str:
        return f"lease {self.key} at {redact_url(self.redis_url)} (ttl {self.ttl_s} s, renew every {self.renew_s} s)"
