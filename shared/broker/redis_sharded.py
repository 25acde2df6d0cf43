"""The gateway's sharded subscriptions on a Redis Cluster: one subscription connection per primary that serves a
wanted stream's slot (:class:`shared.broker.redis_subscription.RedisSubscription` in its sharded mode, the same fast
reader), each stream's shard channel (``SSUBSCRIBE <base>:{<stream>}``) on the connection of the primary that serves
its slot, and the heartbeat's on the primary of its own slot.

Where a slot lives changes: a migration (the node pushes ``sunsubscribe`` for the slot's channels, and a late
``SSUBSCRIBE`` is answered ``-MOVED``) or a failover (the primary's connection is lost; its replica takes over).
Either way the channels concerned are given up, the slot map is read again (:class:`shared.redis.cluster
.ClusterClient`), each channel is subscribed where its slot lives now, retried with backoff while no primary serves
it, and once every channel is held again the listener's ``on_broker_reconnect`` runs, so the relay repairs each
stream from its history on the shard that now serves it: nothing is delivered twice or out of order, and what the
new primary's history lacks (writes its old primary confirmed but never replicated) is counted as lost by the relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from typing import Any

import redis.exceptions as redis_errors
from redis.asyncio.connection import ConnectionPool

from shared.backoff import backoff_delays
from shared.broker.contract import BrokerListener
from shared.broker.redis_subscription import RedisSubscription
from shared.errors import BrokerError
from shared.redis.cluster import ClusterClient, describe
from shared.redis.slots import Address, key_slot
from shared.streams import ChannelNamer

logger = logging.getLogger("shared.broker.redis")

PLACE_ATTEMPTS = 6  # map reads while subscribing one set of channels before the caller is told it failed
HEARTBEAT = ""  # the stream name the heartbeat channel is held under


class ShardedSubscriptions:
    """Every wanted shard channel held on the connection of the primary serving its slot (module docstring).
    Counters are plain ints for the metrics layer."""

    def __init__(
        self,
        cluster: ClusterClient,
        namer: ChannelNamer,
        options: dict[str, Any],
        *,
        socket_timeout_s: float,
        health_check_interval_s: float,
        reconnect_initial_s: float,
        reconnect_max_s: float,
    ) -> None:
        self.socket_timeout_s = socket_timeout_s
        self.health_check_interval_s = health_check_interval_s
        self.reconnect_initial_s = reconnect_initial_s
        self.reconnect_max_s = reconnect_max_s
        self.reconnects = 0  # times every channel was held again after a loss or a move
        self.moves = 0  # channels whose slot moved to another node (a migration or a failover)
        self.failure: BaseException | None = None  # a fatal error of one of the readers (e.g. an ACL refusal)
        self.problem: str | None = None  # why some channel is not held now (for /readyz)
        self.task: asyncio.Task[None] | None = None  # the task that puts channels back where their slot lives

        self._cluster = cluster
        self._namer = namer
        self._options = options
        self._listener: BrokerListener | None = None
        self._heartbeat = namer.heartbeat_channel.encode()
        self._wanted: dict[bytes, str] = {self._heartbeat: HEARTBEAT}
        self._connections: dict[Address, RedisSubscription] = {}
        self._retired = [0, 0]  # malformed messages, listener errors of connections closed since
        self._changed = asyncio.Event()
        self._lock = asyncio.Lock()
        self._repair_due = False  # some channel was given up: the listener repairs once all are back
        self._open = False

    # ---- state ----
    @property
    def connected(self) -> bool:
        if not self._open or self._changed.is_set():
            return False
        for channel in self._wanted:
            if self._holder(channel) is None:
                return False
        return True

    @property
    def malformed_messages(self) -> int:
        return self._retired[0] + sum(c.malformed_messages for c in self._connections.values())

    @property
    def listener_errors(self) -> int:
        return self._retired[1] + sum(c.listener_errors for c in self._connections.values())

    def subscriptions(self) -> dict[Address, list[str]]:
        """Streams held per node (the heartbeat as ``""``), for tests and operators."""
        return {address: sorted(c.channels.values()) for address, c in self._connections.items() if c.connected}

    def _holder(self, channel: bytes) -> RedisSubscription | None:
        for connection in self._connections.values():
            if connection.connected and channel in connection.channels:
                return connection
        return None

    def set_listener(self, listener: BrokerListener) -> None:
        self._listener = listener
        for connection in self._connections.values():
            connection.set_listener(listener)

    # ---- lifecycle ----
    async def open(self) -> None:
        """Subscribe every wanted channel (the heartbeat at least) and start the task that keeps them placed."""
        async with self._lock:
            await self._place(list(self._wanted))
        self._open = True
        self.task = asyncio.create_task(self._keep_placed(), name="pricegate-redis-shards")

    async def close(self) -> None:
        self._open = False
        task, self.task = self.task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for address in list(self._connections):
            await self._retire(address)

    # ---- channels ----
    async def subscribe(self, streams: Iterable[str]) -> None:
        """Returns once every stream's channel is held where its slot lives; raises BrokerError if some is not (the
        caller retries: a channel wanted but not held is placed again by the next call)."""
        new = {self._namer.channel(stream).encode(): stream for stream in streams}
        self._wanted.update(new)
        if not self._open:
            return  # placed at open()
        async with self._lock:
            await self._place([channel for channel in new if self._holder(channel) is None])

    async def unsubscribe(self, streams: Iterable[str]) -> None:
        gone = [self._namer.channel(stream).encode() for stream in streams]
        for channel in gone:
            self._wanted.pop(channel, None)
        async with self._lock:
            for connection in list(self._connections.values()):
                mine = [channel for channel in gone if channel in connection.channels]
                if mine:
                    await connection.unsubscribe_channels(mine)

    # ---- placing ----
    async def _place(self, channels: list[bytes]) -> None:
        """Subscribe ``channels`` (those still wanted) where their slots live; raises BrokerError if some are still
        not held after ``PLACE_ATTEMPTS`` reads of the map."""
        delays = backoff_delays(self.reconnect_initial_s, self.reconnect_max_s)
        failures: list[str] = []
        for attempt in range(PLACE_ATTEMPTS):
            missing = [c for c in channels if c in self._wanted and self._holder(c) is None]
            if not missing:
                return
            if attempt:
                await asyncio.sleep(next(delays))
            if attempt or any(self._cluster.map.owner(key_slot(c)) is None for c in missing):
                try:
                    await self._cluster.refresh()
                except BrokerError as error:
                    failures.append(str(error))
                    continue
            by_node: dict[Address, dict[bytes, str]] = {}
            for channel in missing:
                owner = self._cluster.map.owner(key_slot(channel))
                if owner is None:
                    failures.append(f"hash slot {key_slot(channel)} is served by no primary")
                    continue
                by_node.setdefault(owner, {})[channel] = self._wanted[channel]
            for address, wanted in by_node.items():
                self._drop_elsewhere(address, wanted)
                try:
                    await self._subscribe_on(address, wanted)
                except (BrokerError, OSError, redis_errors.RedisError) as error:
                    failures.append(f"{describe(address)}: {error!r}")
                    await self._retire(address)
        missing = [c for c in channels if c in self._wanted and self._holder(c) is None]
        if missing:
            self.problem = (
                f"{len(missing)} shard channel(s) not subscribed (e.g. {missing[0].decode(errors='replace')}): "
                + "; ".join(failures[-3:])
            )
            raise BrokerError(f"sharded subscription failed: {self.problem}")

    def _drop_elsewhere(self, address: Address, wanted: dict[bytes, str]) -> None:
        """A channel moving to ``address`` is forgotten by any other connection (its node gave it up already)."""
        for other, connection in self._connections.items():
            if other != address:
                for channel in wanted:
                    connection.channels.pop(channel, None)

    async def _subscribe_on(self, address: Address, wanted: dict[bytes, str]) -> None:
        connection = self._connections.get(address)
        if connection is not None and (connection.task is None or connection.task.done()):
            await self._retire(address)  # lost (its owner is told; a late look may come first)
            connection = None
        if connection is None:
            connection = RedisSubscription(
                self._namer,
                safe_url=f"redis://{describe(address)}",
                socket_timeout_s=self.socket_timeout_s,
                health_check_interval_s=self.health_check_interval_s,
                reconnect_initial_s=self.reconnect_initial_s,
                reconnect_max_s=self.reconnect_max_s,
                sharded=True,
                slot_of=key_slot,
                on_lost=self._lost,
                on_moved=self._moved,
            )
            if self._listener is not None:
                connection.set_listener(self._listener)
            for channel, stream in wanted.items():
                connection.add_channel(channel, stream)
            self._connections[address] = connection
            host, port = address
            await connection.open(ConnectionPool(host=host, port=port, protocol=2, **self._options))
            return
        await connection.subscribe_channels(wanted)

    async def _retire(self, address: Address) -> None:
        connection = self._connections.pop(address, None)
        if connection is None:
            return
        self._retired[0] += connection.malformed_messages
        self._retired[1] += connection.listener_errors
        if connection.failure is not None and not isinstance(connection.failure, BrokerError):
            self.failure = connection.failure
        await connection.close()

    # ---- where slots went ----
    def _lost(self, connection: RedisSubscription, error: BaseException) -> None:
        """A shard's connection broke (a node died, or the network): every channel it held is placed again."""
        self.problem = connection.problem
        self._repair_due = True
        self._changed.set()

    def _moved(self, connection: RedisSubscription, channels: list[bytes], why: str) -> None:
        """A node gave channels up (its slot left it) or refused them (``-MOVED``): placed again."""
        self.moves += len(channels)
        logger.info("%d shard channel(s) to place again (%s)", len(channels), why)
        self._repair_due = True
        self._changed.set()

    async def _keep_placed(self) -> None:
        """Forever: when a connection was lost or a slot moved, put every wanted channel where its slot lives now,
        with backoff while that fails; then tell the listener (the relay repairs from history)."""
        delays = backoff_delays(self.reconnect_initial_s, self.reconnect_max_s)
        while True:
            await self._changed.wait()
            started = time.monotonic()
            self._changed.clear()
            try:
                async with self._lock:
                    for address, connection in list(self._connections.items()):
                        if connection.task is None or connection.task.done():
                            await self._retire(address)
                    await self._place(list(self._wanted))
                    for address, connection in list(self._connections.items()):
                        if not connection.channels:
                            await self._retire(address)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                delay = next(delays)
                logger.warning("shard subscriptions not all placed (%s); again in %.2f s", error, delay)
                await asyncio.sleep(delay)
                self._changed.set()
                continue
            delays = backoff_delays(self.reconnect_initial_s, self.reconnect_max_s)
            self.problem = None
            if self._repair_due and not self._changed.is_set():
                self._repair_due = False
                self.reconnects += 1
                logger.info(
                    "shard subscriptions placed again in %.2f s (%d channels on %d nodes)",
                    time.monotonic() - started,
                    len(self._wanted),
                    len(self._connections),
                )
                listener = self._listener
                if listener is not None:
                    try:
                        listener.on_broker_reconnect()
                    except Exception:
                        logger.exception("broker listener failed in on_broker_reconnect")
