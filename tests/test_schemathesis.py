"""Schemathesis against a real ``pricegate demo``: the REST API answers as its OpenAPI document says.

Schemathesis (its own virtualenv, ``.venv-schemathesis``, pinned by ./run-tests) loads ``/openapi.json`` from the
running demo and sends the document's examples, its boundary values and then random requests, both valid and
invalid (``--mode all``), checking every answer: no 5xx, a documented status code and content type, the
documented required headers (``X-MBX-USED-WEIGHT-1M``, ``Retry-After``, ``WWW-Authenticate``) and a body that
matches the documented schema. Once with authentication off, once with JWT authentication on (then schemathesis
also checks that a missing or wrong token is refused). Not checked: that every schema-valid request is accepted,
which the document cannot promise (a well-formed symbol may not be listed; ``symbol`` and ``symbols`` together are
refused). ``PRICEGATE_SCHEMATHESIS_EXAMPLES`` (default 150 per operation) and ``PRICEGATE_SCHEMATHESIS_SEED``
(default: random; a failure prints its seed and a curl line) tune a run.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import jwt
import pytest

from tests.external_tools import venv_tool
from tests.processes import free_port, start_pricegate

CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
)
SECRET = "a-schemathesis-secret-of-32-bytes!!"
# Schemathesis's requests all come from 127.0.0.1: lift the per-IP budgets so it meets the API, not the 429s
# (whose answers tests/test_openapi.py checks against the document).
DEMO_ENV = {
    "PRICEGATE_REST_WEIGHT_LIMIT_PER_MIN": "1000000000",
    "PRICEGATE_CONNECTION_ATTEMPTS_PER_IP": "1000000",
    "PRICEGATE_MAX_CONNECTIONS_PER_IP": "100000",
    "PRICEGATE_LOG_LEVEL": "warning",
}


@pytest.mark.integration
@pytest.mark.timeout(150)
@pytest.mark.parametrize("auth", ["none", "jwt"])
async def test_the_demo_answers_as_its_openapi_document_says(auth: str, tmp_path: Path) -> None:
    st = venv_tool(".venv-schemathesis", "st")
    port = free_port()
    env = dict(DEMO_ENV)
    extra: list[str] = []
    if auth == "jwt":
        env |= {"PRICEGATE_AUTH": "jwt", "PRICEGATE_JWT_SECRET": SECRET}
        token = jwt.encode({"exp": int(time.time()) + 600, "sub": "schemathesis"}, SECRET, algorithm="HS256")
        extra = ["--header", f"Authorization: Bearer {token}", "--checks", "ignored_auth"]
    demo = await start_pricegate("demo", "--port", str(port), "--shutdown-drain-s", "0", env=env)
    try:
        await demo.wait_for_line(r"pricegate is serving on http://127\.0\.0\.1:\d+")
        arguments = [
            "run", f"http://127.0.0.1:{port}/openapi.json",
            "--checks", ",".join(CHECKS), *extra,
            "--mode", "all",
            "--phases", "examples,coverage,fuzzing",
            "--max-examples", os.environ.get("PRICEGATE_SCHEMATHESIS_EXAMPLES", "150"),
            "--request-timeout", "10",
            "--generation-database", "none",
            "--no-color",
        ]  # fmt: skip
        if seed := os.environ.get("PRICEGATE_SCHEMATHESIS_SEED"):
            arguments += ["--seed", seed]
        run = await asyncio.create_subprocess_exec(
            st, *arguments, cwd=tmp_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        async with asyncio.timeout(120):
            output, _ = await run.communicate()
        report = output.decode(errors="replace")
        assert run.returncode == 0, f"schemathesis found answers that break the document:\n{report[-12000:]}"
        assert "7 selected / 7 total" in report and " passed" in report, report[-4000:]
    finally:
        await demo.stop()
