"""Redis broker: implements :class:`shared.broker.contract.Broker` over one Redis server, reached by a ``redis://``,
``rediss://`` or ``unix://`` URL (:class:`RedisBroker`) or as the master Sentinels name (:class:`SentinelBroker`,
``redis+sentinel://``; it follows a failover to the promoted replica). A Redis Cluster is
:mod:`shared.broker.redis_cluster`, which shares the publish call's layout and the reading of its replies with this
module; :func:`shared.broker.factory.redis_broker` picks the class from the URL. Ingest publishes through a Lua
script (:mod:`shared.redis.scripts`; here, a batch of several messages in calls of the batch script, up to
``BATCH_CALL_MESSAGES`` each, pipelined) that atomically, per message, assigns the channel's epoch and sequence,
appends the envelope to the channel's history stream (ID ``<seq>-0``, trimmed by length; age is bounded by a key TTL
refreshed on every publish plus an age filter on read), stores the last value of state streams and PUBLISHes the
envelope. A batch's calls are packed by hand and their replies read raw (:mod:`shared.redis.packed_publish`,
:mod:`shared.redis.packed_pipeline`: a few microseconds a message where redis-py spent tens). Gateways read history
and last values here and receive publications through the broker's one subscription connection
(:mod:`shared.broker.redis_subscription`).

Fenced publishing checks two things in the script (:mod:`shared.redis.scripts`): the lease token against the lease
key, and the fencing epoch the lease handed this process (:meth:`RedisBroker.take_fencing_epoch`) against the
fence, the highest epoch any leader announced. Behind Sentinel (and on a cluster) the broker also remembers, per
stream, the last (epoch, seq) Redis answered it with (the floor): a Redis that lost acknowledged writes (a promoted
replica) then continues the sequence after it instead of handing the same seq out twice. One server's calls carry
no floor, so they are the same every time (the load generator replays them).
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as aioredis
import redis.exceptions as redis_errors
from redis.asyncio.connection import ConnectionPool
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff

from shared.broker.contract import BrokerListener, OutgoingMessage
from shared.broker.redis_subscription import RedisSubscription
from shared.errors import BrokerError, NotLeaderError, PublishIncomplete
from shared.frames import Publication, decode_publication
from shared.redaction import redact_url
from shared.redis.packed_pipeline import run_packed, run_packed_batches
from shared.redis.packed_publish import PublishPacker
from shared.redis.scripts import FENCE_MEMBER, HISTORY_FIELD, NOT_LEADER, PUBLISH_BATCH_SCRIPT, PUBLISH_SCRIPT
from shared.redis.urls import parse_redis_url
from shared.streams import ChannelKeys, ChannelNamer

BATCH_CALL_MESSAGES = 64  # most messages per batch script call: Redis runs nothing else meanwhile (~0.5 ms)


class PublishCalls:
    """The publish script's arguments for a batch, and the reading of its replies: shared by every Redis broker, so
    the KEYS/ARGV layout (the contract in :mod:`shared.redis.scripts`) is written once."""

    __slots__ = ("floors", "namer", "publish_command", "use_floors")

    def __init__(self, namer: ChannelNamer, *, sharded: bool, floors: bool) -> None:
        self.namer = namer
        self.publish_command = "SPUBLISH" if sharded else "PUBLISH"
        # Per stream, the newest (epoch, seq) Redis answered: the script's floor (see the module docstring). Kept
        # where a failover is part of the design (Sentinel, Cluster); one server's calls stay the same every time.
        self.use_floors = floors
        self.floors: dict[str, tuple[int, int]] = {}

    def args(
        self,
        message: OutgoingMessage,
        keys: ChannelKeys,
        *,
        lease_key: str,
        fence_key: str,
        candidate_epoch: int,
        published_at_ms: int,
        history_maxlen: int,
        ttl_ms: int,
        token: str,
        fencing_epoch: int | None,
    ) -> tuple[Any, ...]:
        event = message.event
        floor = self.floors.get(message.stream)
        return (
            keys.epoch,
            keys.seq,
            keys.history,
            keys.last,
            keys.event_id,
            lease_key,
            fence_key,
            keys.channel,
            candidate_epoch,
            published_at_ms,  # the load generator (loadtests/publisher.py) relies on it coming just before the payload
            message.payload,
            1 if message.keep_last else 0,
            history_maxlen,
            ttl_ms,
            token,
            "" if event is None else event.last,
            "" if fencing_epoch is None else fencing_epoch,
            "" if floor is None else floor[0],
            "" if floor is None else floor[1],
            self.publish_command,
        )

    def answered(self, stream: str, epoch: int, seq: int) -> None:
        """Record an answer as the stream's floor (the newest one: answers of one stream come in order)."""
        if self.use_floors:
            self.floors[stream] = (epoch, seq)


