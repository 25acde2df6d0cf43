"""Host stalls: moments when a CPU of this machine ran nothing of ours at all, measured while a benchmark runs.

On a virtual machine the host can take a vCPU away for tens of milliseconds (on this project's 2-vCPU VM a busy
loop at nice -20 on an otherwise idle machine saw gaps of 100 ms a few times a minute: BENCHMARKS.md). A message
in flight then waits that long whatever the code under test does, and a benchmark step of a few seconds with one
such stall has a p99 of tens of milliseconds. This monitor tells those steps apart: per CPU, one thread pinned to
it at the highest priority a normal process may take (nice -20 when allowed) sleeps ``--period-ms`` at a time and
counts every wake-up later than ``--threshold-ms``. Such a thread preempts anything of normal priority at once, so
a late wake-up means the CPU ran no process at all: the host (or the kernel's own work) had it. It costs a few
microseconds per wake-up (about 0.5 % of a CPU at 2 ms).

Run as ``python -m loadtests.host_stalls --cpus 0,1``; it reads one JSON command per line on stdin
(``{"cmd":"report"}``: the stalls since the previous report, then counting starts again; ``{"cmd":"quit"}``) and
answers each with one JSON line: ``{"event":"report","cpus":{"0":{"stalls":N,"worst_ms":X,"stalled_ms":Y},...}}``.
:class:`StallMonitor` starts and drives it; :func:`stalls_summary` folds a report into the figures a step records.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loadtests.loadgen import LineProcess

DEFAULT_PERIOD_MS = 2.0
DEFAULT_THRESHOLD_MS = 10.0


class _Watch:
    """One CPU's record since the last report."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.stalls = 0
        self.worst_s = 0.0
        self.stalled_s = 0.0

    def take(self) -> dict[str, float]:
        with self.lock:
            report = {"stalls": self.stalls, "worst_ms": round(self.worst_s * 1000, 2),
                      "stalled_ms": round(self.stalled_s * 1000, 2)}  # fmt: skip
            self.stalls, self.worst_s, self.stalled_s = 0, 0.0, 0.0
        return report


def _watch(cpu: int, watch: _Watch, period_s: float, threshold_s: float, stop: threading.Event) -> None:
    with contextlib.suppress(OSError):  # pinning and priority are best effort (no such CPU, no privilege)
        os.sched_setaffinity(0, {cpu})  # 0: this thread
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), -20)
    due = time.monotonic() + period_s
    while not stop.is_set():
        time.sleep(max(0.0, due - time.monotonic()))
        now = time.monotonic()
        late = now - due
        if late > threshold_s:
            with watch.lock:
                watch.stalls += 1
                watch.worst_s = max(watch.worst_s, late)
                watch.stalled_s += late
        due = now + period_s


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.host_stalls", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpus", default=",".join(str(cpu) for cpu in sorted(os.sched_getaffinity(0))))
    parser.add_argument("--period-ms", type=float, default=DEFAULT_PERIOD_MS)
    parser.add_argument("--threshold-ms", type=float, default=DEFAULT_THRESHOLD_MS)
    options = parser.parse_args(argv)
    cpus = [int(cpu) for cpu in options.cpus.split(",") if cpu]
    watches = {cpu: _Watch() for cpu in cpus}
    stop = threading.Event()
    threads = [
        threading.Thread(
            target=_watch,
            args=(cpu, watches[cpu], options.period_ms / 1000, options.threshold_ms / 1000, stop),
            daemon=True,
        )
        for cpu in cpus
    ]
    for thread in threads:
        thread.start()
    print(json.dumps({"event": "ready", "cpus": cpus}), flush=True)
    for line in sys.stdin:
        command = json.loads(line).get("cmd") if line.strip() else None
        if command == "report":
            print(json.dumps({"event": "report", "cpus": {str(cpu): watches[cpu].take() for cpu in cpus}}), flush=True)
        elif command == "quit":
            break
    stop.set()
    return 0


class StallMonitor:
    """The monitor as a child process of a benchmark: :meth:`report` between steps."""

    def __init__(self, cpus: Sequence[int], *, threshold_ms: float = DEFAULT_THRESHOLD_MS) -> None:
        argv = [sys.executable, "-m", "loadtests.host_stalls", "--cpus", ",".join(map(str, cpus))]
        self.threshold_ms = threshold_ms
        root = Path(__file__).resolve().parent.parent
        self.process = LineProcess([*argv, "--threshold-ms", str(threshold_ms)], name="host-stalls", cwd=root)
        self.process.expect("ready", 10)

    def report(self) -> dict[str, Any]:
        """Per CPU, the stalls since the previous report (the first: since start)."""
        self.process.send(json.dumps({"cmd": "report"}))
        cpus: dict[str, Any] = self.process.expect("report", 10)["cpus"]
        return cpus

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.process.send(json.dumps({"cmd": "quit"}))
        self.process.stop()


def stalls_summary(report: dict[str, Any]) -> dict[str, float]:
    """A report folded over the CPUs: how many stalls, the worst, and the time stalled (summed)."""
    cpus = report.values()
    return {
        "host_stalls": sum(cpu["stalls"] for cpu in cpus),
        "host_stall_worst_ms": max((cpu["worst_ms"] for cpu in cpus), default=0.0),
        "host_stalled_ms": round(sum(cpu["stalled_ms"] for cpu in cpus), 2),
    }


if __name__ == "__main__":
    raise SystemExit(main())
