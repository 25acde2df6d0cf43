"""The broker-scale benchmark (issue 11, item 6): end-to-end messages/s through ingest's publish path into a Redis
Cluster of 1, 2 and 3 shards with a real gateway subscribed to every stream, and the per-shard ceiling.

    python -m loadtests.broker_scale                    # 1, 2, 3 shards x (packed, broker), full ramp: ~7 minutes
    python -m loadtests.broker_scale --quick            # same configurations, coarser ramp: ~2 minutes
    python -m loadtests.broker_scale --shards 1 --via packed --layout none   # one configuration, nothing pinned

Per configuration (shards x publish path), everything fresh: a local Redis Cluster of that many primaries
(``loadtests/redis_cluster.py``: redis-server processes, no replicas), one ``pricegate gateway`` on it
(``PRICEGATE_REDIS_URL=redis+cluster://...``), the publisher (``loadtests/cluster_publisher.py``: ``ClusterBroker``
from the broker factory, fenced, with event ids and last values, as ``pricegate ingest`` publishes; ``--via broker``
calls ``ClusterBroker.publish`` itself, ``--via packed`` sends its exact commands packed by hand because the broker's
client side stops one process near 30 000 messages/s, below a shard's ceiling), and the load generator
(``loadtests/loadgen.c``) with ``--clients-per-stream`` WebSocket clients per stream on the gateway. The streams
(``--streams``, 60 ticker streams by default) are chosen so that every shard owns the same number, so the clients'
subscriptions make the gateway ``SSUBSCRIBE`` on every shard (checked with ``PUBSUB SHARDCHANNELS`` on each node, and
no classic channel anywhere) and every message really travels publisher -> shard -> ``SPUBLISH`` -> gateway ->
WebSocket client.

The publish rate (messages/s over all streams, round-robin) rises geometrically until a step is not *sustained*: the
publisher achieved >= 98 % of the asked rate, >= 99 % of the expected frames reached the clients and p99 publish ->
receive < 250 ms; it is then bisected between the last good and the first bad rate. Per step it records each
shard's CPU (``/proc/<pid>/stat``), the gateway's, the publisher's and the load generator's, every CPU's busy %
(softirq included), the gateway's broker messages received (its ``/metrics``), and the CPU other processes used.
From those: **Redis CPU per message** (all shards' CPU over the messages published), the gateway's and the
publisher's CPU per message, and which one ran out first (the bottleneck named in each result).

Then, for the packed path, **the shards alone**: the gateway and its clients stop, one raw ``SSUBSCRIBE`` reader per
node takes their place (the same ``SPUBLISH`` to one subscriber per message, so the same Redis work) and the rate
rises again from the configuration's max until the publisher cannot keep it: the messages/s a shard sustains and
its CPU per message there (the per-shard ceiling). Last, at ``--fanout-rate`` messages/s per shard, 1, 4 and 8
readers per channel (as 1, 4 and 8 gateway processes would subscribe): the shard's CPU per message for each further
subscriber, the slope the capacity model (docs/capacity.md) uses.

CPU layout (``--layout``): ``split`` (default with ``taskset`` and two CPUs): every Redis node on CPU 0, gateway,
publisher, load generator and this script on CPU 1, so one shard has a core to itself and its saturation is measured
directly, while 2 and 3 shards share that one core (their sum cannot exceed it: what grows with shards is what each
shard's own core would add, the per-shard ceiling). ``none``: nothing pinned.

Output: progress on stderr; one JSON object per configuration on stdout, then a last line
``{"shards": [...], "packed_max_msgs_per_s": [...], "broker_max_msgs_per_s": [...], "per_shard_ceiling": {...}, ...}``.
Everything measured, every step included, goes to ``<out>/results.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from loadtests.fanout import (
    Processes,
    _die_with_parent,
    busy_pct,
    cpu_seconds,
    cpu_times,
    foreign_cpu_seconds,
    free_port,
    machine,
    source_version,
    wait_for_port,
)
from loadtests.loadgen import LineProcess, LoadGen, LoadGenError, build
from loadtests.redis_cluster import ClusterError, LocalCluster, slot_ranges
from shared.redis.resp import pack_command
from shared.redis.slots import key_slot
from shared.streams import ChannelNamer

VIAS = ("packed", "broker")
SATURATED_PCT = 90.0  # a process (or a CPU) this busy during a failed step is what ran out
PREFIX = "pgbs"  # + run id: PRICEGATE_CHANNEL_PREFIX of the gateway and publisher


class BenchmarkError(RuntimeError):
    pass


def log(message: str) -> None:
    print(f"[broker_scale {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def balanced_streams(total: int, shards: int) -> list[str]:
    """``total`` ticker streams (``bs0000usdt@ticker``, ...) such that each of ``shards`` even slot ranges owns
    ``total // shards`` of them (a stream's slot is its hash tag's, ``{<stream>}``, whatever the prefix)."""
    if total % shards:
        raise ValueError(f"--streams {total} is not a multiple of {shards} shards")
    ranges = slot_ranges(shards)
    per_shard = total // shards
    chosen: list[list[str]] = [[] for _ in ranges]
    index = 0
    while any(len(streams) < per_shard for streams in chosen):
        stream = f"bs{index:04d}usdt@ticker"
        index += 1
        slot = key_slot("{" + stream + "}")
        shard = next(i for i, (first, last) in enumerate(ranges) if first <= slot <= last)
        if len(chosen[shard]) < per_shard:
            chosen[shard].append(stream)
    # Interleaved, so the publisher's round-robin spreads every batch over every shard.
    return [streams[i] for i in range(per_shard) for streams in chosen]


