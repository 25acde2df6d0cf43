"""Broker -> hub: one broker subscription per stream that local clients need, in order, gaps repaired.

Sessions tell the relay when a stream gains its first local subscriber (:meth:`Relay.want`) or loses its last
(:meth:`Relay.unwant`); a single reconciler task turns the difference between *wanted* and *active* into broker
subscribe/unsubscribe calls, so 1 000 local clients on one stream are one broker subscription and racing
want/unwant calls can never leave a stale subscription behind. Wanted streams are announced as demand so
ingest starts them upstream.

Every publication carries ``(epoch, seq)``. The relay delivers seq+1 at once; drops duplicates; on a gap (or
after the broker reconnects) it buffers the stream's new messages, reads the missed ones from the broker's
history, delivers them in order, then the buffer. What history cannot cover is counted as lost. A new epoch (the
broker lost the channel's state) restarts the sequence at 1; new-epoch messages missed before the first one seen
are repaired from the new epoch's history the same way. Delivery never
awaits: :meth:`on_publication` queues frames in the hub and schedules one flush per loop turn.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from gateway.metrics import GatewayMetrics
from gateway.ws.hub import Hub
from shared.backoff import backoff_delays
from shared.broker.contract import Broker
from shared.cancellation import raise_if_cancel_was_lost
from shared.frames import Publication

logger = logging.getLogger("pricegate.gateway.relay")


class _Cursor:
    __slots__ = ("epoch", "seq")

    def __init__(self, epoch: int, seq: int) -> None:
        self.epoch = epoch
        self.seq = seq


class Relay:
    def __init__(
        self,
        broker: Broker,
        hub: Hub,
        metrics: GatewayMetrics,
        *,
        schedule_flush: Callable[[], None],
        demand_ttl_s: float = 5.0,
    ) -> None:
        self.broker = broker
        self.hub = hub
        self.metrics = metrics
        self.schedule_flush = schedule_flush
        self.demand_ttl_s = demand_ttl_s
        self.wanted: set[str] = set()
        self.active: set[str] = set()
        self.last_heartbeat_ms = 0
        self.healthy = False  # reconciler running and last broker call succeeded
        self._cursors: dict[str, _Cursor] = {}
        self._repairing: dict[str, list[Publication]] = {}
        self._changed = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        broker.set_listener(self)

    # ---- demand from sessions ----
    def want(self, stream: str) -> None:
        self.wanted.add(stream)
        self._changed.set()

    def unwant(self, stream: str) -> None:
        self.wanted.discard(stream)
        self._changed.set()

    # ---- long-lived tasks (run inside the app's TaskGroup) ----
    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self._reconcile_forever())
            group.create_task(self._announce_forever())

    async def _reconcile_forever(self) -> None:
        delays = backoff_delays(initial=0.1, maximum=5.0)
        self.healthy = True
        while True:
            await self._changed.wait()
            self._changed.clear()
            try:
                await self._reconcile()
                raise_if_cancel_was_lost()
            except Exception as error:  # broker failures are retried, never fatal
                self.healthy = False
                delay = next(delays)
                logger.warning("broker subscription update failed (%r); retrying in %.2fs", error, delay)
                await asyncio.sleep(delay)
                self._changed.set()
            else:
                self.healthy = True
                delays = backoff_delays(initial=0.1, maximum=5.0)

    async def _reconcile(self) -> None:
        to_remove = self.active - self.wanted
        if to_remove:
            await self.broker.unsubscribe(to_remove)
            self.active -= to_remove
            for stream in to_remove:
                self._cursors.pop(stream, None)
                self._repairing.pop(stream, None)
        to_add = self.wanted - self.active
        if to_add:
            await self.broker.announce_demand(to_add, time.time() + self.demand_ttl_s)
            await self.broker.subscribe(to_add)
            self.active |= to_add

    async def _announce_forever(self) -> None:
        while True:
            await asyncio.sleep(self.demand_ttl_s / 3)
            if self.active:
                try:
                    await self.broker.announce_demand(set(self.active), time.time() + self.demand_ttl_s)
                    raise_if_cancel_was_lost()
                except Exception as error:  # next round retries
                    logger.warning("demand announcement failed: %r", error)
            if self.last_heartbeat_ms:
                self.metrics.heartbeat_age.set(max(0.0, time.time() - self.last_heartbeat_ms / 1000))

    # ---- BrokerListener ----
    def on_publication(self, stream: str, publication: Publication) -> None:
        if stream not in self.active and stream not in self.wanted:
            return  # a late message for a stream we already left
        self.metrics.broker_messages.inc()
        if publication.published_at_ms:
            self.metrics.pubsub_lag.observe(max(0.0, time.time() - publication.published_at_ms / 1000))
        pending = self._repairing.get(stream)
        if pending is not None:
            pending.append(publication)
            return
        cursor = self._cursors.get(stream)
        if cursor is None:
            self._cursors[stream] = _Cursor(publication.epoch, publication.seq)
        elif cursor.epoch != publication.epoch:
            # The broker lost the channel's state and restarted its sequence at 1 in a new epoch. Accepting any
            # seq here silently dropped the new epoch's first messages when they had missed pub/sub: repair
            # them from the new epoch's history (which holds nothing older) like any other gap.
            cursor.epoch, cursor.seq = publication.epoch, 0
            if publication.seq != 1:
                self._start_repair(stream, cursor, publication)
                return
            cursor.seq = 1
        elif publication.seq == cursor.seq + 1:
            cursor.seq = publication.seq
        elif publication.seq <= cursor.seq:
            return  # duplicate (e.g. history replay overlapping live delivery)
        else:
            self._start_repair(stream, cursor, publication)
            return
        self._deliver(stream, publication.payload)

    def on_heartbeat(self, published_at_ms: int) -> None:
        self.last_heartbeat_ms = published_at_ms

    def on_broker_reconnect(self) -> None:
        self.metrics.broker_reconnects.inc()
        for stream, cursor in list(self._cursors.items()):
            if stream not in self._repairing:
                self._repairing[stream] = []
                self._spawn(self._repair(stream, cursor))

    # ---- internals ----
    def _deliver(self, stream: str, payload: bytes) -> None:
        if self.hub.broadcast(stream, payload):
            self.schedule_flush()

    def _start_repair(self, stream: str, cursor: _Cursor, publication: Publication) -> None:
        self._repairing[stream] = [publication]
        self._spawn(self._repair(stream, cursor))

    def _spawn(self, coroutine: object) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coroutine)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _read_history(self, stream: str, after: int) -> list[Publication]:
        try:
            return await self.broker.history(stream, after)
        except Exception as error:  # repair degrades to counting the loss
            logger.warning("history read for %s failed: %r", stream, error)
            return []

    async def _repair(self, stream: str, cursor: _Cursor) -> None:
        history = await self._read_history(stream, cursor.seq)
        if any(publication.epoch != cursor.epoch for publication in [*history, *self._repairing.get(stream, ())]):
            # A new epoch began after our cursor (the broker lost the channel's state while we were away). The
            # history now holds only the new epoch, from its seq 1, and the read above skipped it up to our old
            # seq: read all of it.
            history = await self._read_history(stream, 0)
        pending = self._repairing.pop(stream, None)
        if pending is None or stream not in self.active:
            return
        expected = cursor.seq + 1
        lost = 0
        for publication in [*history, *pending]:
            if publication.epoch != cursor.epoch:
                # The sequence restarts in the new epoch: its seq 1 is the next message (what history could not
                # supply from there is counted as lost below, like any gap).
                cursor.epoch, cursor.seq = publication.epoch, 0
                expected = 1
            if publication.seq < expected:
                continue
            lost += publication.seq - expected
            cursor.seq = publication.seq
            expected = publication.seq + 1
            self._deliver(stream, publication.payload)
        if lost:
            self.metrics.broker_gaps.labels(result="lost").inc()
            self.metrics.broker_lost_messages.inc(lost)
            logger.warning("%s: %d message(s) not recoverable from history", stream, lost)
        elif history:
            self.metrics.broker_gaps.labels(result="repaired").inc()

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
