"""A ``redis-server`` of a test's own, which the test may kill and start again (empty, as after a crash without
persistence) without disturbing anyone else using the shared test server. Under ``CI=true`` a missing
``redis-server`` binary is a failure (``service_missing``)."""

from __future__ import annotations

import asyncio
import shutil
import time

import redis.asyncio as aioredis
import redis.exceptions as redis_errors

from tests.conftest import service_missing
from tests.processes import free_port


class PrivateRedis:
    """On a unix socket (``PrivateRedis(path)``: no port to race for), or on a TCP port of loopback
    (:meth:`on_tcp`: a free port, kept across restarts, as a real deployment's Redis is)."""

    def __init__(self, socket_path: str | None = None, *, port: int | None = None) -> None:
        if (socket_path is None) == (port is None):
            raise ValueError("give a unix socket path or a TCP port")
        self.socket_path = socket_path
        self.port = port
        self.url = f"unix://{socket_path}?db=0" if socket_path is not None else f"redis://127.0.0.1:{port}/0"
        self._process: asyncio.subprocess.Process | None = None

    @classmethod
    def on_tcp(cls) -> PrivateRedis:
        return cls(port=free_port())

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.returncode is None

    async def start(self) -> None:
        executable = shutil.which("redis-server")
        if executable is None:
            service_missing("redis-server (to run a private server)", FileNotFoundError("redis-server"))
        if self.socket_path is not None:
            listen = ["--port", "0", "--unixsocket", self.socket_path, "--unixsocketperm", "700"]
        else:
            listen = ["--port", str(self.port), "--bind", "127.0.0.1"]
        self._process = await asyncio.create_subprocess_exec(
            executable, *listen, "--save", "", "--appendonly", "no",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        client = aioredis.from_url(self.url)
        try:
            deadline = time.monotonic() + 5
            while True:
                try:
                    await client.ping()
                    return
                except redis_errors.ConnectionError:
                    if time.monotonic() > deadline or self._process.returncode is not None:
                        raise
                    await asyncio.sleep(0.01)
        finally:
            await client.aclose()

    async def kill(self) -> None:
        """SIGKILL: nothing is saved, every connection drops at once."""
        process, self._process = self._process, None
        if process is not None and process.returncode is None:
            process.kill()
            await process.wait()