def gateway_counters(port: int) -> dict[str, float] | None:
    """The gateway's broker counters from its /metrics (None if the scrape fails)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return None
    names = {
        "pricegate_gateway_broker_messages_received_total": "received",
        "pricegate_gateway_broker_lost_messages_total": "lost",
        "pricegate_gateway_broker_reconnects_total": "reconnects",
    }
    counters = dict.fromkeys(names.values(), 0.0)
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in names:
            counters[names[name]] = float(value)
    return counters


class Receiver(Protocol):
    """What counts the messages that arrived in a step (the load generator, or :class:`RawSubscribers`)."""

    def reset(self) -> None: ...

    def stats(self) -> dict[str, Any]: ...


class RawSubscribers:
    """In place of the gateway for the shard ceiling: per primary ``copies`` connections, each holding an
    ``SSUBSCRIBE`` per stream the primary owns (``SSUBSCRIBE`` takes channels of one slot only), all read by one
    thread (``selectors``) that counts the pushed ``smessage``s without parsing them. Their CPU is this script's."""

    MARK = b"\r\nsmessage\r\n"

    def __init__(self, cluster: LocalCluster, prefix: str, streams: Sequence[str], copies: int = 1) -> None:
        """``copies`` subscribers per channel (each its own connection per node), as ``copies`` gateways."""
        self.copies = copies
        self.prefix, self.streams = prefix, list(streams)
        namer = ChannelNamer(prefix, "binance")
        self.channels: dict[int, list[str]] = {}
        for stream in streams:
            channel = namer.channel(stream)
            self.channels.setdefault(cluster.owner(key_slot(channel)), []).append(channel)
        self.count = 0
        self.base = 0
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None
        self.sockets: list[socket.socket] = []

    def start(self) -> RawSubscribers:
        for port, channels in [item for item in self.channels.items() for _ in range(self.copies)]:
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            self.sockets.append(sock)
            sock.sendall(b"".join(pack_command(b"SSUBSCRIBE", channel.encode()) for channel in channels))
            confirmed = b""
            while confirmed.count(b"ssubscribe") < len(channels):
                chunk = sock.recv(1 << 16)
                if not chunk:
                    raise BenchmarkError(f"node {port} closed the subscription")
                confirmed += chunk
            sock.setblocking(False)
        self.thread = threading.Thread(target=self._read, name="ssubscribe-readers", daemon=True)
        self.thread.start()
        return self

    def _read(self) -> None:
        keep = len(self.MARK) - 1
        tails = {sock.fileno(): b"" for sock in self.sockets}
        with selectors.DefaultSelector() as selector:
            for sock in self.sockets:
                selector.register(sock, selectors.EVENT_READ, sock)
            while not self.stopping.is_set():
                found = 0
                for key, _ in selector.select(timeout=0.1):
                    sock = key.data
                    try:
                        chunk = sock.recv(1 << 18)
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError:
                        return
                    if not chunk:
                        return
                    data = tails[sock.fileno()] + chunk
                    found += data.count(self.MARK)
                    tails[sock.fileno()] = data[-keep:]
                if found:
                    with self.lock:
                        self.count += found

    def reset(self) -> None:
        with self.lock:
            self.base = self.count

    def stats(self) -> dict[str, Any]:
        with self.lock:
            frames = self.count - self.base
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "frames": frames,
            "p50_us": 0,
            "p99_us": 0,
            "max_us": 0,
            "lost": 0,
            "cpu_user_s": usage.ru_utime,
            "cpu_sys_s": usage.ru_stime,
            "monotonic_s": time.monotonic(),
        }

    def stop(self) -> None:
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(timeout=2)
        for sock in self.sockets:
            sock.close()


@dataclass
class Options:
    shards: list[int]
    vias: list[str]
    quick: bool
    streams: int
    clients_per_stream: int
    step_s: float
    growth: float
    bisect: int
    start_rate: float
    max_steps: int
    delivered_min: float
    p99_max_ms: float
    drain_cap_s: float
    ceiling: bool
    ceiling_growth: float
    fanout_subscribers: list[int]
    fanout_rate: float
    layout: str
    redis_cpu: int
    load_cpu: int
    boost: bool
    out: Path


@dataclass
class Step:
    rate: float  # asked, messages/s over all streams
    achieved_per_s: float  # what the publisher really sent per second
    delivered_per_s: float  # frames the clients received over the publishing time
    sustained: bool
    why: str
    delivered_ratio: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    sent: int
    msgs_per_pipeline: float  # messages per pipeline per primary: what one Redis read and reply carry
    redis_cpu_pct: list[float]  # per shard, % of one CPU over the step
    redis_us_per_msg: float  # all shards' CPU over the messages published
    gateway_cpu_pct: float
    gateway_us_per_msg: float | None  # the gateway's CPU over the broker messages it received
    gateway_received: int | None
    publisher_cpu_pct: float
    publisher_us_per_msg: float
    loadgen_cpu_pct: float
    cpu_busy_pct: dict[str, float | None]  # per CPU, softirq included
    foreign_cpu_pct: float
    lost_messages: int | None  # counted lost by the gateway (gap repair could not recover)
    bottleneck: str = ""  # for a failed step: what ran out

    def brief(self) -> str:
        redis = "+".join(f"{pct:.0f}" for pct in self.redis_cpu_pct)
        busy = " ".join(f"cpu{cpu} {pct:.0f}%" for cpu, pct in self.cpu_busy_pct.items() if pct is not None)
        return (
            f"rate {self.rate:8.0f}/s: {'OK  ' if self.sustained else 'FAIL'} sent {self.achieved_per_s:8.0f}/s "
            f"delivered {self.delivered_ratio * 100:6.2f}% p50 {self.p50_ms:6.2f} p99 {self.p99_ms:7.2f} ms | "
            f"redis {redis}% ({self.redis_us_per_msg:.1f} us/msg) gateway {self.gateway_cpu_pct:.0f}% "
            f"publisher {self.publisher_cpu_pct:.0f}% loadgen {self.loadgen_cpu_pct:.0f}% | {busy}"
            + (f" | OTHER PROCESSES {self.foreign_cpu_pct:.0f}%" if self.foreign_cpu_pct >= 5 else "")
            + ("" if self.sustained else f" ({self.why}; {self.bottleneck})")
        )


