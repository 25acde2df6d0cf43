"""The ``pricegate`` command as a user runs it: configuration errors, the embedded demo, clean SIGTERM."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.processes import free_port, run_pricegate, start_pricegate


async def test_unparsable_setting_is_one_clear_line_naming_it() -> None:
    code, output = await run_pricegate("demo", env={"PRICEGATE_PORT": "eighty"})
    assert code == 2
    assert output.strip().splitlines() == [
        "pricegate: configuration error: PRICEGATE_PORT='eighty': not a valid int: "
        "invalid literal for int() with base 10: 'eighty'"
    ]


async def test_bad_flag_value_names_the_flag() -> None:
    code, output = await run_pricegate("demo", "--control-rate-per-s", "-1")
    assert code == 2
    assert "--control-rate-per-s" in output and "must be >=" in output
    assert "Traceback" not in output


async def test_unreachable_redis_at_start_names_the_setting() -> None:
    code, output = await run_pricegate("gateway", env={"PRICEGATE_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})
    assert code == 2
    assert "PRICEGATE_REDIS_URL" in output and "cannot reach Redis" in output
    assert "Traceback" not in output


async def test_gateway_without_redis_url_says_it_is_required() -> None:
    code, output = await run_pricegate("gateway", env={"PRICEGATE_REDIS_URL": ""})
    assert code == 2
    assert "PRICEGATE_REDIS_URL" in output and "required" in output


@pytest.mark.integration
async def test_demo_serves_synthetic_market_and_drains_on_sigterm() -> None:
    port = free_port()
    demo = await start_pricegate("demo", "--port", str(port), "--symbols", "BTCUSDT,ETHUSDT", "--shutdown-drain-s", "1")
    try:
        await demo.wait_for_line(r"pricegate is serving on http://127\.0\.0\.1:\d+")
        base = f"127.0.0.1:{port}"
        async with httpx.AsyncClient() as client:
            info = (await client.get(f"http://{base}/api/v3/exchangeInfo")).json()
            assert [entry["symbol"] for entry in info["symbols"]] == ["BTCUSDT", "ETHUSDT"]
            assert info["symbols"][0]["filters"][0]["filterType"] == "PRICE_FILTER"
        streams = "btcusdt@trade/btcusdt@ticker/ethusdt@bookTicker/btcusdt@kline_1m"
        async with connect(f"ws://{base}/stream?streams={streams}") as ws:
            seen: dict[str, dict[str, Any]] = {}
            async with asyncio.timeout(10):
                while len(seen) < 4:
                    frame = json.loads(await ws.recv())
                    seen[frame["stream"]] = frame["data"]
            assert seen["btcusdt@trade"]["e"] == "trade"
            assert seen["btcusdt@ticker"]["e"] == "24hrTicker"
            assert "e" not in seen["ethusdt@bookTicker"]
            assert seen["btcusdt@kline_1m"]["k"]["i"] == "1m"
            demo.process.send_signal(15)
            with pytest.raises(ConnectionClosed) as closed:
                async with asyncio.timeout(10):
                    while True:
                        await ws.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
        assert await demo.stop() == 0
        # The demo's one ingest was never a standby: stopping it says so, not "buffering as a standby" (issue 12).
        output = "".join(demo.output)
        assert "publishing stopped: shutting down" in output, output
        assert "standby" not in output, output
    finally:
        if demo.process.returncode is None:
            demo.process.kill()
            await demo.process.wait()
