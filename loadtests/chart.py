"""PNG chart of a fan-out benchmark run, against N, one line per server, from the ``results.json`` that
``loadtests.fanout`` writes: the two throughput definitions (max sustained deliveries/s at p99 < 250 ms, and at
p99 <= 25 ms with an even publishing pace, when the run measured it) and p99 latency at half of each server's own
max sustained rate.

    python -m loadtests.chart out/fanout-<time>/results.json -o docs/benchmarks/fanout.png
    python -m loadtests.chart out/fanout-<time>/results.json --markdown     # BENCHMARKS.md tables, no plot

Needs matplotlib (the ``load`` extra) for the PNG.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

COLOURS = {"pricegate": "#1f77b4", "naive": "#d62728", "picows": "#2ca02c", "uvloop": "#7f7f7f"}
LABELS = {
    "pricegate": "pricegate gateway",
    "naive": "naive Starlette loop",
    "picows": "picows broadcast",
    "uvloop": "bare uvloop protocol",
}


def series(report: dict[str, Any]) -> dict[str, list[tuple[int, float | None, float | None, bool]]]:
    """target -> [(N, max sustained deliveries/s, p99 ms at half of it, publisher-limited)] sorted by N."""
    out: dict[str, list[tuple[int, float | None, float | None, bool]]] = {}
    for entry in report["results"]:
        point = (entry["clients"], entry["max_sustained_per_s"], entry["p99_ms"], bool(entry.get("publisher_limited")))
        out.setdefault(entry["target"], []).append(point)
    return {target: sorted(points) for target, points in out.items()}


def latency_bound_series(report: dict[str, Any]) -> dict[str, list[tuple[int, float]]]:
    """target -> [(N, max sustained deliveries/s at p99 <= 25 ms)] sorted by N (empty if the run did not measure it)."""
    out: dict[str, list[tuple[int, float]]] = {}
    for entry in report["results"]:
        if entry.get("latency_bound_per_s"):
            out.setdefault(entry["target"], []).append((entry["clients"], float(entry["latency_bound_per_s"])))
    return {target: sorted(points) for target, points in out.items()}


def draw(report: dict[str, Any], output: Path, title: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    bound = latency_bound_series(report)
    if bound:
        figure, (throughput, bounded, latency) = plt.subplots(1, 3, figsize=(17, 4.8))
    else:
        figure, (throughput, latency) = plt.subplots(1, 2, figsize=(12, 4.8))
    for target, bound_points in bound.items():
        bounded.plot(
            [n for n, _ in bound_points], [rate / 1000 for _, rate in bound_points], "o-",
            color=COLOURS.get(target), label=LABELS.get(target, target),
        )  # fmt: skip
        for n, rate in bound_points:
            bounded.annotate(f"{rate / 1000:.0f}k", (n, rate / 1000), textcoords="offset points", xytext=(4, 4))
    for target, points in series(report).items():
        colour = COLOURS.get(target)
        label = LABELS.get(target, target)
        xs = [n for n, best, _, _ in points if best]
        throughput.plot(xs, [best / 1000 for _, best, _, _ in points if best], "o-", color=colour, label=label)
        for n, best, _, limited in points:
            if best:
                # ">=": the publisher could not go faster, so the server's real max is higher.
                text = f"{'>=' if limited else ''}{best / 1000:.0f}k"
                throughput.annotate(text, (n, best / 1000), textcoords="offset points", xytext=(4, 4))
        lat = [(n, p99) for n, _, p99, _ in points if p99]
        latency.plot([n for n, _ in lat], [p99 for _, p99 in lat], "o-", color=colour, label=label)
    throughput.set_xscale("log")
    throughput.set_xlabel("connected clients N")
    throughput.set_yscale("log")
    throughput.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    throughput.yaxis.set_minor_formatter(FuncFormatter(lambda value, _: ""))
    throughput.set_ylabel("max sustained deliveries/s (thousands, log)")
    throughput.set_title("Throughput: >= 99% delivered, p99 < 250 ms, no client lost")
    latency.set_xscale("log")
    latency.set_yscale("log")
    latency.set_xlabel("connected clients N")
    latency.set_ylabel("p99 publish -> receive (ms)")
    latency.set_title("p99 latency at half of each server's own max")
    latency.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    latency.yaxis.set_minor_formatter(FuncFormatter(lambda value, _: ""))
    latency.axhline(25, color="grey", linestyle="--", linewidth=0.8)
    latency.annotate("25 ms target", (0.02, 25), xycoords=("axes fraction", "data"), color="grey", va="bottom")
    axes = [throughput, latency]
    if bound:
        bounded.set_xscale("log")
        bounded.set_xlabel("connected clients N")
        bounded.set_ylabel("max sustained deliveries/s (thousands)")
        bounded.set_title("Latency-bound: p99 <= 25 ms, even pace")
        axes.insert(1, bounded)
    for axis in axes:
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


def _cell(value: Any, spec: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, (int, float)) and spec:
        return format(value, spec)
    return str(value)


def markdown(report: dict[str, Any]) -> str:
    """The run as BENCHMARKS.md tables: the per-N summary, then one row per server and N."""
    lines = [
        "| N | pricegate max sustained/s | naive | picows | vs naive | vs picows | p50 ms | p99 ms | KiB/conn |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    final = report.get("final", {})
    for index, clients in enumerate(final.get("clients", [])):

        def value(key: str, i: int = index) -> Any:
            return final[key][i]

        lines.append(
            f"| {clients:,} | {_cell(value('max_sustained_per_s'), ',')} | "
            f"{_cell(value('naive_max_sustained_per_s'), ',')} | {_cell(value('picows_max_sustained_per_s'), ',')} | "
            f"{_cell(value('ratio_vs_naive'), '.2f')}x | {_cell(value('ratio_vs_picows'), '.2f')}x | "
            f"{_cell(value('p50_ms'), '.2f')} | {_cell(value('p99_ms'), '.2f')} | "
            f"{_cell(value('kib_per_conn'), '.1f')} |"
        )
    lines += [
        "",
        "| server | N | max sustained deliveries/s | msgs/s | p50 / p99 ms at half max | p50 / p99 ms at max "
        "| server process CPU % at max | server core busy % | load core busy % at max / first fail "
        "| load generator CPU % (peak) | RSS idle MiB | KiB/conn | other processes CPU % (peak) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for entry in sorted(report["results"], key=lambda e: (e["clients"], e["target"] != "pricegate", e["target"])):
        lines.append(
            f"| {entry['target']} | {entry['clients']:,} | {_cell(entry['max_sustained_per_s'], ',')}"
            f"{' (publisher-limited)' if entry.get('publisher_limited') else ''} | "
            f"{_cell(entry['max_sustained_msgs_per_s'], ',.0f')} | "
            f"{_cell(entry['p50_ms'], '.2f')} / {_cell(entry['p99_ms'], '.2f')} | "
            f"{_cell(entry['p50_ms_at_max'], '.2f')} / {_cell(entry['p99_ms_at_max'], '.2f')} | "
            f"{_cell(entry['server_cpu_pct_at_max'], '.0f')} | "
            f"{_cell(entry.get('server_core_busy_pct_at_max'), '.0f')} | "
            f"{_cell(entry.get('load_core_busy_pct_at_max'), '.0f')} / "
            f"{_cell(entry.get('load_core_busy_pct_at_fail'), '.0f')} | "
            f"{_cell(entry['loadgen_cpu_pct_peak'], '.0f')} | {_cell(entry['rss_idle_mib'], '.1f')} | "
            f"{_cell(entry['kib_per_conn'], '.1f')} | {_cell(entry.get('foreign_cpu_pct_peak'), '.0f')} |"
            + (f" error: {entry['error']}" if entry.get("error") else "")
        )
    stalls = [entry for entry in report["results"] if entry.get("stall")]
    if stalls:
        lines += [
            "",
            "| server | N | stalled | rate msgs/s | unread KiB per stalled client | readers' p50 / p99 ms "
            "| no-stall p99 ms | p99 ratio | min delivered | lost | RSS MiB by step | kernel TCP MiB |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
        ]
        for entry in stalls:
            stall = entry["stall"]
            lines.append(
                f"| {entry['target']} | {entry['clients']:,} | {stall['stalled_clients']} | {stall['rate']:,.0f} | "
                f"{stall['unread_kib_per_stalled_client']} | {stall['p50_ms']:.2f} / {stall['p99_ms']:.2f} | "
                f"{_cell(stall['no_stall_p99_ms'], '.2f')} | {_cell(stall['p99_ratio'], '.2f')} | "
                f"{stall['min_delivered_ratio'] * 100:.2f}% | {stall['lost']} | {stall['rss_mib_by_step']} | "
                f"{stall.get('tcp_kernel_mib_after_fill')} → {stall.get('tcp_kernel_mib_at_end')} |"
            )
    scale = report.get("scale")
    if scale:
        lines += [
            "",
            "| clients | gateway processes | connected | connect s | KiB/conn | delivered | lost | p50 / p99 / max ms "
            "| gateway CPU % each | load generators CPU % | other processes CPU % | RSS MiB after | held |",
            "|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---:|---|---|",
        ]
        cpus = scale.get("gateway_cpu_pct") or []
        held = "yes" if scale.get("ok") else f"no: {scale.get('why') or scale.get('error')}"
        lines.append(
            f"| {scale['clients']:,} | {scale['processes']} | {_cell(scale.get('connected'), ',')} | "
            f"{_cell(scale.get('connect_s'), '.1f')} | {_cell(scale.get('kib_per_conn'), '.2f')} | "
            f"{_cell((scale.get('delivered_ratio') or 0) * 100, '.2f')}% | {_cell(scale.get('lost'))} | "
            f"{_cell(scale.get('p50_ms'), '.1f')} / {_cell(scale.get('p99_ms'), '.1f')} / "
            f"{_cell(scale.get('max_ms'), '.1f')} | {min(cpus, default=0):.0f} to {max(cpus, default=0):.0f} | "
            f"{_cell(scale.get('loadgen_cpu_pct'), '.0f')} | {_cell(scale.get('foreign_cpu_pct'), '.0f')} | "
            f"{scale.get('rss_mib_after')} | {held} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.chart", description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="results.json written by python -m loadtests.fanout")
    parser.add_argument("-o", "--output", type=Path, default=Path("fanout.png"))
    parser.add_argument("--title", help="figure title (default: the command and the machine)")
    parser.add_argument("--markdown", action="store_true", help="print the run as markdown tables instead")
    args = parser.parse_args(argv)
    report = json.loads(args.results.read_text())
    if not report.get("results"):
        parser.error(f"{args.results} has no per-target results (a --scale run?)")
    if args.markdown:
        print(markdown(report))
        return 0
    draw(report, args.output, args.title)
    print(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
