"""Ingest failover time and connection-rotation behaviour, measured with real processes (not a test).

Against the local fake exchange (``tests/fake_binance.py``, trading on at ``--rate`` events per second per
stream whether or not anyone is subscribed) and real Redis, it runs ``pricegate ingest --source binance``
processes and reads the published channels straight from Redis pub/sub (epoch:seq:time:payload envelopes).

- ``failover`` (default): ``--standbys`` + 1 ingest processes; per run, ``kill -9`` the lease holder and measure
  the takeover time (kill -> the standby's "took the leader lease" log line), the delivery pause on pub/sub
  (the longest silence around the kill), and whether trades were lost or duplicated and the per-channel sequence
  continued (aggTrade and trade streams, checked id by id and seq by seq); the killed process is then restarted
  as a standby for the next run.
- ``rotation``: one ingest with ``PRICEGATE_UPSTREAM_ROTATE_AFTER_S=--rotate-after`` (or, with ``--trigger
  server_shutdown``, a ``serverShutdown`` sent every ``--rotate-after`` seconds); for ``--duration`` seconds,
  every rotation's overlap (successor opened -> predecessor closed, from the fake's records), duplicates dropped
  (ingest's metrics), lost or repeated trades and the longest delivery pause near a switch versus elsewhere.

One JSON line per run, then a summary line. Examples::

    python -m loadtests.failover --runs 5
    python -m loadtests.failover --runs 5 --ttl 1.5 --renew 0.5
    python -m loadtests.failover rotation --rotate-after 3 --duration 30
    python -m loadtests.failover rotation --trigger server_shutdown --rotate-after 3 --duration 30
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import signal
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import redis.asyncio as aioredis

from shared.streams import ChannelNamer
from tests.fake_binance import FakeBinance
from tests.processes import PricegateProcess, free_port, start_pricegate

STREAMS = ("btcusdt@aggTrade", "btcusdt@trade")
ID_KEY = {"btcusdt@aggTrade": "a", "btcusdt@trade": "t"}
REDIS_URL = os.environ.get("PRICEGATE_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")


@dataclass
class Feed:
    """Everything published on the watched channels: (receive time, stream, epoch, seq, event id)."""

    entries: list[tuple[float, str, int, int, int]] = field(default_factory=list)

    def since(self, start: float) -> list[tuple[float, str, int, int, int]]:
        return [entry for entry in self.entries if entry[0] >= start]


async def watch(redis_url: str, prefix: str, feed: Feed, ready: asyncio.Event) -> None:
    namer = ChannelNamer(prefix, "binance")
    channels = {namer.channel(stream): stream for stream in STREAMS}
    client = aioredis.from_url(redis_url)
    pubsub = client.pubsub()
    try:
        await pubsub.subscribe(*channels)
        ready.set()
        async for message in pubsub.listen():
            if message["type"] != "message":
                continue
            epoch, seq, _, payload = message["data"].split(b":", 3)
            stream = channels[message["channel"].decode()]
            event_id = orjson.loads(payload)[ID_KEY[stream]]
            feed.entries.append((time.monotonic(), stream, int(epoch), int(seq), event_id))
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]  # redis-py leaves PubSub.aclose unannotated
        await client.aclose()


def continuity(entries: list[tuple[float, str, int, int, int]]) -> dict[str, Any]:
    """Lost and repeated event ids and sequence holes per stream, over a stretch of the feed."""
    report: dict[str, Any] = {}
    for stream in STREAMS:
        ids = [entry[4] for entry in entries if entry[1] == stream]
        seqs = [entry[3] for entry in entries if entry[1] == stream]
        if not ids:
            report[stream] = {"events": 0}
            continue
        report[stream] = {
            "events": len(ids),
            "lost": len(set(range(ids[0], ids[-1] + 1)) - set(ids)),
            "repeated": len(ids) - len(set(ids)),
            "out_of_order": sum(1 for a, b in itertools.pairwise(ids) if b < a),
            "seq_holes": sum(1 for a, b in itertools.pairwise(seqs) if b != a + 1),
            "epochs": len({entry[2] for entry in entries if entry[1] == stream}),
        }
    return report


def longest_pause(entries: list[tuple[float, str, int, int, int]]) -> float:
    times = sorted(entry[0] for entry in entries)
    return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


def metric(scrape: str, name: str) -> float:
    """Sum of a metric's samples (all label sets) in a Prometheus text scrape."""
    total = 0.0
    for line in scrape.splitlines():
        if line.startswith(name) and line[len(name) : len(name) + 1] in (" ", "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def base_env(fake: FakeBinance, prefix: str, args: argparse.Namespace) -> dict[str, str]:
    return {
        "PRICEGATE_REDIS_URL": args.redis_url,
        "PRICEGATE_CHANNEL_PREFIX": prefix,
        "PRICEGATE_BINANCE_WS_URL": fake.ws_url,
        "PRICEGATE_BINANCE_REST_URL": fake.rest_url,
        "PRICEGATE_ALWAYS_ON_STREAMS": ",".join(STREAMS),
        "PRICEGATE_LEADER_TTL_S": str(args.ttl),
        "PRICEGATE_LEADER_RENEW_S": str(args.renew),
        "PRICEGATE_LOG_LEVEL": "info",
    }


@contextlib.asynccontextmanager
async def cleanup(redis_url: str, prefix: str, processes: list[PricegateProcess]) -> AsyncIterator[None]:
    try:
        yield
    finally:
        for process in processes:
            if process.process.returncode is None:
                process.process.kill()
            await process.process.wait()
        client = aioredis.from_url(redis_url)
        keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


async def start_ingest(env: dict[str, str], metrics_port: int = 0) -> PricegateProcess:
    env = {**env, "PRICEGATE_INGEST_METRICS_PORT": str(metrics_port or free_port())}
    process = await start_pricegate("ingest", "--source", "binance", env=env)
    await process.wait_for_line(r"pricegate ingest: binance source")
    return process


async def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.005)