@dataclass
class Ceiling:
    """The shards alone (no gateway): the highest rate the publisher kept, and what ran out above it."""

    steps: list[Step] = field(default_factory=list)
    max_sustained: Step | None = None
    first_failed: Step | None = None
    limited_by: str = ""
    # At one fixed rate, S subscribers per channel (S gateways): Redis CPU per message against S.
    fanout: list[dict[str, Any]] = field(default_factory=list)

    def us_per_extra_subscriber(self) -> float | None:
        """The least-squares slope of Redis µs per message over subscribers per channel."""
        points = [(row["subscribers"], row["redis_us_per_msg"]) for row in self.fanout if row["delivered_ratio"] > 0.98]
        if len(points) < 2:
            return None
        mean_x = sum(x for x, _ in points) / len(points)
        mean_y = sum(y for _, y in points) / len(points)
        spread = sum((x - mean_x) ** 2 for x, _ in points)
        return round(sum((x - mean_x) * (y - mean_y) for x, y in points) / spread, 3) if spread else None

    def us_per_subscriber_pipeline(self) -> float | None:
        """The same per pipeline: Redis writes to a subscriber once per pipeline it serves, whatever it carries."""
        slope = self.us_per_extra_subscriber()
        batches = [row["msgs_per_pipeline"] for row in self.fanout]
        return None if slope is None or not batches else round(slope * sum(batches) / len(batches), 2)

    def line(self, shards: int) -> dict[str, Any]:
        best = self.max_sustained
        return {
            "max_msgs_per_s": None if best is None else round(best.achieved_per_s),
            "per_shard_msgs_per_s": None if best is None else round(best.achieved_per_s / shards),
            "redis_us_per_msg": None if best is None else best.redis_us_per_msg,
            "redis_cpu_pct": None if best is None else best.redis_cpu_pct,
            "limited_by": self.limited_by,
            "redis_saturated": self.limited_by.startswith("redis"),
            "redis_us_per_extra_subscriber": self.us_per_extra_subscriber(),
            "redis_us_per_subscriber_pipeline": self.us_per_subscriber_pipeline(),
            "fanout": [
                {
                    key: row[key]
                    for key in ("subscribers", "rate", "msgs_per_pipeline", "redis_us_per_msg", "delivered_ratio")
                }
                for row in self.fanout
            ],
        }


@dataclass
class ConfigResult:
    shards: int
    via: str
    layout: str
    streams: int
    clients: int
    steps: list[Step] = field(default_factory=list)
    max_sustained: Step | None = None
    first_failed: Step | None = None
    limited_by: str = ""
    shard_channels: dict[str, int] = field(default_factory=dict)
    classic_channels: int = 0
    ceiling: Ceiling | None = None
    error: str | None = None

    def line(self) -> dict[str, Any]:
        best = self.max_sustained
        return {
            "shards": self.shards,
            "via": self.via,
            "layout": self.layout,
            "max_msgs_per_s": None if best is None else round(best.achieved_per_s),
            "per_shard_msgs_per_s": None if best is None else round(best.achieved_per_s / self.shards),
            "limited_by": self.limited_by,
            "redis_us_per_msg": None if best is None else best.redis_us_per_msg,
            "redis_cpu_pct": None if best is None else best.redis_cpu_pct,
            "gateway_us_per_msg": None if best is None else best.gateway_us_per_msg,
            "publisher_us_per_msg": None if best is None else best.publisher_us_per_msg,
            "p99_ms": None if best is None else best.p99_ms,
            "foreign_cpu_pct_peak": max((step.foreign_cpu_pct for step in self.steps), default=0.0),
            "shard_channels": self.shard_channels,
            "shards_alone": None if self.ceiling is None else self.ceiling.line(self.shards),
            "error": self.error,
        }


