"""PNG chart of a fan-out benchmark run: max sustained deliveries/s and p99 latency (at half of each server's own
max sustained rate) against N, one line per server, from the ``results.json`` that ``loadtests.fanout`` writes.

    python -m loadtests.chart out/fanout-<time>/results.json -o docs/benchmarks/fanout.png

Needs matplotlib (the ``load`` extra).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

COLOURS = {"pricegate": "#1f77b4", "naive": "#d62728", "picows": "#2ca02c"}
LABELS = {"pricegate": "pricegate gateway", "naive": "naive Starlette loop", "picows": "picows broadcast"}


def series(report: dict[str, Any]) -> dict[str, list[tuple[int, float | None, float | None]]]:
    """target -> [(N, max sustained deliveries/s, p99 ms at half of it)] sorted by N."""
    out: dict[str, list[tuple[int, float | None, float | None]]] = {}
    for entry in report["results"]:
        out.setdefault(entry["target"], []).append((entry["clients"], entry["max_sustained_per_s"], entry["p99_ms"]))
    return {target: sorted(points) for target, points in out.items()}


def draw(report: dict[str, Any], output: Path, title: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    figure, (throughput, latency) = plt.subplots(1, 2, figsize=(12, 4.8))
    for target, points in series(report).items():
        colour = COLOURS.get(target)
        label = LABELS.get(target, target)
        xs = [n for n, best, _ in points if best]
        throughput.plot(xs, [best / 1000 for _, best, _ in points if best], "o-", color=colour, label=label)
        for n, best, _ in points:
            if best:
                throughput.annotate(f"{best / 1000:.0f}k", (n, best / 1000), textcoords="offset points", xytext=(4, 4))
        lat = [(n, p99) for n, _, p99 in points if p99]
        latency.plot([n for n, _ in lat], [p99 for _, p99 in lat], "o-", color=colour, label=label)
    throughput.set_xscale("log")
    throughput.set_xlabel("connected clients N")
    throughput.set_ylabel("max sustained deliveries/s (thousands)")
    throughput.set_title("Throughput: >= 99% delivered, p99 < 250 ms, no client lost")
    throughput.set_ylim(bottom=0)
    latency.set_xscale("log")
    latency.set_yscale("log")
    latency.set_xlabel("connected clients N")
    latency.set_ylabel("p99 publish -> receive (ms)")
    latency.set_title("p99 latency at half of each server's own max")
    latency.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    latency.yaxis.set_minor_formatter(FuncFormatter(lambda value, _: ""))
    latency.axhline(25, color="grey", linestyle="--", linewidth=0.8)
    latency.annotate("25 ms target", (0.02, 25), xycoords=("axes fraction", "data"), color="grey", va="bottom")
    for axis in (throughput, latency):
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    machine = report.get("machine", {})
    figure.suptitle(
        title
        or f"{report.get('command', '')}  ·  {machine.get('nproc')} CPUs, {machine.get('cpu_model', '')}, "
        f"Python {machine.get('python', '')}",
        fontsize=9,
    )
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.chart", description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="results.json written by python -m loadtests.fanout")
    parser.add_argument("-o", "--output", type=Path, default=Path("fanout.png"))
    parser.add_argument("--title", help="figure title (default: the command and the machine)")
    args = parser.parse_args(argv)
    report = json.loads(args.results.read_text())
    if not report.get("results"):
        parser.error(f"{args.results} has no per-target results (a --scale run?)")
    draw(report, args.output, args.title)
    print(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
