"""pricegate's sizing model (docs/capacity.md): measured per-process, per-shard and per-message figures turned into
gateway processes, Redis Cluster shards, ingest processes, memory and network egress for a client population and
a market.

The constants are measured figures, each naming where it comes from (BENCHMARKS.md: the fan-out benchmark and
the broker-scale benchmark); ``python -m loadtests.capacity_check`` measures the per-process and per-shard ones
again at a scaled-down local run and says whether they still hold. ``python -m loadtests.capacity_model`` prints
the tables of docs/capacity.md (``tests/test_capacity.py`` holds the document to them), or ``--json`` the same
figures for other tools.

The model, per gateway process (one core, one event loop):

- CPU per second = ``writes/s x write_us + frames/s x frame_us + pings/s x ping_us`` for its clients, plus
  ``broker messages/s x broker_msg_us`` for the streams it relays (once per stream, whatever its clients);
- a process carries at most ``max_clients_per_process`` connections and is planned at ``target_utilization``;
- memory = ``base_rss_mib`` + clients x (``kib_per_conn`` in the process + ``kernel_kib_per_conn`` in the kernel)
  + the slow clients' buffers (``slow_client_fraction`` of them holding their whole allowance).

Per Redis Cluster shard (one primary, one core): CPU per message = ``redis_us_per_msg`` (the publish script with
fence, duplicate check, history, last value and one ``SPUBLISH`` subscriber) + (``redis_us_per_pipeline`` +
``redis_us_per_subscriber_pipeline`` for each further gateway process subscribed) / messages per pipeline, with one
pipeline per ``pipeline_interval_ms`` when busy; planned at ``target_utilization``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Figure:
    value: float
    unit: str
    source: str


@dataclass(frozen=True)
class Constants:
    """Every input of the model with its source. ``checked`` names the ones capacity_check measures again."""

    # --- one gateway process (BENCHMARKS.md, "Fan-out") ---
    write_us: Figure = Figure(
        12.7,
        "µs of gateway CPU per socket write of one frame",
        "fan-out benchmark, 100 000 clients at one ticker a second each: 16.7k one-frame writes/s per process at "
        "21 % of a CPU, the 20 s pings included",
    )
    frame_us: Figure = Figure(
        0.14,
        "µs per further frame in a coalesced write",
        "fan-out benchmark, where the time goes: 6.2 µs per write of 5.4 frames (N = 1 000) vs 9.7 µs per write of "
        "29.8 frames (N = 5 000)",
    )
    ping_us: Figure = Figure(
        18.0,
        "µs per ping/pong round trip",
        "fan-out benchmark: 10 000 clients pinged every second cost 18 % of a CPU",
    )
    kib_per_conn: Figure = Figure(
        8.5, "KiB of gateway RSS per idle client", "fan-out benchmark: 7.6-8.5 KiB per idle connection"
    )
    base_rss_mib: Figure = Figure(
        50.0,
        "MiB of RSS of a gateway process with no clients",
        "fan-out benchmark: 55.8 MiB with 1 000 idle clients at 8.5 KiB each, rounded up",
    )
    # --- per shard and per broker message (BENCHMARKS.md, "Broker scale") ---
    redis_us_per_msg: Figure = Figure(
        14.2,
        "µs of Redis CPU per published message",
        "broker-scale benchmark, shards alone: the per-message part of a least-squares fit of Redis CPU per message "
        "against 1 / messages per pipeline, 18 steps of 1 to 1 600 messages per pipeline, rms 0.6 µs (fenced "
        "publish script with event id, history, last value, one SPUBLISH)",
    )
    redis_us_per_pipeline: Figure = Figure(
        30.5,
        "µs of Redis CPU per pipeline (one read, one reply, one write to each subscriber)",
        "the same fit: the part that a pipeline's messages share",
    )
    redis_us_per_subscriber_pipeline: Figure = Figure(
        3.5,
        "µs of Redis CPU per further subscribed gateway per pipeline",
        "broker-scale benchmark, one shard alone at 5 000 msgs/s (one message per pipeline) with 1, 4 and 8 "
        "subscribers per channel: the slope per subscriber (2-3 shards sharing a core: 1.9-2.8)",
    )
    shard_msgs_per_s: Figure = Figure(
        69_600,
        "messages/s one shard sustained alone on one core (Redis ≥ 95 % busy)",
        "broker-scale benchmark, one shard alone (packed publisher, two pipelines in flight, one raw subscriber): "
        "13.8 µs a message at 96 % busy",
    )
    pipeline_interval_ms: Figure = Figure(
        1.0,
        "ms between two pipelines ingest sends one shard when busy",
        "assumption: ingest sends each source batch as it arrives (several calls in flight); the benchmark's "
        "publisher wakes every millisecond",
    )
    gateway_broker_msg_us: Figure = Figure(
        9.1,
        "µs of gateway CPU per message received from the broker (one client on its stream)",
        "broker-scale benchmark: the gateway at 66-70k msgs/s through 1, 2 and 3 shards (8.7-9.1 µs)",
    )
    ingest_msgs_per_s: Figure = Figure(
        40_000,
        "messages/s ClusterBroker.publish can take with a whole core (one ingest process's upper bound on a cluster)",
        "broker-scale benchmark, --via broker: 24.5-26 µs of client CPU per message; 27-29k msgs/s measured with "
        "the core shared with the gateway",
    )
    # --- estimates, not measured here ---
    kernel_kib_per_conn: Figure = Figure(
        4.0,
        "KiB of kernel memory per idle TCP connection",
        "slab object sizes on this kernel: TCP 2 368 B, sock_inode_cache 832, filp 192, dentry 192, epoll 128",
    )
    slow_buffer_kib: Figure = Figure(
        384.0,
        "KiB a stalled client can hold before it is conflated or closed",
        "PRICEGATE_CLIENT_BUFFER_BYTES 256 KiB in the process + SO_SNDBUF 64 KiB doubled by Linux in the kernel",
    )
    slow_client_fraction: Figure = Figure(0.01, "of clients stalled at any time", "assumption")
    wire_overhead_bytes: Figure = Figure(
        70.0,
        "bytes on the wire per socket write beyond the frames",
        "Ethernet 14 + IPv4 20 + TCP with timestamps 32, rounded up; no TLS",
    )
    ws_header_bytes: Figure = Figure(2.0, "bytes of WebSocket header per frame under 126 bytes (4 above)", "RFC 6455")
    # --- planning rules ---
    target_utilization: Figure = Figure(
        0.5, "of a core planned per gateway process and per shard", "headroom for bursts, reconnect storms, failover"
    )
    max_clients_per_process: Figure = Figure(
        20_000,
        "clients per gateway process",
        "the open-file limit on the benchmark machine (PRICEGATE_MAX_CONNECTIONS is 50 000); the 100 000-client "
        "run held with 16 667 per process",
    )
    ping_interval_s: Figure = Figure(20.0, "s between pings to each client", "PRICEGATE_PING_INTERVAL_S (Binance)")

    checked: tuple[str, ...] = field(
        default=(
            "redis_us_per_msg",
            "redis_us_per_pipeline",
            "redis_us_per_subscriber_pipeline",
            "shard_msgs_per_s",
            "gateway_broker_msg_us",
            "ingest_msgs_per_s",
            "write_us",
            "kib_per_conn",
        )
    )

    def value(self, name: str) -> float:
        figure = getattr(self, name)
        assert isinstance(figure, Figure)
        return figure.value

    def figures(self) -> dict[str, Figure]:
        return {name: value for name, value in vars(self).items() if isinstance(value, Figure)}


MODEL = Constants()


@dataclass(frozen=True)
class Profile:
    """What one client receives: messages/s over its streams, their size, and socket writes/s (at most one per
    message; fewer where the gateway coalesces under load)."""

    name: str
    description: str
    streams: int
    msgs_per_s: float
    payload_bytes: float
    writes_per_s: float


PROFILES = (
    Profile(
        "watcher",
        "one `@ticker` stream (the fan-out scale test's shape): 1 message/s of ~480 B",
        1,
        1.0,
        480.0,
        1.0,
    ),
    Profile(
        "trader",
        "one busy symbol's `@trade`, `@bookTicker` and `@depth@100ms`: ~20 + 100 + 10 messages/s of ~180, ~130 and "
        "~1 000 B, coalesced to ≤ 40 writes/s (25 ms cycles)",
        3,
        130.0,
        (20 * 180 + 100 * 130 + 10 * 1000) / 130,
        40.0,
    ),
)


@dataclass(frozen=True)
class StreamKind:
    name: str
    streams: int
    avg_msgs_per_s: float  # market-wide
    busy_msgs_per_s: float  # market-wide, at busy times
    payload_bytes: float
    basis: str


SYMBOLS = 2000
MARKET = (
    StreamKind("`<symbol>@trade`", SYMBOLS, 1_000, 10_000, 180, "assumption: ~90 M spot trades/day, 10x at busy times"),
    StreamKind("`<symbol>@ticker`", SYMBOLS, 2_000, 2_000, 480, "1 push per second per symbol (Binance's rule)"),
    StreamKind(
        "`<symbol>@bookTicker`",
        SYMBOLS,
        10_000,
        40_000,
        130,
        "assumption: every best bid/ask change; hundreds/s on the top symbols, little on the tail",
    ),
    StreamKind(
        "`<symbol>@depth@100ms`",
        SYMBOLS,
        10_000,
        20_000,
        1_000,
        "at most 10 pushes/s per symbol (Binance's rule); half of them busy on average, all at busy times",
    ),
)


@dataclass
class Sizing:
    clients: int
    profile: str
    partitions: int  # groups of gateway processes, each relaying its share of the streams
    processes: int
    subscribers_per_stream: int  # gateway processes subscribed to each stream: the processes of one group
    bound_by: str
    cores: float
    gateway_cpu_per_process: float
    memory_gib: float
    egress_gbit_s: float
    deliveries_per_s: float
    relayed_msgs_per_s: float  # per gateway process
    shards: int | None
    redis_us_per_msg: float
    ingest_processes: int


MAX_RELAY_SHARE = 0.2  # of a gateway process's core for broker messages; beyond it the streams are partitioned
MAX_SUBSCRIBERS_PER_STREAM = 100  # gateway processes on one stream; beyond it the streams are partitioned


def gateway_cpu_per_client(profile: Profile, c: Constants = MODEL) -> float:
    """Seconds of gateway CPU per second per client (writes, the extra frames they carry, pings)."""
    writes = min(profile.writes_per_s, profile.msgs_per_s)
    return (
        writes * c.value("write_us")
        + (profile.msgs_per_s - writes) * c.value("frame_us")
        + c.value("ping_us") / c.value("ping_interval_s")
    ) / 1e6


def egress_bytes_per_client(profile: Profile, c: Constants = MODEL) -> float:
    writes = min(profile.writes_per_s, profile.msgs_per_s)
    header = c.value("ws_header_bytes") if profile.payload_bytes < 126 else 4.0
    pings = (2 + c.value("wire_overhead_bytes")) / c.value("ping_interval_s")
    return profile.msgs_per_s * (profile.payload_bytes + header) + writes * c.value("wire_overhead_bytes") + pings


def market_rate(busy: bool = True, kinds: tuple[StreamKind, ...] = MARKET) -> float:
    return sum(kind.busy_msgs_per_s if busy else kind.avg_msgs_per_s for kind in kinds)


def shard_cost_us(rate_per_shard: float, subscribers: int, c: Constants = MODEL) -> float:
    """Redis CPU per message on a shard taking ``rate_per_shard`` messages/s with ``subscribers`` gateway processes
    on each stream: the per-message part, plus the pipeline's share (one pipeline per ``pipeline_interval_ms``, so
    more messages share it the busier the shard)."""
    per_pipeline = c.value("redis_us_per_pipeline") + max(0, subscribers - 1) * c.value(
        "redis_us_per_subscriber_pipeline"
    )
    messages = max(1.0, rate_per_shard * c.value("pipeline_interval_ms") / 1000)
    return c.value("redis_us_per_msg") + per_pipeline / messages


def shards_for(rate: float, subscribers: int, c: Constants = MODEL) -> tuple[int | None, float]:
    """The fewest shards that take ``rate`` messages/s at ``target_utilization`` with ``subscribers`` gateway
    processes on each stream, and the Redis CPU per message there; (None, cost at one message per pipeline) when
    no number of shards can, because the pipelines' fan-out alone fills a shard."""
    util = c.value("target_utilization")
    for shards in range(1, 10_001):
        per_shard = rate / shards
        cost = shard_cost_us(per_shard, subscribers, c)
        if per_shard * cost / 1e6 <= util:
            return shards, round(cost, 1)
    return None, round(shard_cost_us(0, subscribers, c), 1)