class Benchmark:
    def __init__(self, options: Options) -> None:
        self.options = options
        self.processes = Processes()
        self.python = sys.executable
        self.run_id = f"{os.getpid()}x{int(time.time())}"
        self.root = Path(__file__).resolve().parent.parent
        self.tempdir = Path(tempfile.mkdtemp(prefix="pricegate-broker-scale-"))
        self.loadgen_binary = build()
        self.cluster: LocalCluster | None = None
        cpus = os.cpu_count() or 1
        taskset = shutil.which("taskset")
        can_pin = options.layout == "split" and cpus >= 2 and taskset is not None
        if options.layout == "split" and not can_pin:
            log("note: --layout split needs taskset and two CPUs: nothing pinned")
        self.redis_pin = [taskset, "-c", str(options.redis_cpu)] if taskset and can_pin else []
        self.load_pin = [taskset, "-c", str(options.load_cpu)] if taskset and can_pin else []
        self.layout = (
            f"split: Redis nodes on CPU {options.redis_cpu}; gateway, publisher, load generator and orchestrator on "
            f"CPU {options.load_cpu}"
            if can_pin
            else "none: nothing pinned"
        )
        if can_pin:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(0, {options.load_cpu})

    def close(self) -> None:
        self.processes.stop_all()
        if self.cluster is not None:
            self.cluster.stop()
            self.cluster = None
        shutil.rmtree(self.tempdir, ignore_errors=True)

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONPATH"] = str(self.root) + os.pathsep + env.get("PYTHONPATH", "")
        return env

    def our_pids(self) -> set[int]:
        pids = {os.getpid(), os.getppid()}
        pids.update(child.pid for child in self.processes.children)
        if self.cluster is not None:
            pids.update(self.cluster.pids)
        return pids

    def background_load(self, seconds: float = 1.0) -> float:
        ours = self.our_pids()
        before = foreign_cpu_seconds(ours)
        time.sleep(seconds)
        return round((foreign_cpu_seconds(ours) - before) / seconds * 100, 1)

    # ---- processes ----
    def start_gateway(self, port: int, prefix: str, streams: Sequence[str], url: str) -> subprocess.Popen[Any]:
        env = self._env()
        clients = len(streams) * self.options.clients_per_stream
        limit = str(max(10_000, 2 * clients))
        env.update(
            PRICEGATE_REDIS_URL=url,
            PRICEGATE_CHANNEL_PREFIX=prefix,
            PRICEGATE_SYMBOLS=",".join(stream.split("@", 1)[0].upper() for stream in streams),
            PRICEGATE_LOG_LEVEL="warning",
            PRICEGATE_SHUTDOWN_DRAIN_S="0.5",
            PRICEGATE_MAX_CONNECTIONS=limit,
            PRICEGATE_MAX_CONNECTIONS_PER_IP=limit,
            PRICEGATE_CONNECTION_ATTEMPTS_PER_IP=limit,
            PRICEGATE_MAX_SUBSCRIPTIONS_PER_IP=limit,
        )
        argv = [*self.load_pin, self.python, "-m", "pricegate_cli", "gateway", "--port", str(port)]
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(self.tempdir / f"gateway-{port}.log", "w"),
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_parent,
            cwd=self.root,
        )
        self.processes.add(process)
        wait_for_port(port, process, 30)
        return process

    def start_publisher(self, url: str, prefix: str, streams: Sequence[str], via: str) -> LineProcess:
        argv = [*self.load_pin, self.python, "-m", "loadtests.cluster_publisher", "--redis-url", url]
        argv += ["--prefix", prefix, "--streams", ",".join(streams), "--via", via]
        publisher = LineProcess(
            argv, name="publisher", env=self._env(), cwd=self.root, start_new_session=True, preexec_fn=_die_with_parent
        )
        self.processes.add(publisher)
        publisher.expect("ready", 60)
        return publisher

    def warm_up(self, publisher: LineProcess, loadgen: LoadGen, gateway: subprocess.Popen[Any], streams: int) -> None:
        """One message per stream per round until every client has a frame: every subscription is live."""
        loadgen.reset()
        stats: dict[str, Any] = {}
        for _ in range(40):
            publisher.send(json.dumps({"cmd": "run", "rate": streams * 4, "duration": 0.25}))
            publisher.expect("ran", 30)
            time.sleep(0.2)
            stats = loadgen.stats()
            if stats["zero_frame_clients"] == 0 and stats["reading"] > 0:
                return
            if gateway.poll() is not None:
                raise BenchmarkError(f"gateway exited with {gateway.returncode} during warm-up")
        raise BenchmarkError(f"warm-up: {stats.get('zero_frame_clients')} clients never received a frame")

    # ---- one step ----
    def run_step(
        self,
        rate: float,
        *,
        publisher: LineProcess,
        receiver: Receiver,
        reading: list[int],
        gateway: subprocess.Popen[Any] | None = None,
        gateway_port: int | None = None,
    ) -> Step:
        """Publish at ``rate`` for a step, wait for what is in flight, and measure. ``receiver`` counts what arrived:
        the load generator (through the gateway) or, for the shard ceiling, raw shard subscribers."""
        options = self.options
        assert self.cluster is not None
        redis_pids = self.cluster.pids
        receiver.reset()
        before = receiver.stats()
        redis0 = [cpu_seconds(pid) for pid in redis_pids]
        gateway0 = cpu_seconds(gateway.pid) if gateway is not None else 0.0
        publisher0 = cpu_seconds(publisher.pid)
        counters0 = gateway_counters(gateway_port) if gateway_port is not None else None
        cores0 = cpu_times()
        ours = self.our_pids()
        foreign0 = foreign_cpu_seconds(ours)
        wall0 = time.monotonic()
        publisher.send(json.dumps({"cmd": "run", "rate": rate, "duration": options.step_s}))
        published = publisher.expect("ran", options.step_s * 4 + 30)
        publish_end = time.monotonic()
        expected = sum(sent * readers for sent, readers in zip(published["per_stream"], reading, strict=True))
        after = receiver.stats()
        last_frames, last_change = after["frames"], time.monotonic()
        while after["frames"] < expected and time.monotonic() - publish_end < options.drain_cap_s:
            time.sleep(0.05)
            after = receiver.stats()
            if after["frames"] != last_frames:
                last_frames, last_change = after["frames"], time.monotonic()
            elif time.monotonic() - last_change > 0.5:
                break
        wall = time.monotonic() - wall0
        cores1 = cpu_times()
        foreign = (foreign_cpu_seconds(ours) - foreign0) / wall * 100
        redis_s = [cpu_seconds(pid) - start for pid, start in zip(redis_pids, redis0, strict=True)]
        alive = gateway is None or gateway.poll() is None
        gateway_s = cpu_seconds(gateway.pid) - gateway0 if gateway is not None and alive else 0.0
        publisher_s = cpu_seconds(publisher.pid) - publisher0
        counters1 = gateway_counters(gateway_port) if gateway_port is not None and alive else None
        receiver_wall = after["monotonic_s"] - before["monotonic_s"]
        receiver_cpu = after["cpu_user_s"] + after["cpu_sys_s"] - before["cpu_user_s"] - before["cpu_sys_s"]
        sent = int(published["sent"])
        received = lost = None
        if counters0 is not None and counters1 is not None:
            received = int(counters1["received"] - counters0["received"])
            lost = int(counters1["lost"] - counters0["lost"])
        delivered = after["frames"] / expected if expected else 0.0
        p99_ms = after["p99_us"] / 1000
        why = []
        if not alive:
            assert gateway is not None
            why.append(f"gateway exited ({gateway.returncode})")
        if published["achieved_per_s"] < 0.98 * rate:
            why.append(f"publisher sent only {published['achieved_per_s']:.0f}/s")
        if delivered < options.delivered_min:
            why.append(f"delivered {delivered * 100:.2f}% < {options.delivered_min * 100:.0f}%")
        if p99_ms >= options.p99_max_ms:
            why.append(f"p99 {p99_ms:.1f} ms >= {options.p99_max_ms:.0f} ms")
        if after["lost"]:
            why.append(f"{after['lost']} clients lost")
        step = Step(
            rate=round(rate, 1),
            achieved_per_s=float(published["achieved_per_s"]),
            delivered_per_s=round(after["frames"] / max(float(published["elapsed_s"]), 1e-9), 1),
            sustained=not why,
            why="; ".join(why),
            delivered_ratio=round(delivered, 5),
            p50_ms=after["p50_us"] / 1000,
            p99_ms=p99_ms,
            max_ms=after["max_us"] / 1000,
            sent=sent,
            msgs_per_pipeline=round(sent / max(int(published.get("pipelines", 0)), 1), 2),
            redis_cpu_pct=[round(seconds / wall * 100, 1) for seconds in redis_s],
            redis_us_per_msg=round(sum(redis_s) / max(sent, 1) * 1e6, 2),
            gateway_cpu_pct=round(gateway_s / wall * 100, 1),
            gateway_us_per_msg=round(gateway_s / received * 1e6, 2) if received else None,
            gateway_received=received,
            publisher_cpu_pct=round(publisher_s / wall * 100, 1),
            publisher_us_per_msg=round(publisher_s / max(sent, 1) * 1e6, 2),
            loadgen_cpu_pct=round(receiver_cpu / max(receiver_wall, 1e-9) * 100, 1),
            cpu_busy_pct={str(cpu): busy_pct(cores0, cores1, cpu) for cpu in sorted(cores1)},
            foreign_cpu_pct=round(foreign, 1),
            lost_messages=lost,
        )
        if not step.sustained:
            step.bottleneck = self.bottleneck(step)
        return step

    def bottleneck(self, step: Step) -> str:
        """What ran out in a failed step, from the processes' own CPU: Redis (pinned: the shards together on their
        CPU; else one shard, single-threaded, at a whole CPU), the gateway or the publisher at a whole CPU, the load
        CPU full with the gateway, publisher and load generator together (pinned), every CPU full, or other
        processes. A CPU full mostly of other processes' work is named as such, not as ours."""
        options = self.options
        found = []
        redis_total = sum(step.redis_cpu_pct)
        if self.redis_pin and redis_total >= SATURATED_PCT:
            found.append(f"redis (shards {redis_total:.0f}% of CPU {options.redis_cpu})")
        elif any(pct >= SATURATED_PCT for pct in step.redis_cpu_pct):
            found.append(f"redis (a shard at {max(step.redis_cpu_pct):.0f}% of a CPU)")
        if step.gateway_cpu_pct >= SATURATED_PCT:
            found.append(f"gateway ({step.gateway_cpu_pct:.0f}% of a CPU)")
        if step.publisher_cpu_pct >= SATURATED_PCT:
            found.append(f"publisher ({step.publisher_cpu_pct:.0f}% of a CPU)")
        ours_on_load = step.gateway_cpu_pct + step.publisher_cpu_pct + step.loadgen_cpu_pct
        load_core = step.cpu_busy_pct.get(str(options.load_cpu)) if self.load_pin else None
        if load_core is not None and load_core >= SATURATED_PCT and ours_on_load >= 0.6 * load_core:
            found.append(
                f"load CPU {options.load_cpu} ({load_core:.0f}% busy: gateway {step.gateway_cpu_pct:.0f}%, "
                f"publisher {step.publisher_cpu_pct:.0f}%, load generator {step.loadgen_cpu_pct:.0f}%, rest kernel)"
            )
        busy = [pct for pct in step.cpu_busy_pct.values() if pct is not None]
        if not self.load_pin and busy and min(busy) >= SATURATED_PCT and step.foreign_cpu_pct < 50:
            found.append(f"every CPU ({', '.join(f'{pct:.0f}%' for pct in busy)} busy)")
        if step.foreign_cpu_pct >= 10:
            found.append(f"other processes ({step.foreign_cpu_pct:.0f}% of a CPU)")
        return "; ".join(found) or "no process or CPU above 90 % (latency or scheduling)"

    def settle(self, receiver: Receiver, alive: Callable[[], bool], cap_s: float = 20.0) -> None:
        """After an overload step: wait until the backlog has drained (nothing more arrives)."""
        deadline = time.monotonic() + cap_s
        frames = receiver.stats()["frames"]
        quiet_since = time.monotonic()
        while time.monotonic() < deadline and alive():
            time.sleep(0.1)
            now_frames = receiver.stats()["frames"]
            if now_frames != frames:
                frames, quiet_since = now_frames, time.monotonic()
            elif time.monotonic() - quiet_since >= 0.5:
                return

    # ---- one configuration ----
    def run_config(self, shards: int, via: str) -> ConfigResult:
        options = self.options
        streams = balanced_streams(options.streams, shards)
        clients = len(streams) * options.clients_per_stream
        result = ConfigResult(shards, via, self.layout, len(streams), clients)
        prefix = f"{PREFIX}{self.run_id}"
        label = f"{shards} shard{'s' if shards > 1 else ''}, {via}"
        log(f"{label}: starting a cluster of {shards} primaries, a gateway, the publisher and {clients} clients")
        gateway = publisher = loadgen = None
        subscribers: RawSubscribers | None = None
        try:
            self.cluster = LocalCluster(shards, pin=self.redis_pin, preexec_fn=_die_with_parent).start()
            port = free_port()
            gateway = self.start_gateway(port, prefix, streams, self.cluster.url)
            publisher = self.start_publisher(self.cluster.url, prefix, streams, via)
            loadgen = LoadGen(
                self.load_pin, self.loadgen_binary, clients=clients, ports=str(port), streams=",".join(streams)
            )
            self.processes.add(loadgen)
            hello = loadgen.connected(timeout=60)
            if hello["open"] < clients:
                raise BenchmarkError(f"only {hello['open']}/{clients} clients connected ({hello['failed']} failed)")
            reading = list(hello["reading_per_stream"])
            self.warm_up(publisher, loadgen, gateway, len(streams))
            channels = self.cluster.shard_channels()
            result.shard_channels = {str(port): count for port, count in channels.items()}
            result.classic_channels = self.cluster.classic_channels()
            per_shard = len(streams) // shards
            if any(count < per_shard for count in channels.values()) or result.classic_channels:
                raise BenchmarkError(
                    f"the gateway's subscriptions are not {per_shard} shard channels per node: {channels} "
                    f"({result.classic_channels} classic channels)"
                )
            log(f"{label}: every client has a frame; shard channels per node {list(channels.values())}")
            running_gateway, running_loadgen = gateway, loadgen

            def through_gateway(rate: float) -> Step:
                done = self.run_step(
                    rate,
                    publisher=publisher,
                    receiver=running_loadgen,
                    reading=reading,
                    gateway=running_gateway,
                    gateway_port=port,
                )
                if done.lost_messages:
                    log(f"{label}: WARNING the gateway counted {done.lost_messages} messages lost")
                if not done.sustained and running_gateway.poll() is None:
                    self.settle(running_loadgen, lambda: running_gateway.poll() is None)
                return done

            good, bad = self.ramp(
                label,
                through_gateway,
                result.steps,
                start=options.start_rate,
                growth=options.growth,
                alive=lambda: running_gateway.poll() is None,
            )
            result.max_sustained, result.first_failed = good, bad
            result.limited_by = bad.bottleneck if bad is not None else "none: no step failed (a lower bound)"
            if via == "packed" and options.ceiling:
                for through in (loadgen, gateway):
                    self.processes.stop(through, timeout=10)
                loadgen = gateway = None
                subscribers = RawSubscribers(self.cluster, prefix, streams).start()
                result.ceiling = self.shard_ceiling(label, result, publisher, subscribers)
        except (BenchmarkError, LoadGenError, ClusterError, OSError) as error:
            result.error = str(error)
            log(f"{label}: ERROR {error}")
        finally:
            if subscribers is not None:
                subscribers.stop()
            for child in (loadgen, publisher, gateway):
                if child is not None:
                    self.processes.stop(child, timeout=10)
            if self.cluster is not None:
                self.cluster.stop()
                self.cluster = None
        return result

    def shard_ceiling(
        self, label: str, result: ConfigResult, publisher: LineProcess, subscribers: RawSubscribers
    ) -> Ceiling:
        """The shards alone: the gateway and its clients stopped, one raw ``SSUBSCRIBE`` reader per node in their
        place (the same ``SPUBLISH`` to one subscriber per message: the same Redis work), and the rate raised from
        the configuration's max until the publisher cannot keep it; what ran out is named as in the ramp."""
        options = self.options
        reading = [1] * result.streams
        ceiling = Ceiling()
        log(f"{label}: shard ceiling: gateway stopped, a raw SSUBSCRIBE reader per node, publisher alone")

        def alone(rate: float) -> Step:
            done = self.run_step(rate, publisher=publisher, receiver=subscribers, reading=reading)
            if not done.sustained:
                self.settle(subscribers, lambda: True)
            return done

        start = result.max_sustained.achieved_per_s if result.max_sustained is not None else options.start_rate
        good, bad = self.ramp(
            f"{label}, shards alone",
            alone,
            ceiling.steps,
            start=start,
            growth=options.ceiling_growth,
            alive=lambda: True,
        )
        ceiling.max_sustained, ceiling.first_failed = good, bad
        ceiling.limited_by = bad.bottleneck if bad is not None else "none: no step failed (a lower bound)"
        subscribers.stop()
        assert self.cluster is not None
        for copies in options.fanout_subscribers:
            several = RawSubscribers(self.cluster, subscribers.prefix, subscribers.streams, copies).start()
            rate = options.fanout_rate * result.shards
            try:
                done = self.run_step(rate, publisher=publisher, receiver=several, reading=[copies] * result.streams)
            finally:
                several.stop()
            log(f"{label}, {copies} subscriber(s) per channel: {done.brief()}")
            ceiling.fanout.append({"subscribers": copies, **asdict(done)})
        slope = ceiling.us_per_extra_subscriber()
        if slope is not None:
            log(f"{label}: each extra subscriber per channel costs the shard {slope:.2f} us per message")
        return ceiling

    def ramp(
        self,
        label: str,
        step: Callable[[float], Step],
        steps: list[Step],
        *,
        start: float,
        growth: float,
        alive: Callable[[], bool],
    ) -> tuple[Step | None, Step | None]:
        """Rates ``start`` x ``growth``^k until a step fails, then ``--bisect`` steps between the last good and the
        first bad rate. Returns (max sustained step, first failed step)."""
        options = self.options

        def run(rate: float) -> Step:
            done = step(rate)
            steps.append(done)
            log(f"{label}: {done.brief()}")
            return done

        rate = start
        good: Step | None = None
        bad: Step | None = None
        for _ in range(options.max_steps):
            done = run(rate)
            if not done.sustained:
                bad = done
                break
            good = done
            rate *= growth
        else:
            log(f"{label}: WARNING no step failed within --max-steps: a lower bound")
        if good is None and bad is not None:
            for _ in range(4):  # the first rate was already too much: walk down until one holds
                if not alive():
                    break
                rate /= growth * growth
                done = run(rate)
                if done.sustained:
                    good = done
                    break
                bad = done
        if good is not None and bad is not None:
            for _ in range(options.bisect):
                if not alive():
                    break
                done = run(math.sqrt(good.rate * bad.rate))
                if done.sustained:
                    good = done
                else:
                    bad = done
        return good, bad


