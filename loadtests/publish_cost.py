"""Redis' CPU per published message: ingest's batch script calls against one-message script calls (issue 13,
target 5), measured in the same run on the same server.

``python -m loadtests.publish_cost`` starts its own ``redis-server`` (pinned to CPU 0) and a tap that
PSUBSCRIBEs to every channel (``redis-cli``, so each PUBLISH is delivered as in production), and from CPU 1
publishes a market of ``--symbols`` symbols x (trade, bookTicker, depth@100ms) with the full contract: the
leader lease and the fence checked, an event identity per message, history, the last value of bookTicker. Each
publish call carries ``--batch`` messages (26: the firehose's average per call) and goes out in one of two ways,
alternating round by round so both see the same machine:

- ``one``: one ``EVALSHA`` of the one-message script per message, pipelined (``PublishPacker.pack``: what
  ``RedisBroker.publish`` sent before the batch script, and still sends for a batch of one and on a cluster);
- ``batch``: one ``EVALSHA`` of the batch script for the call (``PublishPacker.pack(batch_call=True)``: what
  ``RedisBroker.publish`` sends for a batch of several on one server).

The bytes are the broker's own (its packer, on a redis-py connection, replies read by
:func:`shared.redis.packed_pipeline.run_packed`), without the broker's bookkeeping around them, which costs the
client and not Redis. Reported per round and as medians: Redis' CPU per message (its process' user + system time
from /proc), the script's own time per message (``INFO commandstats``), and the ratio batch / one. The last stdout
line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from loadtests.fake_exchange import stream_names, symbol_names
from loadtests.fanout import cpu_seconds, free_port, machine, source_version, wait_for_port
from shared.broker.contract import EventId, OutgoingMessage
from shared.redis.packed_pipeline import run_packed, run_packed_batches
from shared.redis.packed_publish import PublishPacker
from shared.redis.scripts import PUBLISH_BATCH_SCRIPT, PUBLISH_SCRIPT
from shared.streams import ChannelNamer

MODES = ("one", "batch")
TOKEN = "publish-cost"
FENCING_EPOCH = 1


def log(message: str) -> None:
    print(f"[publish-cost {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def market(symbols: int, count: int, first_id: int) -> list[OutgoingMessage]:
    """``count`` messages round-robin over every stream, each stream's exchange ids counting up from ``first_id``;
    payloads of about Binance's sizes (~150 bytes, depth@100ms ~300)."""
    streams = stream_names(symbol_names(symbols))
    messages = []
    for number in range(count):
        stream = streams[number % len(streams)]
        event_id = first_id + number // len(streams)
        payload = b'{"e":"x","E":%d,"s":"%b","i":%d,"data":"%b"}' % (
            number, stream.encode(), event_id, b"0" * (250 if "depth" in stream else 100)
        )  # fmt: skip
        messages.append(
            OutgoingMessage(stream, payload, stream.endswith("@bookTicker"), EventId(event_id, event_id, 0))
        )
    return messages


async def evalsha_usec(client: aioredis.Redis) -> float:
    stats = await client.info("commandstats")
    return float(stats.get("cmdstat_evalsha", {}).get("usec", 0))


async def publish_round(
    client: aioredis.Redis, mode: str, packer: PublishPacker, messages: Sequence[OutgoingMessage], batch: int
) -> None:
    connection = await client.connection_pool.get_connection()  # type: ignore[no-untyped-call]
    options: dict[str, Any] = {"candidate_epoch": 1, "history_maxlen": 1000, "ttl_ms": 300_000, "token": TOKEN,
                               "fencing_epoch": FENCING_EPOCH, "floors": {}}  # fmt: skip
    try:
        for start in range(0, len(messages), batch):
            calls = messages[start : start + batch]
            published_at_ms = time.time_ns() // 1_000_000
            results: list[Any] = []
            if mode == "one":
                data = packer.pack(calls, published_at_ms=published_at_ms, **options)
                await run_packed(connection, data, len(calls), results, timeout_s=10)
            else:
                data = packer.pack(calls, published_at_ms=published_at_ms, batch_call=True, **options)
                await run_packed_batches(connection, data, [len(calls)], results, timeout_s=10)
            failed = [result for result in results if not isinstance(result, tuple)]
            if failed:
                raise SystemExit(f"publish-cost: Redis did not publish: {failed[0]!r}")
    finally:
        await client.connection_pool.release(connection)


