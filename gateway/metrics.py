"""Gateway metrics (Prometheus), one registry per app so tests can run several gateways in one process.

Hot-path counts (deliveries per stream kind, subscriptions, buffer drops) are kept as plain integers by the
hub and outboxes and read by :class:`HubCollector` at scrape time, so fan-out never calls into
prometheus_client per message or per client. Labels are bounded by construction: stream kind, close code,
drop reason, result — never client, IP or symbol.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from gateway.ws.hub import Hub

LAG_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
FANOUT_BUCKETS = (0.00001, 0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
# The installed distribution's version: pyproject.toml's is the only definition (``pricegate --version`` reads it too).
VERSION = importlib.metadata.version("pricegate")


class HubCollector(Collector):
    """Reads the hub's counters at scrape time."""

    def __init__(self, hub: Hub, buffer_drops: Callable[[], tuple[int, int]], sent_bytes: Callable[[], int]) -> None:
        self.hub = hub
        self.buffer_drops = buffer_drops
        self.sent_bytes = sent_bytes

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        subscriptions = GaugeMetricFamily(
            "pricegate_gateway_subscriptions", "Client stream subscriptions on this replica", labels=["kind"]
        )
        for kind, count in self.hub.subscriptions_by_kind().items():
            subscriptions.add_metric([kind.value], count)
        yield subscriptions
        channels = GaugeMetricFamily(
            "pricegate_gateway_broker_subscriptions", "Streams this replica receives from the broker"
        )
        channels.add_metric([], len(self.hub.streams()))
        yield channels
        sent = CounterMetricFamily(
            "pricegate_gateway_messages_sent", "Messages queued to clients, by stream kind", labels=["kind"]
        )
        for kind, count in self.hub.deliveries.items():
            sent.add_metric([kind.value], count)
        yield sent
        fanned = CounterMetricFamily(
            "pricegate_gateway_broadcasts", "Broker messages fanned out to local clients", labels=["kind"]
        )
        for kind, count in self.hub.messages.items():
            fanned.add_metric([kind.value], count)
        yield fanned
        conflated, dropped = self.buffer_drops()
        drops = CounterMetricFamily(
            "pricegate_gateway_messages_dropped",
            "Messages not delivered to a slow client: conflated to a newer value, or dropped on overflow",
            labels=["reason"],
        )
        drops.add_metric(["conflated"], conflated)
        drops.add_metric(["overflow"], dropped)
        yield drops
        sent_bytes = CounterMetricFamily("pricegate_gateway_sent_bytes", "Bytes written to client sockets")
        sent_bytes.add_metric([], self.sent_bytes())
        yield sent_bytes
        flushes = CounterMetricFamily(
            "pricegate_gateway_flushes", "Fan-out flush chunks (at most one per busy loop turn)"
        )
        flushes.add_metric([], self.hub.flushes)
        yield flushes
        batches = CounterMetricFamily(
            "pricegate_gateway_batches",
            "Stream batches handed to local clients, one socket write each (deliveries / batches = frames per write)",
        )
        batches.add_metric([], self.hub.batches)
        yield batches


class GateCollector(Collector):
    """How much bursty work waits for a loop turn (gateway/turn_gate.py), read at scrape time: a reconnect storm
    shows as handshakes waiting, a mass disconnect as closes waiting."""

    def __init__(self, waiting: Callable[[], dict[str, int]]) -> None:
        self.waiting = waiting

    def collect(self) -> Iterator[GaugeMetricFamily]:
        gauge = GaugeMetricFamily(
            "pricegate_gateway_gate_waiting",
            "Connections waiting for an event-loop turn: handshakes to be parsed, closes of clients that left",
            labels=["gate"],
        )
        for gate, count in self.waiting().items():
            gauge.add_metric([gate], count)
        yield gauge