def redis_cost_fit(results: list[ConfigResult]) -> dict[str, Any]:
    """Redis CPU per message = ``us_per_msg + us_per_pipeline / (messages per pipeline)``, least squares over the
    steps with the shards alone (one subscriber per channel) of every configuration: what a shard costs depends on
    how many messages each of its reads and replies carries, i.e. on how busy it is."""
    points = []
    for result in results:
        if result.ceiling is None:
            continue
        steps = list(result.ceiling.steps)
        steps += [Step(**{k: v for k, v in row.items() if k != "subscribers"}) for row in result.ceiling.fanout[:1]]
        points += [(1 / step.msgs_per_pipeline, step.redis_us_per_msg) for step in steps if step.msgs_per_pipeline]
    if len(points) < 3:
        return {}
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    if not spread:
        return {}
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / spread
    residual = [y - (mean_y + slope * (x - mean_x)) for x, y in points]
    return {
        "us_per_msg": round(mean_y - slope * mean_x, 2),
        "us_per_pipeline": round(slope, 2),
        "points": len(points),
        "rms_error_us": round(math.sqrt(sum(r * r for r in residual) / len(residual)), 2),
        "msgs_per_pipeline_range": [round(1 / max(x for x, _ in points), 1), round(1 / min(x for x, _ in points), 1)],
    }