async def holder_pid(redis_url: str, prefix: str) -> int | None:
    client = aioredis.from_url(redis_url)
    try:
        token = await client.get(ChannelNamer(prefix, "binance").leader_key)
    finally:
        await client.aclose()
    if token is None:
        return None
    assert isinstance(token, bytes)
    return int(token.decode().split(":")[1])


def lease_lines(process: PricegateProcess) -> int:
    return sum("took the leader lease" in line for line in process.output)


async def run_failover(args: argparse.Namespace) -> list[dict[str, Any]]:
    prefix = f"pgbench{uuid.uuid4().hex[:10]}"
    results: list[dict[str, Any]] = []
    interval = 1.0 / args.rate
    async with FakeBinance(keep_trading=True, data_interval_s=interval, ping_interval_s=20) as fake:
        env = base_env(fake, prefix, args)
        processes: list[PricegateProcess] = []
        async with cleanup(args.redis_url, prefix, processes):
            feed, ready = Feed(), asyncio.Event()
            watcher = asyncio.create_task(watch(args.redis_url, prefix, feed, ready))
            await ready.wait()
            for _ in range(args.standbys + 1):
                processes.append(await start_ingest(env))
            await asyncio.sleep(args.settle)
            for run in range(args.runs):
                pid = await holder_pid(args.redis_url, prefix)
                leader = next(p for p in processes if p.process.pid == pid)
                standbys = [p for p in processes if p is not leader]
                counts = {id(p): lease_lines(p) for p in standbys}

                def taken(standbys: list[PricegateProcess] = standbys, counts: dict[int, int] = counts) -> bool:
                    return any(lease_lines(p) > counts[id(p)] for p in standbys)

                run_start = time.monotonic()
                # A random moment of the renewal cycle: the takeover time depends on it (TTL - renew .. TTL + renew).
                await asyncio.sleep(args.settle + random.uniform(0.0, args.renew))
                killed_at = time.monotonic()
                os.kill(leader.process.pid, signal.SIGKILL)
                await wait_for(taken, 30, "a standby took over")
                took_over_at = time.monotonic()
                await asyncio.sleep(args.settle)
                new_leader = next(p for p in standbys if lease_lines(p) > counts[id(p)])
                flush = [line for line in new_leader.output if "buffered messages judged" in line]
                around = [e for e in feed.since(killed_at - 1.0) if e[0] <= took_over_at + 1.0]
                after_kill = feed.since(killed_at)
                first_after = next((e[0] for e in after_kill if e[0] > took_over_at - 0.5), None)
                result = {
                    "mode": "failover",
                    "run": run + 1,
                    "ttl_s": args.ttl,
                    "renew_s": args.renew,
                    "takeover_s": round(took_over_at - killed_at, 3),
                    "first_message_after_kill_s": None if first_after is None else round(first_after - killed_at, 3),
                    "delivery_pause_s": round(longest_pause(around), 3),
                    "takeover_flush": flush[-1].split("leading: ", 1)[-1].strip() if flush else None,
                    "steady_pause_s": round(
                        longest_pause([e for e in feed.entries if run_start <= e[0] < killed_at]), 3
                    ),
                    "streams": continuity(feed.since(run_start)),
                }
                print(json.dumps(result), flush=True)
                results.append(result)
                processes.remove(leader)
                await leader.process.wait()
                processes.append(await start_ingest(env))
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
    return results


