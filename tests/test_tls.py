"""The gateway can terminate TLS itself (for clients that refuse ws://): wss:// and https:// on one port."""

from __future__ import annotations

import asyncio
import json
import shutil
import ssl
import subprocess
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect

from shared.broker.memory import MemoryBroker
from tests.harness import message, running_gateway
from tests.polling import eventually


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[str, str]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("openssl is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return str(cert), str(key)


async def test_wss_and_https(certificate: tuple[str, str]) -> None:
    cert, key = certificate
    context = ssl.create_default_context(cafile=cert)
    broker = MemoryBroker()
    async with running_gateway(broker, ssl_certfile=cert, ssl_keyfile=key) as gw:
        async with httpx.AsyncClient(verify=context) as client:
            response = await client.get(f"https://127.0.0.1:{gw.port}/api/v3/ping")
            assert response.json() == {}
        async with connect(f"wss://127.0.0.1:{gw.port}/ws/btcusdt@trade", ssl=context) as ws:
            await eventually(
                lambda: "btcusdt@trade" in gw.node.relay.active, what="the relay's subscription to btcusdt@trade"
            )
            await broker.publish([message("btcusdt@trade", {"e": "trade", "t": 1})])
            assert json.loads(await asyncio.wait_for(ws.recv(), 3)) == {"e": "trade", "t": 1}


async def test_wss_clients_leaving_are_closed_without_a_warning_each(
    certificate: tuple[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    """Over TLS the SSL protocol closes on the client's close_notify itself: the gateway does not try to keep the
    transport for the closer (asyncio would log a warning per client) and every session ends."""
    cert, key = certificate
    context = ssl.create_default_context(cafile=cert)
    async with running_gateway(MemoryBroker(), ssl_certfile=cert, ssl_keyfile=key, closes_per_turn=1) as gw:
        writers = []
        for _ in range(10):
            _, writer = await asyncio.open_connection("127.0.0.1", gw.port, ssl=context, server_hostname="127.0.0.1")
            writer.write(
                b"GET /ws/btcusdt@trade HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            )
            writers.append(writer)
        await eventually(lambda: len(gw.node.sessions) == 10, what="ten wss sessions")
        for writer in writers:
            writer.close()
        await eventually(lambda: not gw.node.sessions, what="every wss session closed")
    assert not [record for record in caplog.records if "eof_received" in record.getMessage()]