class BrokerCollector(Collector):
    """Reads the broker's own counters (malformed envelopes, listener errors) at scrape time."""

    def __init__(self, broker: object) -> None:
        self.broker = broker

    def collect(self) -> Iterator[CounterMetricFamily]:
        malformed = CounterMetricFamily(
            "pricegate_gateway_broker_malformed_messages", "Broker messages skipped because they did not decode"
        )
        malformed.add_metric([], int(getattr(self.broker, "malformed_messages", 0)))
        yield malformed
        errors = CounterMetricFamily(
            "pricegate_gateway_broker_listener_errors", "Exceptions raised while handling a broker message"
        )
        errors.add_metric([], int(getattr(self.broker, "listener_errors", 0)))
        yield errors


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.connections = Gauge("pricegate_gateway_connections", "Open client WebSockets", registry=r)
        self.connections_accepted = Counter(
            "pricegate_gateway_connections_accepted", "Client WebSockets accepted", registry=r
        )
        self.connections_rejected = Counter(
            "pricegate_gateway_connections_rejected", "Client WebSockets refused", ["reason"], registry=r
        )
        self.disconnects = Counter(
            "pricegate_gateway_disconnects", "Client WebSockets closed, by close code", ["code"], registry=r
        )
        self.slow_consumer_disconnects = Counter(
            "pricegate_gateway_slow_consumer_disconnects",
            "Clients closed because their buffer overflowed on an event stream",
            registry=r,
        )
        self.control_messages = Counter(
            "pricegate_gateway_control_messages", "Client control messages, by result", ["result"], registry=r
        )
        self.broker_messages = Counter(
            "pricegate_gateway_broker_messages_received", "Publications received from the broker", registry=r
        )
        self.broker_reconnects = Counter(
            "pricegate_gateway_broker_reconnects", "Broker subscription reconnects", registry=r
        )
        self.broker_gaps = Counter(
            "pricegate_gateway_broker_gaps",
            "Sequence gaps seen on broker channels, by outcome (repaired from history or lost)",
            ["result"],
            registry=r,
        )
        self.broker_lost_messages = Counter(
            "pricegate_gateway_broker_lost_messages", "Messages a gap repair could not recover", registry=r
        )
        self.pubsub_lag = Histogram(
            "pricegate_gateway_pubsub_lag_seconds",
            "Time from ingest publishing a message to this replica receiving it",
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.broadcast_duration = Histogram(
            "pricegate_gateway_broadcast_duration_seconds",
            "Time of one fan-out flush chunk: pending streams handed to up to flush_chunk_clients subscribers",
            buckets=FANOUT_BUCKETS,
            registry=r,
        )
        self.heartbeat_age = Gauge(
            "pricegate_gateway_ingest_heartbeat_age_seconds",
            "Seconds since the last ingest heartbeat seen on the broker",
            registry=r,
        )
        self.ready = Gauge("pricegate_gateway_ready", "1 when /readyz answers 200", registry=r)
        # Authentication: bounded labels only (never a key, token or subject).
        self.auth_failures = Counter(
            "pricegate_gateway_auth_failures",
            "Refused credentials (WebSocket and REST) by reason: missing, malformed, invalid, expired, revoked, "
            "unavailable",
            ["reason"],
            registry=r,
        )
        self.auth_cache_results = Counter(
            "pricegate_gateway_auth_cache_results",
            "API key checks by answer: hit (this process), shared (Redis), miss (database), coalesced (joined a "
            "lookup in flight), refused (a recent refusal), stale (past TTL, database down), unavailable",
            ["result"],
            registry=r,
        )
        self.auth_key_lookups = Counter(
            "pricegate_gateway_auth_key_lookups",
            "API key database lookups by result: found, unknown, revoked, error",
            ["result"],
            registry=r,
        )
        self.build_info = Gauge("pricegate_gateway_build_info", "Build information", ["version"], registry=r)
        self.build_info.labels(version=VERSION).set(1)

    # The authenticator's counters (gateway.auth.service.AuthCounters).
    def auth_failure(self, reason: str) -> None:
        self.auth_failures.labels(reason=reason).inc()

    def auth_cache(self, result: str) -> None:
        self.auth_cache_results.labels(result=result).inc()

    def auth_key_lookup(self, result: str) -> None:
        self.auth_key_lookups.labels(result=result).inc()

    def attach(
        self, hub: Hub, buffer_drops: Callable[[], tuple[int, int]], broker: object, sent_bytes: Callable[[], int]
    ) -> None:
        self.registry.register(HubCollector(hub, buffer_drops, sent_bytes))
        self.registry.register(BrokerCollector(broker))

    def attach_gates(self, waiting: Callable[[], dict[str, int]]) -> None:
        self.registry.register(GateCollector(waiting))
