"""The fan-out benchmark's plumbing at tiny scale, so it cannot rot: ``python -m loadtests.fanout`` with 40
clients and two short rate steps against the real gateway and both baselines, a stalled-clients run and a
(tiny) scale test on one ``pricegate gateway --workers 2`` (real Redis, real processes, the
load generator compiled from ``loadtests/loadgen.c``). Figures are not checked (this is no benchmark), only
that the output has its documented shape and that frames were really delivered, counted and timed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loadtests.chart import latency_bound_series, markdown
from loadtests.fanout import KEYS
from loadtests.host_stalls import StallMonitor, stalls_summary
from loadtests.publisher import STREAMS, publish_time_us, ticker_payload
from tests.external_tools import require_programs

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _programs() -> None:
    require_programs("redis-server", "cc")


def test_payload_is_a_binance_ticker_carrying_the_publish_time_in_microseconds() -> None:
    now_us = time.time_ns() // 1000
    payload = ticker_payload(3, now_us)
    parsed = json.loads(payload)
    assert parsed["e"] == "24hrTicker" and parsed["s"] == "SOLUSDT" and parsed["E"] == now_us
    assert publish_time_us(payload) == now_us
    assert 360 <= len(payload) <= 380
    assert len(STREAMS) == 20 and len(set(STREAMS)) == 20


@pytest.mark.integration
@pytest.mark.timeout(90)
def test_quick_mode_plumbing_at_tiny_scale(tmp_path: Path) -> None:
    command = [
        sys.executable, "-m", "loadtests.fanout", "--quick",
        "--clients", "40",
        "--step-seconds", "0.4",
        "--start-deliveries", "400",
        "--max-steps", "2",
        "--bisect", "0",
        "--common-rates", "400,800",
        "--stall-fraction", "0.5", "--stall-fill-seconds", "0.5",
        "--scale", "40", "--scale-seconds", "1",
        "--out", str(tmp_path / "out"),
    ]  # fmt: skip
    started = time.monotonic()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=80, check=False)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-4000:]
    assert elapsed < 60, f"took {elapsed:.0f}s"

    lines = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 3, result.stdout  # one line per N, the scale test, then the final object
    per_n, scale_line, final = lines
    for key in KEYS:
        assert key in per_n and key in final, key
    assert per_n["clients"] == 40 and final["clients"] == [40]
    for key in ("max_sustained_per_s", "naive_max_sustained_per_s", "picows_max_sustained_per_s"):
        assert per_n[key] > 0, (key, result.stderr[-4000:])
        assert final[key] == [per_n[key]]
    assert per_n["ratio_vs_naive"] == round(per_n["max_sustained_per_s"] / per_n["naive_max_sustained_per_s"], 2)
    assert per_n["ratio_vs_picows"] == round(per_n["max_sustained_per_s"] / per_n["picows_max_sustained_per_s"], 2)
    assert 0 < per_n["p50_ms"] <= per_n["p99_ms"] < 250
    assert per_n["kib_per_conn"] is not None

    # The scale test (tiny here): every client connected and received its tickers, on one port of one
    # `pricegate gateway --workers 2` whose workers both took clients.
    scale = scale_line["scale"]
    assert scale["connected"] == 40 and scale["ok"] is True, scale
    assert scale["delivered_ratio"] >= 0.99 and scale["lost"] == 0
    assert scale["processes"] == 2 and scale["gateway"] == "pricegate gateway --workers 2 (one port)"
    assert sum(scale["connections_per_worker"]) == 40 and all(scale["connections_per_worker"]), scale
    assert len(scale["gateway_cpu_pct"]) == 2 and None not in scale["gateway_cpu_pct"]

    report = json.loads((tmp_path / "out" / "results.json").read_text())
    assert report["final"] == final
    assert report["scale"] == scale
    tables = markdown(report)  # BENCHMARKS.md's tables come from the same report
    assert "| 40 |" in tables and "| pricegate | 40 |" in tables and "stalled" in tables
    assert tables.splitlines()[-1].startswith("| 40 | ")  # the scale row
    for entry in report["results"]:  # the stalled run: 20 of 40 clients never read, the others all got theirs
        stall = entry["stall"]
        assert stall["stalled_clients"] == 20 and stall["server_alive"] is True, (entry["target"], stall)
        assert stall["min_delivered_ratio"] >= 0.99 and stall["lost"] == 0, (entry["target"], stall)
    assert {entry["target"] for entry in report["results"]} == {"pricegate", "naive", "picows", "uvloop"}
    # Issue 13's figures: every target at the common rates (even pace), the latency-bound max, CPU per delivery.
    assert per_n["latency_bound_per_s"] > 0 and per_n["picows_latency_bound_per_s"] > 0
    assert per_n["ratio_latency_bound_vs_picows"] == round(
        per_n["latency_bound_per_s"] / per_n["picows_latency_bound_per_s"], 2
    )
    # CPU time is read in 10 ms ticks: at this tiny scale a step may use less than one.
    assert per_n["us_per_delivery_light"] >= 0 and per_n["picows_us_per_delivery_light"] >= 0
    # The chart's latency-bound panel has a point per server (BENCHMARKS.md shows both throughput definitions).
    assert {target: [n for n, _ in points] for target, points in latency_bound_series(report).items()} == {
        target: [40] for target in ("pricegate", "naive", "picows", "uvloop")
    }
    for entry in report["results"]:
        assert [round(c["deliveries_per_s"]) for c in entry["common"]] == [400, 800], entry["common"]
        assert all(step["pace"] == "even" for step in entry["latency_steps"])
    for entry in report["results"]:
        assert entry["error"] is None, entry
        assert entry["connected"] == 40
        assert len(entry["steps"]) >= 2  # two ramp steps (plus the half-rate one, kept separately)
        for step in entry["steps"]:
            assert step["publisher"]["sent"] > 0
            assert step["delivered_ratio"] > 0.9  # frames were really received and counted per client
            assert step["p99_ms"] > 0  # ... and their publish time parsed
            assert step["loadgen_cpu_pct"] >= 0
    assert report["machine"]["nproc"] >= 1 and report["command"].startswith("python -m loadtests.fanout")


async def test_packed_publisher_sends_exactly_what_redis_broker_publish_sends(monkeypatch: pytest.MonkeyPatch) -> None:
    from loadtests.publisher import PackedScript, record_publish
    from shared.broker.contract import OutgoingMessage
    from shared.broker.redis import RedisBroker

    # The candidate epoch (used only by a channel that has none) is drawn per publish call: fix it.
    monkeypatch.setattr("shared.broker.redis.random.randrange", lambda *_: 4242)
    broker = RedisBroker("redis://127.0.0.1:1/0", prefix="pgbench:test", history_maxlen=1000, history_max_age_s=300)
    broker._script_sha = "0123456789abcdef0123456789abcdef01234567"
    packed = await PackedScript.from_broker(broker, STREAMS)
    payload = ticker_payload(5, 1_700_000_000_123_456)
    # What RedisBroker.publish itself writes to Redis for this message.
    (theirs,) = await record_publish(broker, [OutgoingMessage(STREAMS[5], payload, True)])
    head = theirs[: theirs.index(b"$%d\r\n%b" % (len(payload), payload))]
    published_ms = head[head.rindex(b"$", 0, len(head) - 2) :]  # the bulk string just before the payload
    assert packed.command(5, published_ms, payload) == theirs


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_storm_plumbing_reads_the_gateways_own_pause_record(tmp_path: Path) -> None:
    """``--storm`` at tiny scale: the storm clients reconnected, the steady ones were measured through it, and the
    gateway's loop-lag and GC-pause histograms were read around it (the 'no pause over 20 ms' figure). The storm's
    clients leave with resets (``--storm-abort``; the default, FIN, is how every load generator quits)."""
    command = [
        sys.executable, "-m", "loadtests.fanout", "--targets", "pricegate",
        "--clients", "40", "--storm", "40", "--storm-abort", "--storm-seconds", "1.5", "--step-seconds", "0.5",
        "--out", str(tmp_path / "out"),
    ]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=55, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    storm = next(line["storm"] for line in lines if "storm" in line)
    assert len(storm) == 1, storm
    (entry,) = storm
    assert entry["target"] == "pricegate" and entry.get("error") is None, entry
    assert entry["storm_drop"] == "rst", entry
    assert entry["reconnected"] == 40 and entry["steady_lost"] == 0, entry
    assert entry["storm_delivered_ratio"] > 0.9 and entry["storm_p99_ms"] > 0, entry
    # The loop-lag monitor samples every 100 ms: two steps of >= 0.5 s each gave it samples to count.
    assert entry["loop_lag_samples"] >= 5 and entry["loop_lag_over_20ms"] >= 0, entry
    assert entry["gc_pauses_over_20ms"] >= 0 and entry["gc_full"] >= 0, entry


def test_the_host_stall_monitor_sees_a_cpu_taken_away() -> None:
    """A stopped monitor process stands for a vCPU the host took: its threads wake up that late, and say so, per
    CPU; the next report starts from nothing again."""
    cpus = sorted(os.sched_getaffinity(0))[:2]
    monitor = StallMonitor(cpus)
    try:
        monitor.report()  # counting starts here
        os.kill(monitor.process.pid, signal.SIGSTOP)
        time.sleep(0.15)
        os.kill(monitor.process.pid, signal.SIGCONT)
        time.sleep(0.05)
        report = monitor.report()
        assert set(report) == {str(cpu) for cpu in cpus}
        for figures in report.values():
            assert figures["stalls"] >= 1 and 100 <= figures["worst_ms"] <= figures["stalled_ms"]
        summary = stalls_summary(report)
        assert summary["host_stalls"] >= len(cpus) and summary["host_stall_worst_ms"] >= 100
        time.sleep(0.05)
        assert all(figures["worst_ms"] < 100 for figures in monitor.report().values())
    finally:
        monitor.close()


@pytest.mark.integration
@pytest.mark.timeout(90)
def test_publish_cost_plumbing_at_tiny_scale(tmp_path: Path) -> None:
    """Both forms publish every message of every round (a duplicate or a refusal ends the run with an error), each
    round is measured for both, and the last line carries the medians and their ratio."""
    out = tmp_path / "cost.json"
    command = [
        sys.executable, "-m", "loadtests.publish_cost", "--symbols", "10", "--messages", "600", "--rounds", "2",
        "--batch", "8", "--out", str(out),
    ]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=80, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    final = json.loads(result.stdout.strip().splitlines()[-1])
    assert final["symbols"] == 10 and final["batch"] == 8
    assert final["one_script_us_per_msg"] > 0 and final["batch_script_us_per_msg"] > 0
    one, batch = final["one_redis_us_per_msg"], final["batch_redis_us_per_msg"]
    assert one >= 0 and batch >= 0
    assert final["ratio_batch_vs_one"] == (round(batch / one, 3) if one else None)
    report = json.loads(out.read_text())
    assert sorted((r["round"], r["mode"]) for r in report["rounds"]) == [
        (1, "batch"),
        (1, "one"),
        (2, "batch"),
        (2, "one"),
    ]
    assert all(r["messages"] == 600 and r["script_us_per_msg"] > 0 for r in report["rounds"])
