"""One gateway process's shared state: hub, relay, metrics, known symbols, open sessions and draining.

Sessions come and go; the node outlives them. It schedules at most one hub flush per event-loop turn (every
frame queued during that turn goes out in one write per client; a flush serves ``flush_chunk_clients`` clients
and continues on the next turn, after the loop has read the broker again), keeps the set of symbols clients may ask for
(from the exchangeInfo ingest caches in the broker), and closes every session with 1001, spread over a few
seconds, when the process is asked to stop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import orjson

from gateway.metrics import GatewayMetrics
from gateway.relay import Relay
from gateway.ws.hub import Hub
from gateway.ws.keepalive import KeepaliveSchedule
from shared.broker.contract import Broker
from shared.cancellation import raise_if_cancel_was_lost
from shared.settings import Settings

if TYPE_CHECKING:
    from gateway.ws.session import Session

logger = logging.getLogger("pricegate.gateway")

CLOSE_GOING_AWAY = 1001
EXCHANGE_INFO_POLL_S = 30.0


class DrainableSession(Protocol):
    def close_going_away(self) -> None: ...


class KeptAlive(Protocol):
    """A connection the node pings (gateway.ws.uvicorn_protocol's native sessions)."""

    ping_deadline: float

    def send_ping(self) -> None: ...

    def keepalive_timeout(self) -> None: ...


class GatewayNode:
    def __init__(self, settings: Settings, broker: Broker, metrics: GatewayMetrics | None = None) -> None:
        self.settings = settings
        self.broker = broker
        self.metrics = metrics or GatewayMetrics()
        self.hub = Hub()
        self.relay = Relay(
            broker, self.hub, self.metrics, schedule_flush=self.schedule_flush, demand_ttl_s=settings.demand_ttl_s
        )
        self.sessions: set[Session] = set()
        self.known_symbols: frozenset[str] = frozenset(settings.symbols)
        self.exchange_info: bytes | None = None
        self.draining = False
        self.started_at = time.time()
        self._flush_scheduled = False
        self._closed_conflated = 0
        self._closed_dropped = 0
        self.sent_bytes = 0  # plain int: sessions add to it per write; exported at scrape time
        self._drain_task: asyncio.Task[None] | None = None
        self.keepalive: KeepaliveSchedule[KeptAlive] = KeepaliveSchedule(
            settings.ping_interval_s, settings.ping_timeout_s
        )
        self._keepalive_timer: asyncio.TimerHandle | None = None
        self.metrics.attach(self.hub, self.buffer_drops, broker, lambda: self.sent_bytes)

    # ---- flushing ----
    def schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            # Next loop turn: under load a turn takes longer, more messages arrive meanwhile and each client's
            # write carries more of them (measured: spacing flushes further only added latency; BENCHMARKS.md).
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        # perf_counter, not loop.time(): uvloop's loop clock is cached per iteration and would read 0 here.
        started = time.perf_counter()
        try:
            self.hub.flush(self.settings.flush_chunk_clients)
        finally:
            # Even if a delivery raised (the loop logs it; that stream's batch is gone), fan-out must go on.
            self.metrics.broadcast_duration.observe(time.perf_counter() - started)
            if self.hub.has_pending:
                # More streams wait: serve them on the next loop turn, after the loop has read the broker (new
                # messages join their stream's batch before its turn) and the clients.
                asyncio.get_running_loop().call_soon(self._flush)
            else:
                self._flush_scheduled = False

    # ---- keepalive: one timer pings every connection, a slice per tick ----
    def keep_alive(self, connection: KeptAlive) -> None:
        self.keepalive.add(connection)
        if self._keepalive_timer is None:
            self._keepalive_timer = asyncio.get_running_loop().call_later(
                self.keepalive.tick_s, self._keepalive_tick
            )

    def stop_keeping_alive(self, connection: KeptAlive) -> None:
        self.keepalive.remove(connection)

    def _keepalive_tick(self) -> None:
        try:
            due, overdue = self.keepalive.tick(time.monotonic())
            for connection in overdue:
                self._keep_going(connection.keepalive_timeout)
            for connection in due:
                self._keep_going(connection.send_ping)
        finally:
            # One failing connection must not stop the pings (and timeouts) of every other.
            if len(self.keepalive):
                self._keepalive_timer = asyncio.get_running_loop().call_later(
                    self.keepalive.tick_s, self._keepalive_tick
                )
            else:
                self._keepalive_timer = None

    @staticmethod
    def _keep_going(action: Callable[[], None]) -> None:
        try:
            action()
        except Exception:
            logger.exception("keepalive action failed")

    # ---- symbols ----
    def is_known_symbol(self, symbol: str) -> bool:
        return symbol in self.known_symbols

    def set_exchange_info(self, document: bytes) -> None:
        try:
            parsed = orjson.loads(document)
            symbols = frozenset(
                entry["symbol"] for entry in parsed["symbols"] if entry.get("status", "TRADING") == "TRADING"
            )
        except (orjson.JSONDecodeError, KeyError, TypeError) as error:
            logger.warning("ignoring malformed exchangeInfo from the broker: %r", error)
            return
        if symbols:
            self.exchange_info = document
            self.known_symbols = symbols

    async def load_exchange_info(self) -> bytes | None:
        """Read the cached exchangeInfo from the broker (keeping the last good copy on failure)."""
        try:
            document = await self.broker.get_exchange_info()
        except Exception as error:  # keep the last good copy
            logger.warning("reading exchangeInfo from the broker failed: %r", error)
            document = None
        if document is not None and document != self.exchange_info:
            self.set_exchange_info(document)
        return self.exchange_info

    async def poll_exchange_info(self) -> None:
        """Keep the exchangeInfo (and so the known symbols) current; fast until ingest has written one."""
        while True:
            await self.load_exchange_info()
            raise_if_cancel_was_lost()
            await asyncio.sleep(EXCHANGE_INFO_POLL_S if self.exchange_info is not None else 0.1)

    # ---- health ----
    @property
    def ready(self) -> bool:
        return not self.draining and self.broker.connected and self.relay.healthy

    def buffer_drops(self) -> tuple[int, int]:
        conflated, dropped = self._closed_conflated, self._closed_dropped
        for session in self.sessions:
            session_conflated, session_dropped = session.dropped
            conflated += session_conflated
            dropped += session_dropped
        return conflated, dropped

    def session_closed(self, session: Session) -> None:
        self.sessions.discard(session)
        session_conflated, session_dropped = session.dropped
        self._closed_conflated += session_conflated
        self._closed_dropped += session_dropped

    # ---- draining ----
    def begin_drain(self) -> None:
        """Stop being ready and close every session with 1001, spread over ``shutdown_drain_s``."""
        if self.draining:
            return
        self.draining = True
        self.metrics.ready.set(0)
        self._drain_task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        sessions = list(self.sessions)
        logger.info("draining %d client connection(s) over %.1fs", len(sessions), self.settings.shutdown_drain_s)
        if not sessions:
            return
        # Spread the closes so clients do not all reconnect to the other replicas in the same instant.
        batches = max(1, min(len(sessions), int(self.settings.shutdown_drain_s * 10)))
        per_batch = -(-len(sessions) // batches)
        pause = self.settings.shutdown_drain_s / batches
        for start in range(0, len(sessions), per_batch):
            for session in sessions[start : start + per_batch]:
                session.close_going_away()
            if pause:
                await asyncio.sleep(pause)
