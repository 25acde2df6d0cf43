"""Locust as users run it: a 10-second headless run of loadtests/locustfile.py against a real ``pricegate demo``.

Locust (its own virtualenv, ``.venv-locust``, pinned by ./run-tests) runs 20 WebSocket users with
``--exit-code-on-error 1``, so any failure (a refused connection, no first message, a lost connection, a silent
stream, an exception in the user) fails the test; the summary must show every metric the locustfile reports
(``ws connect``, ``ws first message``, ``ws lag``) with frames received; and no DeprecationWarning may appear
(websockets 18 turns today's deprecations into errors). A second, short run against a port where nothing listens
proves the exit code does fail.
"""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path

import pytest

from tests.external_tools import ROOT, venv_tool
from tests.processes import free_port, start_pricegate

LOCUSTFILE = ROOT / "loadtests" / "locustfile.py"
USERS = 20


async def run_locust(locust: Path, host: str, seconds: int, cwd: Path) -> tuple[int, str]:
    """(exit code, combined output) of a headless run; warnings are shown every time they happen."""
    env = {**os.environ, "PYTHONWARNINGS": "always::DeprecationWarning", "LOCUST_RECV_TIMEOUT_S": "5"}
    env.pop("PYTEST_ADDOPTS", None)
    process = await asyncio.create_subprocess_exec(
        locust, "-f", str(LOCUSTFILE), "--headless",
        "-u", str(USERS), "-r", "10", "-t", f"{seconds}s",
        "--only-summary", "--exit-code-on-error", "1", "--stop-timeout", "5",
        "-H", host,
        cwd=cwd, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    async with asyncio.timeout(seconds + 40):
        output, _ = await process.communicate()
    assert process.returncode is not None
    return process.returncode, output.decode(errors="replace")


def summary(output: str) -> dict[str, tuple[int, int]]:
    """Locust's summary table: metric name -> (requests, failures)."""
    rows = re.findall(r"^WS\s+(ws [a-z ]+?)\s+(\d+)\s+(\d+)\(", output, re.MULTILINE)
    return {name: (int(requests), int(failures)) for name, requests, failures in rows}


@pytest.mark.integration
@pytest.mark.timeout(120)
async def test_a_ten_second_locust_run_against_the_demo_has_no_failure(tmp_path: Path) -> None:
    locust = venv_tool(".venv-locust", "locust")
    port = free_port()
    demo = await start_pricegate("demo", "--port", str(port), "--shutdown-drain-s", "0")
    try:
        await demo.wait_for_line(r"pricegate is serving on http://127\.0\.0\.1:\d+")
        code, output = await run_locust(locust, f"http://127.0.0.1:{port}", 10, tmp_path)
    finally:
        await demo.stop()
    assert code == 0, f"locust reported failures or errors:\n{output[-6000:]}"
    assert "DeprecationWarning" not in output, output[-6000:]
    metrics = summary(output)
    assert set(metrics) == {"ws connect", "ws first message", "ws lag"}, output[-4000:]
    assert metrics["ws connect"] == (USERS, 0) and metrics["ws first message"] == (USERS, 0), metrics
    requests, failures = metrics["ws lag"]
    assert failures == 0 and requests >= USERS * 5, metrics  # tickers once a second, ~9 s per user


@pytest.mark.integration
@pytest.mark.timeout(60)
async def test_locust_fails_the_run_when_the_users_cannot_connect(tmp_path: Path) -> None:
    locust = venv_tool(".venv-locust", "locust")
    code, output = await run_locust(locust, f"http://127.0.0.1:{free_port()}", 2, tmp_path)
    assert code == 1, output[-4000:]
    requests, failures = summary(output)["ws connect"]
    assert requests == failures > 0, output[-4000:]
