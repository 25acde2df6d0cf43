"""The storage benchmarks' plumbing at tiny scale, so they cannot rot: ``loadtests.candle_writes`` (all three
write modes, a reader process) and ``loadtests.rest_cache`` (hit, PostgreSQL miss and exchange miss) run as
real processes against the real PostgreSQL and Redis. Figures are not checked (this is no benchmark), only the
documented output shape, zero errors and no lost rows, and that nothing is left behind in the database."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import asyncpg
import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.integration


async def _leftover_schemas(dsn: str) -> list[str]:
    connection = await asyncpg.connect(dsn)
    try:
        rows = await connection.fetch("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'pgbench\\_%'")
    finally:
        await connection.close()
    return [row["nspname"] for row in rows]


async def _run(*args: str) -> dict[str, Any]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", *args, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(60):
        stdout, stderr = await process.communicate()
    assert process.returncode == 0, stderr.decode()[-2000:]
    document: dict[str, Any] = json.loads(stdout.decode().strip().splitlines()[-1])
    return document


async def test_candle_writes_runs_every_mode_without_errors(postgres_dsn: str) -> None:
    before = await _leftover_schemas(postgres_dsn)
    report = await _run(
        "loadtests.candle_writes", "--dsn", postgres_dsn, "--writers", "3", "--upserts", "40", "--batch", "10",
        "--readers", "2", "--pool", "3", "--reader-pool", "2",
    )  # fmt: skip
    results = report["results"]
    assert [result["mode"] for result in results] == ["naive", "batched", "copy"]
    for result in results:
        assert result["upserts"] == 120 and result["errors"] == 0 and result["rows_lost"] == 0
        assert result["rows_expected"] == 80 and result["rows_per_s"] > 0 and result["lookups"] > 0
        assert result["vs_naive"] > 0
    assert await _leftover_schemas(postgres_dsn) == before


async def test_rest_cache_measures_hits_and_misses(postgres_dsn: str, redis_url: str) -> None:
    before = await _leftover_schemas(postgres_dsn)
    report = await _run(
        "loadtests.rest_cache", "--dsn", postgres_dsn, "--redis-url", redis_url, "--requests", "5", "--exchange"
    )
    results = report["results"]
    assert set(results) == {
        "klines hit", "klines miss (PostgreSQL)", "klines miss (local fake exchange)",
        "technical hit", "technical miss (PostgreSQL)", "technical miss (local fake exchange)",
    }  # fmt: skip
    assert all(figures["requests"] == 5 and figures["p50_ms"] > 0 for figures in results.values())
    assert results["klines hit"]["bytes"] == results["klines miss (PostgreSQL)"]["bytes"] > 100_000
    assert await _leftover_schemas(postgres_dsn) == before
