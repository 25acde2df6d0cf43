"""Ingest's Prometheus metrics: what it published, its leadership, and (read at scrape time) its upstream.

:class:`IngestMetrics` holds the instruments ingest updates as it goes (published messages, duplicates, gaps,
backfill, leadership, event-time lag, demand refused beyond the stream bound). :class:`UpstreamCollector` turns
the live Binance source's plain counters (connections, streams per connection, messages by kind, reconnects and
rotations by reason, connection attempts, REST weight and rate limiting) into metrics when Prometheus scrapes,
so the hot path only increments ints. Labels are bounded: stream kind, a reason enum, an HTTP status, a
connection index (streams / 1024 of them).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from ingest.sources.binance.source import BinanceSource

# Exchange event time -> published: Binance's own push delay plus ours; seconds.
LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class IngestMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.published = Counter("pricegate_ingest_published_messages", "Messages published", ["kind"], registry=r)
        self.publish_errors = Counter("pricegate_ingest_publish_errors", "Failed publish batches", registry=r)
        self.publish_duration = Histogram(
            "pricegate_ingest_publish_duration_seconds", "Time to publish one batch", registry=r
        )
        self.wanted_streams = Gauge("pricegate_ingest_wanted_streams", "Streams ingest keeps flowing", registry=r)
        self.refused_streams = Gauge(
            "pricegate_ingest_refused_streams",
            "Demanded streams not subscribed upstream now: wanted streams would exceed PRICEGATE_MAX_UPSTREAM_STREAMS",
            registry=r,
        )
        self.stream_refusals = Counter(
            "pricegate_ingest_stream_refusals",
            "Streams refused beyond PRICEGATE_MAX_UPSTREAM_STREAMS, counted each time one enters the refused set",
            ["kind"],
            registry=r,
        )
        self.last_event = Gauge(
            "pricegate_ingest_last_event_timestamp_seconds", "Wall clock of the last published message", registry=r
        )
        self.is_leader = Gauge("pricegate_ingest_is_leader", "1 while this process publishes", registry=r)
        self.leader_changes = Counter(
            "pricegate_ingest_leader_changes",
            "Leadership taken (event=acquired) or given up (event=lost_refused|lost_error|lost_expired|fenced|stopped)",
            ["event"],
            registry=r,
        )
        self.duplicates = Counter(
            "pricegate_ingest_duplicates_dropped",
            "Events not published because their exchange identity was already published (failover overlap)",
            ["kind"],
            registry=r,
        )
        self.sequence_gaps = Counter(
            "pricegate_ingest_sequence_gaps",
            "Jumps in the exchange's ids of trade, aggTrade and diff-depth streams (events missed upstream)",
            ["kind"],
            registry=r,
        )
        self.backfilled = Counter(
            "pricegate_ingest_backfilled_trades", "Missed trades fetched over REST and published", ["kind"], registry=r
        )
        self.unrecoverable = Counter(
            "pricegate_ingest_unrecoverable_trades",
            "Missed trades that could not be backfilled (logged with their id range)",
            ["kind"],
            registry=r,
        )
        self.event_lag = Histogram(
            "pricegate_ingest_event_lag_seconds",
            "Exchange event time to publication, for events that carry one",
            ["kind"],
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.standby_buffered = Gauge(
            "pricegate_ingest_standby_buffered_messages",
            "Messages kept unpublished: a standby's, for a takeover, or the leader's while Redis is unreachable",
            registry=r,
        )
        self.broker_up = Gauge(
            "pricegate_ingest_broker_up",
            "0 while ingest's calls to Redis fail (it keeps running and retries), 1 otherwise",
            registry=r,
        )
        self.outage_dropped = Counter(
            "pricegate_ingest_outage_dropped_messages",
            "Messages lost because Redis stayed unreachable longer than PRICEGATE_OUTAGE_BUFFER_MESSAGES could hold",
            ["kind"],
            registry=r,
        )


class UpstreamCollector(Collector):
    """Reads a :class:`~ingest.sources.binance.source.BinanceSource` at scrape time. Runs on the metrics
    server's thread: it only copies ints and small dicts, which the GIL keeps consistent."""

    def __init__(self, source: BinanceSource) -> None:
        self.source = source

    def describe(self) -> list[object]:  # no fixed description: the families are built on each scrape
        return []

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        source = self.source
        yield GaugeMetricFamily(
            "pricegate_ingest_upstream_connections",
            "Open upstream WebSocket connections (a rotation's successor included)",
            value=source.sockets_open,
        )
        per_connection = GaugeMetricFamily(
            "pricegate_ingest_upstream_connection_streams",
            "Streams assigned to each upstream connection",
            labels=["connection"],
        )
        for index, streams in enumerate(source.connection_streams):
            per_connection.add_metric([str(index)], len(streams))
        yield per_connection
        received = CounterMetricFamily(
            "pricegate_ingest_upstream_messages", "Data messages received from Binance, by stream kind", labels=["kind"]
        )
        for kind, count in dict(source.received).items():
            received.add_metric([kind], count)
        yield received
        reconnects = CounterMetricFamily(
            "pricegate_ingest_upstream_reconnects",
            "Unplanned upstream reconnects, by reason (closed, connect_failed, stall, server_shutdown)",
            labels=["reason"],
        )
        for reason, count in dict(source.reconnects).items():
            reconnects.add_metric([reason], count)
        yield reconnects
        rotations = CounterMetricFamily(
            "pricegate_ingest_upstream_rotations",
            "Make-before-break connection replacements, by reason (age, server_shutdown, malformed)",
            labels=["reason"],
        )
        for reason, count in dict(source.rotations).items():
            rotations.add_metric([reason], count)
        yield rotations
        for name, doc, value in (
            ("upstream_rotation_timeouts", "Rotations switched without a full overlap", source.rotation_timeouts),
            (
                "upstream_connection_attempts",
                "Upstream connection attempts (paced under 300/5 min)",
                source.connection_attempts,
            ),
            (
                "upstream_malformed_frames",
                "Malformed upstream frames (skipped, never published)",
                source.malformed_frames,
            ),
            (
                "upstream_duplicates_dropped",
                "Events both sockets of a rotation delivered (sent once)",
                source.duplicates_dropped,
            ),
            ("upstream_control_errors", "Error replies of Binance to our SUBSCRIBE/UNSUBSCRIBE", source.control_errors),
        ):
            yield CounterMetricFamily(f"pricegate_ingest_{name}", doc, value=value)
        yield CounterMetricFamily(
            "pricegate_ingest_upstream_connect_wait_seconds",
            "Time connection attempts were held back for Binance's attempt limit",
            value=source.connect_wait_s,
        )
        rest = source.rest
        yield GaugeMetricFamily(
            "pricegate_ingest_rest_weight_used",
            "REST request weight used in the current minute (X-MBX-USED-WEIGHT-1M, or our own count)",
            value=rest.budget.used,
        )
        yield GaugeMetricFamily(
            "pricegate_ingest_rest_weight_limit", "REST weight per minute ingest allows itself", value=rest.budget.limit
        )
        yield GaugeMetricFamily(
            "pricegate_ingest_rest_blocked_seconds",
            "Seconds left before REST may be called again after a 429/418",
            value=rest.budget.blocked_s(),
        )
        requests = CounterMetricFamily(
            "pricegate_ingest_rest_requests", "REST requests to Binance by HTTP status", labels=["status"]
        )
        for status, count in dict(rest.requests).items():
            requests.add_metric([status], count)
        yield requests
