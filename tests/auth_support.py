"""Helpers of the authentication tests: a migrated key table, raw-socket handshakes, JWT minting, a cuttable
TCP proxy in front of PostgreSQL (an outage without mocks)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import jwt

from gateway.auth.api_keys import ApiKeys
from shared.db import open_pool
from shared.settings import Settings
from tests.tcp_proxy import TcpProxy

SECRET = "a-test-secret-of-at-least-32-bytes!!"  # HS256 needs 32 bytes (RFC 7518 §3.2)


@contextlib.asynccontextmanager
async def key_table(dsn: str, schema: str) -> AsyncIterator[ApiKeys]:
    """The ``api_keys`` table of a freshly migrated schema."""
    pool = await open_pool(Settings(database_url=dsn, database_schema=schema, db_migrate_on_start=True))
    try:
        yield ApiKeys(pool)
    finally:
        await pool.close()


def auth_settings(dsn: str, schema: str, redis_url: str, prefix: str, **extra: Any) -> dict[str, Any]:
    """Gateway overrides for API-key authentication on a test schema and key prefix, with generous edge limits
    (the tests open many connections from 127.0.0.1)."""
    return {
        "auth": "apikey",
        "database_url": dsn,
        "database_schema": schema,
        "redis_url": redis_url,
        "channel_prefix": prefix,
        "max_connections_per_ip": 20_000,
        "connection_attempts_per_ip": 100_000,
        **extra,
    }


def token(claims: dict[str, Any] | None = None, *, key: Any = SECRET, algorithm: str = "HS256", **more: Any) -> str:
    """A connection token; ``exp`` defaults to a minute from now."""
    body = {"exp": int(time.time()) + 60, **(claims or {}), **more}
    return jwt.encode(body, key, algorithm=algorithm)


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


class RawHandshake:
    """One upgrade request on a raw socket: the status, headers and body of the answer."""

    def __init__(self, status: int, headers: dict[str, str], body: bytes, writer: asyncio.StreamWriter) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.writer = writer

    def close(self) -> None:
        self.writer.close()


async def raw_handshake(
    port: int, path: str = "/ws/btcusdt@trade", headers: dict[str, str] | None = None, *, timeout: float = 10.0
) -> RawHandshake:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(upgrade_request(path, headers))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        found: dict[str, str] = {}
        for line in header_lines:
            if ":" in line:
                name, value = line.split(":", 1)
                found[name.strip().lower()] = value.strip()
        status = int(status_line.split()[1])
        body = b""
        if status != 101 and "content-length" in found:
            body = await asyncio.wait_for(reader.readexactly(int(found["content-length"])), timeout)
    except BaseException:
        writer.close()
        raise
    return RawHandshake(status, found, body, writer)


class CuttableProxy(TcpProxy):
    """Forwards to PostgreSQL until :meth:`cut`: then every connection through it is closed and new ones are
    closed at once, as when the database host goes away."""

    def __init__(self, target_port: int) -> None:
        super().__init__(target_port)
        self.down = False

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        if self.down:
            client_writer.close()
            return
        await super()._accept(client_reader, client_writer)

    def connect(
        self,
        client_reader: asyncio.StreamReader,
        client_writer: asyncio.StreamWriter,
        server_reader: asyncio.StreamReader,
        server_writer: asyncio.StreamWriter,
    ) -> None:
        self._spawn(_pump(client_reader, server_writer))
        self._spawn(_pump(server_reader, client_writer))

    def cut(self) -> None:
        self.down = True
        for writer in self._writers:
            writer.close()
        self._writers.clear()

    def restore(self) -> None:
        self.down = False


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()
