"""``pricegate watch`` end to end, as a user runs it: real ``pricegate demo`` processes, real sockets, a real
pseudo-terminal for the live table; and what goes wrong (nothing listening, an unknown stream, the server going
away and coming back, a bad URL): one line each, retried, never a traceback."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import pty
import re
import signal
import struct
import sys
import termios
from collections.abc import AsyncIterator, Mapping

import pytest

from tests.auth_support import SECRET, token
from tests.processes import PricegateProcess, free_port, start_pricegate

pytestmark = pytest.mark.integration
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


class Watch:
    """A ``pricegate watch`` process with stdout and stderr read apart."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.stdout: list[bytes] = []
        self.stderr: list[str] = []
        assert process.stdout is not None and process.stderr is not None
        self._readers = [
            asyncio.create_task(self._read(process.stdout, self.stdout.append)),
            asyncio.create_task(self._read(process.stderr, lambda line: self.stderr.append(line.decode()))),
        ]

    @staticmethod
    async def _read(stream: asyncio.StreamReader, keep: object) -> None:
        while line := await stream.readline():
            keep(line)  # type: ignore[operator]

    async def wait_for(self, condition: object, timeout: float = 20.0) -> None:
        async with asyncio.timeout(timeout):
            while not condition():  # type: ignore[operator]
                if self.process.returncode is not None:
                    raise AssertionError(f"watch exited {self.process.returncode}: {''.join(self.stderr)}")
                await asyncio.sleep(0.05)

    async def stop(self, sig: int | None = signal.SIGTERM) -> int:
        """Send ``sig`` (None: wait for the process to end by itself); the exit code."""
        if self.process.returncode is None and sig is not None:
            self.process.send_signal(sig)
        async with asyncio.timeout(10):
            code = await self.process.wait()
        await asyncio.gather(*self._readers)
        return code


async def start_watch(*args: str, env: Mapping[str, str] | None = None) -> Watch:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pricegate_cli",
        "watch",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )
    return Watch(process)


async def start_demo(port: int, *extra: str, env: Mapping[str, str] | None = None) -> PricegateProcess:
    demo = await start_pricegate(
        "demo", "--port", str(port), "--symbols", "BTCUSDT,ETHUSDT", "--shutdown-drain-s", "0.2", *extra, env=env
    )
    await demo.wait_for_line(r"pricegate is serving on http://127\.0\.0\.1:\d+")
    return demo


@pytest.fixture
async def demo() -> AsyncIterator[tuple[PricegateProcess, int]]:
    port = free_port()
    running = await start_demo(port)
    try:
        yield running, port
    finally:
        await running.stop()


def data_lines(watch: Watch) -> list[dict[str, object]]:
    return [json.loads(line) for line in watch.stdout]


async def test_json_prints_every_data_frame_as_one_line(demo: tuple[PricegateProcess, int]) -> None:
    _, port = demo
    watch = await start_watch("btcusdt@trade", "ETHUSDT@bookTicker", "--url", f"ws://127.0.0.1:{port}", "--json")
    await watch.wait_for(
        lambda: {str(f["stream"]) for f in data_lines(watch)} >= {"btcusdt@trade", "ethusdt@bookTicker"}
    )
    assert await watch.stop() == 0
    frames = data_lines(watch)
    assert {str(frame["stream"]) for frame in frames} == {"btcusdt@trade", "ethusdt@bookTicker"}
    trade = next(frame["data"] for frame in frames if frame["stream"] == "btcusdt@trade")
    assert isinstance(trade, dict) and trade["e"] == "trade" and trade["s"] == "BTCUSDT"
    # The frames are the server's bytes: its compact JSON, not a re-encoding.
    assert all(b": " not in line and line.endswith(b"}\n") for line in watch.stdout)
    assert watch.stderr[0].startswith(f"pricegate watch: connected to ws://127.0.0.1:{port}/stream?streams=")
    assert "Traceback" not in "".join(watch.stderr)


async def test_json_into_head_stops_quietly(demo: tuple[PricegateProcess, int]) -> None:
    _, port = demo
    shell = await asyncio.create_subprocess_shell(
        f"{sys.executable} -m pricegate_cli watch btcusdt@trade --url ws://127.0.0.1:{port} --json | head -3; "
        'echo "exit ${PIPESTATUS[0]}"',
        executable="/bin/bash",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(30):
        out, err = await shell.communicate()
    lines = out.decode().splitlines()
    assert [json.loads(line)["stream"] for line in lines[:3]] == ["btcusdt@trade"] * 3
    assert lines[3] == "exit 0"
    assert "Traceback" not in err.decode() and "Exception" not in err.decode()


async def test_the_live_table_in_a_terminal(demo: tuple[PricegateProcess, int]) -> None:
    _, port = demo
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 130, 0, 0))
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pricegate_cli",
        "watch",
        "btcusdt@trade",
        "ethusdt@ticker",
        "btcusdt@bookTicker",
        "--url",
        f"ws://127.0.0.1:{port}",
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env={**os.environ, "TERM": "xterm-256color"},
    )
    os.close(slave)
    os.set_blocking(master, False)
    screen = ""

    def read() -> None:
        nonlocal screen
        while True:
            try:
                chunk = os.read(master, 65536)
            except (BlockingIOError, OSError):
                return
            if not chunk:
                return
            screen += chunk.decode(errors="replace")

    def row(stream: str) -> re.Match[str] | None:
        # The newest drawing of the stream's row with a price, a rate and a lag (bookTicker has no event time).
        return re.search(
            rf"{re.escape(stream)}\s*│\s*[\d.]+(?: / [\d.]+)?\s*│[^│]+│\s*[\d.]+\s*│\s*(-|-?\d+ ms)", text()
        )

    def text() -> str:
        return ANSI.sub("", screen)

    try:
        async with asyncio.timeout(20):
            while not all(row(stream) for stream in ("btcusdt@trade", "ethusdt@ticker", "btcusdt@bookTicker")):
                read()
                await asyncio.sleep(0.1)
        assert "msg/s" in text() and "lag" in text() and "events" in text()
        assert f"live: ws://127.0.0.1:{port}/stream?streams=btcusdt@trade/ethusdt@ticker/btcusdt@bookTicker" in text()
        assert "\x1b[" in screen  # drawn for a terminal: cursor movement and colour
        process.send_signal(signal.SIGINT)
        async with asyncio.timeout(10):
            assert await process.wait() == 0
        read()
        assert "Traceback" not in text()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        os.close(master)