async def run(options: argparse.Namespace, redis_pid: int, url: str) -> dict[str, Any]:
    client = aioredis.from_url(url)
    sha = await client.script_load(PUBLISH_SCRIPT)
    batch_sha = await client.script_load(PUBLISH_BATCH_SCRIPT)
    packers: dict[str, PublishPacker] = {}
    for mode in MODES:
        namer = ChannelNamer(f"pgcost:{mode}", "binance")  # one key space per mode, the same size
        await client.set(namer.leader_key, TOKEN)
        await client.zadd(namer.fence_key, {"e": FENCING_EPOCH})
        packer = PublishPacker(namer, lease_key=namer.leader_key, fence_key=namer.fence_key)
        packer.set_script(sha)
        packer.set_batch_script(batch_sha)
        packers[mode] = packer
    streams = options.symbols * 3
    warmup = market(options.symbols, streams, 1)  # every stream's keys exist before the first measured round
    for mode in MODES:
        await publish_round(client, mode, packers[mode], warmup, options.batch)
    rounds: list[dict[str, Any]] = []
    log(f"{'round':>5} {'mode':>6} {'msgs':>8} {'s':>6} {'Redis us/msg':>13} {'script us/msg':>14}")
    for number in range(options.rounds):
        # Each round publishes the next ids of every stream, so none is a duplicate.
        messages = market(options.symbols, options.messages, 2 + number * (options.messages // streams + 1))
        for mode in MODES if number % 2 == 0 else reversed(MODES):
            cpu_before = cpu_seconds(redis_pid)
            usec_before = await evalsha_usec(client)
            began = time.perf_counter()
            await publish_round(client, mode, packers[mode], messages, options.batch)
            elapsed = time.perf_counter() - began
            redis_us = (cpu_seconds(redis_pid) - cpu_before) * 1e6 / len(messages)
            script_us = (await evalsha_usec(client) - usec_before) / len(messages)
            rounds.append({"round": number + 1, "mode": mode, "messages": len(messages),
                           "elapsed_s": round(elapsed, 3), "redis_us_per_msg": round(redis_us, 3),
                           "script_us_per_msg": round(script_us, 3)})  # fmt: skip
            log(f"{number + 1:>5} {mode:>6} {len(messages):>8} {elapsed:>6.2f} {redis_us:>13.2f} {script_us:>14.2f}")
    await client.aclose()
    medians = {
        f"{mode}_{what}": round(statistics.median(r[what] for r in rounds if r["mode"] == mode), 3)
        for mode in MODES
        for what in ("redis_us_per_msg", "script_us_per_msg")
    }
    return {"rounds": rounds, **medians}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loadtests.publish_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--symbols", type=int, default=2000, help="symbols of the market (3 streams each)")
    parser.add_argument("--batch", type=int, default=26, help="messages per publish call")
    parser.add_argument("--messages", type=int, default=120_000, help="messages per mode per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-pin", action="store_true", help="do not pin Redis to CPU 0 and this process to CPU 1")
    parser.add_argument("--out", help="write the results as JSON here too")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if server is None or cli is None:
        raise SystemExit("publish-cost needs redis-server and redis-cli on PATH")
    pin = not options.no_pin and (os.cpu_count() or 1) >= 2
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="pricegate-publish-cost-") as tempdir, contextlib.ExitStack() as stack:
        redis_argv = [server, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
                      "--dir", tempdir, "--client-output-buffer-limit", "pubsub 0 0 0"]  # fmt: skip
        redis_process = subprocess.Popen(
            (["taskset", "-c", "0"] if pin else []) + redis_argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        stack.callback(redis_process.wait)
        stack.callback(redis_process.terminate)
        wait_for_port(port, redis_process, 10)
        if pin:
            os.sched_setaffinity(0, {1})
        tap = subprocess.Popen(
            [cli, "-p", str(port), "psubscribe", "pgcost:*"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        stack.callback(tap.wait)
        stack.callback(tap.terminate)
        log(f"redis-server on port {port}{' (CPU 0; this process on CPU 1)' if pin else ''}; tap subscribed")
        results = asyncio.run(run(options, redis_process.pid, f"redis://127.0.0.1:{port}/0"))
    one = results["one_redis_us_per_msg"]
    ratio = round(results["batch_redis_us_per_msg"] / one, 3) if one else None  # None: too short to see Redis' CPU
    log(
        f"median Redis CPU per message: one {results['one_redis_us_per_msg']} us, batch "
        f"{results['batch_redis_us_per_msg']} us (x{ratio}); script time: one {results['one_script_us_per_msg']} "
        f"us, batch {results['batch_script_us_per_msg']} us"
    )
    document = {"command": "python -m loadtests.publish_cost " + " ".join(argv or sys.argv[1:]),
                "machine": machine(), "source": source_version(Path(__file__).resolve().parent.parent),
                "options": vars(options), **results,
                "ratio_batch_vs_one": ratio}  # fmt: skip
    if options.out:
        with open(options.out, "w") as out:
            json.dump(document, out, indent=2)
    final = {key: document[key] for key in (
        "one_redis_us_per_msg", "batch_redis_us_per_msg", "ratio_batch_vs_one", "one_script_us_per_msg",
        "batch_script_us_per_msg")}  # fmt: skip
    final["symbols"] = options.symbols
    final["batch"] = options.batch
    print(json.dumps(final))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