async def run_rotation(args: argparse.Namespace) -> list[dict[str, Any]]:
    prefix = f"pgbench{uuid.uuid4().hex[:10]}"
    interval = 1.0 / args.rate
    async with FakeBinance(keep_trading=True, data_interval_s=interval, ping_interval_s=20) as fake:
        rotate_after = args.rotate_after if args.trigger == "age" else 86400.0
        env = {**base_env(fake, prefix, args), "PRICEGATE_UPSTREAM_ROTATE_AFTER_S": str(rotate_after)}
        processes: list[PricegateProcess] = []
        async with cleanup(args.redis_url, prefix, processes):
            feed, ready = Feed(), asyncio.Event()
            watcher = asyncio.create_task(watch(args.redis_url, prefix, feed, ready))
            await ready.wait()
            metrics_port = free_port()
            processes.append(await start_ingest(env, metrics_port))
            started = time.monotonic()
            while time.monotonic() - started < args.duration:
                await asyncio.sleep(min(args.rotate_after, args.duration - (time.monotonic() - started)))
                if args.trigger == "server_shutdown" and time.monotonic() - started < args.duration - 1:
                    await fake.send_server_shutdown()  # Binance: "this connection closes soon"
            async with httpx.AsyncClient() as client:
                scrape = (await client.get(f"http://127.0.0.1:{metrics_port}/metrics")).text
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            connections = sorted(fake.connections, key=lambda c: c.opened_at)
            overlaps = [
                (older.closed_at or time.monotonic()) - newer.opened_at
                for older, newer in itertools.pairwise(connections)
            ]
            switches = [c.closed_at for c in connections if c.closed_at is not None]
            # Inter-arrival times on the whole feed, split by whether they start within 1 s of a switch.
            times = sorted(entry[0] for entry in feed.entries)
            gaps = [(a, b - a) for a, b in itertools.pairwise(times)]
            near = [gap for at, gap in gaps if any(abs(at - switch) < 1.0 for switch in switches)]
            far = [gap for at, gap in gaps if all(abs(at - switch) >= 1.0 for switch in switches)]
            result = {
                "mode": "rotation",
                "trigger": args.trigger,
                "every_s": args.rotate_after,
                "duration_s": round(time.monotonic() - started, 1),
                "rotations": len(connections) - 1,
                "overlap_s": {
                    "min": round(min(overlaps), 3) if overlaps else None,
                    "median": round(statistics.median(overlaps), 3) if overlaps else None,
                    "max": round(max(overlaps), 3) if overlaps else None,
                },
                "negative_overlaps": sum(1 for overlap in overlaps if overlap < 0),
                "ingest_metrics": {
                    name: metric(scrape, name)
                    for name in (
                        "pricegate_ingest_upstream_rotations_total",
                        "pricegate_ingest_upstream_rotation_timeouts_total",
                        "pricegate_ingest_upstream_duplicates_dropped_total",
                        "pricegate_ingest_upstream_reconnects_total",
                    )
                },
                "close_reasons": sorted({c.close_reason or "open" for c in connections}),
                "pause_near_switch_s": round(max(near, default=0.0), 3),
                "pause_elsewhere_s": round(max(far, default=0.0), 3),
                "streams": continuity(feed.entries),
            }
            print(json.dumps(result), flush=True)
            return [result]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.failover", description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", nargs="?", choices=("failover", "rotation"), default="failover")
    parser.add_argument("--runs", type=int, default=5, help="failovers to measure")
    parser.add_argument("--standbys", type=int, default=1, help="standby processes beside the leader")
    parser.add_argument("--ttl", type=float, default=3.0, help="PRICEGATE_LEADER_TTL_S")
    parser.add_argument("--renew", type=float, default=1.0, help="PRICEGATE_LEADER_RENEW_S")
    parser.add_argument("--rate", type=float, default=50.0, help="events per second per stream at the exchange")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds of steady state before and after a kill")
    parser.add_argument(
        "--rotate-after", type=float, default=3.0, help="rotation mode: PRICEGATE_UPSTREAM_ROTATE_AFTER_S"
    )
    parser.add_argument("--duration", type=float, default=30.0, help="rotation mode: seconds to watch")
    parser.add_argument(
        "--trigger",
        choices=("age", "server_shutdown"),
        default="age",
        help="rotation mode: rotate by age, or send serverShutdown every --rotate-after seconds",
    )
    parser.add_argument("--redis-url", default=REDIS_URL)
    args = parser.parse_args(argv)
    results = asyncio.run(run_failover(args) if args.mode == "failover" else run_rotation(args))
    if args.mode == "failover":
        takeovers = [r["takeover_s"] for r in results]
        pauses = [r["delivery_pause_s"] for r in results]
        lost = sum(s.get("lost", 0) for r in results for s in r["streams"].values())
        repeated = sum(s.get("repeated", 0) for r in results for s in r["streams"].values())
        summary = {
            "summary": "failover",
            "runs": len(results),
            "takeover_s": {"min": min(takeovers), "median": statistics.median(takeovers), "max": max(takeovers)},
            "delivery_pause_s": {"min": min(pauses), "median": statistics.median(pauses), "max": max(pauses)},
            "trades_lost": lost,
            "trades_repeated": repeated,
        }
        print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
