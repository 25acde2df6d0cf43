"""Tools the suite runs from virtualenvs of their own, because their pins conflict with ours (schemathesis and
locust pin pytest, websockets...): ``./run-tests`` makes ``.venv-schemathesis`` and ``.venv-locust`` when missing
(README, "Development"). A missing tool fails the run under CI=true and skips loudly otherwise, as a missing
service does (tests/conftest.py)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def venv_tool(venv: str, executable: str) -> Path:
    """``<repo>/<venv>/bin/<executable>``, or the test fails (CI=true) or is skipped with the reason."""
    path = ROOT / venv / "bin" / executable
    if path.is_file() and os.access(path, os.X_OK):
        return path
    message = f"{executable} is not installed in {venv}/ (./run-tests makes it: README, 'Development')"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true and {message}", pytrace=False)
    pytest.skip(message)


def require_programs(*needs: str) -> None:
    """The system programs a harness test runs: ``redis-server`` and/or ``cc`` (any of cc, gcc, clang, for the
    load generator and the tap). Missing: fails under CI=true, skips with the reason otherwise (tests/conftest.py)."""
    from tests.conftest import service_missing

    for need in needs:
        found = any(shutil.which(cc) for cc in ("cc", "gcc", "clang")) if need == "cc" else shutil.which(need)
        if not found:
            what = "a C compiler (cc, gcc or clang)" if need == "cc" else need
            service_missing(f"{what}, which the load tests build or start,", FileNotFoundError(need))
