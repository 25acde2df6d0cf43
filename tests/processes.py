"""Run real ``pricegate`` processes in tests: start, wait until they serve, read their output, stop by signal."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class PricegateProcess:
    process: asyncio.subprocess.Process
    output: list[str] = field(default_factory=list)
    _reader: asyncio.Task[None] | None = None

    async def _read(self) -> None:
        assert self.process.stdout is not None
        while line := await self.process.stdout.readline():
            self.output.append(line.decode(errors="replace"))

    async def wait_for_line(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        regex = re.compile(pattern)
        async with asyncio.timeout(timeout):
            while True:
                for line in self.output:
                    match = regex.search(line)
                    if match:
                        return match
                if self.process.returncode is not None:
                    raise AssertionError(f"process exited {self.process.returncode}:\n{''.join(self.output)}")
                await asyncio.sleep(0.05)

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.process.returncode is None:
            self.process.send_signal(sig)
        async with asyncio.timeout(timeout):
            code = await self.process.wait()
        if self._reader is not None:
            await self._reader
        return code


async def start_pricegate(*args: str, env: Mapping[str, str] | None = None) -> PricegateProcess:
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pricegate_cli",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=environment,
    )
    running = PricegateProcess(process)
    running._reader = asyncio.create_task(running._read())
    return running


async def run_pricegate(*args: str, env: Mapping[str, str] | None = None, timeout: float = 20.0) -> tuple[int, str]:
    """Run to completion; returns (exit code, combined output)."""
    running = await start_pricegate(*args, env=env)
    async with asyncio.timeout(timeout):
        code = await running.process.wait()
    assert running._reader is not None
    await running._reader
    return code, "".join(running.output)