class RedisBroker:
    """A :class:`shared.broker.contract.Broker` on Redis. Counters are plain ints for the metrics layer to read."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "pg:md",
        venue: str = "binance",
        history_maxlen: int = 1000,
        history_max_age_s: float = 300.0,
        health_check_interval_s: float = 5.0,
        socket_timeout_s: float = 5.0,
        reconnect_initial_s: float = 0.1,
        reconnect_max_s: float = 5.0,
        seq_floors: bool = False,
    ) -> None:
        """``seq_floors``: pass each stream's floor to the script (module docstring; on for Sentinel)."""
        if history_maxlen < 1:
            raise ValueError(f"history_maxlen must be >= 1, got {history_maxlen!r}")
        self.url = url
        self.safe_url = redact_url(url)
        self.namer = ChannelNamer(prefix, venue)
        self.history_maxlen = history_maxlen
        self.history_max_age_s = history_max_age_s
        self.health_check_interval_s = health_check_interval_s
        self.socket_timeout_s = socket_timeout_s
        self.duplicates_dropped = 0  # events not published because their identity was not new (ingest side)

        self._client: aioredis.Redis | None = None
        self._script_sha = ""
        self._batch_script_sha = ""
        self._malformed_reads = 0  # history entries and last values that did not decode (skipped)
        self._calls = PublishCalls(self.namer, sharded=False, floors=seq_floors)
        self._packer = PublishPacker(self.namer, lease_key=self.namer.leader_key, fence_key=self.namer.fence_key)
        self.fencing_epoch: int | None = None  # the lease's epoch for this process's fenced publishes (None: none)
        self.reconnect_max_s = reconnect_max_s
        self._subscription = RedisSubscription(
            self.namer,
            safe_url=self.safe_url,
            socket_timeout_s=socket_timeout_s,
            health_check_interval_s=health_check_interval_s,
            reconnect_initial_s=reconnect_initial_s,
            reconnect_max_s=reconnect_max_s,
        )

    # ---- state for metrics, health and tests ----
    @property
    def connected(self) -> bool:
        return self._subscription.connected

    @property
    def malformed_messages(self) -> int:
        """Envelopes, heartbeats, history entries and last values that did not decode (skipped)."""
        return self._subscription.malformed_messages + self._malformed_reads

    @property
    def reconnects(self) -> int:
        """Times the subscription connection was re-established after a loss."""
        return self._subscription.reconnects

    @property
    def listener_errors(self) -> int:
        """Exceptions raised by the listener (logged; delivery continues)."""
        return self._subscription.listener_errors

    @property
    def subscriber_client_id(self) -> int | None:
        """CLIENT ID of the live subscription connection."""
        return self._subscription.client_id

    @property
    def reader_task(self) -> asyncio.Task[None] | None:
        """The subscription reader task; it completes with the reader's fatal error, if any."""
        return self._subscription.task

    @property
    def failure(self) -> BaseException | None:
        """The subscription reader's fatal error."""
        return self._subscription.failure

    @property
    def problem(self) -> str | None:
        """Why the subscription side is down (for ``/readyz``), or None while it is live."""
        return None if self.connected else self._subscription.problem

    # ---- lifecycle ----
    def _options(self) -> dict[str, Any]:
        """redis-py connection options shared by the command client and the subscription connection."""
        options: dict[str, Any] = {
            "decode_responses": False,
            "socket_timeout": self.socket_timeout_s,
            "socket_connect_timeout": self.socket_timeout_s,
            # No hidden retries: a retried pipeline could publish a batch twice. Callers own the policy.
            "retry": Retry(NoBackoff(), 0),
        }
        if urlsplit(self.url).scheme != "unix":
            options["socket_keepalive"] = True  # UnixDomainSocketConnection does not take it
        return options

    def _make_client(self, options: dict[str, Any]) -> aioredis.Redis:
        return aioredis.Redis.from_url(self.url, health_check_interval=self.health_check_interval_s, **options)

    def _subscription_pool(self, options: dict[str, Any]) -> ConnectionPool:
        # RESP2 keeps pub/sub replies plain arrays.
        return ConnectionPool.from_url(self.url, protocol=2, **options)

    async def start(self) -> None:
        if self._client is not None:
            raise BrokerError("RedisBroker.start() called twice")
        options = self._options()
        try:
            self._client = self._make_client(options)
            await self._client.ping()
            await self._load_scripts(self._client)
            await self._subscription.open(self._subscription_pool(options))
        except (redis_errors.RedisError, OSError, ValueError) as error:  # OSError includes TimeoutError
            await self._release_client()
            # Worded to follow the CLI's "PRICEGATE_REDIS_URL=...: cannot reach Redis: " prefix.
            raise BrokerError(f"Redis at {self.safe_url}: {self._explain(error)}") from error
        except BrokerError:
            await self._release_client()
            raise

    def _explain(self, error: BaseException) -> str:
        """What a failure to start says (a subclass adds where it looked)."""
        return str(error)

    async def close(self) -> None:
        await self._subscription.close()
        await self._release_client()

    async def _release_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def _require_client(self) -> aioredis.Redis:
        if self._client is None:
            raise BrokerError("RedisBroker is not started")
        return self._client

    # ---- ingest side ----
    async def publish(
        self, messages: Sequence[OutgoingMessage], *, fencing_token: str | None = None
    ) -> list[Publication]:
        if not messages:
            return []
        client = self._require_client()
        published_at_ms = time.time_ns() // 1_000_000
        # Used only by channels whose epoch is missing (first publish or data loss); sharing one value across
        # the batch is harmless because epochs are compared per channel.
        candidate_epoch = random.randrange(1, 2**31)
        ttl_ms = max(0, int(self.history_max_age_s * 1000))
        token = fencing_token or ""
        packer = self._packer

        async def run(batch: Sequence[OutgoingMessage]) -> list[Any]:
            packer.set_script(self._script_sha)  # the digests loaded last (a no-op unless NOSCRIPT reloaded them)
            packer.set_batch_script(self._batch_script_sha)
            options: dict[str, Any] = {
                "candidate_epoch": candidate_epoch,
                "published_at_ms": published_at_ms,
                "history_maxlen": self.history_maxlen,
                "ttl_ms": ttl_ms,
                "token": token,
                "fencing_epoch": self.fencing_epoch if token else None,
                "floors": self._calls.floors,
            }
            if len(batch) == 1:
                # The calls PublishCalls.args describes, packed by hand (tests/test_packed_publish.py holds them
                # equal); a batch of one is the load generator's template (loadtests/publisher.py).
                return await self._run_script(client, packer.pack(batch, **options), 1)
            # Many messages: batch script calls of at most BATCH_CALL_MESSAGES each, pipelined.
            calls = -(-len(batch) // BATCH_CALL_MESSAGES)
            bounds = [len(batch) * call // calls for call in range(calls + 1)]
            packed = b"".join(
                packer.pack(batch[a:b], batch_call=True, **options) for a, b in itertools.pairwise(bounds)
            )
            sizes = [b - a for a, b in itertools.pairwise(bounds)]
            return await self._run_script(client, packed, sizes)

        results = await run(messages)
        missing = [index for index, result in enumerate(results) if isinstance(result, redis_errors.NoScriptError)]
        if missing:
            # Redis restarted or SCRIPT FLUSH ran: nothing of those calls executed, so running them again is
            # safe. (Every call of a batch fails alike unless the flush lands mid-batch.)
            try:
                await self._load_scripts(client)
            except (redis_errors.RedisError, OSError) as error:
                raise PublishIncomplete(
                    f"publish to {self.safe_url}: cannot load the publish script: {error}", missing[0]
                ) from error
            try:
                retried = await run([messages[index] for index in missing])
            except PublishIncomplete as error:
                # Counted in the whole batch: everything before the first rerun call, plus what the rerun confirmed.
                raise PublishIncomplete(str(error), missing[0] + error.confirmed) from error
            for index, result in zip(missing, retried, strict=True):
                results[index] = result
        publications: list[Publication] = []
        for position, (message, result) in enumerate(zip(messages, results, strict=True)):
            if isinstance(result, BaseException):
                done = sum(1 for r in results if not isinstance(r, BaseException))
                if str(result).startswith(NOT_LEADER):
                    raise NotLeaderError(
                        f"publish to {self.safe_url} refused from {message.stream!r} on: {result} (a later leader "
                        f"holds the lease; {done}/{len(messages)} of the batch were published before)"
                    ) from result
                raise PublishIncomplete(
                    f"publish to {self.safe_url} failed for {message.stream!r} "
                    f"({done}/{len(messages)} of the batch were published): {result}",
                    position,
                ) from result
            if result == 0:
                self.duplicates_dropped += 1
                continue
            epoch, seq = int(result[0]), int(result[1])
            self._calls.answered(message.stream, epoch, seq)
            publications.append(Publication(epoch, seq, published_at_ms, message.payload))
        return publications

    async def take_fencing_epoch(self, epoch: int) -> None:
        """The lease was taken with fencing ``epoch``: announce it in the fence (no publisher with a lower one
        publishes after this returns) and publish fenced with it from now on. BrokerError if the fence holds a higher
        one already (a later leader's, which this process's lease outlived only because Redis lost its writes): the
        lease is then given up, and the next acquisition draws a higher epoch."""
        pipe = self._require_client().pipeline(transaction=False)
        pipe.zadd(self.namer.fence_key, {FENCE_MEMBER: epoch}, gt=True)
        pipe.zscore(self.namer.fence_key, FENCE_MEMBER)
        _, highest = await self._command("announce the fencing epoch", pipe.execute())
        if highest is not None and highest > epoch:
            raise BrokerError(f"fencing epoch {epoch} is below {highest:.0f}, a later leader's, at {self.safe_url}")
        self.fencing_epoch = epoch

    async def _load_scripts(self, client: aioredis.Redis) -> None:
        self._script_sha = str(await client.script_load(PUBLISH_SCRIPT))
        self._batch_script_sha = str(await client.script_load(PUBLISH_BATCH_SCRIPT))

    async def _run_script(self, client: aioredis.Redis, packed: bytes, count: int | list[int]) -> list[Any]:
        """``count`` packed calls in one round trip, like a pipeline, or batch script calls of ``count[i]``
        messages each; one result per message, per-message errors as exception values.
        The replies are read as they arrive (:func:`shared.redis.packed_pipeline.run_packed`), so when Redis goes away
        mid-batch the caller learns how many messages are known done (:class:`PublishIncomplete`) and resends only the
        rest, which a killed Redis never ran: no message is published twice."""
        pool = client.connection_pool
        results: list[Any] = []
        try:
            connection = await pool.get_connection()  # type: ignore[no-untyped-call]  # untyped in redis-py
        except (redis_errors.RedisError, OSError) as error:
            raise PublishIncomplete(f"publish to {self.safe_url} failed: {error}", 0) from error
        try:
            if isinstance(count, int):
                await run_packed(connection, packed, count, results, timeout_s=self.socket_timeout_s)
            else:
                await run_packed_batches(connection, packed, count, results, timeout_s=self.socket_timeout_s)
        except (redis_errors.RedisError, OSError) as error:  # OSError includes TimeoutError
            await connection.disconnect()
            # Known done: the messages before the first one that failed or did not run (an answered batch call
            # with an error holds messages Redis never ran).
            confirmed = next((i for i, result in enumerate(results) if isinstance(result, BaseException)), None)
            raise PublishIncomplete(
                f"publish to {self.safe_url} failed: {error}", len(results) if confirmed is None else confirmed
            ) from error
        except BaseException:
            await connection.disconnect()  # cancelled mid-read: unread replies must not reach the next caller
            raise
        finally:
            await pool.release(connection)
        return results

    async def last_event_ids(self, streams: Iterable[str]) -> dict[str, int]:
        names = list(dict.fromkeys(streams))
        if not names:
            return {}
        values = await self._command(
            "last event ids", self._require_client().mget([self.namer.keys(stream).event_id for stream in names])
        )
        found: dict[str, int] = {}
        for stream, value in zip(names, values, strict=True):
            if value is not None:
                try:
                    found[stream] = int(value)
                except ValueError:
                    continue  # not ours to interpret: publishing then starts without a duplicate filter
        return found

    async def publish_heartbeat(self, now_ms: int) -> None:
        await self._command("heartbeat", self._require_client().publish(self.namer.heartbeat_channel, b"%d" % now_ms))

    async def read_demand(self, now_s: float) -> set[str]:
        key = self.namer.demand_key
        pipe = self._require_client().pipeline(transaction=True)
        pipe.zremrangebyscore(key, "-inf", now_s)
        pipe.zrange(key, 0, -1)
        try:
            _, members = await pipe.execute()
        except redis_errors.RedisError as error:
            raise BrokerError(f"read demand from {self.safe_url}: {error}") from error
        return {member.decode() for member in members}

    async def put_exchange_info(self, document: bytes) -> None:
        await self._command("put exchangeInfo", self._require_client().set(self.namer.exchange_info_key, document))

    # ---- gateway side ----
    def set_listener(self, listener: BrokerListener) -> None:
        self._subscription.set_listener(listener)

    async def subscribe(self, streams: Iterable[str]) -> None:
        """Returns once Redis confirmed the new subscriptions, or at once while disconnected: the channels are
        then subscribed on reconnect, which ends with ``on_broker_reconnect``. Raises BrokerError if Redis
        refuses them (an ACL), and then does not keep them."""
        await self._subscription.subscribe(streams)

    async def unsubscribe(self, streams: Iterable[str]) -> None:
        """Delivery for these streams stops at once (messages already in flight are dropped)."""
        await self._subscription.unsubscribe(streams)

    async def history(self, stream: str, after_seq: int) -> list[Publication]:
        """Retained publications after ``after_seq``: at most ``history_maxlen`` (the stream is trimmed
        approximately, reads are exact) and none older than ``history_max_age_s`` by the publisher's clock."""
        key = self.namer.keys(stream).history
        entries = await self._command(
            "history", self._require_client().xrange(key, min=f"{max(after_seq, 0) + 1}-0", max="+")
        )
        oldest_ms = time.time_ns() // 1_000_000 - int(self.history_max_age_s * 1000)
        publications: list[Publication] = []
        for _entry_id, fields in entries or ():
            publication = self._decode(fields.get(HISTORY_FIELD))
            if publication is not None and publication.published_at_ms >= oldest_ms:
                publications.append(publication)
        return publications[-self.history_maxlen :]

    async def last_value(self, stream: str) -> Publication | None:
        data = await self._command("last value", self._require_client().get(self.namer.keys(stream).last))
        return None if data is None else self._decode(data)

    async def announce_demand(self, streams: Iterable[str], expires_at_s: float) -> None:
        mapping = {stream: expires_at_s for stream in streams}
        if mapping:
            # GT: a gateway with a shorter horizon never shortens another gateway's interest.
            await self._command("announce demand", self._require_client().zadd(self.namer.demand_key, mapping, gt=True))

    async def get_exchange_info(self) -> bytes | None:
        data = await self._command("get exchangeInfo", self._require_client().get(self.namer.exchange_info_key))
        return None if data is None else bytes(data)

    # ---- helpers ----
    async def _command(self, what: str, awaitable: Any) -> Any:
        try:
            return await awaitable
        except redis_errors.RedisError as error:
            raise BrokerError(f"{what} on {self.safe_url}: {error}") from error

    def _decode(self, data: bytes | None) -> Publication | None:
        if data is None:
            return None
        try:
            return decode_publication(data)
        except ValueError:
            self._malformed_reads += 1
            return None


class SentinelBroker(RedisBroker):
    """:class:`RedisBroker` on the master that Sentinels name (``redis+sentinel://s1:p1,s2:p2/<master>[/db]``). Every
    new connection asks the Sentinels where the master is, so after a failover the subscription's reconnect, and the
    next publish or command after a failed one, reach the promoted replica; a master demoted while a connection
    stays open answers ``READONLY``, which redis-py turns into a lost connection. Writes the old master confirmed but
    never replicated are handled by the publish script's floor and epoch (module docstring)."""

    def __init__(self, url: str, **kwargs: Any) -> None:
        super().__init__(url, seq_floors=True, **kwargs)
        target = parse_redis_url(url)
        if target.kind != "sentinel":
            raise ValueError(f"not a redis+sentinel:// URL: {self.safe_url}")
        self.target = target
        self._sentinel: Sentinel | None = None

    def _sentinels(self, options: dict[str, Any]) -> Sentinel:
        if self._sentinel is None:
            timeout = options.get("socket_timeout", self.socket_timeout_s)
            self._sentinel = Sentinel(  # type: ignore[no-untyped-call]  # untyped in redis-py
                list(self.target.nodes),
                sentinel_kwargs={"socket_timeout": timeout, "socket_connect_timeout": timeout},
                **options,
            )
        return self._sentinel

    def _data_options(self, options: dict[str, Any]) -> dict[str, Any]:
        data = dict(options, db=self.target.db)
        if self.target.password is not None:
            data["password"] = self.target.password
        if self.target.username is not None:
            data["username"] = self.target.username
        return data

    def _make_client(self, options: dict[str, Any]) -> aioredis.Redis:
        client: aioredis.Redis = self._sentinels(options).master_for(
            self.target.master_name, health_check_interval=self.health_check_interval_s, **self._data_options(options)
        )
        return client

    def _subscription_pool(self, options: dict[str, Any]) -> ConnectionPool:
        return SentinelConnectionPool(  # type: ignore[no-untyped-call]  # untyped in redis-py
            self.target.master_name, self._sentinels(options), protocol=2, **self._data_options(options)
        )

    def _explain(self, error: BaseException) -> str:
        sentinels = ",".join(f"{host}:{port}" for host, port in self.target.nodes)
        if "No master found" in str(error):
            return (
                f"no Sentinel of {sentinels} names a reachable master {self.target.master_name!r} "
                f"(is the name right, and are the Sentinels up?): {error}"
            )
        return f"the master Sentinels ({sentinels}) name for {self.target.master_name!r} does not answer: {error}"

    async def close(self) -> None:
        await super().close()
        sentinel, self._sentinel = self._sentinel, None
        if sentinel is not None:
            await sentinel.aclose()