def size(clients: int, profile: Profile, rate: float, c: Constants = MODEL) -> Sizing:
    """Gateway processes, memory, egress, shards and ingest processes for ``clients`` of ``profile`` whose streams
    carry ``rate`` messages/s in all.

    A gateway process relays (receives once) every stream its clients use; with clients spread at random and
    thousands per process, that is every stream of the population, and every process subscribes to every stream.
    Two rules partition the streams over groups of processes (clients routed by symbol, evenly): relaying may take
    at most ``MAX_RELAY_SHARE`` of a process's core, and at most ``MAX_SUBSCRIBERS_PER_STREAM`` processes subscribe to
    one stream (each costs its shard ``redis_us_per_subscriber_pipeline`` per pipeline)."""
    util = c.value("target_utilization")
    relay_us = c.value("gateway_broker_msg_us")
    per_client = gateway_cpu_per_client(profile, c)
    partitions = max(1, math.ceil(rate * relay_us / 1e6 / MAX_RELAY_SHARE))
    while True:
        relayed = rate / partitions
        relay_cpu = relayed * relay_us / 1e6
        group_clients = clients / partitions
        by_cpu = math.ceil(group_clients * per_client / (util - relay_cpu))
        by_connections = math.ceil(group_clients / c.value("max_clients_per_process"))
        per_group = max(by_cpu, by_connections, 1)
        if per_group <= MAX_SUBSCRIBERS_PER_STREAM:
            break
        partitions = math.ceil(partitions * per_group / MAX_SUBSCRIBERS_PER_STREAM)
    processes = per_group * partitions
    bound_by = "CPU" if by_cpu >= by_connections else "connections"
    cpu_each = relay_cpu + group_clients / per_group * per_client
    memory_kib = (
        processes * c.value("base_rss_mib") * 1024
        + clients * (c.value("kib_per_conn") + c.value("kernel_kib_per_conn"))
        + clients * c.value("slow_client_fraction") * c.value("slow_buffer_kib")
    )
    shards, redis_us = shards_for(rate, per_group, c)
    return Sizing(
        clients=clients,
        profile=profile.name,
        partitions=partitions,
        processes=processes,
        subscribers_per_stream=per_group,
        bound_by=bound_by,
        cores=round(processes * cpu_each, 1),
        gateway_cpu_per_process=round(cpu_each, 3),
        memory_gib=round(memory_kib / 2**20, 1),
        egress_gbit_s=round(clients * egress_bytes_per_client(profile, c) * 8 / 1e9, 2),
        deliveries_per_s=clients * profile.msgs_per_s,
        relayed_msgs_per_s=round(relayed),
        shards=shards,
        redis_us_per_msg=redis_us,
        ingest_processes=math.ceil(rate / c.value("ingest_msgs_per_s")),
    )


