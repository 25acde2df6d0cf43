"""Checks the capacity model's measured constants (``loadtests/capacity_model.py``, docs/capacity.md) against a
scaled-down local run, and prints the verdict.

    python -m loadtests.capacity_check                  # runs the scaled-down benchmarks (about 2 minutes), compares
    python -m loadtests.capacity_check --broker-results out/broker-scale-X/results.json \\
        --fanout-results out/fanout-Y/results.json      # compares runs made before (either may be given alone)

What it runs (each in its own process, exactly as documented in BENCHMARKS.md):

- ``python -m loadtests.broker_scale --quick --shards 1 --via packed,broker``: one shard, the gateway on it, then
  the shard alone and its subscriber fan-out: Redis CPU per message and per pipeline, per further subscriber and
  pipeline, the messages/s of a shard, the gateway's CPU per broker message, and the broker path's client cost (one
  ingest process's ceiling);
- ``python -m loadtests.fanout --quick --targets pricegate --clients 1000``: one gateway process's CPU per delivery at
  a light rate (one frame per write: the model's ``write_us``);
- ``python -m loadtests.fanout --idle-rss --targets pricegate --clients 5000``: memory per idle connection.

Each constant has a direction. A *cost* (µs, KiB) holds when the measured figure is at most the constant x (1 +
tolerance): a model whose costs are higher than measured over-provisions, which is reported (``conservative``) but
not a failure. A *capacity* (messages/s) holds when the measured figure is at least the constant / (1 + tolerance);
one measured below saturation is only a lower bound (``lower bound``). Exit status: 0 when every checked constant
holds, 3 when one does not, 1 when a benchmark failed. The last stdout line is one JSON object:
``{"ok": ..., "tolerance": ..., "checks": [{"name", "model", "measured", "ratio", "kind", "verdict"}, ...]}``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loadtests.capacity_model import MODEL, Constants

ROOT = Path(__file__).resolve().parent.parent
KINDS = {
    "redis_us_per_msg": "cost",
    "redis_us_per_pipeline": "cost",
    "redis_us_per_subscriber_pipeline": "cost",
    "gateway_broker_msg_us": "cost",
    "write_us": "cost",
    "kib_per_conn": "cost",
    "shard_msgs_per_s": "capacity",
    "ingest_msgs_per_s": "capacity",
}
BROKER_QUICK = ["--quick", "--shards", "1", "--via", "packed,broker"]
FANOUT_QUICK = ["--quick", "--targets", "pricegate", "--clients", "1000", "--common-rates", "20000"]
FANOUT_IDLE = ["--idle-rss", "--targets", "pricegate", "--clients", "5000"]
# --tiny: the plumbing only (tests/test_capacity.py), figures meaningless.
BROKER_TINY = [
    "--shards", "1", "--via", "packed,broker", "--streams", "6", "--step-seconds", "0.4", "--start-rate", "300",
    "--max-steps", "2", "--bisect", "0", "--fanout-subscribers", "1,2", "--fanout-rate", "300",
]  # fmt: skip
FANOUT_TINY = [
    "--quick", "--targets", "pricegate", "--clients", "40", "--step-seconds", "0.4", "--start-deliveries", "400",
    "--max-steps", "2", "--bisect", "0", "--common-rates", "400",
]  # fmt: skip
FANOUT_IDLE_TINY = ["--idle-rss", "--targets", "pricegate", "--clients", "200"]


class CheckError(RuntimeError):
    pass


@dataclass
class Check:
    name: str
    model: float
    measured: float | None
    kind: str  # cost | capacity
    verdict: str  # ok | conservative | off | lower bound | not measured
    ratio: float | None  # measured / model
    note: str = ""


def log(message: str) -> None:
    print(f"[capacity_check {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run_benchmark(module: str, args: Sequence[str], out: Path, timeout: float) -> dict[str, Any]:
    """Run ``python -m loadtests.<module> <args> --out <out>`` and return its results.json."""
    command = [sys.executable, "-m", f"loadtests.{module}", *args, "--out", str(out)]
    log(f"running {' '.join(command[2:])}")
    done = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=None, text=True, timeout=timeout)
    results = out / "results.json"
    if not results.is_file():
        raise CheckError(f"{module} wrote no {results} (exit {done.returncode})")
    report: dict[str, Any] = json.loads(results.read_text())
    if done.returncode != 0:
        raise CheckError(f"{module} exited with {done.returncode}: {_errors(report)}")
    return report


def _errors(report: dict[str, Any]) -> str:
    return "; ".join(str(entry.get("error")) for entry in report.get("results", []) if entry.get("error")) or "?"


def broker_figures(report: dict[str, Any]) -> dict[str, tuple[float | None, str]]:
    """The per-shard and per-message figures of a broker_scale report (value, note)."""
    final = report.get("final") or {}
    ceiling = final.get("per_shard_ceiling") or {}
    fit = final.get("redis_cost_fit") or {}
    span = fit.get("msgs_per_pipeline_range")
    figures: dict[str, tuple[float | None, str]] = {
        "redis_us_per_msg": (fit.get("us_per_msg"), f"fit over {fit.get('points')} steps, {span} msgs/pipeline"),
        "redis_us_per_pipeline": (fit.get("us_per_pipeline"), f"the same fit (rms {fit.get('rms_error_us')} µs)"),
        "redis_us_per_subscriber_pipeline": (
            ceiling.get("redis_us_per_subscriber_pipeline"),
            f"slope per subscriber ({ceiling.get('redis_us_per_extra_subscriber')} µs/msg) x msgs/pipeline",
        ),
        "shard_msgs_per_s": (
            ceiling.get("msgs_per_s_per_shard"),
            "saturated" if ceiling.get("saturated") else f"not saturated: {ceiling.get('limited_by')}",
        ),
    }
    packed = [r for r in report.get("results", []) if r["via"] == "packed" and r.get("max_sustained")]
    if packed:
        one = min(packed, key=lambda r: r["shards"])
        figures["gateway_broker_msg_us"] = (one["max_sustained"]["gateway_us_per_msg"], f"{one['shards']} shard(s)")
    broker = [r for r in report.get("results", []) if r["via"] == "broker" and r.get("max_sustained")]
    if broker:
        one = min(broker, key=lambda r: r["shards"])
        cost = one["max_sustained"]["publisher_us_per_msg"]
        figures["ingest_msgs_per_s"] = (
            round(1e6 / cost) if cost else None,
            f"1 / ClusterBroker.publish's client CPU per message ({cost} µs) at the max sustained rate",
        )
    return figures


def fanout_figures(report: dict[str, Any]) -> dict[str, tuple[float | None, str]]:
    """The per-process figures of fanout reports (the quick run and the idle-RSS run merged)."""
    figures: dict[str, tuple[float | None, str]] = {}
    final = report.get("final") or {}
    light = [value for value in final.get("us_per_delivery_light", []) if value]
    if light:
        figures["write_us"] = (max(light), "server CPU per delivery at the light common rate, one frame per write")
    kib = [value for value in final.get("kib_per_conn", []) if value]
    if kib:
        clients = final.get("clients", [])
        figures["kib_per_conn"] = (max(kib), f"idle RSS per connection at N = {clients}")
    return figures


def judge(name: str, measured: float | None, note: str, tolerance: float, c: Constants = MODEL) -> Check:
    model = c.value(name)
    kind = KINDS[name]
    if measured is None:
        return Check(name, model, None, kind, "not measured", None, note)
    ratio = round(measured / model, 3) if model else None
    if kind == "cost":
        if measured > model * (1 + tolerance):
            verdict = "off"
        elif measured < model / (1 + tolerance):
            verdict = "conservative"
        else:
            verdict = "ok"
    elif measured >= model / (1 + tolerance):
        verdict = "ok"
    elif note.startswith("not saturated"):
        verdict = "lower bound"
    else:
        verdict = "off"
    return Check(name, model, measured, kind, verdict, ratio, note)


def check(
    broker: dict[str, Any] | None, fanout: list[dict[str, Any]], tolerance: float, c: Constants = MODEL
) -> list[Check]:
    figures: dict[str, tuple[float | None, str]] = {}
    if broker is not None:
        figures.update(broker_figures(broker))
    # From several fan-out runs, each figure from the run with the most clients (memory per connection is the
    # steadier the more connections it is spread over).
    for report in sorted(fanout, key=lambda report: -max((report.get("final") or {}).get("clients") or [0])):
        for name, (value, note) in fanout_figures(report).items():
            if value is not None and (name not in figures or figures[name][0] is None):
                figures[name] = (value, note)
    return [judge(name, *figures.get(name, (None, "")), tolerance, c) for name in c.checked]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loadtests.capacity_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--broker-results", type=Path, help="a loadtests.broker_scale results.json (else: run it)")
    parser.add_argument(
        "--fanout-results", type=Path, action="append", help="a loadtests.fanout results.json (repeatable; else: run)"
    )
    parser.add_argument("--tolerance", type=float, default=0.35, help="relative tolerance (default 0.35)")
    parser.add_argument("--tiny", action="store_true", help="tiny runs that only prove the plumbing (tests)")
    parser.add_argument("--out", type=Path, help="where the runs' results go (default out/capacity-check-<time>)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out: Path = args.out or Path("out") / f"capacity-check-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        if args.broker_results is not None:
            broker = json.loads(args.broker_results.read_text())
        elif args.fanout_results:
            broker = None
        else:
            broker = run_benchmark(
                "broker_scale", BROKER_TINY if args.tiny else BROKER_QUICK, out / "broker", 120 if args.tiny else 900
            )
        fanout: list[dict[str, Any]] = []
        if args.fanout_results:
            fanout = [json.loads(path.read_text()) for path in args.fanout_results]
        elif args.broker_results is None:
            fanout.append(run_benchmark("fanout", FANOUT_TINY if args.tiny else FANOUT_QUICK, out / "fanout", 600))
            fanout.append(
                run_benchmark("fanout", FANOUT_IDLE_TINY if args.tiny else FANOUT_IDLE, out / "fanout-idle", 300)
            )
    except (CheckError, subprocess.TimeoutExpired, OSError, ValueError) as error:
        log(f"ERROR {error}")
        print(json.dumps({"ok": False, "error": str(error)}), flush=True)
        return 1
    checks = check(broker, fanout, args.tolerance)
    for item in checks:
        measured = "—" if item.measured is None else f"{item.measured:,.2f}"
        log(
            f"{item.name:<32} model {item.model:>12,.2f}  measured {measured:>12}  {item.kind:<8} "
            f"{item.verdict.upper():<12} {item.note}"
        )
    failed = [item.name for item in checks if item.verdict == "off"]
    ok = not failed
    log(
        "the model holds" if ok else f"the model does not hold for {', '.join(failed)}: update loadtests/capacity_model"
    )
    print(json.dumps({"ok": ok, "tolerance": args.tolerance, "checks": [asdict(item) for item in checks]}), flush=True)
    return 0 if ok else 3


if __name__ == "__main__":
    sys.exit(main())
