"""Raw TCP clients for tests that speak HTTP and WebSocket byte by byte (handshakes, floods, malformed input).

Every socket opened here is closed after the test that opened it (tests/conftest.py), whatever it asserted.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os

from tests.harness import RunningGateway

_OPENED: list[asyncio.StreamWriter] = []


async def close_raw_sockets() -> None:
    """Close every raw socket opened since the last call (tests/conftest.py calls it after each test)."""
    while _OPENED:
        writer = _OPENED.pop()
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def open_raw(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    _OPENED.append(writer)
    return reader, writer


def upgrade_request(path: str = "/ws/btcusdt@trade", headers: dict[str, str] | None = None) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {path} HTTP/1.1",
        "Host: 127.0.0.1",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        *(f"{name}: {value}" for name, value in (headers or {}).items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def handshake(
    gw: RunningGateway, request: bytes | None = None, *, timeout: float = 5.0
) -> tuple[int, dict[str, str], asyncio.StreamReader, asyncio.StreamWriter]:
    """Send an upgrade request on a raw socket; (status, headers, reader, writer) of the answer."""
    reader, writer = await open_raw(gw.port)
    writer.write(request if request is not None else upgrade_request())
    await writer.drain()
    status, headers = await read_response_head(reader, timeout)
    return status, headers, reader, writer


async def read_response_head(reader: asyncio.StreamReader, timeout: float) -> tuple[int, dict[str, str]]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers


async def closed_by_server(reader: asyncio.StreamReader, timeout: float) -> bool:
    try:
        while await asyncio.wait_for(reader.read(65536), timeout):
            pass
    except (ConnectionError, TimeoutError):
        return False
    return True