# The relayed rate per profile: watchers spread over every symbol's ticker; traders over every symbol's three
# streams (at busy times), so a gateway process with thousands of clients relays all of them.
RELAYED = {
    "watcher": MARKET[1].busy_msgs_per_s,
    "trader": MARKET[0].busy_msgs_per_s + MARKET[2].busy_msgs_per_s + MARKET[3].busy_msgs_per_s,
}
POPULATIONS = (100_000, 1_000_000, 10_000_000)


def sizings(c: Constants = MODEL) -> list[Sizing]:
    return [size(n, profile, RELAYED[profile.name], c) for profile in PROFILES for n in POPULATIONS]


def _n(value: float) -> str:
    return f"{value:,.0f}"


def markdown(c: Constants = MODEL) -> str:
    """The tables of docs/capacity.md, generated from the constants (the document embeds this output)."""
    lines = ["<!-- generated by python -m loadtests.capacity_model: edit the model, not these tables -->", ""]
    lines += ["**Inputs** (measured unless the source says otherwise; ✓ = checked by `loadtests.capacity_check`)", ""]
    lines += ["| constant | value | unit | source |", "|---|---:|---|---|"]
    for name, figure in c.figures().items():
        mark = " ✓" if name in c.checked else ""
        value = f"{figure.value:,.2f}".rstrip("0").rstrip(".") if figure.value < 100 else _n(figure.value)
        lines.append(f"| `{name}`{mark} | {value} | {figure.unit} | {figure.source} |")
    lines += ["", "**Client populations** (each gateway process at most "]
    lines[-1] += f"{c.value('target_utilization'):.0%} of a core, clients spread at random over the processes)"
    lines += [""]
    lines += [f"- *{profile.name}*: {profile.description}" for profile in PROFILES]
    lines += [""]
    lines += [
        "| clients | profile | stream partitions | gateway processes | bound by | cores | CPU per process "
        "| memory GiB | egress Gbit/s | deliveries/s | relayed msgs/s per process | processes per stream "
        "| Redis µs/msg | shards | ingest processes |",
        "|---:|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in sizings(c):
        lines.append(
            f"| {_n(row.clients)} | {row.profile} | {row.partitions} | {_n(row.processes)} | {row.bound_by} "
            f"| {row.cores:,.1f} "
            f"| {row.gateway_cpu_per_process:.0%} | {row.memory_gib:,.1f} | {row.egress_gbit_s:,.2f} "
            f"| {_n(row.deliveries_per_s)} | {_n(row.relayed_msgs_per_s)} | {row.subscribers_per_stream} "
            f"| {row.redis_us_per_msg:,.1f} | {row.shards} | {row.ingest_processes} |"
        )
    lines += ["", "**The full Binance spot market** (", ""]
    lines[-2] = f"**The full Binance spot market** ({SYMBOLS:,} symbols, {len(MARKET) * SYMBOLS:,} streams)"
    lines += [
        "| stream | streams | msgs/s average | msgs/s busy | payload B | basis |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for kind in MARKET:
        lines.append(
            f"| {kind.name} | {_n(kind.streams)} | {_n(kind.avg_msgs_per_s)} | {_n(kind.busy_msgs_per_s)} "
            f"| {_n(kind.payload_bytes)} | {kind.basis} |"
        )
    avg, busy = market_rate(False), market_rate(True)
    ingress = sum(kind.busy_msgs_per_s * (kind.payload_bytes + 40) for kind in MARKET) * 8 / 1e6
    lines.append(f"| **all** | {_n(len(MARKET) * SYMBOLS)} | **{_n(avg)}** | **{_n(busy)}** | | ingest → Redis "
                 f"≈ {ingress:,.0f} Mbit/s at busy times |")  # fmt: skip
    lines += [
        "",
        "| gateway processes subscribed per stream | shards, busy | Redis µs/msg, busy | shards, average "
        "| Redis µs/msg, average |",
        "|---:|---:|---:|---:|---:|",
    ]
    for subscribers in (1, 10, 100, 1000):
        shards_busy, per_msg_busy = shards_for(busy, subscribers, c)
        shards_avg, per_msg_avg = shards_for(avg, subscribers, c)
        lines.append(f"| {_n(subscribers)} | {shards_busy} | {per_msg_busy:,.1f} | {shards_avg} | {per_msg_avg:,.1f} |")
    relay_busy = busy * c.value("gateway_broker_msg_us") / 1e6
    lines += [
        "",
        f"One ingest process: {_n(c.value('ingest_msgs_per_s'))} msgs/s → "
        f"{math.ceil(avg / c.value('ingest_msgs_per_s'))} at the average rate, "
        f"{math.ceil(busy / c.value('ingest_msgs_per_s'))} at busy times (one leads today). "
        f"A gateway process relaying every stream at busy times spends {relay_busy:.0%} of its core on the broker "
        "messages alone.",
    ]
    return "\n".join(lines) + "\n"


def as_json(c: Constants = MODEL) -> dict[str, Any]:
    return {
        "constants": {name: figure.value for name, figure in c.figures().items()},
        "sizings": [asdict(row) for row in sizings(c)],
        "market": {"avg_msgs_per_s": market_rate(False), "busy_msgs_per_s": market_rate(True)},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.capacity_model", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="the figures as one JSON object instead of markdown")
    args = parser.parse_args(argv)
    if args.json:
        print(json.dumps(as_json()))
    else:
        sys.stdout.write(markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