def summary(results: list[ConfigResult], layout: str, cpus: int) -> dict[str, Any]:
    """The last line: max messages/s per shard count and publish path, and the per-shard ceiling."""
    shards = sorted({result.shards for result in results})

    def figures(via: str, key: str) -> list[Any]:
        by_shards = {result.shards: result.line() for result in results if result.via == via}
        return [by_shards[n][key] if n in by_shards else None for n in shards]

    def alone(key: str) -> list[Any]:
        by_shards = {r.shards: r.ceiling.line(r.shards) for r in results if r.via == "packed" and r.ceiling}
        return [by_shards[n][key] if n in by_shards else None for n in shards]

    # The per-shard ceiling: the fewest shards driven alone (one shard: a CPU of its own under --layout split), the
    # Redis CPU per message at the highest rate it held, and that rate per shard.
    ceiling: dict[str, Any] = {}
    measured = [r for r in results if r.ceiling is not None and r.ceiling.max_sustained is not None]
    if measured:
        # The fewest shards that were driven to saturation (a disturbed run may leave one configuration short).
        one = min(
            measured, key=lambda r: (not r.ceiling.limited_by.startswith("redis") if r.ceiling else True, r.shards)
        )
        assert one.ceiling is not None and one.ceiling.max_sustained is not None
        best = one.ceiling.max_sustained
        ceiling = {
            "measured_on": f"{one.shards} shard(s) alone, packed publisher",
            "redis_us_per_msg": best.redis_us_per_msg,
            "redis_cpu_pct": best.redis_cpu_pct,
            "msgs_per_s_per_shard": round(best.achieved_per_s / one.shards),
            "saturated": one.ceiling.limited_by.startswith("redis"),
            "limited_by": one.ceiling.limited_by,
            # What one shard takes at that cost with a whole CPU (100 % busy): the model's figure.
            "msgs_per_s_per_shard_core": round(1e6 / best.redis_us_per_msg) if best.redis_us_per_msg else None,
            # Each further gateway subscribed to a stream: Redis CPU per message on that stream's shard.
            "redis_us_per_extra_subscriber": one.ceiling.us_per_extra_subscriber(),
            "redis_us_per_subscriber_pipeline": one.ceiling.us_per_subscriber_pipeline(),
        }

    fit = redis_cost_fit(results)

    def short(texts: list[Any]) -> list[str | None]:
        return [None if text is None else str(text).split(" ", 1)[0] for text in texts]

    return {
        "shards": shards,
        "packed_max_msgs_per_s": figures("packed", "max_msgs_per_s"),
        "broker_max_msgs_per_s": figures("broker", "max_msgs_per_s"),
        "packed_limited_by": short(figures("packed", "limited_by")),
        "broker_limited_by": short(figures("broker", "limited_by")),
        "shards_alone_max_msgs_per_s": alone("max_msgs_per_s"),
        "shards_alone_limited_by": short(alone("limited_by")),
        "redis_us_per_msg": figures("packed", "redis_us_per_msg"),
        "gateway_us_per_msg": figures("packed", "gateway_us_per_msg"),
        "packed_publisher_us_per_msg": figures("packed", "publisher_us_per_msg"),
        "broker_publisher_us_per_msg": figures("broker", "publisher_us_per_msg"),
        "per_shard_ceiling": ceiling,
        "redis_cost_fit": fit,
        "cpus": cpus,
        "layout": layout,
    }


