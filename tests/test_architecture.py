"""Module boundaries (docs/architecture.md, "Module map" and "Pure modules"), enforced by walking every import.

- ``shared`` imports nothing from ``gateway`` or ``ingest``; ``gateway`` and ``ingest`` never import each other;
  only ``pricegate_cli`` (the composition root) imports both.
- *Pure* modules import no I/O library, so they are testable without sockets or an event loop.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("shared", "gateway", "ingest", "pricegate_cli")
FORBIDDEN = {
    "shared": {"gateway", "ingest", "pricegate_cli"},
    "gateway": {"ingest", "pricegate_cli"},
    "ingest": {"gateway", "pricegate_cli"},
    "pricegate_cli": set(),
}
PURE_MODULES = (
    "shared/errors.py",
    "shared/streams.py",
    "shared/frames.py",
    "shared/settings.py",
    "shared/backoff.py",
    "shared/ratelimit.py",
    "shared/broker/contract.py",
    "shared/redis/resp.py",
    "shared/redis/urls.py",
    "shared/redis/slots.py",
    "shared/redis/packed_publish.py",
    "shared/broker/outcome.py",
    "shared/intervals.py",
    "shared/candles/model.py",
    "gateway/ws/control.py",
    "gateway/ws/hub.py",
    "gateway/ws/keepalive.py",
    "gateway/ws/frames.py",
    "gateway/ws/close_codes.py",
    "gateway/ws/admission.py",
    "gateway/ws/asgi_outbox.py",
    "gateway/sequencer.py",
    "gateway/edge/client_ip.py",
    "gateway/edge/origins.py",
    "gateway/edge/ip_limits.py",
    "gateway/edge/guard.py",
    "gateway/auth/principal.py",
    "gateway/auth/tokens.py",
    "gateway/auth/key_cache.py",
    "gateway/auth/expiry.py",
    "gateway/auth/http.py",
    "gateway/rest/weights.py",
    "gateway/rest/params.py",
    "gateway/rest/technicals.py",
    "ingest/sources/binance/wire.py",
    "ingest/sources/synthetic/market.py",
    "ingest/sources/synthetic/symbols.py",
    "ingest/sources/synthetic/book.py",
    "ingest/sources/synthetic/ohlc.py",
    "ingest/sources/synthetic/rolling.py",
    "ingest/sources/synthetic/stream_names.py",
    "ingest/sources/synthetic/symbol_market.py",
    "shared/binance/exchange_info.py",
    "ingest/sources/synthetic/past_candles.py",
    "shared/binance/identity.py",
    "ingest/publish/continuity.py",
    "ingest/publish/standby.py",
    "ingest/sources/binance/rotation.py",
    "shared/binance/weight.py",
    "ingest/publish/trades.py",
    "pricegate_cli/watch_view.py",
)
IO_LIBRARIES = {
    "asyncio", "socket", "ssl", "selectors", "threading", "subprocess", "redis", "websockets", "starlette",
    "uvicorn", "httpx", "asyncpg", "prometheus_client", "uvloop", "requests", "aiohttp",
}  # fmt: skip


def imported_top_levels(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def modules_of(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", PACKAGES)
def test_package_dependencies_point_the_right_way(package: str) -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(imported_top_levels(path) & FORBIDDEN[package])
        for path in modules_of(package)
    }
    assert {module: bad for module, bad in offenders.items() if bad} == {}


@pytest.mark.parametrize("module", PURE_MODULES)
def test_pure_modules_import_no_io_library(module: str) -> None:
    path = ROOT / module
    assert path.is_file(), f"{module} is listed as pure but does not exist"
    assert sorted(imported_top_levels(path) & IO_LIBRARIES) == []


DOC = ROOT / "docs" / "architecture.md"


def _doc_section(title: str, next_title: str) -> str:
    text = DOC.read_text()
    return text[text.index(f"## {title}") : text.index(f"## {next_title}")]


def test_the_architecture_doc_lists_exactly_the_pure_modules() -> None:
    listed: set[str] = set()
    for line in _doc_section("Pure modules", "How to add a stream kind").splitlines():
        match = re.match(r"- `([^`]+/)`: (.*)", line)
        if match:
            listed.update(match.group(1) + name for name in re.findall(r"`([^`]+)`", match.group(2)))
    assert sorted(listed) == sorted(PURE_MODULES), "docs/architecture.md 'Pure modules' differs from PURE_MODULES"


def test_the_architecture_doc_names_every_module() -> None:
    module_map = _doc_section("Module map", "Pure modules")
    missing = [
        str(path.relative_to(ROOT))
        for package in PACKAGES
        for path in modules_of(package)
        if path.name != "__init__.py"
        and str(path.relative_to(ROOT / package)) not in module_map
        and path.name not in module_map
    ]
    assert not missing, f"docs/architecture.md's module map does not name {missing}"
