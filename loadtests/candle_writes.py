"""PostgreSQL write stress: W concurrent candle writers x U upserts each, with R API-key readers alongside,
written three ways in the same run (each in its own fresh schema, dropped afterwards):

- ``naive``:   one ``INSERT ... ON CONFLICT`` per candle, each its own transaction (the original app's way:
               one write per candle, as it arrives);
- ``batched``: ``PostgresCandleStore.upsert`` (what ingest uses): one ``unnest`` upsert statement per batch;
- ``copy``:    ``COPY`` each batch into a temporary table, then one ``INSERT ... SELECT ... ON CONFLICT``.

Readers run in a separate process with their own pool, as gateways (the readers) and ingest (the writer) are
separate processes in production: reader latency then shows contention inside PostgreSQL (and for the CPUs),
not a queue for the writers' pool or their event loop.
Writer n upserts minutes [n*U/2, n*U/2 + U) of one symbol, so half of every writer's candles are also written
by the next writer, concurrently (upserts, not just inserts; contention on the same rows and index pages).
Per mode it prints rows/s, errors, rows lost (expected distinct rows minus rows found), and the readers'
lookups/s with p50/p99 lookup latency; then each mode's throughput as a ratio of ``naive``, measured in the
same run. The last line is all figures as one JSON object.

    python -m loadtests.candle_writes                  # 50 writers x 2000 upserts, batches of 500, 10 readers
    python -m loadtests.candle_writes --writers 50 --upserts 2000 --batch 500 --readers 10 --pool 20 \\
        --dsn postgresql://postgres@127.0.0.1:5432/test --modes naive,batched,copy
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import asyncpg

from gateway.auth.api_keys import ApiKeys
from shared.candles.model import Candle
from shared.candles.postgres import PostgresCandleStore, upsert_arguments
from shared.db import create_pool, migrate
from shared.intervals import MINUTE_MS

START = 1_700_000_000_000 // MINUTE_MS * MINUTE_MS
COLUMNS = (
    "symbol", "kline_interval", "open_time", "close_time", "open", "high", "low", "close", "volume", "quote_volume",
    "trades", "taker_buy_base_volume", "taker_buy_quote_volume",
)  # fmt: skip
NAIVE_UPSERT = f"""
INSERT INTO candles ({", ".join(COLUMNS)}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
ON CONFLICT (symbol, kline_interval, open_time) DO UPDATE SET
    close_time = excluded.close_time, open = excluded.open, high = excluded.high, low = excluded.low,
    close = excluded.close, volume = excluded.volume, quote_volume = excluded.quote_volume, trades = excluded.trades,
    taker_buy_base_volume = excluded.taker_buy_base_volume, taker_buy_quote_volume = excluded.taker_buy_quote_volume
"""
COPY_MERGE = f"""
INSERT INTO candles ({", ".join(COLUMNS)})
SELECT {", ".join(COLUMNS)} FROM candles_in ORDER BY symbol, kline_interval, open_time
ON CONFLICT (symbol, kline_interval, open_time) DO UPDATE SET
    close_time = excluded.close_time, open = excluded.open, high = excluded.high, low = excluded.low,
    close = excluded.close, volume = excluded.volume, quote_volume = excluded.quote_volume, trades = excluded.trades,
    taker_buy_base_volume = excluded.taker_buy_base_volume, taker_buy_quote_volume = excluded.taker_buy_quote_volume
"""

Write = Callable[[Any, list[Candle]], Awaitable[None]]


def candle_at(index: int) -> Candle:
    """The candle with the given minute index; its values depend on the index only (any writer writes the same)."""
    open_time = START + index * MINUTE_MS
    price = 100 + index % 97
    return Candle(
        "BTCUSDT", "1m", open_time, open_time + MINUTE_MS - 1, f"{price}.10000000", f"{price + 1}.00000000",
        f"{price - 1}.00000000", f"{price}.20000000", f"{index % 13}.00000000", f"{price * (index % 13)}.00000000",
        index % 50, "0.50000000", f"{price / 2:.8f}",
    )  # fmt: skip


async def write_naive(pool: Any, batch: list[Candle]) -> None:
    for candle in batch:  # one statement, one transaction per candle
        await pool.execute(NAIVE_UPSERT, *(column[0] for column in upsert_arguments([candle])))


async def write_batched(pool: Any, batch: list[Candle]) -> None:
    await PostgresCandleStore(pool).upsert(batch)


async def write_copy(pool: Any, batch: list[Candle]) -> None:
    columns = upsert_arguments(batch)
    records = list(zip(*columns, strict=True))
    async with pool.acquire() as connection, connection.transaction():
        await connection.execute(
            "CREATE TEMPORARY TABLE IF NOT EXISTS candles_in (LIKE candles INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
        )
        await connection.copy_records_to_table("candles_in", records=records, columns=COLUMNS)
        await connection.execute(COPY_MERGE)


MODES: dict[str, Write] = {"naive": write_naive, "batched": write_batched, "copy": write_copy}


async def run_mode(name: str, args: argparse.Namespace) -> dict[str, Any]:
    schema = f"pgbench_{uuid.uuid4().hex[:12]}"
    pool = await create_pool(
        args.dsn, schema=schema, min_size=args.pool, max_size=args.pool, statement_timeout_ms=args.statement_timeout_ms
    )
    readers: asyncio.subprocess.Process | None = None
    try:
        await migrate(pool, schema)
        keys = ApiKeys(pool)
        issued = [await keys.create(f"bot-{i}") for i in range(20)]
        write = MODES[name]
        errors: list[str] = []

        async def writer(number: int) -> int:
            first = number * args.upserts // 2
            indexes = list(range(first, first + args.upserts))
            random.Random(number).shuffle(indexes)
            written = 0
            for start in range(0, len(indexes), args.batch):
                batch = [candle_at(i) for i in indexes[start : start + args.batch]]
                try:
                    await write(pool, batch)
                    written += len(batch)
                except Exception as error:  # counted and reported: the point is that there are none
                    errors.append(repr(error))
            return written

        readers = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "loadtests.candle_writes", "--read", schema, "--dsn", args.dsn,
            "--readers", str(args.readers), "--reader-pool", str(args.reader_pool), *issued,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert readers.stdout is not None and readers.stdin is not None
        await readers.stdout.readline()  # "ready": its pool is connected
        started = time.perf_counter()
        written = await asyncio.gather(*(writer(n) for n in range(args.writers)))
        elapsed = time.perf_counter() - started
        readers.stdin.close()  # stop reading
        read = json.loads(await readers.stdout.readline())
        await readers.wait()
        errors += read["errors"]
        distinct = (args.writers - 1) * args.upserts // 2 + args.upserts
        found = await pool.fetchval("SELECT count(*) FROM candles")
        return {
            "mode": name,
            "upserts": sum(written),
            "seconds": round(elapsed, 3),
            "rows_per_s": round(sum(written) / elapsed),
            "errors": len(errors) - len(read["errors"]) + read["error_count"],
            "first_error": errors[0] if errors else None,
            "rows_expected": distinct,
            "rows_lost": distinct - found,
            "lookups": read["lookups"],
            "lookups_per_s": round(read["lookups"] / elapsed),
            "lookup_p50_ms": read["p50_ms"],
            "lookup_p99_ms": read["p99_ms"],
        }
    finally:
        if readers is not None and readers.returncode is None:  # the run failed: do not leave it behind
            readers.kill()
            await readers.wait()
        async with pool.acquire() as connection:
            await connection.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')  # our generated name
        await pool.close()


async def read_until_stdin_closes(args: argparse.Namespace) -> None:
    """The reader process: ``--readers`` coroutines look API keys up until stdin closes, then one JSON line."""
    pool = await create_pool(
        args.dsn, schema=args.read, min_size=args.reader_pool, max_size=args.reader_pool, statement_timeout_ms=5000
    )
    keys = ApiKeys(pool)
    errors: list[str] = []
    latencies: list[float] = []
    stop = asyncio.Event()

    async def reader(number: int) -> None:
        rng = random.Random(number)
        while not stop.is_set():
            started = time.perf_counter()
            try:
                if await keys.lookup(rng.choice(args.keys)) is None:
                    errors.append("an issued API key did not look up")
            except Exception as error:  # counted and reported: the point is that there are none
                errors.append(repr(error))
            latencies.append(time.perf_counter() - started)

    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    print("ready", flush=True)
    tasks = [asyncio.create_task(reader(n)) for n in range(args.readers)]
    await stdin.read()  # EOF: the writers are done
    stop.set()
    await asyncio.gather(*tasks)
    await pool.close()
    latencies.sort()
    summary = {
        "errors": errors[:20],
        "error_count": len(errors),
        "lookups": len(latencies),
        "p50_ms": round(statistics.median(latencies) * 1000, 2) if latencies else None,
        "p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 2) if latencies else None,
    }
    print(json.dumps(summary), flush=True)


async def server_facts(dsn: str) -> dict[str, Any]:
    connection = await asyncpg.connect(dsn)
    try:
        facts = {"postgres": await connection.fetchval("SHOW server_version")}
        for setting in ("synchronous_commit", "fsync", "shared_buffers", "max_connections"):
            facts[setting] = await connection.fetchval(f"SHOW {setting}")  # fixed names, not input
        return facts
    finally:
        await connection.close()


async def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--dsn", default=os.environ.get("PRICEGATE_DATABASE_URL", "postgresql://postgres@127.0.0.1/test")
    )
    parser.add_argument("--writers", type=int, default=50)
    parser.add_argument("--upserts", type=int, default=2000, help="candles per writer")
    parser.add_argument("--batch", type=int, default=500, help="candles per statement (batched, copy)")
    parser.add_argument("--readers", type=int, default=10)
    parser.add_argument("--pool", type=int, default=20, help="writers' connections (fewer than writers: they queue)")
    parser.add_argument("--reader-pool", type=int, default=5, help="readers' connections")
    parser.add_argument("--statement-timeout-ms", type=int, default=5000)
    parser.add_argument("--modes", default="naive,batched,copy")
    parser.add_argument("--read", metavar="SCHEMA", help=argparse.SUPPRESS)  # the reader process
    parser.add_argument("keys", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.read:
        await read_until_stdin_closes(args)
        return 0
    modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    facts = {**await server_facts(args.dsn), "cpus": os.cpu_count(), "python": platform.python_version()}
    print(f"server: {facts}", file=sys.stderr)
    results = []
    for mode in modes:
        print(f"{mode}: {args.writers} writers x {args.upserts} upserts, {args.readers} readers ...", file=sys.stderr)
        result = await run_mode(mode, args)
        results.append(result)
        print(
            f"{mode:8s} {result['rows_per_s']:>9,} rows/s  {result['seconds']:>7.2f} s  errors {result['errors']}  "
            f"lost {result['rows_lost']}  lookups {result['lookups_per_s']:,}/s "
            f"(p50 {result['lookup_p50_ms']} ms, p99 {result['lookup_p99_ms']} ms)",
            flush=True,
        )
    baseline = next((r for r in results if r["mode"] == "naive"), None)
    if baseline is not None:
        for result in results:
            result["vs_naive"] = round(result["rows_per_s"] / baseline["rows_per_s"], 1)
            print(f"{result['mode']:8s} x{result['vs_naive']} the naive throughput")
    shown = {name: value for name, value in vars(args).items() if name not in ("read", "keys")}
    print(json.dumps({"args": shown, "server": facts, "results": results}))
    return 1 if any(r["errors"] or r["rows_lost"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
