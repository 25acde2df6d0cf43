"""Several ``pricegate ingest`` processes and gateways on one host (README: run two or more ingests): with the
defaults they all start (ingest's /metrics port moves up from 9108 when taken, logged and printed); a port chosen by
hand that is taken (ingest's metrics port, a gateway's port or metrics port) stops the process at start with exit 2
and one line naming the setting, never a traceback."""

from __future__ import annotations

import signal
import socket

import httpx
import pytest
import redis.asyncio as aioredis

from tests.processes import free_port, run_pricegate, start_pricegate

pytestmark = pytest.mark.integration

METRICS_LINE = r"/metrics on http://127\.0\.0\.1:(\d+)/metrics"


async def test_two_ingests_on_one_host_start_with_the_default_metrics_port(redis_url: str, key_prefix: str) -> None:
    env = {"PRICEGATE_REDIS_URL": redis_url, "PRICEGATE_CHANNEL_PREFIX": key_prefix}  # metrics port: the default
    ingests = [await start_pricegate("ingest", env=env) for _ in range(2)]
    try:
        ports = [int((await ingest.wait_for_line(METRICS_LINE)).group(1)) for ingest in ingests]
        assert len(set(ports)) == 2 and all(9108 <= port <= 9127 for port in ports), ports
        moved = [ingest for ingest, port in zip(ingests, ports, strict=True) if port != 9108]
        assert all("PRICEGATE_INGEST_METRICS_PORT=9108 is taken" in "".join(p.output) for p in moved)
        async with httpx.AsyncClient() as http:
            for port in ports:
                assert "pricegate_ingest_is_leader" in (await http.get(f"http://127.0.0.1:{port}/metrics")).text
    finally:
        for ingest in ingests:
            if ingest.process.returncode is None:
                assert await ingest.stop(signal.SIGTERM, timeout=10) == 0, "".join(ingest.output[-20:])
        client = aioredis.from_url(redis_url)
        try:  # the shared test Redis keeps nothing of ours (the last leader's key has no TTL)
            keys = [key async for key in client.scan_iter(match=f"{key_prefix}*")]
            if keys:
                await client.delete(*keys)
        finally:
            await client.aclose()


async def test_a_taken_metrics_port_chosen_by_hand_is_one_clear_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, output = await run_pricegate(
            "ingest",
            env={"PRICEGATE_REDIS_URL": "redis://127.0.0.1:1/0", "PRICEGATE_INGEST_METRICS_PORT": str(port)},
        )
    assert code == 2, output
    assert "Traceback" not in output
    (line,) = [line for line in output.splitlines() if "PRICEGATE_INGEST_METRICS_PORT" in line]
    assert line.startswith(f"pricegate: configuration error: PRICEGATE_INGEST_METRICS_PORT={port}: the port is in use")


@pytest.mark.parametrize("setting", ["PRICEGATE_PORT", "PRICEGATE_METRICS_PORT"])
async def test_a_second_gateway_on_a_taken_port_is_one_clear_line(setting: str) -> None:
    with socket.socket() as taken:  # what another gateway on this host holds
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ports = {"PRICEGATE_PORT": str(free_port()), "PRICEGATE_METRICS_PORT": str(free_port()), setting: str(port)}
        code, output = await run_pricegate("gateway", env={"PRICEGATE_REDIS_URL": "redis://127.0.0.1:1/0", **ports})
    assert code == 2, output
    assert "Traceback" not in output
    (line,) = [line for line in output.splitlines() if setting in line]
    assert line.startswith(f"pricegate: configuration error: {setting}={port}: cannot listen on 127.0.0.1"), line
