"""The fan-out benchmark: max sustained deliveries/s, latency and memory of pricegate's gateway against a naive
Starlette loop and a picows server, same workload, same run.

    python -m loadtests.fanout --clients 1000,5000,10000          # full ramp (BENCHMARKS.md)
    python -m loadtests.fanout --quick                             # < 3 minutes, same N, coarser ramp
    python -m loadtests.fanout --quick --stall-fraction 0.1        # + 10 % clients that never read
    python -m loadtests.fanout --idle-rss --clients 10000          # memory per idle client only
    python -m loadtests.fanout --scale 100000                      # 100k clients on one gateway port, 1 ticker/s
    python -m loadtests.fanout --clients 1000,5000,10000 --stall-fraction 0.1 --scale 100000  # every target

What it starts (and stops, also on Ctrl-C and on errors): a ``redis-server`` on a free port (unless
``--redis-url`` is given), the publisher (``loadtests/publisher.py``: ~370-byte 24hrTicker payloads on 20
channels through ``RedisBroker.publish``), the server under test, and the load generator (``loadgen.c``, built
at run time with the system compiler: N epoll WebSocket clients, client i on ``/ws/<stream i % 20>``). With
``taskset`` and two or more CPUs the server runs alone on CPU 0 and everything else (load generator,
publisher, Redis, this script) on CPU 1.

Per target and N: the server starts fresh, its RSS is read with 0 and then N idle clients (KiB per connection
= difference / N), a warm-up publishes until every client has a frame (so every subscription is live), then
the publish rate (messages/s over the 20 channels; deliveries/s = rate x N / 20) is stepped up geometrically
until a step is not *sustained* (>= 99 % of the expected frames delivered, p99 publish -> receive < 250 ms, no
client lost), bisected between the last good and the first bad rate, and finally run once at half the max
sustained rate for the latency figures. A step whose publisher could not keep its rate (achieved < 98 %) ends
the ramp with the result marked ``publisher_limited`` (a lower bound), never as a server failure.

Output: progress on stderr; on stdout one JSON object per N, then (with ``--scale``) ``{"scale": {...}}``, then a
last line with the same keys whose values are lists in the order of ``clients`` (the first keys are the ones
issue 5 names; p50/p99 are at half the max sustained rate). Everything measured, every step included, goes to
``<out>/results.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import math
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from loadtests.host_stalls import StallMonitor, stalls_summary
from loadtests.loadgen import LineProcess, LoadGen, LoadGenError, LoadGenGroup, build, fd_limit
from loadtests.publisher import STREAMS, SYMBOLS

TARGETS = ("pricegate", "naive", "picows", "uvloop", "pricegate-apikey")
DEFAULT_TARGETS = ("pricegate", "naive", "picows", "uvloop")
# pricegate-apikey: the same gateway with PRICEGATE_AUTH=apikey (a key issued in a fresh PostgreSQL schema, sent by
# every client in X-MBX-APIKEY): authentication happens at the handshake only, so its fan-out figures must match.
KEYS = (
    "clients",
    "max_sustained_per_s",
    "naive_max_sustained_per_s",
    "picows_max_sustained_per_s",
    "ratio_vs_naive",
    "ratio_vs_picows",
    "p50_ms",
    "p99_ms",
    "kib_per_conn",
    # Issue 13: the max sustained with p99 <= 25 ms (even pace), and the server CPU per delivery at the light rate.
    "latency_bound_per_s",
    "picows_latency_bound_per_s",
    "ratio_latency_bound_vs_picows",
    "us_per_delivery_light",
    "picows_us_per_delivery_light",
)
LATENCY_BOUND_P99_MS = 25.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchmarkError(RuntimeError):
    pass


def log(message: str) -> None:
    print(f"[fanout {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- process helpers


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (all its threads) from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu_times() -> dict[int, tuple[float, float]]:
    """Per CPU: (busy, total) jiffies from /proc/stat. Busy includes softirq time, where loopback TCP does much
    of its receive work without charging it to any process."""
    times: dict[int, tuple[float, float]] = {}
    with open("/proc/stat") as stat:
        for line in stat:
            if line.startswith("cpu") and line[3].isdigit():
                name, *values = line.split()
                numbers = [float(v) for v in values]
                idle = numbers[3] + (numbers[4] if len(numbers) > 4 else 0.0)  # idle + iowait
                total = sum(numbers[:8])  # guest time is already counted in user
                times[int(name[3:])] = (total - idle, total)
    return times


def busy_pct(before: dict[int, tuple[float, float]], after: dict[int, tuple[float, float]], cpu: int) -> float | None:
    if cpu not in before or cpu not in after:
        return None
    busy = after[cpu][0] - before[cpu][0]
    total = after[cpu][1] - before[cpu][1]
    return round(busy / total * 100, 1) if total > 0 else None


def foreign_cpu_seconds(ours: set[int]) -> float:
    """CPU seconds used so far by user-space processes that are not part of this benchmark (other work on the
    machine disturbs the figures; kernel threads, whose work is ours too under load, are not counted)."""
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) in ours:
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == "2" or entry.name == "2":  # kthreadd and its children
            continue
        total += int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])  # with reaped children
    return total / CLK_TCK


def tcp_kernel_mib() -> float | None:
    """Memory the kernel holds in TCP socket buffers, machine-wide (/proc/net/sockstat ``TCP: ... mem`` pages):
    where a stalled client's unread data sits before the server's own buffers see any of it."""
    with contextlib.suppress(OSError, ValueError), open("/proc/net/sockstat") as sockstat:
        for line in sockstat:
            if line.startswith("TCP:"):
                fields = line.split()
                return round(int(fields[fields.index("mem") + 1]) * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
    return None


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def gateway_workers(supervisor: int) -> list[int]:
    """The worker pids of a ``pricegate gateway --workers`` supervisor: its children spawned by multiprocessing
    (not multiprocessing's resource tracker), oldest first."""
    workers = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == supervisor and b"multiprocessing.spawn" in cmdline:
            workers.append((int(stat.rsplit(")", 1)[1].split()[19]), int(entry.name)))  # (start time, pid)
    return [pid for _, pid in sorted(workers)]


def scrape_metrics(port: int) -> str | None:
    """The /metrics exposition of a pricegate process on ``port`` (None if the scrape fails)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            return str(response.read().decode())
    except OSError:
        return None


def gateway_connections(port: int) -> int | None:
    """Open WebSockets of one gateway process, from its /metrics (None if the scrape fails)."""
    text = scrape_metrics(port)
    if text is None:
        return None
    for line in text.splitlines():
        if line.startswith("pricegate_gateway_connections "):
            return int(float(line.rsplit(" ", 1)[1]))
    return None


def gateway_counters(port: int) -> dict[str, float] | None:
    """pricegate's fan-out counters from its /metrics: deliveries (messages sent, all stream kinds) and batches
    (socket writes). Two scrapes per step; None if the scrape fails (the step's other figures stand without)."""
    text = scrape_metrics(port)
    if text is None:
        return None
    counters = {"deliveries": 0.0, "batches": 0.0}
    for line in text.splitlines():
        if line.startswith("pricegate_gateway_messages_sent_total{"):
            counters["deliveries"] += float(line.rsplit(" ", 1)[1])
        elif line.startswith("pricegate_gateway_batches_total"):
            counters["batches"] = float(line.rsplit(" ", 1)[1])
    return counters


def gateway_pauses(port: int) -> dict[str, float] | None:
    """:func:`pauses_in` a fresh scrape of a gateway's /metrics on ``port`` (None if the scrape fails)."""
    text = scrape_metrics(port)
    return None if text is None else pauses_in(text)


def pauses_in(text: str, subsystem: str = "gateway") -> dict[str, float]:
    """pricegate's own record of what stood its event loop still (``shared/runtime_metrics.py``), from the /metrics
    exposition of a gateway (or, with ``subsystem="ingest"``, of an ingest process):
    per histogram, the observations and how many exceeded 20 ms (the bucket bounds include 0.02), and the garbage
    collections of the oldest generation. Scraped around a phase, the difference is that phase's."""
    figures = {"loop_lag_count": 0.0, "loop_lag_le_20ms": 0.0, "gc_pause_count": 0.0, "gc_pause_le_20ms": 0.0}
    figures["gc_full_count"] = 0.0
    for line in text.splitlines():
        for name, key in (("event_loop_lag_seconds", "loop_lag"), ("gc_pause_seconds", "gc_pause")):
            if not line.startswith(f"pricegate_{subsystem}_{name}_"):
                continue
            value = float(line.rsplit(" ", 1)[1])
            if line.startswith(f"pricegate_{subsystem}_{name}_count"):
                figures[f"{key}_count"] += value
                if 'generation="2"' in line:
                    figures["gc_full_count"] += value
            elif 'le="0.02"' in line:
                figures[f"{key}_le_20ms"] += value
            if key == "loop_lag" and 'le="' in line and 'le="+Inf"' not in line:  # every bucket, for the worst
                bound = line.split('le="', 1)[1].split('"', 1)[0]
                figures["loop_lag_bucket_" + bound] = value
    return figures


def pauses_between(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, float | None]:
    """What :func:`gateway_pauses` saw between two scrapes: loop-lag samples and GC pauses over 20 ms, and full
    collections (all None when a scrape failed)."""
    if before is None or after is None:
        keys = ("loop_lag_samples", "loop_lag_over_20ms", "loop_lag_worst_le_ms", "gc_pauses_over_20ms", "gc_full")
        return dict.fromkeys(keys)

    def delta(key: str) -> float:
        return after[key] - before[key]

    # The worst loop lag, to its histogram bucket: the smallest bound that holds every sample of the phase.
    bounds = sorted(
        (float(key.removeprefix("loop_lag_bucket_")), key) for key in after if key.startswith("loop_lag_bucket_")
    )
    worst = next((bound for bound, key in bounds if delta(key) >= delta("loop_lag_count")), None)
    return {
        "loop_lag_samples": delta("loop_lag_count"),
        "loop_lag_over_20ms": delta("loop_lag_count") - delta("loop_lag_le_20ms"),
        "loop_lag_worst_le_ms": None if worst is None else worst * 1000,
        "gc_pauses_over_20ms": delta("gc_pause_count") - delta("gc_pause_le_20ms"),
        "gc_full": delta("gc_full_count"),
    }


def time_wait_sockets() -> int:
    """TCP sockets in TIME_WAIT on this machine (``/proc/net/sockstat``; 0 if unreadable)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/net/sockstat").read_text().splitlines():
            if line.startswith("TCP:"):
                fields = line.split()
                return int(fields[fields.index("tw") + 1])
    return 0


def drain_time_wait(below: int, timeout: float = 75.0) -> int:
    """Wait (up to ``timeout``, TIME_WAIT lasts 60 s on Linux) until fewer than ``below`` sockets are in TIME_WAIT:
    a run of 100 000 clients leaves as many behind, and connecting the next run's clients among them costs the
    kernel a port search per connect (back-to-back scale runs slowed down run after run). Returns the count left."""
    deadline = time.monotonic() + timeout
    count = time_wait_sockets()
    if count >= below:
        log(f"waiting for {count} TIME_WAIT sockets of an earlier run to expire (below {below})")
    while count >= below and time.monotonic() < deadline:
        time.sleep(1.0)
        count = time_wait_sockets()
    return count


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_port_run(count: int) -> int:
    """The first of ``count`` consecutive free ports (``pricegate gateway --workers``: worker i's /metrics is on
    the first + i)."""
    for _ in range(100):
        first = free_port()
        try:
            with contextlib.ExitStack() as stack:
                for offset in range(count):
                    stack.enter_context(socket.create_server(("127.0.0.1", first + offset)))
        except OSError:
            continue
        return first
    raise BenchmarkError(f"no {count} consecutive free ports")


def wait_for_port(port: int, process: subprocess.Popen[Any], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchmarkError(f"server exited with {process.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise BenchmarkError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f}s")


def _die_with_parent() -> None:
    # A child killed with us never outlives the benchmark, even if this script is SIGKILLed (Linux only).
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def raise_nofile(need: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, max(hard, need)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        log(
            f"note: RLIMIT_NOFILE hard limit {hard} < {need} (no CAP_SYS_RESOURCE): "
            "load generators and --scale gateways are split to fit"
        )
        return hard
    return need


@dataclass
class Pinning:
    server: list[str]
    load: list[str]
    description: str

    @staticmethod
    def detect(server_cpu: int, load_cpu: int, enabled: bool) -> Pinning:
        taskset = shutil.which("taskset")
        cpus = os.cpu_count() or 1
        if not enabled or taskset is None or cpus < 2:
            why = "disabled" if not enabled else ("no taskset" if taskset is None else "one CPU")
            return Pinning([], [], f"none ({why})")
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, {load_cpu})  # this script shares the load CPU
        return Pinning(
            [taskset, "-c", str(server_cpu)],
            [taskset, "-c", str(load_cpu)],
            f"server on CPU {server_cpu}; load generator, publisher, Redis and orchestrator on CPU {load_cpu}",
        )


class Processes:
    """Every child we start, stopped in reverse order on exit (normal, error, Ctrl-C or SIGTERM)."""

    def __init__(self) -> None:
        self.children: list[subprocess.Popen[Any] | LineProcess] = []

    def add(self, child: subprocess.Popen[Any] | LineProcess) -> None:
        self.children.append(child)

    def stop(self, child: subprocess.Popen[Any] | LineProcess, timeout: float = 5.0) -> None:
        if isinstance(child, LineProcess):
            with contextlib.suppress(Exception):
                child.stop(timeout)
            process = child.process
        else:
            process = child
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                process.wait()
        if child in self.children:
            self.children.remove(child)

    def stop_all(self) -> None:
        for child in reversed(list(self.children)):
            self.stop(child, timeout=3.0)


# ---------------------------------------------------------------- configuration


@dataclass
class Options:
    clients: list[int]
    targets: list[str]
    quick: bool
    redis_url: str | None
    step_s: float
    growth: float
    bisect: int
    start_deliveries: float
    max_steps: int
    delivered_min: float
    p99_max_ms: float
    stall_fraction: float
    idle_rss: bool
    scale: int
    scale_processes: int
    scale_seconds: float
    server_cpu: int
    load_cpu: int
    pin: bool
    out: Path
    per_src: int
    publish_via: str = "packed"
    streams: int = len(STREAMS)
    disturbed_pct: float = 10.0  # other processes' CPU % in a step above which a target's run is "disturbed"
    retry_disturbed: int = 0
    boost: bool = True
    idle_settle_s: float = 1.0
    stall_fill_s: float = 10.0
    drain_cap_s: float = 1.5
    # Issue 13: rates every target is measured at (deliveries/s; the first is the light rate of the CPU-per-delivery
    # figure), and the latency-bound ramp (max sustained with p99 <= 25 ms), both at an even publishing pace.
    common_deliveries: tuple[float, ...] = (20_000.0, 40_000.0, 80_000.0)
    latency_growth: float = 1.25
    latency_bisect: int = 3
    latency_bound: bool = True
    storm: int = 0  # --storm M: M clients drop and reconnect at once beside the N steady ones
    storm_seconds: float = 6.0
    storm_concurrency: int = 2048
    storm_rate: float = 1.0  # messages per second per stream (so per client) during the storm
    storm_abort: bool = False  # the storm's clients drop with RST (a crash with unread data), not FIN
    database_url: str = "postgresql://127.0.0.1:5432/test"  # for the pricegate-apikey target's keys


@dataclass
class Step:
    rate: float  # messages/s published over all streams
    deliveries_per_s: float  # nominal: rate x reading clients / streams
    sustained: bool
    why: str
    delivered_ratio: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    lost: int
    server_cpu_pct: float
    server_rss_kib: int
    loadgen_cpu_pct: float
    publisher: dict[str, Any]
    publisher_limited: bool
    redis_cpu_pct: float | None
    foreign_cpu_pct: float  # other processes on the machine during the step (should be ~0)
    server_core_busy_pct: float | None  # the whole server CPU, softirq included (None without pinning)
    load_core_busy_pct: float | None  # the whole load CPU: load generator + publisher + Redis + this script
    # pricegate only, from its /metrics: socket writes (batches) per second, frames per write, and server CPU per
    # write, which is what bounds its cycle over N clients and so its latency under load.
    writes_per_s: float | None = None
    frames_per_write: float | None = None
    cpu_us_per_write: float | None = None
    pace: str = "due"
    cpu_us_per_delivery: float | None = None  # the server's CPU over the deliveries it made in the step
    # The longest moment either CPU ran nothing of ours (loadtests/host_stalls.py: the VM's host had it), over 10 ms;
    # 0 for none. Every frame in flight then waited that long, whatever the server did.
    host_stall_worst_ms: float | None = None

    def brief(self) -> str:
        return (
            f"rate {self.rate:8.1f} msg/s = {self.deliveries_per_s / 1000:8.1f}k deliveries/s: "
            f"{'OK  ' if self.sustained else 'FAIL'} delivered {self.delivered_ratio * 100:6.2f}% "
            f"p50 {self.p50_ms:7.2f} p99 {self.p99_ms:8.2f} max {self.max_ms:8.1f} ms  lost {self.lost}  "
            f"server CPU {self.server_cpu_pct:5.1f}%"
            + ("" if self.server_core_busy_pct is None else f" (core {self.server_core_busy_pct}%)")
            + f"  loadgen CPU {self.loadgen_cpu_pct:5.1f}%"
            + ("" if self.load_core_busy_pct is None else f" (load core {self.load_core_busy_pct}%)")
            + "  "
            f"publisher {self.publisher.get('achieved_per_s', 0):.0f}/s"
            + (
                f"  writes {self.writes_per_s / 1000:.1f}k/s x{self.frames_per_write:.1f} frames "
                f"{self.cpu_us_per_write:.1f} us CPU each"
                if self.writes_per_s and self.frames_per_write and self.cpu_us_per_write
                else ""
            )
            + (f"  OTHER PROCESSES {self.foreign_cpu_pct:.0f}% CPU" if self.foreign_cpu_pct >= 5 else "")
            + (f"  HOST STALL {self.host_stall_worst_ms:.0f} ms" if self.host_stall_worst_ms else "")
            + ("" if self.sustained else f"  ({self.why})")
        )


@dataclass
class TargetResult:
    target: str
    clients: int
    connected: int = 0
    connect_s: float = 0.0
    rss_base_kib: int = 0
    rss_idle_kib: int = 0
    kib_per_conn: float | None = None
    steps: list[Step] = field(default_factory=list)
    max_sustained: Step | None = None
    half_rate: Step | None = None
    publisher_limited: bool = False
    error: str | None = None
    stall: dict[str, Any] | None = None
    attempts: int = 1
    common: list[Step] = field(default_factory=list)  # one step per Options.common_deliveries, even pace
    latency_bound: Step | None = None  # the highest sustained even-pace step with p99 <= 25 ms
    latency_steps: list[Step] = field(default_factory=list)

    @property
    def foreign_peak(self) -> float:
        return max((s.foreign_cpu_pct for s in self.steps), default=0.0)

    @property
    def first_failure(self) -> Step | None:
        best = self.max_sustained
        above = [s for s in self.steps if not s.sustained and (best is None or s.rate > best.rate)]
        return min(above, key=lambda s: s.rate) if above else None

    @property
    def max_sustained_per_s(self) -> float | None:
        return round(self.max_sustained.deliveries_per_s) if self.max_sustained else None

    def summary(self) -> dict[str, Any]:
        best, half = self.max_sustained, self.half_rate
        return {
            "target": self.target,
            "clients": self.clients,
            "connected": self.connected,
            "connect_s": round(self.connect_s, 2),
            "max_sustained_per_s": self.max_sustained_per_s,
            "max_sustained_msgs_per_s": round(best.rate, 1) if best else None,
            "publisher_limited": self.publisher_limited,
            "p50_ms": half.p50_ms if half else None,
            "p99_ms": half.p99_ms if half else None,
            "max_ms": half.max_ms if half else None,
            "p50_ms_at_max": best.p50_ms if best else None,
            "p99_ms_at_max": best.p99_ms if best else None,
            "server_cpu_pct_at_max": best.server_cpu_pct if best else None,
            "server_rss_mib_at_max": round(best.server_rss_kib / 1024, 1) if best else None,
            "loadgen_cpu_pct_at_max": best.loadgen_cpu_pct if best else None,
            "loadgen_cpu_pct_peak": max((s.loadgen_cpu_pct for s in self.steps), default=None),
            # Whole-core busy % (softirq included) at the max sustained step and at the first failed step above
            # it: a load core near 100 % at the failure means the figure is also bounded by the load side.
            "server_core_busy_pct_at_max": best.server_core_busy_pct if best else None,
            "load_core_busy_pct_at_max": best.load_core_busy_pct if best else None,
            "load_core_busy_pct_at_fail": self.first_failure.load_core_busy_pct if self.first_failure else None,
            "foreign_cpu_pct_peak": self.foreign_peak,
            "attempts": self.attempts,
            "rss_base_mib": round(self.rss_base_kib / 1024, 1),
            "rss_idle_mib": round(self.rss_idle_kib / 1024, 1),
            "kib_per_conn": self.kib_per_conn,
            "stall": self.stall,
            "error": self.error,
            "latency_bound_per_s": round(self.latency_bound.deliveries_per_s) if self.latency_bound else None,
            "us_per_delivery_light": self.common[0].cpu_us_per_delivery if self.common else None,
            "common": [
                {
                    "deliveries_per_s": round(s.deliveries_per_s),
                    "p50_ms": s.p50_ms,
                    "p99_ms": s.p99_ms,
                    "sustained": s.sustained,
                    "cpu_us_per_delivery": s.cpu_us_per_delivery,
                }
                for s in self.common
            ],
            "steps": [step.__dict__ for step in self.steps],
            "latency_steps": [step.__dict__ for step in self.latency_steps],
        }


# ---------------------------------------------------------------- the benchmark


# Several gateways and the load share every CPU in the scale test: the kernel places them.
SCALE_PINNING = Pinning([], [], "none (scale test: the gateways and the load share all CPUs)")


class Benchmark:
    def __init__(self, options: Options) -> None:
        self.options = options
        self.processes = Processes()
        self.python = sys.executable
        self.run_id = f"{os.getpid()}-{int(time.time())}"
        self.api_key: str | None = None  # issued for the pricegate-apikey target
        self.schema: str | None = None
        self.redis_url = options.redis_url or ""
        self.redis_process: subprocess.Popen[Any] | None = None
        self.metrics_ports: dict[int, int] = {}  # pricegate server pid -> its port (for /metrics)
        self.worker_metrics_ports: dict[int, list[int]] = {}  # supervisor pid -> its workers' /metrics ports
        self.stalls: StallMonitor | None = None  # started with the first step
        if options.clients:
            self.pinning = Pinning.detect(options.server_cpu, options.load_cpu, options.pin)
        else:
            self.pinning = SCALE_PINNING
        self.loadgen_binary = build()
        self.tempdir = Path(tempfile.mkdtemp(prefix="pricegate-fanout-"))
        self.streams = list(STREAMS[: options.streams])
        self.root = Path(__file__).resolve().parent.parent

    # ---- lifecycle ----
    def api_key_env(self) -> dict[str, str]:
        """PRICEGATE_AUTH=apikey on a fresh schema of ``--database-url`` with one key issued (once per run)."""
        if self.api_key is None:
            schema = f"fanout_{uuid.uuid4().hex[:10]}"
            env = {
                **self._env(),
                "PRICEGATE_DATABASE_URL": self.options.database_url,
                "PRICEGATE_DATABASE_SCHEMA": schema,
                "PRICEGATE_REDIS_URL": self.redis_url,
            }
            for args in (["db", "migrate"], ["keys", "create", "--label", "fanout-benchmark"]):
                done = subprocess.run(
                    [self.python, "-m", "pricegate_cli", *args], env=env, cwd=self.root, capture_output=True,
                    text=True, timeout=60, check=False,
                )  # fmt: skip
                if done.returncode != 0:
                    raise BenchmarkError(f"pricegate {' '.join(args)}: {done.stderr.strip()[-300:]}")
            self.schema = schema
            self.api_key = done.stdout.split()[-1]
            log(f"pricegate-apikey: one key issued in schema {schema} of {self.options.database_url}")
        return {
            "PRICEGATE_AUTH": "apikey",
            "PRICEGATE_DATABASE_URL": self.options.database_url,
            "PRICEGATE_DATABASE_SCHEMA": self.schema or "",
        }

    def _drop_schema(self) -> None:
        if self.schema is None:
            return
        with contextlib.suppress(Exception):
            import asyncio

            import asyncpg

            async def drop() -> None:
                connection = await asyncpg.connect(self.options.database_url)
                try:
                    await connection.execute(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')
                finally:
                    await connection.close()

            asyncio.run(drop())

    def close(self) -> None:
        self.processes.stop_all()
        self._drop_schema()
        if self.options.redis_url:
            self._delete_keys()
        shutil.rmtree(self.tempdir, ignore_errors=True)

    def _spawn(
        self, argv: Sequence[str], *, pin: list[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen[Any]:
        process = subprocess.Popen(
            [*pin, *argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(self.tempdir / f"{Path(argv[0]).name}-{len(self.processes.children)}.log", "w"),
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_parent,
            cwd=self.root,
        )
        self.processes.add(process)
        return process

    def start_redis(self) -> None:
        if self.redis_url:
            return
        server = shutil.which("redis-server")
        if server is None:
            raise BenchmarkError("no redis-server on PATH: install Redis or pass --redis-url")
        port = free_port()
        self.redis_process = self._spawn(
            [
                server, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
                "--dir", str(self.tempdir),
                # A server that falls behind during an overload step must not be cut off by Redis' default
                # Pub/Sub output limit: the step then fails on latency, and the next step starts clean.
                "--client-output-buffer-limit", "pubsub 0 0 0",
            ],
            pin=self.pinning.load,
        )  # fmt: skip
        wait_for_port(port, self.redis_process, 10)
        self.redis_url = f"redis://127.0.0.1:{port}/0"
        log(f"started redis-server on port {port}")

    def _delete_keys(self) -> None:
        with contextlib.suppress(Exception):
            import redis

            client = redis.Redis.from_url(self.redis_url)
            for key in client.scan_iter(match=f"pgbench:{self.run_id}:*", count=1000):
                client.delete(key)

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONPATH"] = str(self.root) + os.pathsep + env.get("PYTHONPATH", "")
        return env

    def start_server(
        self, target: str, port: int, prefix: str, clients: int, *, workers: int = 1
    ) -> subprocess.Popen[Any]:
        """Start one server on ``port``; for pricegate with ``workers`` > 1, one ``pricegate gateway --workers``
        (a supervisor whose workers share the port), ready once every worker serves."""
        env = self._env()
        streams = ",".join(self.streams)
        metrics_base = 0
        if target in ("pricegate", "pricegate-apikey"):
            if target == "pricegate-apikey":
                env.update(self.api_key_env(), PRICEGATE_MAX_CONNECTIONS_PER_KEY=str(max(50_000, 2 * clients)))
            env.update(
                PRICEGATE_REDIS_URL=self.redis_url,
                PRICEGATE_CHANNEL_PREFIX=prefix,
                PRICEGATE_SYMBOLS=",".join(SYMBOLS),
                PRICEGATE_LOG_LEVEL="warning",
                PRICEGATE_MAX_CONNECTIONS=str(max(50_000, 2 * clients)),
                PRICEGATE_SHUTDOWN_DRAIN_S="0.5",
                # The load generator opens up to --per-src clients per source address (10 000): the per-IP edge
                # limits, meant for the public, would refuse all but the first 300 of them.
                PRICEGATE_MAX_CONNECTIONS_PER_IP=str(max(50_000, 2 * clients)),
                PRICEGATE_CONNECTION_ATTEMPTS_PER_IP=str(max(50_000, 2 * clients)),
                PRICEGATE_MAX_SUBSCRIPTIONS_PER_IP=str(max(50_000, 2 * clients)),
            )
            argv = [self.python, "-m", "pricegate_cli", "gateway", "--port", str(port)]
            if workers > 1:
                metrics_base = free_port_run(workers)
                argv += ["--workers", str(workers), "--metrics-port", str(metrics_base)]
        elif target == "naive":
            argv = [self.python, "-m", "loadtests.baselines.naive_starlette", "--port", str(port)]
            argv += ["--redis-url", self.redis_url, "--prefix", prefix, "--streams", streams]
        elif target in ("picows", "uvloop"):
            argv = [self.python, "-m", f"loadtests.baselines.{target}_server", "--port", str(port)]
            argv += ["--redis-url", self.redis_url, "--prefix", prefix, "--streams", streams]
        else:
            raise BenchmarkError(f"unknown target {target!r}")
        process = self._spawn(argv, pin=self.pinning.server, env=env)
        wait_for_port(port, process, 30)
        if metrics_base:
            for index in range(workers):  # each worker serves its /metrics once it serves clients
                wait_for_port(metrics_base + index, process, 30)
            self.worker_metrics_ports[process.pid] = [metrics_base + index for index in range(workers)]
        elif target in ("pricegate", "pricegate-apikey"):
            self.metrics_ports[process.pid] = port
        return process

    def start_publisher(self, prefix: str) -> LineProcess:
        argv = [*self.pinning.load, self.python, "-m", "loadtests.publisher", "--redis-url", self.redis_url]
        argv += ["--prefix", prefix, "--streams", str(self.options.streams), "--via", self.options.publish_via]
        publisher = LineProcess(
            argv, name="publisher", env=self._env(), cwd=self.root, start_new_session=True, preexec_fn=_die_with_parent
        )
        self.processes.add(publisher)
        publisher.expect("ready", 30)
        return publisher

    def start_loadgen(
        self,
        ports: Sequence[int],
        clients: int,
        stall_fraction: float = 0.0,
        *,
        concurrency: int | None = None,
        src_offset_base: int = 0,
        header: str | None = None,
        background: bool = False,
        abort_on_quit: bool = False,
    ) -> tuple[LoadGen | LoadGenGroup, dict[str, Any]]:
        """One load generator, or several when N exceeds what one process may open (its hard open-file limit,
        which root cannot raise without CAP_SYS_RESOURCE), each on its own source addresses. ``background``: at
        nice 19, so that on the shared load CPU it takes only what the measured clients, Redis and the publisher
        leave (the reconnect storm's clients)."""
        options = self.options
        per_process = max(len(self.streams), (fd_limit() - 256) // len(self.streams) * len(self.streams))
        shares = [min(per_process, clients - start) for start in range(0, clients, per_process)]
        members: list[LoadGen] = []
        offset = src_offset_base  # several load generators at once use disjoint source addresses
        for share in shares:
            member = LoadGen(
                [*self.pinning.load, "nice", "-n", "19"] if background else self.pinning.load,
                self.loadgen_binary,
                clients=share,
                ports=",".join(map(str, ports)),
                streams=",".join(self.streams),
                per_src=options.per_src,
                src_offset=offset or None,
                stall_fraction=stall_fraction or None,
                # Stalled clients get a 4 KiB receive buffer so their stall reaches the server within a second
                # (with default loopback buffers it takes megabytes, longer than a step).
                stall_rcvbuf=4096 if stall_fraction else None,
                concurrency=concurrency,
                header=header,
                abort_on_quit=1 if abort_on_quit else None,
            )
            self.processes.add(member)
            members.append(member)
            offset += -(-share // options.per_src)
        loadgen: LoadGen | LoadGenGroup = (
            members[0] if len(members) == 1 else LoadGenGroup(members, shares, len(self.streams))
        )
        if len(members) > 1:
            log(f"{clients} clients over {len(members)} load generators (open-file limit {fd_limit()} per process)")
        hello = loadgen.connected(timeout=60 + clients / 200)
        return loadgen, hello

    def run_target_retrying(self, target: str, clients: int) -> TargetResult:
        """``run_target``, run again (after waiting for a quiet machine) while other processes disturbed it, up
        to ``--retry-disturbed`` times; the least disturbed attempt is kept."""
        options = self.options
        best = self.run_target(target, clients)
        for attempt in range(2, options.retry_disturbed + 2):
            if best.foreign_peak < options.disturbed_pct:
                break
            log(f"{target} N={clients}: other processes took up to {best.foreign_peak:.0f}% CPU; waiting to retry")
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and self.background_load(2.0) >= options.disturbed_pct / 2:
                pass
            again = self.run_target(target, clients)
            again.attempts = attempt
            if again.foreign_peak < best.foreign_peak or best.error:
                best = again
            best.attempts = attempt
        return best

    def background_load(self, seconds: float = 1.0) -> float:
        ours = self.our_pids()
        before = foreign_cpu_seconds(ours)
        time.sleep(seconds)
        return round((foreign_cpu_seconds(ours) - before) / seconds * 100, 1)

    def our_pids(self) -> set[int]:
        pids = {os.getpid(), os.getppid()}  # the parent: a test runner or shell waiting on us
        for child in self.processes.children:
            pids.add(child.pid)
        for supervisor in self.worker_metrics_ports:  # a --workers gateway's workers are its children, not ours
            pids.update(gateway_workers(supervisor))
        return pids

    # ---- one step ----
    def run_step(
        self,
        rate: float,
        duration: float,
        *,
        server: subprocess.Popen[Any],
        publisher: LineProcess,
        loadgen: LoadGen | LoadGenGroup,
        reading_per_stream: list[int],
        p99_max_ms: float | None = None,
        delivered_min: float | None = None,
        pace: str = "due",
    ) -> Step:
        options = self.options
        p99_limit = options.p99_max_ms if p99_max_ms is None else p99_max_ms
        delivered_limit = options.delivered_min if delivered_min is None else delivered_min
        loadgen.reset()
        before = loadgen.stats()
        server_cpu0 = cpu_seconds(server.pid)
        cores0 = cpu_times()
        ours = self.our_pids()
        foreign0 = foreign_cpu_seconds(ours)
        redis_cpu0 = cpu_seconds(self.redis_process.pid) if self.redis_process else None
        metrics_port = self.metrics_ports.get(server.pid)
        counters0 = gateway_counters(metrics_port) if metrics_port else None
        if self.stalls is None:
            self.stalls = StallMonitor(sorted(os.sched_getaffinity(0) | self._server_cpus()))
            self.processes.add(self.stalls.process)
        self.stalls.report()  # counting starts again
        wall0 = time.monotonic()
        publisher.send(json.dumps({"cmd": "run", "rate": rate, "duration": duration, "pace": pace}))
        published = publisher.expect("ran", duration * 3 + 30)
        publish_end = time.monotonic()
        expected = sum(
            sent * readers for sent, readers in zip(published["per_stream"], reading_per_stream, strict=False)
        )
        # Let frames in flight arrive; later than the cap counts as not delivered (their latency fails anyway).
        after = loadgen.stats()
        last_frames, last_change = after["frames"], time.monotonic()
        while after["frames"] < expected and time.monotonic() - publish_end < options.drain_cap_s:
            time.sleep(0.05)
            after = loadgen.stats()
            if after["frames"] != last_frames:
                last_frames, last_change = after["frames"], time.monotonic()
            elif time.monotonic() - last_change > 0.5:
                break
        wall = time.monotonic() - wall0
        host_stall = stalls_summary(self.stalls.report())["host_stall_worst_ms"]
        counters1 = gateway_counters(metrics_port) if metrics_port and server.poll() is None else None
        cores1 = cpu_times()
        foreign = (foreign_cpu_seconds(ours) - foreign0) / wall * 100
        server_alive = server.poll() is None
        server_cpu = (cpu_seconds(server.pid) - server_cpu0) / wall * 100 if server_alive else 0.0
        rss = rss_kib(server.pid) if server_alive else 0
        redis_cpu = (
            (cpu_seconds(self.redis_process.pid) - redis_cpu0) / wall * 100
            if self.redis_process is not None and redis_cpu0 is not None
            else None
        )
        loadgen_wall = after["monotonic_s"] - before["monotonic_s"]
        loadgen_cpu = (
            (after["cpu_user_s"] + after["cpu_sys_s"] - before["cpu_user_s"] - before["cpu_sys_s"]) / loadgen_wall * 100
        )
        delivered = after["frames"] / expected if expected else 0.0
        p99_ms = after["p99_us"] / 1000
        publisher_limited = published["achieved_per_s"] < 0.98 * rate
        why = []
        if not server_alive:
            why.append(f"server exited ({server.returncode})")
        if delivered < delivered_limit:
            why.append(f"delivered {delivered * 100:.2f}% < {delivered_limit * 100:.0f}%")
        if p99_ms >= p99_limit:
            why.append(f"p99 {p99_ms:.1f} ms >= {p99_limit:.0f} ms")
        if after["lost"]:
            why.append(f"{after['lost']} clients lost (last close code {after['last_close_code']})")
        if publisher_limited:
            why.append(f"publisher achieved only {published['achieved_per_s']:.0f}/s")
        readers = sum(reading_per_stream)
        deliveries = after["frames"]
        cpu_per_delivery = round(server_cpu / 100 * wall / deliveries * 1e6, 2) if deliveries and server_alive else None
        writes = frames_per_write = cpu_per_write = None
        if counters0 and counters1:
            batches = counters1["batches"] - counters0["batches"]
            if batches > 0:
                writes = round(batches / wall, 1)
                frames_per_write = round((counters1["deliveries"] - counters0["deliveries"]) / batches, 2)
                cpu_per_write = round(server_cpu / 100 * wall / batches * 1e6, 2)
        return Step(
            rate=round(rate, 2),
            deliveries_per_s=rate * readers / len(self.streams),
            sustained=not why,
            why="; ".join(why),
            delivered_ratio=round(delivered, 5),
            p50_ms=after["p50_us"] / 1000,
            p99_ms=p99_ms,
            max_ms=after["max_us"] / 1000,
            lost=after["lost"],
            server_cpu_pct=round(server_cpu, 1),
            server_rss_kib=rss,
            loadgen_cpu_pct=round(loadgen_cpu, 1),
            publisher={k: v for k, v in published.items() if k not in ("event", "per_stream")},
            publisher_limited=publisher_limited,
            redis_cpu_pct=None if redis_cpu is None else round(redis_cpu, 1),
            foreign_cpu_pct=round(foreign, 1),
            server_core_busy_pct=busy_pct(cores0, cores1, options.server_cpu) if self.pinning.server else None,
            load_core_busy_pct=busy_pct(cores0, cores1, options.load_cpu) if self.pinning.load else None,
            writes_per_s=writes,
            frames_per_write=frames_per_write,
            cpu_us_per_write=cpu_per_write,
            pace=pace,
            cpu_us_per_delivery=cpu_per_delivery,
            host_stall_worst_ms=host_stall,
        )

    def _server_cpus(self) -> set[int]:
        """The CPU the server is pinned to (the orchestrator runs on the load CPU), or none when not pinned."""
        return {self.options.server_cpu} if self.pinning.server else set()

    def settle(self, loadgen: LoadGen | LoadGenGroup, server: subprocess.Popen[Any], cap_s: float = 20.0) -> None:
        """After an overload step: wait until the server has flushed its backlog (frames stop arriving)."""
        deadline = time.monotonic() + cap_s
        frames = loadgen.stats()["frames"]
        quiet_since = time.monotonic()
        while time.monotonic() < deadline and server.poll() is None:
            time.sleep(0.1)
            now_frames = loadgen.stats()["frames"]
            if now_frames != frames:
                frames, quiet_since = now_frames, time.monotonic()
            elif time.monotonic() - quiet_since >= 0.5:
                return

    def warm_up(self, publisher: LineProcess, loadgen: LoadGen | LoadGenGroup, server: subprocess.Popen[Any]) -> None:
        """Publish one message per stream per round until every reading client has received a frame (counted
        across rounds): proves every subscription is live before anything is measured."""
        loadgen.reset()
        stats: dict[str, Any] = {}
        for _ in range(30):
            publisher.send(json.dumps({"cmd": "run", "rate": len(self.streams) * 4, "duration": 0.25}))
            publisher.expect("ran", 30)
            time.sleep(0.2 + stats.get("reading", 0) / 50_000)
            stats = loadgen.stats()
            if stats["zero_frame_clients"] == 0 and stats["reading"] > 0:
                return
            if server.poll() is not None:
                raise BenchmarkError(f"server exited with {server.returncode} during warm-up")
        raise BenchmarkError(f"warm-up: {stats['zero_frame_clients']} clients never received a frame")

    # ---- one target at one N ----
    def run_target(self, target: str, clients: int) -> TargetResult:
        options = self.options
        result = TargetResult(target, clients)
        prefix = f"pgbench:{self.run_id}:{target}:{clients}"
        port = free_port()
        log(f"{target} N={clients}: starting")
        server = self.start_server(target, port, prefix, clients)
        publisher = loadgen = None
        try:
            time.sleep(0.5)
            result.rss_base_kib = rss_kib(server.pid)
            publisher = self.start_publisher(prefix)
            header = f"X-MBX-APIKEY: {self.api_key}" if target == "pricegate-apikey" else None
            loadgen, hello = self.start_loadgen([port], clients, header=header)
            result.connected, result.connect_s = hello["open"], hello["elapsed_s"]
            if hello["open"] < clients:
                raise BenchmarkError(f"only {hello['open']}/{clients} clients connected ({hello['failed']} failed)")
            time.sleep(options.idle_settle_s)
            result.rss_idle_kib = rss_kib(server.pid)
            result.kib_per_conn = round((result.rss_idle_kib - result.rss_base_kib) / clients, 2)
            log(
                f"{target} N={clients}: {clients} clients in {hello['elapsed_s']:.1f}s; RSS "
                f"{result.rss_base_kib / 1024:.1f} -> {result.rss_idle_kib / 1024:.1f} MiB "
                f"= {result.kib_per_conn:.1f} KiB/conn"
            )
            if options.idle_rss:
                return result
            reading = hello["reading_per_stream"]
            self.warm_up(publisher, loadgen, server)
            if options.latency_bound:
                self.common_rates(result, server=server, publisher=publisher, loadgen=loadgen, reading=reading)
                self.latency_ramp(result, server=server, publisher=publisher, loadgen=loadgen, reading=reading)
            self.ramp(result, server=server, publisher=publisher, loadgen=loadgen, reading=reading)
            if options.stall_fraction > 0 and result.half_rate is not None:
                self.stop_loadgen(loadgen)
                loadgen = None
                result.stall = self.stall_run(result, server=server, port=port, publisher=publisher)
        except (BenchmarkError, LoadGenError) as error:
            result.error = str(error)
            log(f"{target} N={clients}: ERROR {error}")
        finally:
            if loadgen is not None:
                self.stop_loadgen(loadgen)
            if publisher is not None:
                self.processes.stop(publisher)
            self.processes.stop(server)
        return result

    def stop_loadgen(self, loadgen: LoadGen | LoadGenGroup) -> None:
        for member in loadgen.members if isinstance(loadgen, LoadGenGroup) else [loadgen]:
            self.processes.stop(member, timeout=30)

    def _even_step(
        self,
        result: TargetResult,
        deliveries_per_s: float,
        *,
        server: subprocess.Popen[Any],
        publisher: LineProcess,
        loadgen: LoadGen | LoadGenGroup,
        reading: list[int],
        label: str,
    ) -> Step:
        rate = max(deliveries_per_s * len(self.streams) / sum(reading), 1.0)
        done = self.run_step(
            rate,
            self.options.step_s,
            server=server,
            publisher=publisher,
            loadgen=loadgen,
            reading_per_stream=reading,
            p99_max_ms=LATENCY_BOUND_P99_MS,
            pace="even",
        )
        log(f"{result.target} N={result.clients} {label}: {done.brief()}")
        if done.lost and server.poll() is None:
            loadgen.reconnect(timeout=60 + result.clients / 200)
        if not done.sustained and server.poll() is None:
            self.settle(loadgen, server)
        return done

    def common_rates(
        self,
        result: TargetResult,
        *,
        server: subprocess.Popen[Any],
        publisher: LineProcess,
        loadgen: LoadGen | LoadGenGroup,
        reading: list[int],
    ) -> None:
        """Every target at the same rates (even pace): p50/p99 side by side, and at the first (light) rate the
        server CPU per delivery. Stops at a rate the target no longer delivers (a higher one tells nothing)."""
        for deliveries in self.options.common_deliveries:
            done = self._even_step(
                result, deliveries, server=server, publisher=publisher, loadgen=loadgen, reading=reading,
                label=f"common {deliveries / 1000:.0f}k/s",
            )  # fmt: skip
            result.common.append(done)
            if done.delivered_ratio < self.options.delivered_min or done.lost or server.poll() is not None:
                break

    def latency_ramp(
        self,
        result: TargetResult,
        *,
        server: subprocess.Popen[Any],
        publisher: LineProcess,
        loadgen: LoadGen | LoadGenGroup,
        reading: list[int],
    ) -> None:
        """The max sustained rate with p99 <= 25 ms at an even pace: geometric steps of ``latency_growth`` from
        the light rate (or down from it), then ``latency_bisect`` bisections, so the figure is known to within
        a factor of ``latency_growth ** (1 / 2 ** latency_bisect)`` (1.25 and 3: 3 %)."""
        options = self.options

        def step(deliveries: float) -> Step:
            done = self._even_step(
                result, deliveries, server=server, publisher=publisher, loadgen=loadgen, reading=reading,
                label="p99<=25ms",
            )  # fmt: skip
            result.latency_steps.append(done)
            return done

        deliveries = options.common_deliveries[0]
        good: Step | None = None
        bad: Step | None = None
        for _ in range(options.max_steps):
            done = step(deliveries)
            if done.publisher_limited:
                good = done if done.sustained else good
                break
            if not done.sustained:
                bad = done
                break
            good = done
            deliveries *= options.latency_growth
        if good is None and bad is not None:
            for _ in range(6):  # the light rate already too much: walk down
                if server.poll() is not None:
                    break
                deliveries /= options.latency_growth**2
                done = step(deliveries)
                if done.sustained:
                    good = done
                    break
                bad = done
        if good is not None and bad is not None:
            for _ in range(options.latency_bisect):
                if server.poll() is not None:
                    break
                done = step(math.sqrt(good.deliveries_per_s * bad.deliveries_per_s))
                if done.sustained:
                    good = done
                else:
                    bad = done
        result.latency_bound = good

    def ramp(
        self,
        result: TargetResult,
        *,
        server: subprocess.Popen[Any],
        publisher: LineProcess,
        loadgen: LoadGen | LoadGenGroup,
        reading: list[int],
    ) -> None:
        options = self.options
        readers = sum(reading)
        to_rate = len(self.streams) / readers  # deliveries/s -> messages/s

        def step(rate: float, duration: float = options.step_s) -> Step:
            done = self.run_step(
                rate, duration, server=server, publisher=publisher, loadgen=loadgen, reading_per_stream=reading
            )
            result.steps.append(done)
            log(f"{result.target} N={result.clients}: {done.brief()}")
            if done.lost and server.poll() is None:
                loadgen.reconnect(timeout=60 + result.clients / 200)
            if not done.sustained and server.poll() is None:
                self.settle(loadgen, server)
            return done

        rate = max(options.start_deliveries * to_rate, 1.0)
        good: Step | None = None
        bad: Step | None = None
        for _ in range(options.max_steps):
            done = step(rate)
            if done.publisher_limited:
                result.publisher_limited = True
                break
            if not done.sustained:
                bad = done
                break
            good = done
            rate *= options.growth
        else:
            log(f"{result.target} N={result.clients}: WARNING no step failed within --max-steps: a lower bound")
        if good is None and bad is not None and not result.publisher_limited:
            # The first rate was already too much: walk down until one holds (bounded).
            for _ in range(4):
                if server.poll() is not None:
                    break
                rate /= options.growth * options.growth
                done = step(rate)
                if done.sustained:
                    good = done
                    break
                bad = done
        if good is not None and bad is not None and not result.publisher_limited:
            for _ in range(options.bisect):
                if server.poll() is not None:
                    break
                done = step(math.sqrt(good.rate * bad.rate))
                if done.publisher_limited:
                    break
                if done.sustained:
                    good = done
                else:
                    bad = done
        result.max_sustained = good
        if good is not None and server.poll() is None:
            half = self.run_step(
                good.rate / 2,
                options.step_s,
                server=server,
                publisher=publisher,
                loadgen=loadgen,
                reading_per_stream=reading,
            )
            result.half_rate = half
            log(f"{result.target} N={result.clients}: half of max: {half.brief()}")

    def stall_run(
        self, result: TargetResult, *, server: subprocess.Popen[Any], port: int, publisher: LineProcess
    ) -> dict[str, Any]:
        """The same server, N clients of which ``stall_fraction`` never read, at half the max sustained rate
        (the no-stall latency reference): p99 of the readers, delivery, and the server's RSS step by step."""
        options = self.options
        assert result.half_rate is not None
        loadgen, hello = self.start_loadgen([port], result.clients, stall_fraction=options.stall_fraction)
        try:
            reading = hello["reading_per_stream"]
            self.warm_up(publisher, loadgen, server)
            rate = result.half_rate.rate
            # An unmeasured fill phase first: the stalled clients' socket buffers fill and the server starts
            # holding (or dropping) their data; only then are the readers' latency and the server's RSS measured.
            fill = self.run_step(
                rate,
                options.stall_fill_s,
                server=server,
                publisher=publisher,
                loadgen=loadgen,
                reading_per_stream=reading,
            )
            log(f"{result.target} N={result.clients} stall fill ({options.stall_fill_s:.0f}s): {fill.brief()}")
            kernel_before = tcp_kernel_mib()
            steps = []
            for _ in range(3):
                done = self.run_step(
                    rate,
                    options.step_s,
                    server=server,
                    publisher=publisher,
                    loadgen=loadgen,
                    reading_per_stream=reading,
                )
                steps.append(done)
                log(f"{result.target} N={result.clients} stall {options.stall_fraction:.0%}: {done.brief()}")
                if server.poll() is not None:
                    break
            reference = result.half_rate.p99_ms
            worst = max(step.p99_ms for step in steps)
            seconds = options.stall_fill_s + sum(options.step_s for _ in steps)
            return {
                "stall_fraction": options.stall_fraction,
                # What each stalled client was sent and never read, had the server queued all of it.
                "unread_kib_per_stalled_client": round(rate / len(self.streams) * 370 * seconds / 1024, 1),
                "rss_mib_after_fill": round(fill.server_rss_kib / 1024, 1),
                "tcp_kernel_mib_after_fill": kernel_before,
                "tcp_kernel_mib_at_end": tcp_kernel_mib(),
                "stalled_clients": hello["open"] - sum(reading),
                "rate": rate,
                "p50_ms": steps[-1].p50_ms,
                "p99_ms": worst,
                "no_stall_p99_ms": reference,
                "p99_ratio": round(worst / reference, 3) if reference else None,
                "min_delivered_ratio": min(step.delivered_ratio for step in steps),
                "lost": sum(step.lost for step in steps),
                "rss_mib_by_step": [round(step.server_rss_kib / 1024, 1) for step in steps],
                "server_alive": server.poll() is None,
            }
        finally:
            self.stop_loadgen(loadgen)

    # ---- the reconnect storm ----
    def run_storm(self, target: str, clients: int, storm: int) -> dict[str, Any]:
        """``--storm M``: ``clients`` steady clients and M more on one server, every client receiving
        ``--storm-rate`` messages a second (even pace); then, in a measured step, all M drop at once and reconnect
        at full speed (a new load generator connecting ``--storm-concurrency`` at a time). What matters is the
        steady clients' p99 during that step, beside the same step without a storm."""
        options = self.options
        prefix = f"pgbench:{self.run_id}:storm:{target}"
        port = free_port()
        report: dict[str, Any] = {
            "target": target,
            "steady_clients": clients,
            "storm_clients": storm,
            "storm_drop": "rst" if options.storm_abort else "fin",
        }
        server = self.start_server(target, port, prefix, clients + storm)
        publisher = steady = stormers = None
        try:
            publisher = self.start_publisher(prefix)
            steady, hello = self.start_loadgen([port], clients)
            stormers, _ = self.start_loadgen(
                [port], storm, src_offset_base=100, background=True, abort_on_quit=options.storm_abort
            )
            reading = hello["reading_per_stream"]
            self.warm_up(publisher, steady, server)
            metrics_port = self.metrics_ports.get(server.pid)
            pauses0 = gateway_pauses(metrics_port) if metrics_port else None  # from here on, clients + storm open
            rate = options.storm_rate * len(self.streams)  # every client gets storm_rate messages a second
            quiet = self.run_step(
                rate, options.step_s, server=server, publisher=publisher, loadgen=steady, reading_per_stream=reading,
                p99_max_ms=100.0, pace="even",
            )  # fmt: skip
            log(f"storm {target}: without a storm: {quiet.brief()}")
            steady.reset()
            publisher.send(json.dumps({"cmd": "run", "rate": rate, "duration": options.storm_seconds, "pace": "even"}))
            time.sleep(min(1.0, options.storm_seconds / 4))
            dropped = time.monotonic()
            self.stop_loadgen(stormers)  # every storm client closes at once
            # The storm's clients yield the load CPU to the measured ones (and Redis, the publisher): on a real
            # network they would be other machines, and what is measured is the server's effect on the steady.
            stormers, storm_hello = self.start_loadgen(
                [port], storm, concurrency=options.storm_concurrency, src_offset_base=200, background=True
            )
            reconnected_s = time.monotonic() - dropped
            published = publisher.expect("ran", options.storm_seconds * 3 + 30)
            time.sleep(0.5)
            after = steady.stats()
            pauses = pauses_between(pauses0, gateway_pauses(metrics_port) if metrics_port else None)
            expected = sum(sent * readers for sent, readers in zip(published["per_stream"], reading, strict=False))
            report.update(
                rate=rate,
                quiet_p50_ms=quiet.p50_ms,
                quiet_p99_ms=quiet.p99_ms,
                storm_p50_ms=after["p50_us"] / 1000,
                storm_p99_ms=after["p99_us"] / 1000,
                storm_max_ms=after["max_us"] / 1000,
                storm_delivered_ratio=round(after["frames"] / expected, 5) if expected else None,
                steady_lost=after["lost"],
                reconnected=storm_hello["open"],
                reconnect_s=round(reconnected_s, 2),
                target_p99_ms=100.0,
                held=after["p99_us"] / 1000 < 100.0 and after["lost"] == 0 and storm_hello["open"] == storm,
                **pauses,  # pricegate's own loop lag and GC pauses over both steps (quiet, then the storm)
            )
            log(
                f"storm {target}: {storm} clients dropped and reconnected in {reconnected_s:.2f}s; steady clients' "
                f"p50/p99/max {report['storm_p50_ms']:.1f}/{report['storm_p99_ms']:.1f}/{report['storm_max_ms']:.1f} ms"
                f" (without storm {quiet.p50_ms:.1f}/{quiet.p99_ms:.1f}); loop lag > 20 ms: "
                f"{pauses['loop_lag_over_20ms']} of {pauses['loop_lag_samples']} samples (worst <= "
                f"{pauses['loop_lag_worst_le_ms']} ms), GC pauses > 20 ms: "
                f"{pauses['gc_pauses_over_20ms']}, full collections: {pauses['gc_full']}"
            )
        except (BenchmarkError, LoadGenError) as error:
            report["error"] = str(error)
            log(f"storm {target}: ERROR {error}")
        finally:
            for loadgen in (steady, stormers):
                if loadgen is not None:
                    self.stop_loadgen(loadgen)
            if publisher is not None:
                self.processes.stop(publisher)
            self.processes.stop(server)
        return report

    def redis_pids(self) -> list[int]:
        return [self.redis_process.pid] if self.redis_process is not None and self.redis_process.poll() is None else []

    # ---- the scale test ----
    def run_scale(self) -> dict[str, Any]:
        """``--scale N``: N clients on one port of one ``pricegate gateway --workers K`` (K workers sharing the port
        through SO_REUSEPORT, enough for the per-process open-file limit), every client receiving one ticker per
        second (20 messages/s over 20 channels) for ``--scale-seconds``."""
        options = self.options
        clients = options.scale
        # Each worker holds at most its open-file limit of connections, and the kernel spreads clients over the
        # workers by a hash (not evenly): enough workers that the average leaves 1 000 descriptors to spare.
        count = max(options.scale_processes, -(-clients // max(1, fd_limit() - 1000)))
        prefix = f"pgbench:{self.run_id}:scale"
        port = free_port()
        loadgen = publisher = supervisor = None
        workers: list[int] = []
        report: dict[str, Any] = {
            "clients": clients,
            "processes": count,
            "gateway": f"pricegate gateway --workers {count} (one port)",
            "pinning": SCALE_PINNING.description,
        }
        # After a pinned ramp this script (and so every child it starts) and Redis are pinned to the load CPU:
        # release them for the scale test, where the kernel places everything, and pin them back afterwards.
        ramp_pinning, self.pinning = self.pinning, SCALE_PINNING
        pinned = {pid: os.sched_getaffinity(pid) for pid in (0, *self.redis_pids())}
        every_cpu = set(range(os.cpu_count() or 1))
        for pid in pinned:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(pid, every_cpu)
        try:
            report["time_wait_before"] = drain_time_wait(max(10_000, clients // 10))
            supervisor = self.start_server("pricegate", port, prefix, clients // count + 1, workers=count)
            workers = gateway_workers(supervisor.pid)
            if len(workers) != count:
                raise BenchmarkError(f"pricegate gateway --workers {count} runs {len(workers)} workers")
            time.sleep(0.5)
            base = [rss_kib(pid) for pid in workers]
            publisher = self.start_publisher(prefix)
            loadgen, hello = self.start_loadgen([port], clients)
            report.update(connected=hello["open"], connect_s=hello["elapsed_s"])
            log(f"scale: {hello['open']}/{clients} clients connected in {hello['elapsed_s']:.1f}s")
            time.sleep(options.idle_settle_s * 2)
            idle = [rss_kib(pid) for pid in workers]
            report["kib_per_conn"] = round((sum(idle) - sum(base)) / max(hello["open"], 1), 2)
            report["rss_mib_idle"] = [round(kib / 1024, 1) for kib in idle]
            # How the kernel spread the clients over the workers (SO_REUSEPORT hashes each connection).
            report["connections_per_worker"] = [
                gateway_connections(metrics) for metrics in self.worker_metrics_ports[supervisor.pid]
            ]
            log(f"scale: clients per worker {report['connections_per_worker']}")
            self.warm_up(publisher, loadgen, supervisor)
            cpu0 = [cpu_seconds(pid) for pid in workers]
            supervisor_cpu0 = cpu_seconds(supervisor.pid)
            wall0 = time.monotonic()
            step = self.run_step(
                float(len(self.streams)),
                options.scale_seconds,
                server=supervisor,
                publisher=publisher,
                loadgen=loadgen,
                reading_per_stream=hello["reading_per_stream"],
                p99_max_ms=1000.0,
                delivered_min=1.0,
            )
            log(f"scale: {step.brief()}")
            wall = time.monotonic() - wall0
            alive = set(gateway_workers(supervisor.pid))
            report["gateway_cpu_pct"] = [
                round((cpu_seconds(pid) - before) / wall * 100, 1) if pid in alive else None
                for pid, before in zip(workers, cpu0, strict=True)
            ]
            report["supervisor_cpu_pct"] = round((cpu_seconds(supervisor.pid) - supervisor_cpu0) / wall * 100, 1)
            report["foreign_cpu_pct"] = step.foreign_cpu_pct
            why = step.why
            if alive != set(workers):
                why = "; ".join(filter(None, [why, f"{len(set(workers) - alive)} workers died and were replaced"]))
            report.update(
                p50_ms=step.p50_ms,
                p99_ms=step.p99_ms,
                max_ms=step.max_ms,
                delivered_ratio=step.delivered_ratio,
                lost=step.lost,
                ok=step.sustained and hello["open"] == clients and alive == set(workers),
                why=why,
                loadgen_cpu_pct=step.loadgen_cpu_pct,
                rss_mib_after=[round(rss_kib(pid) / 1024, 1) for pid in workers if pid in alive],
            )
        except (BenchmarkError, LoadGenError) as error:
            report["error"] = str(error)
            log(f"scale: ERROR {error}")
        finally:
            if loadgen is not None:
                self.stop_loadgen(loadgen)
            if publisher is not None:
                self.processes.stop(publisher)
            if supervisor is not None:
                # SIGTERM: the workers drain their clients (0.5 s) and exit with the supervisor.
                self.processes.stop(supervisor, timeout=20.0)
            self.pinning = ramp_pinning
            for pid, cpus in pinned.items():
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(pid, cpus)
        return report


# ---------------------------------------------------------------- reporting


def _ratio(ours: float | None, theirs: float | None) -> float | None:
    if ours is None or not theirs:
        return None
    return round(ours / theirs, 2)


def per_n_line(clients: int, results: dict[str, TargetResult]) -> dict[str, Any]:
    ours = results.get("pricegate")
    naive = results.get("naive")
    picows = results.get("picows")
    ours_max = ours.max_sustained_per_s if ours else None
    naive_max = naive.max_sustained_per_s if naive else None
    picows_max = picows.max_sustained_per_s if picows else None
    line: dict[str, Any] = {
        "clients": clients,
        "max_sustained_per_s": ours_max,
        "naive_max_sustained_per_s": naive_max,
        "picows_max_sustained_per_s": picows_max,
        "ratio_vs_naive": _ratio(ours_max, naive_max),
        "ratio_vs_picows": _ratio(ours_max, picows_max),
        "p50_ms": ours.half_rate.p50_ms if ours and ours.half_rate else None,
        "p99_ms": ours.half_rate.p99_ms if ours and ours.half_rate else None,
        "kib_per_conn": ours.kib_per_conn if ours else None,
        "max_ms": ours.half_rate.max_ms if ours and ours.half_rate else None,
    }
    ours_bound = ours.latency_bound.deliveries_per_s if ours and ours.latency_bound else None
    picows_bound = picows.latency_bound.deliveries_per_s if picows and picows.latency_bound else None
    line["latency_bound_per_s"] = round(ours_bound) if ours_bound else None
    line["picows_latency_bound_per_s"] = round(picows_bound) if picows_bound else None
    line["ratio_latency_bound_vs_picows"] = _ratio(ours_bound, picows_bound)
    line["us_per_delivery_light"] = ours.summary()["us_per_delivery_light"] if ours else None
    line["picows_us_per_delivery_light"] = picows.summary()["us_per_delivery_light"] if picows else None
    apikey = results.get("pricegate-apikey")
    if apikey is not None:
        # Authentication costs nothing on the fan-out path: same figures within noise (issue 10: within 5 %).
        line["ratio_apikey_vs_off"] = _ratio(apikey.max_sustained_per_s, ours_max)
        line["ratio_apikey_vs_off_latency_bound"] = _ratio(
            apikey.latency_bound.deliveries_per_s if apikey.latency_bound else None, ours_bound
        )
    for name, result in results.items():
        summary = result.summary()
        if name != "pricegate":
            line[f"{name}_latency_bound_per_s"] = summary["latency_bound_per_s"]
            line[f"{name}_us_per_delivery_light"] = summary["us_per_delivery_light"]
        line[f"{name}_common"] = [[c["deliveries_per_s"], c["p50_ms"], c["p99_ms"]] for c in summary["common"]]
        for key in ("p50_ms", "p99_ms", "max_ms", "kib_per_conn"):
            if name != "pricegate":
                line[f"{name}_{key}"] = summary[key]
        for key in ("server_cpu_pct_at_max", "server_rss_mib_at_max", "loadgen_cpu_pct_peak", "publisher_limited"):
            line[f"{name}_{key}"] = summary[key]
        if result.stall is not None:
            line[f"{name}_stall_p99_ratio"] = result.stall["p99_ratio"]
        if result.error:
            line[f"{name}_error"] = result.error
    return line


def source_version(root: Path) -> str:
    """``git describe``-style version of the tree being measured (``-dirty`` when it has local changes)."""
    with contextlib.suppress(Exception):
        done = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=root, capture_output=True, text=True, check=True
        )
        return done.stdout.strip()
    return "unknown"


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions = {}
    for package in ("starlette", "uvicorn", "websockets", "uvloop", "redis", "picows"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    redis_version = ""
    with contextlib.suppress(Exception):
        redis_version = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.strip()
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "libraries": versions,
        "redis": redis_version,
    }


def print_table(results: list[TargetResult]) -> None:
    header = (
        f"{'target':>10} {'N':>7} {'max sustained/s':>16} {'p50 ms':>8} {'p99 ms':>8} {'CPU %':>6} "
        f"{'KiB/conn':>9} {'loadgen CPU %':>14}"
    )
    print(header, file=sys.stderr)
    for result in results:
        summary = result.summary()

        def fmt(value: Any, spec: str) -> str:
            return format(value, spec) if value is not None else "-"

        print(
            f"{result.target:>10} {result.clients:>7} {fmt(summary['max_sustained_per_s'], ',d'):>16} "
            f"{fmt(summary['p50_ms'], '.2f'):>8} {fmt(summary['p99_ms'], '.2f'):>8} "
            f"{fmt(summary['server_cpu_pct_at_max'], '.0f'):>6} {fmt(summary['kib_per_conn'], '.1f'):>9} "
            f"{fmt(summary['loadgen_cpu_pct_peak'], '.0f'):>14}"
            + (f"  ERROR: {result.error}" if result.error else "")
            + ("  (publisher-limited: lower bound)" if result.publisher_limited else "")
            + (
                f"  (DISTURBED: other processes up to {result.foreign_peak:.0f}% CPU)"
                if result.foreign_peak >= 10
                else ""
            ),
            file=sys.stderr,
        )


# ---------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.fanout",
        description="Fan-out benchmark: pricegate vs a naive Starlette loop vs picows (see BENCHMARKS.md).",
    )
    parser.add_argument(
        "--clients",
        help="comma-separated N values (default 1000,5000,10000; none with --scale unless given: then both run)",
    )
    parser.add_argument(
        "--targets",
        default=",".join(DEFAULT_TARGETS),
        help="subset of pricegate,naive,picows,uvloop,pricegate-apikey (the last: auth on, keys in --database-url)",
    )
    parser.add_argument("--database-url", default="postgresql://127.0.0.1:5432/test", help="for pricegate-apikey")
    parser.add_argument(
        "--common-rates",
        help="deliveries/s every target is measured at, even pace (default 20000,40000,80000; --quick 20000,80000)",
    )
    parser.add_argument(
        "--no-latency-bound", action="store_true", help="skip the common rates and the p99 <= 25 ms ramp"
    )
    parser.add_argument("--quick", action="store_true", help="1.5 s steps, x2 growth, one bisection: < 3 minutes")
    parser.add_argument("--redis-url", help="use this Redis instead of starting a redis-server")
    parser.add_argument("--step-seconds", type=float, help="publishing time per step (default 5; --quick 1.5)")
    parser.add_argument("--growth", type=float, help="rate factor between steps (default 1.5; --quick 2)")
    parser.add_argument("--bisect", type=int, help="bisection steps after the first failure (default 3; --quick 1)")
    parser.add_argument("--start-deliveries", type=float, help="first step, deliveries/s (default 20000; quick 40000)")
    parser.add_argument("--max-steps", type=int, help="upper bound on ramp steps per target (default 20; --quick 10)")
    parser.add_argument("--delivered-min", type=float, default=0.99, help="sustained: delivered fraction (0.99)")
    parser.add_argument("--p99-max-ms", type=float, default=250.0, help="sustained: p99 latency bound (250 ms)")
    parser.add_argument("--stall-fraction", type=float, default=0.0, help="also run with this fraction stalled")
    parser.add_argument(
        "--stall-fill-seconds", type=float, help="unmeasured publishing before the stall steps (15; --quick 6)"
    )
    parser.add_argument("--idle-rss", action="store_true", help="only connect N idle clients and report memory")
    parser.add_argument("--scale", type=int, default=0, help="scale test: this many clients, 1 ticker/s each")
    parser.add_argument(
        "--scale-workers",
        "--scale-processes",
        dest="scale_processes",
        type=int,
        default=2,
        help="gateway workers (pricegate gateway --workers) for --scale; more if the open-file limit needs",
    )
    parser.add_argument("--scale-seconds", type=float, default=30.0, help="publishing time of --scale")
    parser.add_argument(
        "--storm", type=int, default=0, help="reconnect storm: this many clients drop and reconnect beside --clients"
    )
    parser.add_argument("--storm-seconds", type=float, default=6.0, help="the measured step around the storm")
    parser.add_argument(
        "--storm-rate", type=float, default=1.0, help="messages/s each client receives during --storm (default 1)"
    )
    parser.add_argument(
        "--storm-abort", action="store_true", help="the storm's clients drop with RST (as crashed ones), not FIN"
    )
    parser.add_argument(
        "--retry-disturbed",
        type=int,
        default=0,
        help="rerun a target (up to this many times) when other processes used >= 10%% CPU during one of its steps",
    )
    parser.add_argument("--server-cpu", type=int, default=0)
    parser.add_argument("--load-cpu", type=int, default=1)
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--no-boost", action="store_true", help="keep the default priority (else nice -10 as root)")
    parser.add_argument(
        "--publish-via",
        choices=("packed", "broker"),
        default="packed",
        help="packed: RedisBroker.publish's exact commands, packed once (default); broker: RedisBroker.publish",
    )
    parser.add_argument("--per-src", type=int, default=10_000, help="clients per source address in 127.0.0.0/8")
    parser.add_argument("--out", type=Path, help="results directory (default out/fanout-<time>)")
    args = parser.parse_args(argv)
    quick = args.quick
    if args.clients is None:
        args.clients = "" if args.scale else "1000,5000,10000"
    clients = [int(n) for n in args.clients.split(",") if n]
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    for target in targets:
        if target not in TARGETS:
            parser.error(f"unknown target {target!r}; choose from {', '.join(TARGETS)}")
    if args.redis_url and not args.redis_url.startswith(("redis://127.", "redis://localhost")):
        parser.error("--redis-url must be on loopback (redis://127.x.x.x or redis://localhost)")
    return Options(
        clients=clients,
        targets=targets,
        quick=quick,
        redis_url=args.redis_url,
        step_s=args.step_seconds or (1.5 if quick else 5.0),
        growth=args.growth or (2.0 if quick else 1.5),
        bisect=args.bisect if args.bisect is not None else (1 if quick else 3),
        start_deliveries=args.start_deliveries or (40_000.0 if quick else 20_000.0),
        max_steps=args.max_steps or (10 if quick else 20),
        delivered_min=args.delivered_min,
        p99_max_ms=args.p99_max_ms,
        stall_fraction=args.stall_fraction,
        idle_rss=args.idle_rss,
        scale=args.scale,
        scale_processes=args.scale_processes,
        scale_seconds=args.scale_seconds,
        server_cpu=args.server_cpu,
        load_cpu=args.load_cpu,
        pin=not args.no_pin,
        out=args.out or Path("out") / f"fanout-{time.strftime('%Y%m%d-%H%M%S')}",
        per_src=args.per_src,
        publish_via=args.publish_via,
        retry_disturbed=args.retry_disturbed,
        boost=not args.no_boost,
        idle_settle_s=0.5 if quick else 1.0,
        stall_fill_s=args.stall_fill_seconds or (6.0 if quick else 15.0),
        common_deliveries=tuple(
            float(rate) for rate in (args.common_rates or ("20000,80000" if quick else "20000,40000,80000")).split(",")
        ),
        latency_growth=1.5 if quick else 1.25,
        latency_bisect=2 if quick else 3,
        latency_bound=not args.no_latency_bound,
        storm=args.storm,
        storm_seconds=args.storm_seconds,
        storm_rate=args.storm_rate,
        storm_abort=args.storm_abort,
        database_url=args.database_url,
    )


@contextlib.contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    # Ctrl-C stops the run even when started from a shell that ignores SIGINT for background jobs.
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    started = time.monotonic()
    raise_nofile(max([*options.clients, options.scale]) + 4096)
    if options.boost:
        # On a shared machine, other work competes for both CPUs: as root, run every process of the benchmark
        # (children inherit it) at a higher priority than the rest. Recorded in the results.
        with contextlib.suppress(OSError):
            os.nice(-10)
    benchmark = Benchmark(options)
    report: dict[str, Any] = {
        "command": "python -m loadtests.fanout " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine(),
        "source": source_version(benchmark.root),
        "pinning": benchmark.pinning.description,
        "nice": os.nice(0),
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in options.__dict__.items()},
        "results": [],
    }
    lines: list[dict[str, Any]] = []
    all_results: list[TargetResult] = []
    completed = False
    try:
        with _sigterm_as_exit():
            log(f"pinning: {benchmark.pinning.description}; load generator {benchmark.loadgen_binary}")
            quiet = benchmark.background_load()
            report["background_cpu_pct_before"] = quiet
            if quiet >= 5:
                log(f"WARNING: other processes use {quiet:.0f}% CPU right now: figures will be disturbed")
            benchmark.start_redis()
            if options.storm:
                report["storm"] = [
                    benchmark.run_storm(target, clients, options.storm)
                    for clients in options.clients
                    for target in options.targets
                ]
                print(json.dumps({"storm": report["storm"]}), flush=True)
            for clients in options.clients if not options.storm else []:
                results = {target: benchmark.run_target_retrying(target, clients) for target in options.targets}
                all_results += results.values()
                report["results"] += [result.summary() for result in results.values()]
                line = per_n_line(clients, results)
                lines.append(line)
                print(json.dumps(line), flush=True)
            if options.scale:
                report["scale"] = benchmark.run_scale()
                print(json.dumps({"scale": report["scale"]}), flush=True)
            completed = True
    finally:
        benchmark.close()
        # Written even when interrupted, so a long run's finished targets are never lost.
        report["completed"] = completed
        report["elapsed_s"] = round(time.monotonic() - started, 1)
        if options.clients:
            report["final"] = {key: [line.get(key) for line in lines] for key in KEYS}
        options.out.mkdir(parents=True, exist_ok=True)
        (options.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
        log(f"{'done' if completed else 'interrupted'} after {report['elapsed_s']:.0f}s; results in {options.out}")
    if options.clients:
        print_table(all_results)
        print(json.dumps(report["final"]), flush=True)
    failed = any(result.error for result in all_results) or bool(report.get("scale", {}).get("error"))
    return 1 if failed else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(130)
