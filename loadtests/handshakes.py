"""Connection admission benchmark: WebSocket handshakes per second into one gateway process, authentication off
against API keys (warm cache) and JWT connection tokens, measured in the same run.

    python -m loadtests.handshakes                        # 10 000 clients per round, 3 rounds per mode
    python -m loadtests.handshakes --clients 2000 --rounds 1   # a quick look

What it starts (and stops): a ``redis-server`` on a free port, a fresh PostgreSQL schema in
``--database-url`` (default the local ``test`` database) migrated with ``pricegate db migrate`` and one key
issued with ``pricegate keys create``, then per mode one ``pricegate gateway`` (pinned to CPU 0 with ``taskset``
when there are two CPUs) and the C load generator (loadtests/loadgen.c, CPU 1), which opens ``--clients``
WebSockets ``--concurrency`` at a time, every one sending the same ``X-MBX-APIKEY`` header (ignored with
authentication off) or, in the JWT mode, its token as ``?token=``. Before the timed rounds one handshake warms
the key caches, so the rounds measure admission with a warm cache — a reconnect storm of known clients.

Per mode and round: the time until every client finished its handshake (handshakes/s = clients / time) and the
gateway's CPU time per handshake. The last stdout line is one JSON object with the medians and the ratios against
authentication off.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jwt

from loadtests.fanout import (
    Pinning,
    Processes,
    _die_with_parent,
    cpu_seconds,
    free_port,
    raise_nofile,
    wait_for_port,
)
from loadtests.loadgen import LoadGen, build

MODES = ("none", "apikey", "jwt")
STREAM = "btcusdt@trade"
ROOT = Path(__file__).resolve().parent.parent


def log(message: str) -> None:
    print(f"[handshakes {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loadtests.handshakes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=512, help="handshakes the load generator keeps open")
    parser.add_argument("--modes", default=",".join(MODES), help="comma list of none, apikey, jwt")
    parser.add_argument("--database-url", default="postgresql://127.0.0.1:5432/test")
    parser.add_argument("--no-pin", action="store_true", help="do not pin server and load to separate CPUs")
    return parser.parse_args(argv)


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.python = sys.executable
        self.processes = Processes()
        self.pinning = Pinning.detect(0, 1, not args.no_pin)
        self.tempdir = Path(tempfile.mkdtemp(prefix="pricegate-handshakes-"))
        self.schema = f"bench_{uuid.uuid4().hex[:10]}"
        self.jwt_secret = secrets.token_hex(32)
        self.redis_url = ""
        self.key = ""

    def env(self, mode: str) -> dict[str, str]:
        env = dict(os.environ)
        clients = str(max(50_000, 2 * self.args.clients))
        env.update(
            PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
            PRICEGATE_REDIS_URL=self.redis_url,
            PRICEGATE_DATABASE_URL=self.args.database_url,
            PRICEGATE_DATABASE_SCHEMA=self.schema,
            PRICEGATE_CHANNEL_PREFIX=f"pgbench:{self.schema}",
            PRICEGATE_LOG_LEVEL="warning",
            PRICEGATE_AUTH=mode,
            PRICEGATE_JWT_SECRET=self.jwt_secret,
            PRICEGATE_MAX_CONNECTIONS=clients,
            PRICEGATE_MAX_CONNECTIONS_PER_KEY=clients,
            # The load generator opens up to 10 000 clients per source address; the public per-IP limits would
            # refuse almost all of them.
            PRICEGATE_MAX_CONNECTIONS_PER_IP=clients,
            PRICEGATE_CONNECTION_ATTEMPTS_PER_IP=str(10 * int(clients)),
            PRICEGATE_MAX_SUBSCRIPTIONS_PER_IP=clients,
            PRICEGATE_SHUTDOWN_DRAIN_S="0.5",
        )
        return env

    def pricegate(self, *args: str, mode: str = "none") -> str:
        done = subprocess.run(
            [self.python, "-m", "pricegate_cli", *args],
            env=self.env(mode),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"pricegate {' '.join(args)} failed: {done.stderr.strip()[-400:]}")
        return done.stdout

    def setup(self) -> None:
        server = shutil.which("redis-server")
        if server is None:
            raise RuntimeError("no redis-server on PATH")
        port = free_port()
        redis = subprocess.Popen(
            [server, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
             "--dir", str(self.tempdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent,
        )  # fmt: skip
        self.processes.add(redis)
        wait_for_port(port, redis, 10)
        self.redis_url = f"redis://127.0.0.1:{port}/0"
        self.pricegate("db", "migrate")
        self.key = self.pricegate("keys", "create", "--label", "handshake-benchmark").split()[-1]
        log(f"redis on {port}, schema {self.schema}, one API key issued")

    def teardown(self) -> None:
        self.processes.stop_all()
        try:
            import asyncio

            import asyncpg

            async def drop() -> None:
                connection = await asyncpg.connect(self.args.database_url)
                try:
                    await connection.execute(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')
                finally:
                    await connection.close()

            asyncio.run(drop())
        except Exception as error:  # the schema name is unique per run; a leftover is harmless
            log(f"could not drop schema {self.schema}: {error!r}")
        shutil.rmtree(self.tempdir, ignore_errors=True)

    def token(self) -> str:
        claims = {"sub": "benchmark", "exp": int(time.time()) + 3600, "streams": ["*@trade"]}
        return str(jwt.encode(claims, self.jwt_secret, algorithm="HS256"))

    def measure(self, mode: str, binary: Path) -> list[dict[str, float]]:
        port = free_port()
        argv = [*self.pinning.server, self.python, "-m", "pricegate_cli", "gateway", "--port", str(port)]
        server = subprocess.Popen(
            argv, env=self.env(mode), cwd=ROOT, stdout=subprocess.DEVNULL, preexec_fn=_die_with_parent
        )
        self.processes.add(server)
        try:
            wait_for_port(port, server, 30)
            options: dict[str, Any] = {"ports": port, "streams": STREAM, "concurrency": self.args.concurrency}
            if mode == "jwt":
                options["path_prefix"] = f"/stream?token={self.token()}&streams="
            else:
                options["header"] = f"X-MBX-APIKEY: {self.key}"
            rounds: list[dict[str, float]] = []
            for index in range(self.args.rounds + 1):  # round 0 warms the caches (and the process) only
                clients = 1 if index == 0 else self.args.clients
                before = cpu_seconds(server.pid)
                loadgen = LoadGen(self.pinning.load, binary, clients=clients, **options)
                self.processes.add(loadgen)
                hello = loadgen.connected(timeout=60 + clients / 100)
                spent = cpu_seconds(server.pid) - before
                self.processes.stop(loadgen)
                if hello["open"] != clients:
                    raise RuntimeError(f"{mode}: only {hello['open']} of {clients} handshakes succeeded: {hello}")
                if index == 0:
                    continue
                elapsed = float(hello["elapsed_s"])
                rounds.append({"per_s": clients / elapsed, "cpu_us": spent / clients * 1e6})
                per_s, cpu_us = clients / elapsed, spent / clients * 1e6
                log(f"{mode:6} round {index}: {per_s:8.0f} handshakes/s, {cpu_us:6.0f} us CPU each")
                time.sleep(1.0)  # let the closes of this round drain before the next
            return rounds
        finally:
            self.processes.stop(server)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    modes = [mode for mode in args.modes.split(",") if mode]
    raise_nofile(args.clients + 256)
    binary = build()
    run = Run(args)
    log(f"pinning: {run.pinning.description}")
    try:
        run.setup()
        results = {mode: run.measure(mode, binary) for mode in modes}
    finally:
        run.teardown()
    summary: dict[str, Any] = {"clients": args.clients, "rounds": args.rounds, "concurrency": args.concurrency}
    for mode, rounds in results.items():
        summary[f"{mode}_handshakes_per_s"] = round(statistics.median(r["per_s"] for r in rounds))
        summary[f"{mode}_cpu_us_per_handshake"] = round(statistics.median(r["cpu_us"] for r in rounds), 1)
    if "none" in results:
        for mode in results:
            if mode != "none":
                summary[f"ratio_{mode}_vs_none"] = round(
                    summary[f"{mode}_handshakes_per_s"] / summary["none_handshakes_per_s"], 3
                )
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
