"""A Redis Cluster as pricegate talks to it: the slot map (which primary serves each slot, from ``CLUSTER SLOTS``), one
redis-py client per node, and single-key commands sent to the slot's primary with the cluster's redirections
handled: ``-MOVED`` (the slot lives elsewhere now: patch the map, look again soon), ``-ASK`` (this once, during a
migration: ``ASKING`` and the command on one connection), ``-TRYAGAIN`` and ``-CLUSTERDOWN`` (a migration or a
failover under way: wait a little), a lost connection (a node died: read the map again from any node that answers).

Why not redis-py's ``RedisCluster``: ingest pipelines its publish calls per node and must know exactly which of them
ran (a retried call would publish twice), gateways hold sharded subscriptions on connections of their own, and both
need the map that decided where a call went; one small map serves all of that, and the command path stays the few
lines below. :meth:`ClusterClient.check` is the start-up check whose answer an operator reads: no seed answers, a
seed that is no cluster node, a cluster that is down, a node too old for sharded Pub/Sub.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions as redis_errors

from shared.errors import BrokerError
from shared.redis.slots import SLOTS, Address, SlotMap, key_slot, redis_version

logger = logging.getLogger("shared.redis.cluster")

SHARDED_PUBSUB_VERSION = (7, 0)
ATTEMPT_DELAYS_S = (0.0, 0.05, 0.1, 0.2, 0.4, 0.8)  # a command's tries: about 1.5 s in all, a migration's step
REFRESH_MIN_INTERVAL_S = 0.1  # map reads requested closer together share one
# Answers that another try, after the map was read again or a short wait, may change.
_TRANSIENT = (redis_errors.TryAgainError, redis_errors.ClusterDownError, redis_errors.MasterDownError)
_UNREACHABLE = (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError)


def describe(address: Address) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ClusterClient:
    """The slot map and a client per node. ``options`` are redis-py connection options for every node (timeouts,
    credentials, no hidden retries); ``seeds`` are where to start."""

    def __init__(self, seeds: Sequence[Address], options: dict[str, Any], *, safe_url: str) -> None:
        self.seeds = tuple(seeds)
        self.options = options
        self.safe_url = safe_url
        self.map = SlotMap.empty()
        self.refreshes = 0  # full map reads that succeeded
        self.answered_by: Address | None = None  # the node whose map was read last
        self._clients: dict[Address, aioredis.Redis] = {}
        self._refresh_lock = asyncio.Lock()
        self._refreshed_at = 0.0
        self._failed_at: dict[Address, float] = {}  # when a node last failed to answer a map read

    # ---- nodes ----
    def node(self, address: Address) -> aioredis.Redis:
        client = self._clients.get(address)
        if client is None:
            host, port = address
            client = self._clients[address] = aioredis.Redis(host=host, port=port, **self.options)
        return client

    def owner(self, slot: int) -> Address:
        address = self.map.owner(slot)
        if address is None:
            raise BrokerError(f"hash slot {slot} is served by no primary of the cluster at {self.safe_url}")
        return address

    async def aclose(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.aclose()

    # ---- the map ----
    async def refresh(self) -> SlotMap:
        """Read ``CLUSTER SLOTS`` from the first node that answers (known primaries, other known nodes, then the
        seeds); raises BrokerError naming each node's failure if none does. Calls closer together than
        ``REFRESH_MIN_INTERVAL_S`` share one read."""
        requested = time.monotonic()
        async with self._refresh_lock:
            if self._refreshed_at >= requested - REFRESH_MIN_INTERVAL_S and self.map.covered():
                return self.map
            known = list(dict.fromkeys([*self.map.primaries, *self.map.nodes, *self.seeds]))
            # Nodes that failed lately go last: a dead host that drops packets costs a whole connect timeout.
            candidates = sorted(known, key=lambda address: self._failed_at.get(address, 0.0))
            failures: list[str] = []
            for address in candidates:
                try:
                    reply = await _command(self.node(address), "CLUSTER SLOTS")
                    slot_map = SlotMap.from_cluster_slots(reply, fallback_host=address[0])
                except redis_errors.ResponseError as error:
                    failures.append(f"{describe(address)}: {_not_a_cluster(error)}")
                    continue
                except (*_UNREACHABLE, ValueError) as error:
                    failures.append(f"{describe(address)}: {error!r}")
                    self._failed_at[address] = time.monotonic()
                    continue
                if not slot_map.covered() and len(candidates) > 1:
                    failures.append(f"{describe(address)}: serves no slot")
                    continue
                self.map = slot_map
                self.answered_by = address
                self._failed_at.pop(address, None)
                self._refreshed_at = time.monotonic()
                self.refreshes += 1
                return slot_map
            raise BrokerError(f"no node of the cluster answered ({'; '.join(failures)})")

    async def check(self) -> None:
        """At start: the map, the cluster's state and every node's version, each failure in one sentence."""
        await self.refresh()
        answering = self.answered_by
        assert answering is not None  # refresh() succeeded
        try:
            info = await _command(self.node(answering), "CLUSTER INFO")
        except (*_UNREACHABLE, redis_errors.RedisError) as error:
            raise BrokerError(f"CLUSTER INFO on {describe(answering)} failed: {error!r}") from error
        state = _field(_info_text(info), "cluster_state")
        if state != "ok":
            raise BrokerError(
                f"the cluster is down (CLUSTERDOWN: cluster_state:{state} on {describe(answering)}, "
                f"{self.map.covered()} of {SLOTS} hash slots served by a primary)"
            )
        for address in self.map.nodes:
            try:
                server = await _command(self.node(address), "INFO", "server")
            except _UNREACHABLE:
                if address in self.map.primaries:
                    raise BrokerError(f"primary {describe(address)} does not answer") from None
                continue  # a replica that is down: checked when it answers (it is no one's source today)
            version = redis_version(_info_text(server))
            if version < SHARDED_PUBSUB_VERSION:
                shown = ".".join(str(part) for part in version)
                raise BrokerError(
                    f"Redis {shown} at {describe(address)} has no sharded Pub/Sub (SPUBLISH/SSUBSCRIBE need Redis "
                    "7.0 or later on every node of the cluster)"
                )

    # ---- commands ----
    async def execute(self, key: bytes | str, *args: Any, delays: Sequence[float] = ATTEMPT_DELAYS_S) -> Any:
        """One command on the primary of ``key``'s slot, redirections and short outages handled (module docstring);
        raises BrokerError once the tries (one per entry of ``delays``, after that pause) are spent, or at once for
        any other error reply."""
        slot = key_slot(key)
        asking: Address | None = None
        last: BaseException | None = None
        for delay in delays:
            if delay:
                await asyncio.sleep(delay)
            try:
                if asking is not None:
                    pipe = self.node(asking).pipeline(transaction=False)
                    pipe.execute_command("ASKING")
                    pipe.execute_command(*args)
                    asking = None
                    return (await pipe.execute())[1]
                if self.map.owner(slot) is None:
                    await self.refresh()
                return await _command(self.node(self.owner(slot)), *args)
            except redis_errors.AskError as error:
                asking, last = (error.host, error.port), error
            except redis_errors.MovedError as error:
                self.map.moved_to(slot, (error.host, error.port))
                last = error
            except _TRANSIENT as error:
                last = error
            except _UNREACHABLE as error:
                last = error
                try:
                    await self.refresh()
                except BrokerError:
                    pass  # the next try reads it again
            except redis_errors.RedisError as error:
                raise BrokerError(f"{args[0]} on {self.safe_url}: {error}") from error
        raise BrokerError(f"{args[0]} on {self.safe_url}: {last!r}") from last


async def _command(client: aioredis.Redis, *args: Any) -> Any:
    return await client.execute_command(*args)  # type: ignore[no-untyped-call]  # untyped in redis-py


def _not_a_cluster(error: redis_errors.ResponseError) -> str:
    text = str(error)
    if "cluster support disabled" in text or "unknown command" in text.lower():
        return f"not a Redis Cluster node ({text}): for one server use redis://host:port/0"
    return text


def _info_text(reply: Any) -> str:
    if isinstance(reply, dict):  # redis-py parses INFO into a dict
        return "\n".join(f"{key}:{value}" for key, value in reply.items())
    return reply.decode(errors="replace") if isinstance(reply, bytes) else str(reply)


def _field(text: str, name: str) -> str:
    for line in text.splitlines():
        if line.startswith(name + ":"):
            return line.partition(":")[2].strip()
    return "?"