async def test_nothing_listening_is_one_line_per_attempt_and_retried() -> None:
    url = f"ws://127.0.0.1:{free_port()}"
    watch = await start_watch("btcusdt@trade", "--url", url, "--json")
    await watch.wait_for(lambda: len(watch.stderr) >= 3)
    assert await watch.stop() == 0
    for line in watch.stderr:
        assert re.fullmatch(r"pricegate watch: cannot connect: .*refused.*; retrying in \d+\.\d s\n", line), line
    delays = [float(re.findall(r"retrying in ([\d.]+) s", line)[0]) for line in watch.stderr]
    assert delays[0] <= 0.5 < max(delays)  # jittered, growing backoff
    assert watch.stdout == []


async def test_an_unknown_stream_is_the_servers_error_in_one_line(demo: tuple[PricegateProcess, int]) -> None:
    _, port = demo
    watch = await start_watch("foousdt@trade", "--url", f"ws://127.0.0.1:{port}", "--json")
    await watch.wait_for(lambda: sum("retrying" in line for line in watch.stderr) >= 2)
    assert await watch.stop() == 0
    errors = [line for line in watch.stderr if "server error" in line]
    assert errors[0] == (
        "pricegate watch: server error: Invalid request: invalid stream 'foousdt@trade': unknown symbol FOOUSDT "
        "(code 2)\n"
    )
    assert any("the server refused every stream asked for; retrying in" in line for line in watch.stderr)
    assert "Traceback" not in "".join(watch.stderr) and watch.stdout == []


async def test_a_known_stream_keeps_flowing_beside_an_unknown_one(demo: tuple[PricegateProcess, int]) -> None:
    _, port = demo
    watch = await start_watch("foousdt@trade", "btcusdt@trade", "--url", f"ws://127.0.0.1:{port}", "--json")
    await watch.wait_for(lambda: len(watch.stdout) >= 3)
    assert await watch.stop() == 0
    assert sum("unknown symbol FOOUSDT" in line for line in watch.stderr) == 1
    assert not any("retrying" in line for line in watch.stderr)


async def test_a_server_that_goes_away_and_comes_back() -> None:
    port = free_port()
    first = await start_demo(port)
    watch = await start_watch("btcusdt@trade", "--url", f"ws://127.0.0.1:{port}", "--json")
    try:
        await watch.wait_for(lambda: len(watch.stdout) >= 2)
        assert await first.stop() == 0  # SIGTERM: the demo closes its clients with 1001
        await watch.wait_for(lambda: any("cannot connect" in line for line in watch.stderr))
        closed = next(line for line in watch.stderr if "closed the connection" in line)
        assert re.fullmatch(
            r"pricegate watch: the server closed the connection \(1001 .*\); retrying in \d+\.\d s\n", closed
        ), closed
        before = len(watch.stdout)
        second = await start_demo(port)
        try:
            await watch.wait_for(lambda: len(watch.stdout) >= before + 2, timeout=40)
        finally:
            await second.stop()
        assert sum(line.startswith("pricegate watch: connected to") for line in watch.stderr) == 2
    finally:
        assert await watch.stop() == 0
    assert "Traceback" not in "".join(watch.stderr)


async def test_a_token_or_an_api_key_reaches_a_gateway_with_authentication() -> None:
    port = free_port()
    demo = await start_demo(port, env={"PRICEGATE_AUTH": "jwt", "PRICEGATE_JWT_SECRET": SECRET})
    try:
        refused = await start_watch("btcusdt@trade", "--url", f"ws://127.0.0.1:{port}", "--json")
        await refused.wait_for(lambda: len(refused.stderr) >= 1)
        assert await refused.stop() == 0
        assert refused.stderr[0].startswith("pricegate watch: the server refused the connection: HTTP 401")
        watch = await start_watch("btcusdt@trade", "--url", f"ws://127.0.0.1:{port}", "--json", "--token", token())
        await watch.wait_for(lambda: len(watch.stdout) >= 1)
        assert await watch.stop() == 0
        assert "token=***" in watch.stderr[0]  # the token is never printed
    finally:
        await demo.stop()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["btcusdt@trade", "--url", "ftp://127.0.0.1"], "--url 'ftp://127.0.0.1': expected a WebSocket base"),
        (["btcusdt"], "'btcusdt' is not a stream name"),
    ],
)
async def test_unusable_arguments_are_one_line_and_exit_2(args: list[str], message: str) -> None:
    watch = await start_watch(*args)
    assert await watch.stop(None) == 2
    assert len(watch.stderr) == 1 and message in watch.stderr[0]