def parse_args(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.broker_scale",
        description="Broker scale: end-to-end messages/s into 1, 2, 3 Redis Cluster shards (see BENCHMARKS.md).",
    )
    parser.add_argument("--quick", action="store_true", help="1.5 s steps, x2 growth, one bisection")
    parser.add_argument("--shards", default="1,2,3", help="comma-separated primaries per cluster (default 1,2,3)")
    parser.add_argument("--via", default="packed,broker", help="publish paths: packed, broker (default both)")
    parser.add_argument("--streams", type=int, default=60, help="ticker streams, a multiple of every shard count")
    parser.add_argument("--clients-per-stream", type=int, default=1, help="WebSocket clients per stream (default 1)")
    parser.add_argument("--step-seconds", type=float, help="publishing time per step (default 4; --quick 1.5)")
    parser.add_argument("--growth", type=float, help="rate factor between steps (default 1.5; --quick 2)")
    parser.add_argument("--bisect", type=int, help="bisection steps after the first failure (default 3; --quick 1)")
    parser.add_argument("--start-rate", type=float, help="first step, messages/s (default 5000; --quick 10000)")
    parser.add_argument("--max-steps", type=int, default=14, help="upper bound on ramp steps per configuration")
    parser.add_argument("--delivered-min", type=float, default=0.99, help="sustained: delivered fraction (0.99)")
    parser.add_argument("--p99-max-ms", type=float, default=250.0, help="sustained: p99 latency bound (250 ms)")
    parser.add_argument(
        "--no-ceiling", action="store_true", help="skip the shards-alone ceiling after each packed configuration"
    )
    parser.add_argument(
        "--fanout-subscribers",
        help="shards alone, at --fanout-rate: subscribers per channel to measure (default 1,4,8; --quick 1,8)",
    )
    parser.add_argument(
        "--fanout-rate",
        type=float,
        default=5_000.0,
        help="messages/s per shard of the subscriber steps (default 5000)",
    )
    parser.add_argument("--layout", choices=("split", "none"), default="split", help="CPU pinning (module docstring)")
    parser.add_argument("--redis-cpu", type=int, default=0)
    parser.add_argument("--load-cpu", type=int, default=1)
    parser.add_argument("--no-boost", action="store_true", help="keep the default priority (else nice -10 as root)")
    parser.add_argument("--out", type=Path, help="results directory (default out/broker-scale-<time>)")
    args = parser.parse_args(argv)
    shards = [int(n) for n in args.shards.split(",") if n]
    vias = [via.strip() for via in args.via.split(",") if via.strip()]
    for via in vias:
        if via not in VIAS:
            parser.error(f"unknown --via {via!r}; choose from {', '.join(VIAS)}")
    if not shards or min(shards) < 1:
        parser.error("--shards: one or more counts >= 1")
    for count in shards:
        if args.streams % count:
            parser.error(f"--streams {args.streams} is not a multiple of {count} shards")
    quick = args.quick
    return Options(
        shards=shards,
        vias=vias,
        quick=quick,
        streams=args.streams,
        clients_per_stream=args.clients_per_stream,
        step_s=args.step_seconds or (1.5 if quick else 4.0),
        growth=args.growth or (2.0 if quick else 1.5),
        bisect=args.bisect if args.bisect is not None else (1 if quick else 3),
        start_rate=args.start_rate or (10_000.0 if quick else 5_000.0),
        max_steps=args.max_steps,
        delivered_min=args.delivered_min,
        p99_max_ms=args.p99_max_ms,
        drain_cap_s=1.5,
        ceiling=not args.no_ceiling,
        ceiling_growth=1.5 if quick else 1.25,
        fanout_subscribers=[int(n) for n in (args.fanout_subscribers or ("1,8" if quick else "1,4,8")).split(",") if n],
        fanout_rate=args.fanout_rate,
        layout=args.layout,
        redis_cpu=args.redis_cpu,
        load_cpu=args.load_cpu,
        boost=not args.no_boost,
        out=args.out or Path("out") / f"broker-scale-{time.strftime('%Y%m%d-%H%M%S')}",
    )


