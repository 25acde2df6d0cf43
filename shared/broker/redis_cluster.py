"""Redis Cluster broker (``redis+cluster://h1:p1,h2:p2,h3:p3/``): the same :class:`shared.broker.contract.Broker` and
wire contract as :mod:`shared.broker.redis`, with sharded Pub/Sub (Redis 7 or later).

- **Per stream, one shard.** Every key of a stream and its channel share the ``{<stream>}`` hash tag, so the publish
  script runs on the primary serving that slot and ``SPUBLISH``es there; only that shard (primary and replicas)
  carries the message, never the whole cluster as a classic ``PUBLISH`` would.
- **Publishing** groups a batch by primary, one pipeline per primary (concurrently), replies read one by one, so it
  knows exactly which calls ran. ``-MOVED`` (the slot moved: the map is patched and read again), ``-ASK`` (a
  migration: ``ASKING`` then the call, on the target), ``-TRYAGAIN``/``-CLUSTERDOWN`` (a migration's step, a
  failover) and ``NOSCRIPT`` (a node that never ran the script) are refusals before the script ran, so those calls
  are sent again, each stream's in order and to one place, for a second or so; what still failed is reported as
  :class:`shared.broker.outcome.PartiallyPublished` (the publisher holds and retries it). A lost connection leaves
  the calls it did not answer unconfirmed: a killed node never ran them.
- **Fencing** cannot read the lease (another slot): each slot has a fence key (``<base>:fence:{<tag>}``, the tag
  chosen so the key lands in that slot) holding the highest fencing epoch announced; a new leader raises it in every
  slot before publishing (:meth:`ClusterBroker.take_fencing_epoch`), so a deposed or paused one is refused on every
  shard from then on.
- **Gateways** hold one sharded subscription connection per primary they need
  (:mod:`shared.broker.redis_sharded`), and read history, last values and the rest from the slot's primary.
- **Keys that are no stream's** (demand, exchangeInfo, the heartbeat channel, the lease) keep their names: each is
  one key (or channel) and lives in the slot of its own name; no command touches two of them.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Iterable, Sequence
from typing import Any

import redis.exceptions as redis_errors
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from shared.broker.contract import BrokerListener, OutgoingMessage
from shared.broker.outcome import PartiallyPublished
from shared.broker.redis import PublishCalls
from shared.broker.redis_sharded import ShardedSubscriptions
from shared.errors import BrokerError, NotLeaderError
from shared.frames import Publication, decode_publication
from shared.redaction import redact_url
from shared.redis.cluster import ClusterClient, describe
from shared.redis.resp import pack_command
from shared.redis.scripts import FENCE_MEMBER, HISTORY_FIELD, NOT_LEADER, PUBLISH_KEYS, PUBLISH_SCRIPT
from shared.redis.slots import SLOTS, Address, fence_tags, key_slot
from shared.redis.urls import parse_redis_url
from shared.streams import ChannelNamer

logger = logging.getLogger("shared.broker.redis")

# Pauses between rounds of a publish whose calls were refused before running (a migration's step, a failover):
# about 1.5 s in all, then what is left is reported and the publisher retries it with its own backoff.
ROUND_DELAYS_S = (0.0, 0.01, 0.05, 0.1, 0.2, 0.4, 0.8)
UNREACHABLE_ROUNDS = 2  # rounds a node may fail to answer before its calls are reported unconfirmed
_AGAIN = (redis_errors.TryAgainError, redis_errors.ClusterDownError, redis_errors.MasterDownError)
_UNREACHABLE = (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError)


class _Unanswered(Exception):
    """A call sent on a connection that broke before its reply: not run, if the node died."""


class ClusterBroker:
    """A :class:`shared.broker.contract.Broker` on a Redis Cluster. Counters are plain ints for the metrics layer."""

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
        reconnect_max_s: float = 1.0,
    ) -> None:
        if history_maxlen < 1:
            raise ValueError(f"history_maxlen must be >= 1, got {history_maxlen!r}")
        target = parse_redis_url(url)
        if target.kind != "cluster":
            raise ValueError(f"not a redis+cluster:// URL: {redact_url(url)}")
        self.url = url
        self.safe_url = redact_url(url)
        self.namer = ChannelNamer(prefix, venue)
        self.history_maxlen = history_maxlen
        self.history_max_age_s = history_max_age_s
        self.socket_timeout_s = socket_timeout_s
        self.duplicates_dropped = 0
        self.fencing_epoch: int | None = None
        self.publish_rounds = 0  # extra rounds publishing needed (refusals before the script ran)

        options: dict[str, Any] = {
            "decode_responses": False,
            "socket_timeout": socket_timeout_s,
            "socket_connect_timeout": socket_timeout_s,
            "socket_keepalive": True,
            # No hidden retries: a retried pipeline could publish a batch twice. The rounds below are the policy.
            "retry": Retry(NoBackoff(), 0),
        }
        if target.username is not None:
            options["username"] = target.username
        if target.password is not None:
            options["password"] = target.password
        self._cluster = ClusterClient(target.nodes, options, safe_url=self.safe_url)
        self._calls = PublishCalls(self.namer, sharded=True, floors=True)
        self._script_sha = ""
        self._started = False
        self._malformed_reads = 0
        self._fence_keys: tuple[str, ...] = ()
        self._subscriptions = ShardedSubscriptions(
            self._cluster,
            self.namer,
            options,
            socket_timeout_s=socket_timeout_s,
            health_check_interval_s=health_check_interval_s,
            reconnect_initial_s=reconnect_initial_s,
            reconnect_max_s=reconnect_max_s,
        )

    # ---- state for metrics, health and tests ----
    @property
    def connected(self) -> bool:
        return self._started and self._subscriptions.connected

    @property
    def problem(self) -> str | None:
        """Why the subscription side is down (for ``/readyz``), or None while it is live."""
        if self.connected:
            return None
        return self._subscriptions.problem or "shard subscriptions being placed"

    @property
    def malformed_messages(self) -> int:
        return self._subscriptions.malformed_messages + self._malformed_reads

    @property
    def reconnects(self) -> int:
        return self._subscriptions.reconnects

    @property
    def listener_errors(self) -> int:
        return self._subscriptions.listener_errors

    @property
    def subscriber_client_id(self) -> int | None:
        return None  # one connection per shard: see shard_subscriptions()

    @property
    def reader_task(self) -> asyncio.Task[None] | None:
        return self._subscriptions.task

    @property
    def failure(self) -> BaseException | None:
        return self._subscriptions.failure

    @property
    def cluster(self) -> ClusterClient:
        return self._cluster

    def shard_subscriptions(self) -> dict[Address, list[str]]:
        """Streams subscribed per primary (the heartbeat as ``""``)."""
        return self._subscriptions.subscriptions()

    # ---- lifecycle ----
    async def start(self) -> None:
        if self._started:
            raise BrokerError("ClusterBroker.start() called twice")
        try:
            await self._cluster.check()
            self._script_sha = await self._load_script(self._cluster.map.primaries)
            tags = fence_tags()
            self._fence_keys = tuple(self.namer.slot_fence_key(tag) for tag in tags)
            await self._subscriptions.open()
        except (BrokerError, redis_errors.RedisError, OSError) as error:
            await self._subscriptions.close()
            await self._cluster.aclose()
            # Worded to follow the CLI's "PRICEGATE_REDIS_URL=...: cannot reach Redis: " prefix.
            raise BrokerError(f"Redis at {self.safe_url}: {error}") from error
        self._started = True

    async def close(self) -> None:
        self._started = False
        await self._subscriptions.close()
        await self._cluster.aclose()

    async def _load_script(self, nodes: Iterable[Address]) -> str:
        sha = ""
        for address in nodes:
            sha = str(await self._cluster.node(address).script_load(PUBLISH_SCRIPT))
        return sha

    def _require_started(self) -> None:
        if not self._started:
            raise BrokerError("ClusterBroker is not started")

    # ---- ingest side ----
    async def publish(
        self, messages: Sequence[OutgoingMessage], *, fencing_token: str | None = None
    ) -> list[Publication]:
        if not messages:
            return []
        self._require_started()
        if fencing_token and self.fencing_epoch is None:
            raise NotLeaderError(f"publish to {self.safe_url} refused: no fencing epoch announced by this process")
        published_at_ms = time.time_ns() // 1_000_000
        candidate_epoch = random.randrange(1, 2**31)
        ttl_ms = max(0, int(self.history_max_age_s * 1000))
        epoch = self.fencing_epoch if fencing_token else None
        slots: list[int] = []
        calls: list[tuple[Any, ...]] = []
        for message in messages:
            keys = self.namer.keys(message.stream)
            slot = key_slot(keys.channel)
            slots.append(slot)
            fence = self._fence_keys[slot]
            calls.append(
                self._calls.args(
                    message,
                    keys,
                    lease_key=fence,  # never read: the lease is in another slot, the token check is not used here
                    fence_key=fence,
                    candidate_epoch=candidate_epoch,
                    published_at_ms=published_at_ms,
                    history_maxlen=self.history_maxlen,
                    ttl_ms=ttl_ms,
                    token="",
                    fencing_epoch=epoch,
                )
            )
        results = await self._run_rounds(messages, slots, calls)
        publications: list[Publication] = []
        unconfirmed: list[int] = []
        refused: tuple[int, BaseException] | None = None
        for index, (message, result) in enumerate(zip(messages, results, strict=True)):
            if isinstance(result, BaseException):
                if refused is None and str(result).startswith(NOT_LEADER):
                    refused = (index, result)
                unconfirmed.append(index)
                continue
            if result == 0:
                self.duplicates_dropped += 1
                continue
            epoch_now, seq = int(result[0]), int(result[1])
            self._calls.answered(message.stream, epoch_now, seq)
            publications.append(Publication(epoch_now, seq, published_at_ms, message.payload))
        done = len(messages) - len(unconfirmed)
        if refused is not None:
            index, error = refused
            raise NotLeaderError(
                f"publish to {self.safe_url} refused from {messages[index].stream!r} on: {error} "
                f"({done}/{len(messages)} of the batch were published)"
            ) from error
        if unconfirmed:
            first = results[unconfirmed[0]]
            raise PartiallyPublished(
                f"publish to {self.safe_url}: {len(unconfirmed)}/{len(messages)} of the batch not confirmed "
                f"(e.g. {messages[unconfirmed[0]].stream!r}: {first!r})",
                unconfirmed,
            )
        return publications

    async def _run_rounds(
        self, messages: Sequence[OutgoingMessage], slots: list[int], calls: list[tuple[Any, ...]]
    ) -> list[Any]:
        """Every call sent where its slot lives, again while refused before running (module docstring). Returns per
        call the script's answer or the exception that stands for it."""
        results: list[Any] = [_Unanswered("not sent")] * len(calls)
        pending = list(range(len(calls)))
        asking: dict[int, Address] = {}
        unreachable: dict[Address, int] = {}
        for delay in ROUND_DELAYS_S:
            if delay:
                await asyncio.sleep(delay)
                self.publish_rounds += 1
            # Each stream's pending calls go where its first one goes, in order: a later call must never run first.
            by_node: dict[Address, list[int]] = {}
            route: dict[str, Address] = {}
            asked: set[str] = set()
            for index in pending:
                stream = messages[index].stream
                address = route.get(stream)
                if address is None:
                    address = asking.get(index) or self._cluster.map.owner(slots[index])
                    if address is None:
                        results[index] = BrokerError(f"hash slot {slots[index]} is served by no primary")
                        continue
                    route[stream] = address
                    if index in asking:
                        asked.add(stream)
                if stream in asked:
                    asking[index] = address  # the whole stream follows its first call's redirection
                by_node.setdefault(address, []).append(index)
            answers = await asyncio.gather(
                *(self._pipeline(address, indices, calls, asking) for address, indices in by_node.items())
            )
            again: list[int] = []
            next_asking: dict[int, Address] = {}
            refresh = False
            reload: set[Address] = set()
            for (address, indices), replies in zip(by_node.items(), answers, strict=True):
                lost = False
                for index, reply in zip(indices, replies, strict=True):
                    results[index] = reply
                    if not isinstance(reply, BaseException):
                        continue
                    if isinstance(reply, redis_errors.AskError):
                        next_asking[index] = (reply.host, reply.port)
                    elif isinstance(reply, redis_errors.MovedError):
                        self._cluster.map.moved_to(reply.slot_id, (reply.host, reply.port))
                        refresh = True
                    elif isinstance(reply, redis_errors.NoScriptError):
                        reload.add(address)
                    elif isinstance(reply, _AGAIN):
                        refresh = refresh or isinstance(reply, redis_errors.ClusterDownError)
                    elif isinstance(reply, _Unanswered):
                        lost = True
                        continue  # decided below, per node
                    else:
                        continue  # the script's own error (NOTLEADER) or another refusal: not sent again
                    again.append(index)
                if lost:
                    unreachable[address] = unreachable.get(address, 0) + 1
                    refresh = True
                    if unreachable[address] < UNREACHABLE_ROUNDS:
                        again += [i for i in indices if isinstance(results[i], _Unanswered)]
            pending = sorted(again)
            asking = next_asking
            if not pending:
                break
            for address in reload:
                try:
                    await self._load_script([address])
                except (redis_errors.RedisError, OSError):
                    refresh = True
            if refresh:
                try:
                    await self._cluster.refresh()
                except BrokerError as error:
                    logger.debug("cluster map not read (%s)", error)
        return results

    async def _pipeline(
        self, address: Address, indices: list[int], calls: list[tuple[Any, ...]], asking: dict[int, Address]
    ) -> list[Any]:
        """One round trip to one node: its calls (each after ``ASKING`` when redirected so), replies read one by
        one; a broken connection leaves the unread ones :class:`_Unanswered`."""
        pool = self._cluster.node(address).connection_pool
        replies: list[Any] = []
        try:
            connection = await pool.get_connection()  # type: ignore[no-untyped-call]  # untyped in redis-py
        except (redis_errors.RedisError, OSError) as error:
            return [_Unanswered(f"{describe(address)}: {error!r}")] * len(indices)
        try:
            commands: list[tuple[Any, ...]] = []
            for index in indices:
                if index in asking:
                    commands.append(("ASKING",))
                commands.append(("EVALSHA", self._script_sha, PUBLISH_KEYS, *calls[index]))
            await connection.send_packed_command(connection.pack_commands(commands))
            for index in indices:
                if index in asking:
                    try:
                        await connection.read_response()
                    except redis_errors.ResponseError:
                        pass  # the call after it answers for itself
                try:
                    replies.append(await connection.read_response())
                except redis_errors.ResponseError as error:  # read in full: the connection stays in step
                    replies.append(error)
        except (redis_errors.RedisError, OSError) as error:  # OSError includes TimeoutError
            await connection.disconnect()
            replies += [_Unanswered(f"{describe(address)}: {error!r}")] * (len(indices) - len(replies))
        except BaseException:
            await connection.disconnect()  # cancelled mid-read: unread replies must not reach the next caller
            raise
        finally:
            await pool.release(connection)
        return replies

    async def take_fencing_epoch(self, epoch: int) -> None:
        """Announce ``epoch`` in every slot's fence (``ZADD GT``, read back), then publish fenced with it. Raises
        BrokerError unless every slot took it: only then is every publisher with a lower epoch refused everywhere; and
        if some slot holds a higher one (a later leader's, which this process's lease outlived only because Redis lost
        writes), so the lease is given up and the next acquisition draws a higher epoch."""
        self._require_started()
        await self._cluster.refresh()
        by_node: dict[Address, list[int]] = {}
        missing: list[int] = []
        for slot in range(SLOTS):
            owner = self._cluster.map.owner(slot)
            if owner is None:
                missing.append(slot)
            else:
                by_node.setdefault(owner, []).append(slot)
        answers = await asyncio.gather(*(self._stamp(address, slots, epoch) for address, slots in by_node.items()))
        highest = 0.0
        for slots, scores in zip(by_node.values(), answers, strict=True):
            for slot, score in zip(slots, scores, strict=True):
                if score is None:
                    missing.append(slot)  # moved meanwhile, or its node failing over
                else:
                    highest = max(highest, score)
        for slot in missing:  # one by one, redirections handled
            key = self._fence_keys[slot]
            await self._cluster.execute(key, "ZADD", key, "GT", epoch, FENCE_MEMBER)
            score = await self._cluster.execute(key, "ZSCORE", key, FENCE_MEMBER)
            highest = max(highest, float(score or 0))
        if highest > epoch:
            raise BrokerError(f"fencing epoch {epoch} is below {highest:.0f}, a later leader's, at {self.safe_url}")
        self.fencing_epoch = epoch

    async def _stamp(self, address: Address, slots: list[int], epoch: int) -> list[float | None]:
        """``ZADD GT`` then ``ZSCORE`` on each slot's fence of one node, in one round trip: per slot the fence's epoch
        afterwards, or None where the node refused (or did not answer)."""
        pool = self._cluster.node(address).connection_pool
        member = FENCE_MEMBER
        epoch_bytes = b"%d" % epoch
        packed = b"".join(
            pack_command(b"ZADD", key, b"GT", epoch_bytes, member) + pack_command(b"ZSCORE", key, member)
            for key in (self._fence_keys[slot].encode() for slot in slots)
        )
        scores: list[float | None] = []
        try:
            connection = await pool.get_connection()  # type: ignore[no-untyped-call]  # untyped in redis-py
        except (redis_errors.RedisError, OSError):
            return [None] * len(slots)
        try:
            await connection.send_packed_command(packed)
            for _ in slots:
                answered = True
                score: Any = None
                for _command in range(2):  # ZADD, then ZSCORE
                    try:
                        score = await connection.read_response()
                    except redis_errors.ResponseError:  # read in full: the connection stays in step
                        answered = False
                scores.append(float(score) if answered and score is not None else None)
        except (redis_errors.RedisError, OSError):
            await connection.disconnect()
            scores += [None] * (len(slots) - len(scores))
        except BaseException:
            await connection.disconnect()
            raise
        finally:
            await pool.release(connection)
        return scores

    async def last_event_ids(self, streams: Iterable[str]) -> dict[str, int]:
        self._require_started()
        names = list(dict.fromkeys(streams))
        found: dict[str, int] = {}
        by_slot: dict[int, list[str]] = {}
        for stream in names:
            by_slot.setdefault(key_slot(self.namer.channel(stream)), []).append(stream)

        async def read(group: list[str]) -> None:
            keys = [self.namer.keys(stream).event_id for stream in group]
            values = await self._cluster.execute(keys[0], "MGET", *keys)
            for stream, value in zip(group, values, strict=True):
                if value is not None:
                    try:
                        found[stream] = int(value)
                    except ValueError:
                        continue  # not ours to interpret: publishing then starts without a duplicate filter

        await asyncio.gather(*(read(group) for group in by_slot.values()))
        return found

    async def publish_heartbeat(self, now_ms: int) -> None:
        self._require_started()
        channel = self.namer.heartbeat_channel
        await self._cluster.execute(channel, "SPUBLISH", channel, b"%d" % now_ms)

    async def read_demand(self, now_s: float) -> set[str]:
        self._require_started()
        key = self.namer.demand_key
        await self._cluster.execute(key, "ZREMRANGEBYSCORE", key, "-inf", now_s)
        members = await self._cluster.execute(key, "ZRANGE", key, 0, -1)
        return {member.decode() for member in members}

    async def put_exchange_info(self, document: bytes) -> None:
        self._require_started()
        key = self.namer.exchange_info_key
        await self._cluster.execute(key, "SET", key, document)

    # ---- gateway side ----
    def set_listener(self, listener: BrokerListener) -> None:
        self._subscriptions.set_listener(listener)

    async def subscribe(self, streams: Iterable[str]) -> None:
        """Returns once the stream's shard confirmed the subscriptions; raises BrokerError while no primary serves
        a stream's slot (the relay retries with backoff)."""
        await self._subscriptions.subscribe(streams)

    async def unsubscribe(self, streams: Iterable[str]) -> None:
        await self._subscriptions.unsubscribe(streams)

    async def history(self, stream: str, after_seq: int) -> list[Publication]:
        self._require_started()
        key = self.namer.keys(stream).history
        entries = await self._cluster.execute(key, "XRANGE", key, f"{max(after_seq, 0) + 1}-0", "+")
        oldest_ms = time.time_ns() // 1_000_000 - int(self.history_max_age_s * 1000)
        publications: list[Publication] = []
        for _entry_id, fields in entries or ():
            publication = self._decode(fields.get(HISTORY_FIELD))
            if publication is not None and publication.published_at_ms >= oldest_ms:
                publications.append(publication)
        return publications[-self.history_maxlen :]

    async def last_value(self, stream: str) -> Publication | None:
        self._require_started()
        key = self.namer.keys(stream).last
        data = await self._cluster.execute(key, "GET", key)
        return None if data is None else self._decode(data)

    async def announce_demand(self, streams: Iterable[str], expires_at_s: float) -> None:
        self._require_started()
        pairs: list[Any] = []
        for stream in streams:
            pairs += [expires_at_s, stream]
        if pairs:
            key = self.namer.demand_key
            # GT: a gateway with a shorter horizon never shortens another gateway's interest.
            await self._cluster.execute(key, "ZADD", key, "GT", *pairs)

    async def get_exchange_info(self) -> bytes | None:
        self._require_started()
        key = self.namer.exchange_info_key
        data = await self._cluster.execute(key, "GET", key)
        return None if data is None else bytes(data)

    def _decode(self, data: bytes | None) -> Publication | None:
        if data is None:
            return None
        try:
            return decode_publication(data)
        except ValueError:
            self._malformed_reads += 1
            return None
