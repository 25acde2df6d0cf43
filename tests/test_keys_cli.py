"""``pricegate keys`` as an operator runs it, against real PostgreSQL and Redis: create prints a key once, list
never shows one, revoke takes the key itself; and ``pricegate demo`` with ``PRICEGATE_AUTH=apikey`` takes those
keys, refuses others, and disconnects a revoked key's connection within the cache TTL."""

from __future__ import annotations

import asyncio
import hashlib
import re
import time

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.polling import eventually
from tests.processes import free_port, run_pricegate, start_pricegate

pytestmark = pytest.mark.integration


async def test_keys_create_list_and_revoke(postgres_dsn: str, pg_schema: str, redis_url: str, key_prefix: str) -> None:
    env = {
        "PRICEGATE_DATABASE_URL": postgres_dsn,
        "PRICEGATE_DATABASE_SCHEMA": pg_schema,
        "PRICEGATE_REDIS_URL": redis_url,
        "PRICEGATE_CHANNEL_PREFIX": key_prefix,
    }
    code, output = await run_pricegate("keys", "list", env=env)
    assert code == 2 and "pricegate db migrate" in output and "Traceback" not in output
    assert (await run_pricegate("db", "migrate", env=env))[0] == 0

    code, output = await run_pricegate("keys", "list", env=env)
    assert (code, output.strip()) == (0, "no API keys (create one with: pricegate keys create --label NAME)")
    code, output = await run_pricegate("keys", "create", "--label", "trading bot", env=env)
    key = output.strip()
    assert code == 0 and re.fullmatch(r"[0-9a-f]{64}", key)
    code, second = await run_pricegate("keys", "create", "--label", "dashboard", env=env)
    assert code == 0 and second.strip() != key
    subject = hashlib.sha256(key.encode()).hexdigest()[:16]

    code, listing = await run_pricegate("keys", "list", env=env)
    assert code == 0 and key not in listing and second.strip() not in listing
    lines = listing.strip().splitlines()
    assert lines[0].split() == ["SUBJECT", "LABEL", "CREATED", "REVOKED"]
    assert lines[1].startswith(subject) and "trading bot" in lines[1] and lines[1].endswith("-")

    code, output = await run_pricegate("keys", "revoke", key, env=env)
    assert code == 0
    assert output.strip() == f"revoked key {subject}; gateways refuse it and close its connections within 30 s"
    code, listing = await run_pricegate("keys", "list", env=env)
    assert not listing.strip().splitlines()[1].endswith("-")  # a revocation time now

    code, output = await run_pricegate("keys", "revoke", key, env=env)
    assert code == 1 and f"key {subject} is already revoked" in output
    code, output = await run_pricegate("keys", "revoke", "ab" * 32, env=env)
    assert code == 1 and "is not a key of this database" in output
    code, output = await run_pricegate("keys", "revoke", "Not-A-Key-" + key[:20], env=env)
    assert code == 2 and "64 lowercase hex characters" in output and key[:20] not in output
    code, output = await run_pricegate("keys", "create", "--label", "", env=env)
    assert code == 2 and "--label" in output


async def test_keys_need_a_database() -> None:
    code, output = await run_pricegate("keys", "list", env={"PRICEGATE_DATABASE_URL": ""})
    assert code == 2 and "PRICEGATE_DATABASE_URL" in output and "required" in output


async def test_the_demo_with_api_keys(postgres_dsn: str, pg_schema: str) -> None:
    env = {
        "PRICEGATE_DATABASE_URL": postgres_dsn,
        "PRICEGATE_DATABASE_SCHEMA": pg_schema,
        "PRICEGATE_AUTH": "apikey",
        "PRICEGATE_AUTH_CACHE_TTL_S": "1",
    }
    assert (await run_pricegate("db", "migrate", env=env))[0] == 0
    key = (await run_pricegate("keys", "create", "--label", "demo", env=env))[1].strip()
    port = free_port()
    demo = await start_pricegate("demo", "--port", str(port), "--symbols", "BTCUSDT", env=env)
    try:
        await demo.wait_for_line(r"pricegate is serving on")
        base = f"ws://127.0.0.1:{port}"
        with pytest.raises(InvalidStatus) as refused:
            async with connect(f"{base}/ws/btcusdt@trade"):
                pass
        assert refused.value.response.status_code == 401
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            assert (await http.get("/api/v3/exchangeInfo")).status_code == 401
            await eventually(lambda: _status(http, "/api/v3/exchangeInfo", key, 200), what="exchangeInfo with the key")
        async with connect(f"{base}/ws/btcusdt@trade", additional_headers={"X-MBX-APIKEY": key}) as ws:
            await asyncio.wait_for(ws.recv(), 10)  # live trades flow
            assert (await run_pricegate("keys", "revoke", key, env=env))[0] == 0
            revoked_at = time.monotonic()
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    await asyncio.wait_for(ws.recv(), 5)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4403
            assert time.monotonic() - revoked_at <= 1 + 3
        assert all(key not in line for line in demo.output)  # never logged
    finally:
        assert await demo.stop() == 0


async def _status(http: httpx.AsyncClient, path: str, key: str, expected: int) -> bool:
    return (await http.get(path, headers={"X-MBX-APIKEY": key})).status_code == expected
