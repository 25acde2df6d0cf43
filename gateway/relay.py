"""Broker -> hub: one broker subscription per stream that local clients need, in order, gaps repaired.

Sessions tell the relay when a stream gains its first local subscriber (:meth:`Relay.want`) or loses its last
(:meth:`Relay.unwant`); a single reconciler task turns the difference between *wanted* and *active* into broker
subscribe/unsubscribe calls, so 1 000 local clients on one stream are one broker subscription and racing
want/unwant calls can never leave a stale subscription behind. Wanted streams are announced as demand so
ingest starts them upstream.

Every publication carries ``(epoch, seq)``; the pure :mod:`gateway.sequencer` decides, per stream, whether it
is delivered, dropped as a duplicate or held while a gap is repaired. On a gap (or after the broker reconnects)
the relay reads the missed publications from the broker's history and delivers them in order, then the held
ones; what history cannot cover is counted as lost. Delivery never awaits: :meth:`on_publication` queues frames
in the hub and schedules one flush per loop turn.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from gateway.metrics import GatewayMetrics
from gateway.sequencer import StreamCursor, Verdict
from gateway.ws.hub import Hub
from shared.backoff import backoff_delays
from shared.broker.contract import Broker
from shared.cancellation import raise_if_cancel_was_lost
from shared.frames import Publication

logger = logging.getLogger("pricegate.gateway.relay")


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
        self._cursors: dict[str, StreamCursor] = {}
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
        cursor = self._cursors.get(stream)
        if cursor is None:
            cursor = self._cursors[stream] = StreamCursor()
        verdict = cursor.judge(publication)
        if verdict is Verdict.DELIVER:
            self._deliver(stream, publication.payload)
        elif verdict is Verdict.REPAIR:
            self._spawn(self._repair(stream, cursor))

    def on_heartbeat(self, published_at_ms: int) -> None:
        self.last_heartbeat_ms = published_at_ms

    def on_broker_reconnect(self) -> None:
        self.metrics.broker_reconnects.inc()
        for stream, cursor in list(self._cursors.items()):
            if cursor.begin_repair():
                self._spawn(self._repair(stream, cursor))

    def position(self, stream: str) -> tuple[int, int] | None:
        """(epoch, seq) of the newest publication of the stream handed to the hub (held ones not included), or
        None before the first; a session's snapshot is ordered against it (gateway.ws.session)."""
        cursor = self._cursors.get(stream)
        if cursor is None or cursor.epoch is None:
            return None
        return cursor.epoch, cursor.seq

    # ---- internals ----
    def _deliver(self, stream: str, payload: bytes) -> None:
        if self.hub.broadcast(stream, payload):
            self.schedule_flush()

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _read_history(self, stream: str, after: int) -> list[Publication]:
        try:
            return await self.broker.history(stream, after)
        except Exception as error:  # repair degrades to counting the loss
            logger.warning("history read for %s failed: %r", stream, error)
            return []

    async def _repair(self, stream: str, cursor: StreamCursor) -> None:
        history = await self._read_history(stream, cursor.seq)
        if cursor.history_needs_full_read(history):
            history = await self._read_history(stream, 0)
        if self._cursors.get(stream) is not cursor or stream not in self.active:
            return  # the stream was left meanwhile (its cursor and held publications went with it)
        result = cursor.finish_repair(history)
        for payload in result.payloads:
            self._deliver(stream, payload)
        if result.lost:
            self.metrics.broker_gaps.labels(result="lost").inc()
            self.metrics.broker_lost_messages.inc(result.lost)
            logger.warning("%s: %d message(s) not recoverable from history", stream, result.lost)
        elif result.repaired:
            self.metrics.broker_gaps.labels(result="repaired").inc()

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
