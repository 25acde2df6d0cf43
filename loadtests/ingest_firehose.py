"""The ingest firehose benchmark (issue 13, target 5): how many exchange messages per second one ``pricegate
ingest`` process publishes with the full contract, and the exchange-send -> Redis-delivery lag.

    python -m loadtests.ingest_firehose                  # 2 000 symbols x (trade, bookTicker, depth@100ms), ~4 min
    python -m loadtests.ingest_firehose --quick          # same market, shorter steps, no bisection; < 3 minutes
    python -m loadtests.ingest_firehose --profile-rate 40000          # + py-spy of ingest during the 40k step
    python -m loadtests.ingest_firehose --ingest-root /tmp/before     # ingest from another tree (before/after)

What it starts (and stops, also on Ctrl-C and on errors): a ``redis-server`` on a free port; the fake exchange
(``loadtests/fake_exchange.py``: REST exchangeInfo and the combined stream endpoint for N symbols); the Redis tap
(``loadtests/tap.c``, or ``loadtests/publication_tap.py`` without a C compiler: one PSUBSCRIBE to every stream
channel, counts publications, checks their sequence and times them against the exchange's send time ``E``); and
``pricegate ingest --source binance`` exactly as deployed (leader lease, fenced publish script with seq + epoch,
history, last value, event-id filter), told to carry every stream of the market with
``PRICEGATE_ALWAYS_ON_STREAMS``, so it opens ceil(3N / 1024) upstream connections and subscribes them with paced
SUBSCRIBE requests. With ``taskset`` and two or more CPUs, ingest runs
alone on CPU 1 and everything else (Redis, fake exchange, tap, this script) on CPU 0, where Redis runs at nice -5
(``--redis-nice``) so that the load generators do not delay it: in production it has a core of its own.

Once every stream is subscribed and a warm-up has published each stream at least once, the offered rate (messages/s
spread evenly over all 3N streams) is stepped up (``--rates``); each step runs ``--step-seconds``, waits until the
tap has seen everything (or nothing more arrives), and records messages/s published, the share of offered messages
published, lag p50/p99/max, sequence gaps seen by the tap, and the CPU of ingest, Redis, the fake and the load CPU.
A step is *sustained* when >= 99 % of what was offered was published and p99 lag <= 5 ms. The ladder stops at the
first step that is not (a failed step during which other processes used >= 10 % of a CPU is run once more); with
``--bisect`` the rate between the last good and first bad step is bisected. A step in which the fake could not keep
its own schedule is marked ``exchange_limited``.

Output: progress on stderr; on stdout one JSON line
``{"max_msgs_per_s": …, "p99_lag_ms": …, "symbols": …, …}`` (the max sustained offered rate and its step's
figures). Everything measured goes to ``<out>/results.json``, ingest's log to ``<out>/ingest.log``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ingest.service import GC_FREEZE_AFTER_S
from loadtests.fake_exchange import stream_names, symbol_names
from loadtests.fanout import (
    Processes,
    busy_pct,
    cpu_seconds,
    cpu_times,
    foreign_cpu_seconds,
    free_port,
    machine,
    pauses_between,
    pauses_in,
    scrape_metrics,
    source_version,
    wait_for_port,
)
from loadtests.host_stalls import StallMonitor, stalls_summary
from loadtests.loadgen import LineProcess, LoadGenError
from loadtests.publication_tap import build_c_tap

SUSTAINED_RATIO = 0.99
P99_LIMIT_MS = 5.0
TARGET_PER_S = 50_000
INGEST_SETTLE_S = GC_FREEZE_AFTER_S[0] + 2.0  # the ladder starts once ingest froze its start-up state
DISTURBED_PCT = 10.0  # other processes' CPU (% of one CPU) during a step above which a failed step is run again
HOST_STALL_DISTURBED_MS = 20.0  # a host stall (loadtests/host_stalls.py) this long in a failed step: run it again
DEFAULT_RATES = (10_000, 20_000, 30_000, 40_000, 50_000, 60_000, 80_000, 100_000, 120_000)
ENV_LIMIT = 131_072 - 64  # Linux caps one environment string (name=value) at 128 KiB
PREFIX = "pg:md"
VENUE = "binance"


class BenchmarkError(RuntimeError):
    pass


def log(message: str) -> None:
    print(f"[firehose {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class Options:
    symbols: int
    rates: list[int]
    step_seconds: float
    bisect: int
    quick: bool
    pin: bool
    out: Path
    profile_rate: int | None
    ingest_cpu: int
    load_cpu: int
    drain_seconds: float
    all_rates: bool
    redis_nice: int
    ingest_root: Path | None
    retry_disturbed: int
    streams_per_connection: int | None
    tap: str


@dataclass
class Step:
    rate: int
    offered: int = 0
    published: int = 0
    elapsed_s: float = 0.0
    published_per_s: float = 0.0
    published_ratio: float = 0.0
    lag_p50_ms: float | None = None
    lag_p90_ms: float | None = None
    lag_p99_ms: float | None = None
    lag_max_ms: float | None = None
    timed: int = 0
    seq_gaps: int = 0
    epoch_changes: int = 0
    drain_s: float = 0.0
    ingest_cpu_pct: float | None = None
    ingest_us_per_msg: float | None = None
    redis_cpu_pct: float | None = None
    exchange_cpu_pct: float | None = None
    tap_cpu_pct: float | None = None
    load_cpu_busy_pct: float | None = None
    ingest_cpu_busy_pct: float | None = None
    background_cpu_pct: float | None = None
    exchange_max_behind_ms: float = 0.0
    # Ingest's own record of its loop's stalls during the step (its pricegate_ingest_event_loop_lag_seconds and
    # gc_pause_seconds; None for a tree that does not export them): the worst lag to its histogram bucket.
    ingest_loop_lag_samples: float | None = None
    ingest_loop_lag_over_20ms: float | None = None
    ingest_loop_lag_worst_le_ms: float | None = None
    ingest_gc_pauses_over_20ms: float | None = None
    # Moments a CPU ran no process at all for over 10 ms (loadtests/host_stalls.py: the VM's host took it), and
    # the longest: a message in flight then waited that long whatever ingest did.
    host_stalls: int | None = None
    host_stall_worst_ms: float | None = None
    # Ingest's publish calls (send -> Redis' last answer, pricegate_ingest_publish_duration_seconds): how many, the
    # share over 10 ms, and the slowest to its histogram bucket. A slow call holds every message it carries.
    publish_calls: int | None = None
    publish_calls_over_10ms_pct: float | None = None
    publish_call_worst_le_ms: float | None = None
    exchange_limited: bool = False
    sustained: bool = False
    disturbed_retry: bool = False  # not sustained while other processes used the machine: run again
    exchange: dict[str, Any] = field(default_factory=dict)

    def row(self) -> str:
        def ms(value: float | None) -> str:
            return "-" if value is None else f"{value:.2f}"

        return (
            f"{self.rate:>8} {self.published_per_s:>10.0f} {self.published_ratio * 100:>7.2f}% "
            f"{ms(self.lag_p50_ms):>7} {ms(self.lag_p99_ms):>8} {ms(self.lag_max_ms):>8} "
            f"{self.ingest_cpu_pct or 0:>6.0f} {self.load_cpu_busy_pct or 0:>6.0f} "
            f"{ms(self.ingest_loop_lag_worst_le_ms).removesuffix('.00'):>6} {ms(self.host_stall_worst_ms):>6} "
            f"{ms(self.publish_calls_over_10ms_pct) + '%':>7} "
            f"{'yes' if self.sustained else 'no':>4}{' (exchange-limited)' if self.exchange_limited else ''}"
        )


def _ms(value: int | None) -> float | None:
    return None if value is None else round(value / 1000, 3)


class Benchmark:
    def __init__(self, options: Options) -> None:
        self.options = options
        self.root = Path(__file__).resolve().parent.parent
        self.processes = Processes()
        self.tempdir = Path(tempfile.mkdtemp(prefix="pricegate-firehose-"))
        self.symbols = symbol_names(options.symbols)
        self.streams = stream_names(self.symbols)
        cpus = os.cpu_count() or 1
        taskset = shutil.which("taskset")
        if options.pin and taskset is not None and cpus >= 2:
            self.pin_ingest = [taskset, "-c", str(options.ingest_cpu)]
            self.pin_load = [taskset, "-c", str(options.load_cpu)]
            with contextlib.suppress(OSError):
                os.sched_setaffinity(0, {options.load_cpu})
            self.pinning = (
                f"ingest alone on CPU {options.ingest_cpu}; Redis, fake exchange, tap and orchestrator on CPU "
                f"{options.load_cpu}"
            )
        else:
            self.pin_ingest = self.pin_load = []
            self.pinning = "none (" + ("disabled" if not options.pin else "no taskset or one CPU") + ")"
        self.redis: subprocess.Popen[Any] | None = None
        self.redis_nice = 0
        self.tap_kind = ""
        self.redis_url = ""
        self.exchange: LineProcess | None = None
        self.exchange_port = 0
        self.tap: LineProcess | None = None
        self.stalls: StallMonitor | None = None
        self.ingest: subprocess.Popen[Any] | None = None
        self.ingest_log = self.tempdir / "ingest.log"
        self.metrics_port = 0
        self.ingest_started = 0.0

    # ---- processes ----

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PRICEGATE_")}
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONPATH"] = str(self.root) + os.pathsep + env.get("PYTHONPATH", "")
        return env

    def start(self) -> None:
        server = shutil.which("redis-server")
        if server is None:
            raise BenchmarkError("no redis-server on PATH")
        port = free_port()
        self.redis = subprocess.Popen(
            [
                *self.pin_load, server, "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                "--appendonly", "no", "--dir", str(self.tempdir), "--client-output-buffer-limit", "pubsub 0 0 0",
                "--latency-monitor-threshold", "2",
            ],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        self.processes.add(self.redis)
        wait_for_port(port, self.redis, 10)
        self.redis_url = f"redis://127.0.0.1:{port}/0"
        log(f"redis-server on port {port}")
        if self.options.redis_nice:
            # Redis shares the load CPU with the fake exchange and the tap; in production it has a core of its own.
            try:
                os.setpriority(os.PRIO_PROCESS, self.redis.pid, self.options.redis_nice)
                log(f"redis-server at nice {self.options.redis_nice}")
            except OSError as error:
                log(f"cannot renice redis-server ({error}): it competes with the load at nice 0")
        self.redis_nice = os.getpriority(os.PRIO_PROCESS, self.redis.pid)

        python = sys.executable
        self.exchange = LineProcess(
            [*self.pin_load, python, "-m", "loadtests.fake_exchange", "--symbols", str(self.options.symbols)],
            name="fake exchange",
            env=self._env(),
            cwd=self.root,
        )
        self.processes.add(self.exchange)
        ready = self.exchange.expect("ready", 30)
        self.exchange_port = int(ready["port"])
        log(f"fake exchange on port {self.exchange_port}: {ready['symbols']} symbols, {ready['streams']} streams")

        pattern = f"{PREFIX}:{VENUE}:{{*"
        c_tap = build_c_tap() if self.options.tap != "python" else None
        if self.options.tap == "c" and c_tap is None:
            raise BenchmarkError("--tap c needs a C compiler (cc, gcc or clang)")
        if c_tap is not None:
            tap_command = [str(c_tap), "--host", "127.0.0.1", "--port", str(port), "--pattern", pattern]
        else:
            module = "loadtests.publication_tap"
            tap_command = [python, "-m", module, "--redis-url", self.redis_url, "--pattern", pattern]
        self.tap_kind = "c" if c_tap is not None else "python"
        self.tap = LineProcess([*self.pin_load, *tap_command], name="tap", env=self._env(), cwd=self.root)
        self.processes.add(self.tap)
        self.tap.expect("ready", 30)
        pinned = bool(self.pin_ingest)
        self.stalls = StallMonitor(
            [self.options.ingest_cpu, self.options.load_cpu] if pinned else sorted(os.sched_getaffinity(0))
        )
        self.processes.add(self.stalls.process)

        always_on = ",".join(self.streams)
        if len("PRICEGATE_ALWAYS_ON_STREAMS=") + len(always_on) >= ENV_LIMIT:
            raise BenchmarkError(
                f"{len(self.streams)} streams do not fit in PRICEGATE_ALWAYS_ON_STREAMS (Linux caps one environment "
                "variable at 128 KiB): use at most about 2 200 symbols"
            )
        self.metrics_port = free_port()
        env = self._env()
        env.update(
            {
                "PRICEGATE_REDIS_URL": self.redis_url,
                "PRICEGATE_CHANNEL_PREFIX": PREFIX,
                "PRICEGATE_VENUE": VENUE,
                "PRICEGATE_SOURCE": "binance",
                "PRICEGATE_BINANCE_WS_URL": f"ws://127.0.0.1:{self.exchange_port}",
                "PRICEGATE_BINANCE_REST_URL": f"http://127.0.0.1:{self.exchange_port}",
                "PRICEGATE_ALWAYS_ON_STREAMS": always_on,
                "PRICEGATE_MAX_UPSTREAM_STREAMS": str(max(5000, len(self.streams))),
                "PRICEGATE_INGEST_METRICS_PORT": str(self.metrics_port),
                "PRICEGATE_HOST": "127.0.0.1",
            }
        )
        if self.options.streams_per_connection:
            env["PRICEGATE_UPSTREAM_MAX_STREAMS"] = str(self.options.streams_per_connection)
        ingest_root = self.options.ingest_root or self.root
        env["PYTHONPATH"] = str(ingest_root) + os.pathsep + env["PYTHONPATH"]
        with self.ingest_log.open("wb") as output:
            self.ingest = subprocess.Popen(
                [*self.pin_ingest, python, "-m", "pricegate_cli", "ingest", "--source", "binance"],
                env=env,
                cwd=ingest_root,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        self.processes.add(self.ingest)
        self.ingest_started = time.monotonic()
        log(f"pricegate ingest started (pid {self.ingest.pid}; log {self.ingest_log})")

    def close(self) -> None:
        self.processes.stop_all()

    def our_pids(self) -> set[int]:
        pids = {os.getpid(), os.getppid()}
        for child in self.processes.children:
            pids.add(child.pid)
        return pids

    def background_load(self, seconds: float = 1.0) -> float:
        ours = self.our_pids()
        before = foreign_cpu_seconds(ours)
        time.sleep(seconds)
        return round((foreign_cpu_seconds(ours) - before) / seconds * 100, 1)

    def _ingest_alive(self) -> None:
        assert self.ingest is not None
        if self.ingest.poll() is not None:
            tail = self.ingest_log.read_text(errors="replace")[-3000:]
            raise BenchmarkError(f"pricegate ingest exited with {self.ingest.returncode}:\n{tail}")

    def exchange_status(self) -> dict[str, Any]:
        assert self.exchange is not None
        self.exchange.send(json.dumps({"cmd": "status"}))
        return self.exchange.expect("status", 10)

    def tap_command(self, command: str, event: str) -> dict[str, Any]:
        assert self.tap is not None
        self.tap.send(json.dumps({"cmd": command}))
        return self.tap.expect(event, 30)

    def wait_subscribed(self, timeout: float = 120.0) -> dict[str, Any]:
        """Until the fake holds every stream on ingest's connections."""
        deadline = time.monotonic() + timeout
        wanted = len(self.streams)
        status: dict[str, Any] = {}
        while time.monotonic() < deadline:
            self._ingest_alive()
            status = self.exchange_status()
            if status["distinct_streams"] >= wanted and status["subscribed"] >= wanted:
                return status
            time.sleep(0.25)
        raise BenchmarkError(f"ingest did not subscribe every stream in {timeout:.0f}s: {status}")

    # ---- steps ----

    def run_step(self, rate: int, duration: float, *, warmup: bool = False) -> Step:
        assert self.exchange is not None and self.ingest is not None and self.redis is not None
        assert self.tap is not None
        self._ingest_alive()
        step = Step(rate)
        self.tap_command("reset", "reset")
        pids = {"ingest": self.ingest.pid, "redis": self.redis.pid, "exchange": self.exchange.pid, "tap": self.tap.pid}
        cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
        machine0 = cpu_times()
        foreign0 = foreign_cpu_seconds(self.our_pids())
        metrics0 = scrape_metrics(self.metrics_port)  # ingest's own record, diffed over the step
        pauses0 = None if metrics0 is None else pauses_in(metrics0, "ingest")
        calls0 = publish_call_buckets(metrics0 or "")
        if self.stalls is not None:
            self.stalls.report()  # counting starts again
        started = time.monotonic()
        profiler = self._start_profiler(rate, duration) if not warmup and rate == self.options.profile_rate else None
        self.exchange.send(json.dumps({"cmd": "run", "rate": rate, "duration": duration}))
        ran = self.exchange.expect("ran", duration + 60)
        sent_done = time.monotonic()
        step.offered = int(ran["offered"])
        step.exchange = ran
        step.exchange_max_behind_ms = float(ran["max_behind_ms"])
        # Until the tap has everything, or nothing more arrived for a while (what is missing then was dropped).
        count, last_change, previous = 0, time.monotonic(), -1
        while True:
            count = int(self.tap_command("count", "count")["count"])
            now = time.monotonic()
            if count >= step.offered:
                break
            if count != previous:
                previous, last_change = count, now
            elif now - last_change > 0.5 or now - sent_done > self.options.drain_seconds:
                break
            time.sleep(0.02)
        step.drain_s = round(time.monotonic() - sent_done, 3)
        # CPU over the sending window only: the drain after it is idle time for everyone but a lagging ingest.
        elapsed = sent_done - started
        cpu1 = {name: cpu_seconds(pid) for name, pid in pids.items()}
        machine1 = cpu_times()
        foreign1 = foreign_cpu_seconds(self.our_pids())
        metrics1 = scrape_metrics(self.metrics_port)
        pauses = pauses_between(pauses0, None if metrics1 is None else pauses_in(metrics1, "ingest"))
        calls1 = publish_call_buckets(metrics1 or "")
        if calls0 and calls1:
            calls = {bound: calls1[bound] - calls0.get(bound, 0.0) for bound in calls1}
            total = calls.get(float("inf"), 0.0)
            if total:
                step.publish_calls = int(total)
                step.publish_calls_over_10ms_pct = round((total - calls.get(0.01, total)) / total * 100, 2)
                worst = min(bound for bound, count in calls.items() if count >= total)
                step.publish_call_worst_le_ms = None if worst == float("inf") else round(worst * 1000, 1)
        if self.stalls is not None:
            stalls = stalls_summary(self.stalls.report())
            step.host_stalls = int(stalls["host_stalls"])
            step.host_stall_worst_ms = stalls["host_stall_worst_ms"]
        if pauses["loop_lag_samples"]:  # an ingest from a tree without the metrics exports no samples
            step.ingest_loop_lag_samples = pauses["loop_lag_samples"]
            step.ingest_loop_lag_over_20ms = pauses["loop_lag_over_20ms"]
            step.ingest_loop_lag_worst_le_ms = pauses["loop_lag_worst_le_ms"]
            step.ingest_gc_pauses_over_20ms = pauses["gc_pauses_over_20ms"]
        if profiler is not None:
            self._stop_profiler(profiler)
        report = self.tap_command("report", "report")
        step.published = int(report["count"])
        step.elapsed_s = round(float(ran["elapsed_s"]), 3)
        step.published_per_s = round(step.published / max(step.elapsed_s, 1e-9), 1)
        step.published_ratio = round(step.published / step.offered, 5) if step.offered else 0.0
        step.timed = int(report["timed"])
        step.lag_p50_ms = _ms(report["lag_p50_us"])
        step.lag_p90_ms = _ms(report["lag_p90_us"])
        step.lag_p99_ms = _ms(report["lag_p99_us"])
        step.lag_max_ms = _ms(report["lag_max_us"])
        step.seq_gaps = int(report["seq_gaps"])
        step.epoch_changes = int(report["epoch_changes"])
        window = max(elapsed, 1e-9)
        step.ingest_cpu_pct = round((cpu1["ingest"] - cpu0["ingest"]) / window * 100, 1)
        if step.published:
            step.ingest_us_per_msg = round((cpu1["ingest"] - cpu0["ingest"]) / step.published * 1e6, 2)
        step.redis_cpu_pct = round((cpu1["redis"] - cpu0["redis"]) / window * 100, 1)
        step.exchange_cpu_pct = round((cpu1["exchange"] - cpu0["exchange"]) / window * 100, 1)
        step.tap_cpu_pct = round((cpu1["tap"] - cpu0["tap"]) / window * 100, 1)
        step.load_cpu_busy_pct = busy_pct(machine0, machine1, self.options.load_cpu)
        step.ingest_cpu_busy_pct = busy_pct(machine0, machine1, self.options.ingest_cpu)
        step.background_cpu_pct = round((foreign1 - foreign0) / window * 100, 1)
        step.exchange_limited = step.exchange_max_behind_ms > 50 or float(ran["achieved_per_s"]) < 0.98 * rate
        step.sustained = (
            step.published_ratio >= SUSTAINED_RATIO and step.lag_p99_ms is not None and step.lag_p99_ms <= P99_LIMIT_MS
        )
        return step

    def _start_profiler(self, rate: int, duration: float) -> subprocess.Popen[Any] | None:
        assert self.ingest is not None
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not Path(py_spy).exists():
            log("no py-spy: --profile-rate ignored")
            return None
        self.options.out.mkdir(parents=True, exist_ok=True)
        output = self.options.out / f"ingest-{rate}.txt"
        log(f"py-spy recording ingest for {duration:.0f}s -> {output}")
        process = subprocess.Popen(
            [
                *self.pin_load, py_spy, "record", "-p", str(self.ingest.pid), "-f", "raw", "-r", "250", "--nolineno",
                "-d", str(max(1, int(duration))), "-o", str(output), "--nonblocking",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.processes.add(process)
        return process

    def _stop_profiler(self, process: subprocess.Popen[Any]) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=30)
        self.processes.stop(process)

    def redis_latency(self) -> dict[str, Any]:
        """Redis' own view of its stalls (``LATENCY LATEST``, events over 2 ms; ``SLOWLOG`` length): whether a lag
        spike was Redis standing still."""
        import redis

        client = redis.Redis.from_url(self.redis_url)
        try:
            latest = client.execute_command("LATENCY", "LATEST")  # type: ignore[no-untyped-call]  # untyped in redis-py
            return {
                "events": [[str(e[0]), int(e[1]), int(e[2]), int(e[3])] for e in latest],  # name, at, last ms, max ms
                "slowlog_len": int(client.slowlog_len()),
                # Redis' own time per publish script call over the whole run (the Lua script and its commands).
                "evalsha_usec_per_call": client.info("commandstats").get("cmdstat_evalsha", {}).get("usec_per_call"),
            }
        except Exception as error:  # diagnostics only
            return {"error": repr(error)}
        finally:
            client.close()

    def ingest_counters(self) -> dict[str, float]:
        """Ingest's own view from its /metrics: published, duplicates, gaps, publish errors, leader, publish calls."""
        wanted = {
            "pricegate_ingest_published_messages_total": "published",
            "pricegate_ingest_duplicates_dropped_total": "duplicates",
            "pricegate_ingest_sequence_gaps_total": "sequence_gaps",
            "pricegate_ingest_publish_errors_total": "publish_errors",
            "pricegate_ingest_unrecoverable_trades_total": "unrecoverable_trades",
            "pricegate_ingest_is_leader": "is_leader",
            "pricegate_ingest_publish_duration_seconds_count": "publish_calls",  # messages / calls = batch size
        }
        counters = dict.fromkeys(wanted.values(), 0.0)
        text = scrape_metrics(self.metrics_port)
        if text is None:
            return {}
        for line in text.splitlines():
            name = line.split("{", 1)[0].split(" ", 1)[0]
            if name in wanted:
                counters[wanted[name]] += float(line.rsplit(" ", 1)[1])
        return counters


def publish_call_buckets(metrics: str) -> dict[float, float]:
    """Ingest's histogram of publish call durations in a /metrics exposition: cumulative count per bucket bound (s);
    {} when absent."""
    buckets: dict[float, float] = {}
    for line in metrics.splitlines():
        if line.startswith("pricegate_ingest_publish_duration_seconds_bucket{"):
            bound = line.split('le="', 1)[1].split('"', 1)[0]
            buckets[float(bound)] = float(line.rsplit(" ", 1)[1])  # float("+Inf") is inf
    return buckets


def ladder(benchmark: Benchmark, options: Options) -> tuple[list[Step], Step | None]:
    """The steps up to the first one not sustained (every rate with ``--all-rates``), then the bisections. A failed
    step during which other processes used >= ``DISTURBED_PCT`` of a CPU, or the host stalled a CPU for
    >= ``HOST_STALL_DISTURBED_MS``, is run again (``--retry-disturbed``; both runs are in the results)."""
    steps: list[Step] = []
    good: Step | None = None
    bad: Step | None = None

    def run(rate: int, what: str) -> Step:
        step = benchmark.run_step(rate, options.step_seconds)
        for _ in range(options.retry_disturbed):
            if step.sustained:
                break
            if (step.background_cpu_pct or 0) >= DISTURBED_PCT:
                log(f"{what} {step.row()} [disturbed: others used {step.background_cpu_pct:.0f}% CPU; again]")
            elif (step.host_stall_worst_ms or 0) >= HOST_STALL_DISTURBED_MS:
                log(f"{what} {step.row()} [disturbed: the host stalled a CPU for {step.host_stall_worst_ms} ms; again]")
            else:
                break
            step.disturbed_retry = True
            steps.append(step)
            step = benchmark.run_step(rate, options.step_seconds)
        steps.append(step)
        log(f"{what} {step.row()}")
        return step

    for rate in options.rates:
        step = run(rate, "step")
        if step.sustained:
            good = step
        else:
            bad = bad or step
            if not options.all_rates:
                break
    for _ in range(options.bisect if good is not None and bad is not None and bad.rate > good.rate else 0):
        assert good is not None and bad is not None
        rate = (good.rate + bad.rate) // 2
        if bad.rate - good.rate < 2000:
            break
        step = run(rate, "bisect")
        if step.sustained:
            good = step
        else:
            bad = step
    return steps, good


def parse_args(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.ingest_firehose", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("--symbols", type=int, default=2000, help="symbols of the fake market (3 streams each)")
    parser.add_argument("--rates", default=None, help="offered messages/s per step, comma-separated")
    parser.add_argument("--step-seconds", type=float, default=None, help="seconds per step (8; --quick: 4)")
    parser.add_argument("--bisect", type=int, default=None, help="bisections after the ladder (2; --quick: 0)")
    parser.add_argument("--quick", action="store_true", help="shorter steps, no bisection: under 3 minutes")
    parser.add_argument("--no-pin", action="store_true", help="do not pin with taskset")
    parser.add_argument("--ingest-cpu", type=int, default=1)
    parser.add_argument("--load-cpu", type=int, default=0)
    parser.add_argument("--drain-seconds", type=float, default=10.0, help="most seconds to wait for stragglers")
    parser.add_argument(
        "--redis-nice",
        type=int,
        default=-5,
        help="redis-server's nice value (default -5, ahead of the fake exchange and the tap on the load CPU, as if it "
        "had a core of its own; needs root, else it stays at 0); 0 to leave it",
    )
    parser.add_argument(
        "--tap",
        choices=("auto", "c", "python"),
        default="auto",
        help="the Redis subscriber: loadtests/tap.c (auto: when a C compiler is there) or loadtests/publication_tap.py",
    )
    parser.add_argument(
        "--retry-disturbed", type=int, default=1, help="reruns of a failed step others or a host stall disturbed"
    )
    parser.add_argument(
        "--streams-per-connection", type=int, default=None, help="PRICEGATE_UPSTREAM_MAX_STREAMS (default: 1024)"
    )
    parser.add_argument(
        "--ingest-root",
        type=Path,
        default=None,
        help="run pricegate ingest from this source tree (e.g. `git archive <commit> | tar -x -C DIR`): before/after",
    )
    parser.add_argument("--all-rates", action="store_true", help="run every rate, also after a step that failed")
    parser.add_argument("--profile-rate", type=int, default=None, help="py-spy ingest during the step at this rate")
    parser.add_argument("--out", type=Path, default=None, help="results directory (out/firehose-<time>)")
    args = parser.parse_args(argv)
    rates = [int(r) for r in args.rates.split(",")] if args.rates else list(DEFAULT_RATES)
    if args.profile_rate is not None and args.profile_rate not in rates:
        rates = sorted({*rates, args.profile_rate})
    return Options(
        symbols=args.symbols,
        rates=rates,
        step_seconds=args.step_seconds if args.step_seconds is not None else (4.0 if args.quick else 8.0),
        bisect=args.bisect if args.bisect is not None else (0 if args.quick else 2),
        quick=args.quick,
        pin=not args.no_pin,
        out=args.out or Path("out") / f"firehose-{time.strftime('%Y%m%d-%H%M%S')}",
        profile_rate=args.profile_rate,
        ingest_cpu=args.ingest_cpu,
        load_cpu=args.load_cpu,
        drain_seconds=args.drain_seconds,
        all_rates=args.all_rates,
        redis_nice=args.redis_nice,
        ingest_root=args.ingest_root.resolve() if args.ingest_root else None,
        retry_disturbed=args.retry_disturbed,
        streams_per_connection=args.streams_per_connection,
        tap=args.tap,
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


def cpu_probe_s() -> float:
    """Seconds a fixed pure-Python loop takes here (the load CPU): how fast this machine runs right now. A VM's
    vCPU can be slower at one time than another (a busy host), which moves every figure: compare runs by it."""
    started = time.perf_counter()
    total = 0
    for value in range(5_000_000):
        total += value
    return round(time.perf_counter() - started, 3)


def final_line(options: Options, benchmark: Benchmark, best: Step | None, connections: int) -> dict[str, Any]:
    return {
        "max_msgs_per_s": best.rate if best is not None else 0,
        "p99_lag_ms": best.lag_p99_ms if best is not None else None,
        "symbols": options.symbols,
        "streams": len(benchmark.streams),
        "upstream_connections": connections,
        "published_per_s": best.published_per_s if best is not None else 0,
        "p50_lag_ms": best.lag_p50_ms if best is not None else None,
        "ingest_cpu_pct": best.ingest_cpu_pct if best is not None else None,
        "ingest_us_per_msg": best.ingest_us_per_msg if best is not None else None,
        "target_met": best is not None and best.rate >= TARGET_PER_S,
    }


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    started = time.monotonic()
    benchmark = Benchmark(options)
    report: dict[str, Any] = {
        "command": "python -m loadtests.ingest_firehose " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine(),
        "source": source_version(benchmark.root),
        "ingest_root": str(options.ingest_root) if options.ingest_root else None,
        "pinning": benchmark.pinning,
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in options.__dict__.items()},
        "criteria": {"published_ratio_min": SUSTAINED_RATIO, "p99_lag_ms_max": P99_LIMIT_MS},
        "steps": [],
    }
    steps: list[Step] = []
    best: Step | None = None
    completed = False
    final: dict[str, Any] | None = None
    try:
        with _sigterm_as_exit():
            log(f"pinning: {benchmark.pinning}")
            report["background_cpu_pct_before"] = quiet = benchmark.background_load()
            report["cpu_probe_s_before"] = probe = cpu_probe_s()
            log(f"CPU probe: {probe} s (a fixed Python loop; lower is faster)")
            if quiet >= 5:
                log(f"WARNING: other processes use {quiet:.0f}% CPU right now: figures will be disturbed")
            benchmark.start()
            subscribed_at = time.monotonic()
            status = benchmark.wait_subscribed()
            report["subscribe_s"] = round(time.monotonic() - subscribed_at, 2)
            report["redis_nice"] = benchmark.redis_nice
            report["tap"] = benchmark.tap_kind
            log(f"every stream subscribed in {report['subscribe_s']}s over {status['connections']} connections")
            # Warm-up: every stream published at least once (its epoch is made), the lease surely held.
            warm_rate = min(5000, max(500, len(benchmark.streams)))
            warm = benchmark.run_step(warm_rate, max(1.0, 2 * len(benchmark.streams) / warm_rate), warmup=True)
            report["warmup"] = asdict(warm)
            log(f"warm-up: {warm.published}/{warm.offered} published, p99 {warm.lag_p99_ms} ms")
            if warm.published_ratio < SUSTAINED_RATIO:
                raise BenchmarkError(f"the warm-up was not published ({warm.published}/{warm.offered}): see the log")
            log(f"{'rate':>8} {'pub/s':>10} {'pub %':>8} {'p50 ms':>7} {'p99 ms':>8} {'max ms':>8} "
                f"{'ingCPU':>6} {'ldCPU':>6} {'loop<=':>6} {'stall':>6} {'call>10':>7} {'ok':>4}")  # fmt: skip
            # pricegate ingest freezes its long-lived state a few seconds after start (one full collection first):
            # not inside the first step.
            settle = INGEST_SETTLE_S - (time.monotonic() - benchmark.ingest_started)
            if settle > 0:
                time.sleep(settle)
            steps, best = ladder(benchmark, options)
            report["steps"] = [asdict(step) for step in steps]
            report["cpu_probe_s_after"] = cpu_probe_s()
            report["redis_latency"] = benchmark.redis_latency()
            report["exchange_status"] = benchmark.exchange_status()
            report["ingest_counters"] = benchmark.ingest_counters()
            final = final_line(options, benchmark, best, int(status["connections"]))
            completed = True
    except (BenchmarkError, LoadGenError) as error:
        log(f"error: {error}")
        report["error"] = str(error)
    finally:
        benchmark.close()
        report["completed"] = completed
        report["elapsed_s"] = round(time.monotonic() - started, 1)
        report["steps"] = [asdict(step) for step in steps]
        report["final"] = final
        options.out.mkdir(parents=True, exist_ok=True)
        (options.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
        with contextlib.suppress(OSError):
            shutil.copy(benchmark.ingest_log, options.out / "ingest.log")
        shutil.rmtree(benchmark.tempdir, ignore_errors=True)
        log(f"{'done' if completed else 'failed'} after {report['elapsed_s']:.0f}s; results in {options.out}")
    if final is None:
        return 1
    print(json.dumps(final), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
