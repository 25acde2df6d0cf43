"""``pricegate gateway --workers N``: real processes on real sockets. Both workers are children of the started
process and serve clients on one port; a worker killed with SIGKILL is replaced while the other's clients stay
connected; SIGTERM drains every client with 1001 and ends every process; bad values are one line naming the
setting. The socket helpers and the settings parser are checked directly."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from gateway.server import hold_port, shared_port_sockets
from pricegate_cli.workers import check_metrics_ports, worker_count
from shared.broker.contract import OutgoingMessage
from shared.broker.redis import RedisBroker
from shared.errors import ConfigError
from shared.settings import Settings
from tests.processes import PricegateProcess, free_port, run_pricegate, start_pricegate

STREAM = "btcusdt@bookTicker"
PAYLOAD = b'{"u":1,"s":"BTCUSDT","b":"1.00","B":"1","a":"2.00","A":"1"}'


# ---- settings and sockets, no process ---------------------------------------------------------------------------


def test_workers_setting_parses_counts_and_auto() -> None:
    assert Settings.from_env({}).workers == 1
    assert Settings.from_env({"PRICEGATE_WORKERS": "4"}).workers == 4
    auto = Settings.from_env({"PRICEGATE_WORKERS": "auto"})
    assert worker_count(auto, cores=lambda: 6) == 6 and worker_count(auto) >= 1
    for bad in ("0", "-2", "abc", "1.5", ""):
        with pytest.raises(ConfigError) as refused:
            Settings().with_overrides({"workers": bad})
        assert refused.value.setting == "--workers", bad


def test_metrics_ports_are_checked_for_every_worker() -> None:
    with pytest.raises(ConfigError, match="required with 2 gateway workers") as refused:
        check_metrics_ports(Settings(), 2)
    assert refused.value.setting == "PRICEGATE_METRICS_PORT"
    with pytest.raises(ConfigError, match="beyond 65535"):
        check_metrics_ports(Settings(metrics_port=65535), 2)
    with pytest.raises(ConfigError, match="include PRICEGATE_PORT"):
        check_metrics_ports(Settings(port=9101, metrics_port=9100), 3)
    base = _free_ports(2)
    with socket.create_server(("127.0.0.1", base + 1)), pytest.raises(ConfigError, match=f"port {base + 1}"):
        check_metrics_ports(Settings(metrics_port=base), 2)
    check_metrics_ports(Settings(metrics_port=base), 2)


def test_held_port_refuses_a_taken_port_and_admits_only_workers() -> None:
    with socket.create_server(("127.0.0.1", 0)) as other, pytest.raises(OSError):
        hold_port("127.0.0.1", other.getsockname()[1])
    held, port = hold_port("127.0.0.1", 0)  # port 0: the kernel's choice, kept
    try:
        assert port > 0
        first, second = shared_port_sockets("127.0.0.1", port), shared_port_sockets("127.0.0.1", port)
        for sock in (*first, *second):
            sock.listen()
        with pytest.raises(OSError), socket.socket() as stranger:  # a server that does not share ports
            stranger.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            stranger.bind(("127.0.0.1", port))
        for sock in (*first, *second):
            sock.close()
    finally:
        for sock in held:
            sock.close()


# ---- real processes ---------------------------------------------------------------------------------------------


def _free_ports(count: int) -> int:
    """The first of ``count`` consecutive free ports (worker i's /metrics is on the first + i)."""
    for _ in range(50):
        base = free_port()
        try:
            with contextlib.ExitStack() as stack:
                for offset in range(count):
                    stack.enter_context(socket.create_server(("127.0.0.1", base + offset)))
        except OSError:
            continue
        return base
    raise AssertionError("no run of free ports")


def _parent_pid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state == "Z"  # exited, not yet reaped


async def _livez_pids(port: int, want: int, exclude: Iterable[int] = (), timeout: float = 10.0) -> set[int]:
    """Distinct pids answering /livez (a new connection each time, so the kernel picks a worker each time)."""
    seen: set[int] = set()
    async with asyncio.timeout(timeout):
        while len(seen - set(exclude)) < want:
            async with httpx.AsyncClient(limits=httpx.Limits(max_keepalive_connections=0)) as http:
                with contextlib.suppress(httpx.HTTPError):
                    seen.add((await http.get(f"http://127.0.0.1:{port}/livez")).json()["pid"])
    return seen - set(exclude)


async def _connections(metrics_port: int) -> int | None:
    """The worker's open WebSockets from its own /metrics; None while nothing answers there."""
    try:
        async with httpx.AsyncClient() as http:
            text = (await http.get(f"http://127.0.0.1:{metrics_port}/metrics")).text
    except httpx.HTTPError:
        return None
    match = re.search(r"^pricegate_gateway_connections ([0-9.e+]+)$", text, re.MULTILINE)
    assert match is not None, text[:2000]
    return int(float(match.group(1)))


async def _closed_code(ws: ClientConnection, timeout: float) -> int | None:
    """Read until the connection closes or ``timeout`` passes: its close code (1006: cut off without a close
    frame), None while it is open."""
    with contextlib.suppress(ConnectionClosed, TimeoutError):
        async with asyncio.timeout(timeout):
            while True:
                await ws.recv()
    return ws.close_code


@pytest.fixture
async def workers_gateway(redis_url: str, key_prefix: str) -> AsyncIterator[tuple[PricegateProcess, int, int]]:
    port, metrics = free_port(), _free_ports(2)
    env = {
        "PRICEGATE_REDIS_URL": redis_url,
        "PRICEGATE_CHANNEL_PREFIX": key_prefix,
        "PRICEGATE_SYMBOLS": "BTCUSDT",
        "PRICEGATE_SHUTDOWN_DRAIN_S": "1",
    }
    args = ["gateway", "--workers", "2", "--port", str(port), "--metrics-port", str(metrics)]
    gateway = await start_pricegate(*args, env=env)
    try:
        await gateway.wait_for_line(r"workers: +2 processes sharing the port")
        yield gateway, port, metrics
    finally:
        if gateway.process.returncode is None:
            gateway.process.kill()
            await gateway.process.wait()


@pytest.mark.integration
@pytest.mark.timeout(60)
async def test_two_workers_share_the_port_are_replaced_when_killed_and_drain_together(
    workers_gateway: tuple[PricegateProcess, int, int], redis_url: str, key_prefix: str
) -> None:
    gateway, port, metrics = workers_gateway
    supervisor = gateway.process.pid
    # Both workers are children of the started process, and both answer on the one port.
    workers = await _livez_pids(port, 2)
    assert {_parent_pid(pid) for pid in workers} == {supervisor}, workers

    clients = [await connect(f"ws://127.0.0.1:{port}/ws/{STREAM}") for _ in range(30)]
    before = [await _connections(metrics) or 0, await _connections(metrics + 1) or 0]
    assert sum(before) == 30 and all(before), before  # both serve clients

    victim = min(workers)
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    (replacement,) = await _livez_pids(port, 1, exclude=workers, timeout=10)
    replaced_s = time.monotonic() - killed_at
    assert _parent_pid(replacement) == supervisor
    await gateway.wait_for_line(rf"gateway worker \d replaced: pid {replacement} serves")
    # The replacement's slot is the one whose /metrics restarted from zero; only its clients were lost.
    after = [await _connections(metrics), await _connections(metrics + 1)]
    slot = after.index(0)
    assert after[1 - slot] == before[1 - slot], (before, after)
    await asyncio.gather(*(_closed_code(ws, 0.5) for ws in clients))
    lost = [ws.close_code for ws in clients if ws.close_code is not None]
    assert lost == [1006] * before[slot], (before, lost)  # cut off with their worker, no close frame
    survivors = [ws for ws in clients if ws.close_code is None]
    assert len(survivors) == before[1 - slot]

    # The survivors are live: a publication reaches each of them.
    broker = RedisBroker(redis_url, prefix=key_prefix)
    await broker.start()
    try:
        async with asyncio.timeout(5):
            for ws in survivors:
                while True:
                    await broker.publish([OutgoingMessage(STREAM, PAYLOAD, True)])
                    with contextlib.suppress(TimeoutError):
                        assert await asyncio.wait_for(ws.recv(), 0.2) == PAYLOAD.decode()
                        break
    finally:
        await broker.close()

    # The replacement takes new clients.
    fresh: list[ClientConnection] = []
    async with asyncio.timeout(5):
        while not await _connections(metrics + slot):
            fresh.append(await connect(f"ws://127.0.0.1:{port}/ws/{STREAM}"))

    # SIGTERM to the parent: every client is closed with 1001, every process is gone within 20 s, exit 0.
    stopped_at = time.monotonic()
    gateway.process.send_signal(signal.SIGTERM)
    codes = await asyncio.gather(*(_closed_code(ws, 10) for ws in survivors + fresh))
    assert codes == [1001] * len(codes)
    assert await gateway.stop(timeout=20) == 0
    drained_s = time.monotonic() - stopped_at
    everyone = {*workers, replacement}
    assert all(_gone(pid) for pid in everyone), [pid for pid in everyone if not _gone(pid)]
    assert drained_s < 20
    print(f"replacement serving {replaced_s:.2f} s after SIGKILL; drained and gone {drained_s:.2f} s after SIGTERM")


@pytest.mark.integration
@pytest.mark.timeout(30)
async def test_a_worker_that_keeps_dying_is_restarted_later_each_time(
    workers_gateway: tuple[PricegateProcess, int, int],
) -> None:
    gateway, port, _ = workers_gateway
    workers = await _livez_pids(port, 2)
    seen = set(workers)
    victim = min(workers)
    for _ in range(2):  # the first death is replaced at once; the second, soon after starting, waits
        os.kill(victim, signal.SIGKILL)
        (victim,) = await _livez_pids(port, 1, exclude=seen, timeout=10)
        seen.add(victim)
    await gateway.wait_for_line(r"replacing it in \d+\.\d s \(it keeps dying")
    assert await gateway.stop() == 0


@pytest.mark.integration
@pytest.mark.timeout(30)
async def test_workers_stop_when_their_supervisor_is_killed(
    workers_gateway: tuple[PricegateProcess, int, int],
) -> None:
    gateway, port, _ = workers_gateway
    workers = await _livez_pids(port, 2)
    gateway.process.kill()  # SIGKILL: the supervisor cannot stop them; they notice and drain
    await gateway.process.wait()
    async with asyncio.timeout(10):
        while not all(_gone(pid) for pid in workers):
            await asyncio.sleep(0.1)


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (["--workers", "0"], {}, "--workers='0'"),
        (["--workers", "abc"], {}, "--workers='abc'"),
        ([], {"PRICEGATE_WORKERS": "abc"}, "PRICEGATE_WORKERS='abc'"),
        (["--workers", "2"], {"PRICEGATE_METRICS_PORT": "0"}, "PRICEGATE_METRICS_PORT=0: required with 2"),
    ],
)
async def test_bad_worker_settings_are_one_line_naming_the_setting(
    args: list[str], env: dict[str, str], named: str
) -> None:
    code, output = await run_pricegate("gateway", *args, env={"PRICEGATE_REDIS_URL": "redis://127.0.0.1:1/0", **env})
    assert code == 2
    (line,) = output.strip().splitlines()
    assert line.startswith(f"pricegate: configuration error: {named}"), line
