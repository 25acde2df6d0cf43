"""One gateway process's fan-out: hub, relay, open sessions, flush scheduling, keepalive timer and draining.

Sessions come and go; the node outlives them. It is what a connection and a session see of the process (it
implements :class:`~gateway.ws.host.ConnectionHost` and :class:`~gateway.ws.session.SessionHost`, and nothing
reaches through it): admission, subscriptions (hub + relay), accounting. It schedules at most one hub flush per
event-loop turn (every frame queued during that turn goes out in one write per client; a flush serves
``flush_chunk_clients`` clients and continues on the next turn, after the loop has read the broker again), pings
every native connection from one timer, and closes every session with 1001, spread over a few seconds, when the
process is asked to stop. It also finds the last value a session asked for with our ``snapshot`` property: the
hub's, or the broker's (one short task per lookup; the session keeps it in order with live data).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable

from gateway.auth.principal import AuthRefusal, Principal, refused
from gateway.auth.service import Authenticator
from gateway.edge.guard import EdgeGuard
from gateway.edge.ip_limits import LimitHit
from gateway.metrics import GatewayMetrics
from gateway.relay import Relay
from gateway.symbols import SymbolDirectory
from gateway.turn_gate import TurnGate
from gateway.ws.admission import Admission, Admitted, Authenticate, Decision, Handshake, Rejection
from gateway.ws.close_codes import CloseCode, metric_label
from gateway.ws.hub import Hub, Subscriber
from gateway.ws.keepalive import KeepaliveSchedule, KeptAlive
from gateway.ws.session import Connection, Session, SessionLimits
from shared.broker.contract import Broker
from shared.settings import Settings
from shared.streams import Stream

logger = logging.getLogger("pricegate.gateway")
CARRY_WAIT_MAX_S = 1.0  # longest a due ping waits for a data write to ride on


class GatewayNode:
    def __init__(
        self,
        settings: Settings,
        broker: Broker,
        symbols: SymbolDirectory,
        metrics: GatewayMetrics | None = None,
        *,
        edge: EdgeGuard | None = None,
        authenticate: Authenticate | None = None,
        key_limit: Callable[[Principal], bool] | None = None,
        authenticator: Authenticator | None = None,
    ) -> None:
        """``authenticator`` (authentication on): its hooks are the defaults of ``authenticate`` and ``key_limit``,
        and it follows sessions opening, closing and refreshing their token (expiry, revocation, per-key counts)."""
        if authenticator is not None:
            authenticate = authenticate or authenticator.authenticate
            key_limit = key_limit or authenticator.key_limit
        self.authenticator = authenticator
        self.broker = broker
        self.edge = edge
        self.symbols = symbols
        self.metrics = metrics or GatewayMetrics()
        self.hub = Hub()
        self.relay = Relay(
            broker, self.hub, self.metrics, schedule_flush=self.schedule_flush, demand_ttl_s=settings.demand_ttl_s
        )
        self.limits = SessionLimits(
            max_streams=settings.max_streams_per_connection,
            control_rate_per_s=settings.control_rate_per_s,
            control_burst=settings.control_burst,
        )
        self.admission = Admission(
            max_streams=settings.max_streams_per_connection,
            is_known_symbol=symbols.is_known,
            unavailable=self._unavailable,
            rejected=lambda reason: self.metrics.connections_rejected.labels(reason=reason).inc(),
            origins=edge.origins if edge is not None else None,
            authenticate=authenticate,
            key_limit=key_limit,
        )
        self.client_buffer_bytes = settings.client_buffer_bytes
        self.client_sndbuf_bytes = settings.client_sndbuf_bytes
        self.max_message_bytes = settings.max_frame_bytes
        self.max_fragments_per_message = settings.max_fragments_per_message
        self.max_connections = settings.max_connections
        self.flush_chunk_clients = settings.flush_chunk_clients
        self.closer = TurnGate(settings.closes_per_turn, "closing a connection")
        self.shutdown_drain_s = settings.shutdown_drain_s
        self.sessions: set[Session] = set()
        self.draining = False
        self.started_at = time.time()
        self._flush_scheduled = False
        self._closed_conflated = 0
        self._left = 0  # sessions whose client went away, their close still waiting its turn (the closer)
        self._closed_dropped = 0
        self.sent_bytes = 0  # plain int: sessions add to it per write; exported at scrape time
        self._drain_task: asyncio.Task[None] | None = None
        self.keepalive: KeepaliveSchedule[KeptAlive] = KeepaliveSchedule(
            settings.ping_interval_s, settings.ping_timeout_s
        )
        self._keepalive_timer: asyncio.TimerHandle | None = None
        # Pings armed to ride on data writes, by when they go out alone: (time, connections) per tick. The wait is
        # short against the pong timeout (60 s at Binance's settings: a ping leaves at most a second late).
        self._carried_pings: deque[tuple[float, list[KeptAlive]]] = deque()
        self._carry_wait_s = min(CARRY_WAIT_MAX_S, settings.ping_timeout_s / 4, settings.ping_interval_s / 2)
        self._snapshot_lookups: set[asyncio.Task[None]] = set()
        self.metrics.attach(self.hub, self.buffer_drops, broker, lambda: self.sent_bytes)
        self.metrics.attach_gates(self._gates_waiting)

    # ---- ConnectionHost: what a connection needs ----
    def admit(self, handshake: Handshake) -> Decision | Awaitable[Decision]:
        return self.admission.admit(handshake)

    def open_session(self, connection: Connection, admitted: Admitted) -> Session:
        return Session(
            self,
            connection,
            admitted.connect.combined,
            self.limits,
            principal=admitted.principal,
            client_ip=admitted.client_ip if self.edge is not None else "",
        )

    def identify(self, transport: object, peer: str | None, forwarded_for: str | None) -> str | Rejection:
        if self.edge is None:
            return peer or ""
        identity = self.edge.identify(transport, peer, forwarded_for)
        if isinstance(identity, LimitHit):
            status = 503 if identity.reason == "tracked_ips" else 429
            retry_after = str(max(1, round(identity.retry_after_s + 0.499)))
            return Rejection(status, f"too many connections: {identity.reason}", {"Retry-After": retry_after})
        return identity

    def connection_closed(self, connection: object) -> None:
        if self.edge is not None:
            self.edge.release(connection)

    def close_soon(self, close: Callable[[], None]) -> None:
        self.closer.run_soon(close)

    def _gates_waiting(self) -> dict[str, int]:
        return {"handshakes": self.edge.gate.waiting if self.edge is not None else 0, "closes": self.closer.waiting}

    def _unavailable(self) -> str | None:
        if self.draining:
            return "draining"
        # Sessions whose client left and whose close waits its turn are not counted: they are gone for the client
        # reconnecting now.
        if len(self.sessions) - self._left >= self.max_connections:
            return "max_connections"
        return None

    # ---- SessionHost: what a session needs ----
    def is_known_symbol(self, symbol: str) -> bool:
        return self.symbols.is_known(symbol)

    def subscribe(self, stream: Stream, subscriber: Subscriber) -> None:
        if self.hub.add(stream, subscriber):
            self.relay.want(stream.name)

    def unsubscribe(self, stream_names: list[str], subscriber: Subscriber) -> None:
        for name in self.hub.remove_all(stream_names, subscriber):
            self.relay.unwant(name)

    def reserve_subscriptions(self, client_ip: str, count: int) -> bool:
        if self.edge is None or self.edge.ledger.add_subscriptions(client_ip, count):
            return True
        self.metrics.connections_rejected.labels(reason="subscriptions_per_ip").inc()
        return False

    def release_subscriptions(self, client_ip: str, count: int) -> None:
        if self.edge is not None:
            self.edge.ledger.remove_subscriptions(client_ip, count)

    def newest_frames(self, stream_names: set[str], combined: bool) -> list[bytes]:
        hub = self.hub
        # A stream whose batch still waits for its turn needs no resend: the batch ends with the newest value, and
        # sending it now as well would show the client that value, then older ones, then it again.
        return [
            frame
            for name in stream_names
            if not hub.is_pending(name) and (frame := hub.latest_frame(name, combined)) is not None
        ]

    def session_opened(self, session: Session) -> None:
        self.sessions.add(session)
        if self.authenticator is not None:
            self.authenticator.session_opened(session)
        self.metrics.connections.inc()
        self.metrics.connections_accepted.inc()

    def session_left(self, session: Session) -> None:
        self._left += 1
        if self.authenticator is not None:
            self.authenticator.session_closed(session)  # its API key's connection count is free for a reconnect

    def session_closed(self, session: Session) -> None:
        if session.left:
            self._left -= 1
        elif self.authenticator is not None:
            self.authenticator.session_closed(session)
        self.sessions.discard(session)
        session_conflated, session_dropped = session.dropped
        self._closed_conflated += session_conflated
        self._closed_dropped += session_dropped
        self.metrics.connections.dec()
        self.metrics.disconnects.labels(code=metric_label(session.close_code or CloseCode.NORMAL)).inc()

    def control_message(self, result: str) -> None:
        self.metrics.control_messages.labels(result=result).inc()

    def slow_consumer(self) -> None:
        self.metrics.slow_consumer_disconnects.inc()

    def refresh_credential(self, session: Session, token: str) -> Principal | AuthRefusal:
        if self.authenticator is None:
            return refused("invalid", "authentication is off on this gateway: there is no token to refresh")
        return self.authenticator.refresh(session, token, list(session.control.subscriptions))

    def snapshot(self, session: Session, stream_name: str) -> None:
        hub = self.hub
        if hub.is_pending(stream_name):
            return  # its batch reaches the session at the next flush, ending with the newest value
        frame = hub.latest_frame(stream_name, session.combined)
        if frame is not None:
            session.write_snapshot(frame)  # the newest value the relay handed the hub: later batches are newer
            return
        # Nothing here yet (usually the stream's first local subscriber): ask the broker, without blocking.
        token = session.expect_snapshot(stream_name)
        lookup = asyncio.get_running_loop().create_task(self._snapshot_from_broker(session, stream_name, token))
        self._snapshot_lookups.add(lookup)
        lookup.add_done_callback(self._snapshot_lookups.discard)

    async def _snapshot_from_broker(self, session: Session, stream_name: str, token: object) -> None:
        try:
            publication = await self.broker.last_value(stream_name)
        except Exception as error:  # a broker failure costs the snapshot only; live data still comes
            logger.debug("snapshot of %s unavailable: %r", stream_name, error)
            publication = None
        if publication is not None and not self.hub.is_pending(stream_name):
            position = self.relay.position(stream_name)
            if position is None or position[0] != publication.epoch or position[1] < publication.seq:
                session.snapshot_arrived(stream_name, token, publication.payload, (publication.epoch, publication.seq))
                return
        # Nothing stored, or the relay already handed the hub this message or a newer one: live data covers it.
        session.snapshot_dropped(stream_name, token)

    def stream_position(self, stream_name: str) -> tuple[int, int] | None:
        return self.relay.position(stream_name)

    async def aclose(self) -> None:
        """Cancel snapshot lookups still out (at shutdown)."""
        for lookup in list(self._snapshot_lookups):
            lookup.cancel()
        await asyncio.gather(*self._snapshot_lookups, return_exceptions=True)

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
            self.hub.flush(self.flush_chunk_clients)
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
            self._keepalive_timer = asyncio.get_running_loop().call_later(self.keepalive.tick_s, self._keepalive_tick)

    def stop_keeping_alive(self, connection: KeptAlive) -> None:
        self.keepalive.remove(connection)

    def _keepalive_tick(self) -> None:
        try:
            now = time.monotonic()
            carried = self._carried_pings
            while carried and carried[0][0] <= now:
                # Armed a moment ago to ride on a data write: what no data carried goes out alone now.
                for connection in carried.popleft()[1]:
                    self._keep_going(connection.flush_ping)
            due, overdue = self.keepalive.tick(now)
            for connection in overdue:
                self._keep_going(connection.keepalive_timeout)
            for connection in due:
                self._keep_going(connection.send_ping)
            if due:
                carried.append((now + self._carry_wait_s, due))
        finally:
            # One failing connection must not stop the pings (and timeouts) of every other.
            if len(self.keepalive):
                self._keepalive_timer = asyncio.get_running_loop().call_later(
                    self.keepalive.tick_s, self._keepalive_tick
                )
            else:
                self._keepalive_timer = None
                self._carried_pings.clear()  # every connection is gone

    @staticmethod
    def _keep_going(action: Callable[[], None]) -> None:
        try:
            action()
        except Exception:
            logger.exception("keepalive action failed")

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
        logger.info("draining %d client connection(s) over %.1fs", len(sessions), self.shutdown_drain_s)
        if not sessions:
            return
        # Spread the closes so clients do not all reconnect to the other replicas in the same instant.
        batches = max(1, min(len(sessions), int(self.shutdown_drain_s * 10)))
        per_batch = -(-len(sessions) // batches)
        pause = self.shutdown_drain_s / batches
        for start in range(0, len(sessions), per_batch):
            for session in sessions[start : start + per_batch]:
                session.close(CloseCode.GOING_AWAY)
            if pause:
                await asyncio.sleep(pause)