@contextlib.contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    started = time.monotonic()
    if options.boost:
        with contextlib.suppress(OSError):
            os.nice(-10)  # as root: every process of the benchmark ahead of other work on a shared machine
    benchmark = Benchmark(options)
    report: dict[str, Any] = {
        "command": "python -m loadtests.broker_scale " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine(),
        "source": source_version(benchmark.root),
        "layout": benchmark.layout,
        "nice": os.nice(0),
        "load_average_before": list(os.getloadavg()),
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(options).items()},
        "results": [],
    }
    results: list[ConfigResult] = []
    completed = False
    try:
        with _sigterm_as_exit():
            log(f"layout: {benchmark.layout}; load average {os.getloadavg()[0]:.2f}")
            quiet = benchmark.background_load()
            report["background_cpu_pct_before"] = quiet
            if quiet >= 5:
                log(f"WARNING: other processes use {quiet:.0f}% CPU right now: figures will be disturbed")
            for via in options.vias:
                for shards in options.shards:
                    result = benchmark.run_config(shards, via)
                    results.append(result)
                    report["results"].append(asdict(result))
                    print(json.dumps(result.line()), flush=True)
            completed = True
    finally:
        benchmark.close()
        report["completed"] = completed
        report["elapsed_s"] = round(time.monotonic() - started, 1)
        report["load_average_after"] = list(os.getloadavg())
        report["final"] = summary(results, benchmark.layout, os.cpu_count() or 1)
        options.out.mkdir(parents=True, exist_ok=True)
        (options.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
        log(f"{'done' if completed else 'interrupted'} after {report['elapsed_s']:.0f}s; results in {options.out}")
    print_table(results)
    print(json.dumps(report["final"]), flush=True)
    return 1 if any(result.error for result in results) else 0


def print_table(results: list[ConfigResult]) -> None:
    """BENCHMARKS.md's table, on stderr: through the gateway, then the shards alone (packed only)."""
    rows = [
        "| shards | publish path | max msgs/s | per shard | limited by | Redis µs/msg | Redis CPU % per shard "
        "| gateway µs/msg | publisher µs/msg | p99 ms | shards alone: max msgs/s | limited by |",
        "|---:|---|---:|---:|---|---:|---|---:|---:|---:|---:|---|",
    ]
    for result in results:
        best = result.max_sustained
        ceiling = result.ceiling.line(result.shards) if result.ceiling is not None else None
        alone = "—" if ceiling is None or ceiling["max_msgs_per_s"] is None else f"{ceiling['max_msgs_per_s']:,}"
        alone_why = "—" if ceiling is None else str(ceiling["limited_by"]).split(" (", 1)[0]
        if best is None:
            rows.append(f"| {result.shards} | {result.via} | — | — | {result.error or '—'} | | | | | | {alone} | |")
            continue
        gateway = "—" if best.gateway_us_per_msg is None else f"{best.gateway_us_per_msg:.1f}"
        rows.append(
            f"| {result.shards} | {result.via} | {best.achieved_per_s:,.0f} "
            f"| {best.achieved_per_s / result.shards:,.0f} | {result.limited_by.split(' (', 1)[0]} "
            f"| {best.redis_us_per_msg:.1f} | {' / '.join(f'{pct:.0f}' for pct in best.redis_cpu_pct)} "
            f"| {gateway} | {best.publisher_us_per_msg:.1f} | {best.p99_ms:.1f} | {alone} | {alone_why} |"
        )
    print("\n".join(rows), file=sys.stderr, flush=True)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(130)
