"""A CLI that helps: ``--version`` from the one definition, each command's ``--help`` showing exactly the settings its
code reads (grouped, with defaults), warnings for unknown PRICEGATE_* variables, and PRICEGATE_LOG_FORMAT=json.

Which settings a command reads is found in its code: from the command's entry functions in ``pricegate_cli`` (followed
function by function, so ``run_demo`` does not count what ``run_ingest`` reads), then every module of ``shared``,
``gateway`` and ``ingest`` those import (module by module), every ``settings.<field>`` (or ``self.settings.<field>``)
there is a read. ``shared/settings.py`` itself (its validation reads everything) is left out.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import dataclasses
import io
import json
import logging
import os
import re
import sys
import tomllib
from functools import cache
from pathlib import Path

import pytest

from pricegate_cli.__main__ import build_parser, version
from pricegate_cli.logs import JsonFormatter
from pricegate_cli.settings_flags import COMMAND_SETTINGS, unknown_variables
from shared.settings import SETTING_GROUPS, Settings, env_name
from tests.processes import free_port, run_pricegate

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("gateway", "ingest", "shared", "pricegate_cli")
FIELDS = {spec.name for spec in dataclasses.fields(Settings)}
PROPERTIES = {"auth_modes": "auth"}  # Settings properties and the field each reads
MAIN = "pricegate_cli.__main__"
EVERY_COMMAND = [f"{MAIN}:load_settings", f"{MAIN}:_configure_logging"]
ENTRIES = {
    "demo": [f"{MAIN}:run_demo"],
    "gateway": [f"{MAIN}:run_gateway", "pricegate_cli.workers:worker_count", "pricegate_cli.workers:supervise"],
    "ingest": [f"{MAIN}:run_ingest"],
    "record": [f"{MAIN}:run_record"],
    "db": ["pricegate_cli.storage:run_db"],
    "keys": ["pricegate_cli.keys:run_keys"],
}
HELP_ARGS = {
    "demo": ["demo"],
    "gateway": ["gateway"],
    "ingest": ["ingest"],
    "record": ["record"],
    "db": ["db"],
    "keys": ["keys", "create"],
}


def module_path(name: str) -> Path | None:
    base = ROOT / name.replace(".", "/")
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


@cache
def parsed(name: str) -> ast.Module:
    path = module_path(name)
    assert path is not None, name
    return ast.parse(path.read_text())


def reads_in(node: ast.AST) -> set[str]:
    found = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Attribute):
            base = sub.value
            label = base.id if isinstance(base, ast.Name) else base.attr if isinstance(base, ast.Attribute) else ""
            name = PROPERTIES.get(sub.attr, sub.attr)
            if label.endswith("settings") and name in FIELDS:
                found.add(name)
    return found


def imported_modules(node: ast.AST) -> set[str]:
    names: set[str] = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Import):
            names.update(alias.name for alias in sub.names)
        elif isinstance(sub, ast.ImportFrom) and sub.module:
            names.add(sub.module)
            names.update(f"{sub.module}.{alias.name}" for alias in sub.names)  # a submodule imported by name
    return {name for name in names if name.split(".")[0] in PACKAGES and module_path(name) is not None}


def module_closure(start: set[str]) -> set[str]:
    seen: set[str] = set()
    todo = list(start)
    while todo:
        name = todo.pop()
        if name in seen or name.startswith("pricegate_cli"):
            continue
        seen.add(name)
        todo.extend(imported_modules(parsed(name)))
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # packages run their __init__
    return seen


def _names_bound_at_top(tree: ast.Module) -> tuple[dict[str, ast.AST], dict[str, str]]:
    defs: dict[str, ast.AST] = {}
    origins: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            defs[node.name] = node
        origins.update(_import_origins(node) if isinstance(node, ast.Import | ast.ImportFrom) else {})
    return defs, origins


def _import_origins(node: ast.AST) -> dict[str, str]:
    """Local name -> ``module`` or ``module:name`` for the imports in ``node``."""
    origins = {}
    for sub in ast.walk(node):
        if isinstance(sub, ast.Import):
            origins.update({(alias.asname or alias.name).split(".")[0]: alias.name for alias in sub.names})
        elif isinstance(sub, ast.ImportFrom) and sub.module:
            origins.update({alias.asname or alias.name: f"{sub.module}:{alias.name}" for alias in sub.names})
    return origins


def settings_read(entries: list[str]) -> set[str]:
    """Every setting the code reachable from ``entries`` (``module:function``) reads."""
    reads: set[str] = set()
    modules: set[str] = set()
    seen: set[str] = set()
    todo = list(entries)
    while todo:
        entry = todo.pop()
        if entry in seen:
            continue
        seen.add(entry)
        module, _, name = entry.partition(":")
        if not module.startswith("pricegate_cli"):
            as_module = f"{module}.{name}"
            modules.add(as_module if name and module_path(as_module) else module)
            continue
        defs, origins = _names_bound_at_top(parsed(module))
        node = defs.get(name)
        if node is None:
            continue
        reads |= reads_in(node)
        local = {**origins, **_import_origins(node)}
        assigned = {sub.id for sub in ast.walk(node) if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store)}
        for sub in ast.walk(node):
            if isinstance(sub, ast.Name) and sub.id not in assigned:
                if sub.id in defs:
                    todo.append(f"{module}:{sub.id}")
                elif sub.id in local:
                    todo.append(local[sub.id])
    for name in module_closure({module for module in modules if module_path(module)}) - {"shared.settings"}:
        reads |= reads_in(parsed(name))
    return reads


def help_text(args: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exited:
        build_parser().parse_args([*args, "--help"])
    assert exited.value.code == 0
    return out.getvalue()


def named_settings(text: str) -> set[str]:
    """The settings a help text lists: each flag's help ends ``[PRICEGATE_X, default: ...]``."""
    return set(re.findall(r"\[(PRICEGATE_[A-Z0-9_]+), default:", re.sub(r"\s+", " ", text)))


def test_every_setting_is_in_exactly_one_group() -> None:
    grouped = [name for group in SETTING_GROUPS for name in group.settings]
    assert sorted(grouped) == sorted(FIELDS), "shared.settings.SETTING_GROUPS must name every setting once"
    assert len({group.name for group in SETTING_GROUPS}) == len(SETTING_GROUPS)


def test_command_settings_name_real_groups_and_settings() -> None:
    groups = {group.name: group.settings for group in SETTING_GROUPS}
    for command, reads in COMMAND_SETTINGS.items():
        assert set(reads.groups) <= set(groups), command
        in_groups = {name for group in reads.groups for name in groups[group]}
        assert set(reads.plus) <= FIELDS - in_groups, f"{command}: plus names a setting its groups already have"
        assert set(reads.without) <= in_groups, f"{command}: without names a setting none of its groups has"
    assert set(COMMAND_SETTINGS) == set(ENTRIES)


@pytest.mark.parametrize("command", sorted(ENTRIES))
def test_each_command_declares_exactly_the_settings_its_code_reads(command: str) -> None:
    read = settings_read(EVERY_COMMAND + ENTRIES[command])
    declared = COMMAND_SETTINGS[command].names()
    assert sorted(read - declared) == [], f"{command} reads these but COMMAND_SETTINGS does not list them"
    assert sorted(declared - read) == [], f"{command} lists these in COMMAND_SETTINGS but never reads them"


@pytest.mark.parametrize("command", sorted(ENTRIES))
def test_each_commands_help_shows_exactly_its_settings_grouped_with_defaults(command: str) -> None:
    text = help_text(HELP_ARGS[command])
    assert named_settings(text) == {env_name(name) for name in COMMAND_SETTINGS[command].names()}
    assert "logging:" in text


def test_help_groups_and_defaults() -> None:
    gateway = help_text(["gateway"])
    titles = re.findall(r"^(\S[^\n]*):$", gateway, re.MULTILINE)
    assert titles[:3] == ["options", "logging", "network (where the gateway listens, TLS, processes, shutdown)"]
    flat = re.sub(r"\s+", " ", gateway)
    assert "[PRICEGATE_PORT, default: 8000]" in flat and "[PRICEGATE_REDIS_URL, default: unset]" in flat
    db = help_text(["db"])
    assert "PRICEGATE_PING_INTERVAL_S" not in db and "--ping-interval-s" not in db
    assert len(db.splitlines()) < 60  # it was 270+ lines of every setting
    assert "[PRICEGATE_SOURCE, default: synthetic]" in re.sub(r"\s+", " ", help_text(["demo"]))


def test_the_version_is_pyprojects() -> None:
    from gateway.metrics import VERSION

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert version() == VERSION == declared


async def test_pricegate_version() -> None:
    code, output = await run_pricegate("--version")
    assert (code, output) == (0, f"pricegate {version()}\n")


def test_unknown_variables_name_the_closest_setting() -> None:
    environ = {
        "PRICEGATE_PORTT": "8001",
        "PRICEGATE_MAX_CONECTIONS": "10",
        "PRICEGATE_REDIS": "redis://x",
        "PRICEGATE_NOTHING_LIKE_IT": "1",
        "PRICEGATE_PORT": "8000",  # a setting
        "PRICEGATE_TEST_REDIS_URL": "redis://x",  # the tests' own
        "PRICEGATE_KUBECTL": "/usr/bin/kubectl",
        "PGPORT": "5432",
    }
    assert unknown_variables(environ) == [
        "unknown setting PRICEGATE_MAX_CONECTIONS (did you mean PRICEGATE_MAX_CONNECTIONS?)",
        "unknown setting PRICEGATE_NOTHING_LIKE_IT (no setting has a similar name)",
        "unknown setting PRICEGATE_PORTT (did you mean PRICEGATE_PORT?)",
        "unknown setting PRICEGATE_REDIS (did you mean PRICEGATE_REDIS_URL?)",
    ]


async def test_an_unknown_variable_is_warned_about_even_when_the_configuration_fails() -> None:
    # Logged once logging is configured ...
    code, output = await run_pricegate("db", "status", env={"PRICEGATE_PORTT": "1", "PRICEGATE_DATABASE_URL": ""})
    assert code == 2
    warning, error = output.splitlines()
    assert warning.endswith(
        " WARNING pricegate.settings: unknown setting PRICEGATE_PORTT (did you mean PRICEGATE_PORT?)"
    )
    assert error.startswith("pricegate: configuration error: PRICEGATE_DATABASE_URL='': required for this command")
    # ... and printed before the error when the settings themselves are wrong (a misspelt name may be why).
    code, output = await run_pricegate("demo", env={"PRICEGATE_DEMO_HISTORY_CANDLE": "5", "PRICEGATE_PORT": "x"})
    assert code == 2
    assert output.splitlines() == [
        "pricegate: warning: unknown setting PRICEGATE_DEMO_HISTORY_CANDLE (did you mean "
        "PRICEGATE_DEMO_HISTORY_CANDLES?)",
        "pricegate: configuration error: PRICEGATE_PORT='x': not a valid int: "
        "invalid literal for int() with base 10: 'x'",
    ]


def test_json_log_records_carry_the_exception_text() -> None:
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        record = logging.LogRecord("pricegate.x", logging.ERROR, __file__, 1, "failed: %s", ("why",), sys.exc_info())
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert set(entry) == {"time", "level", "logger", "message", "exception"}
    assert (entry["level"], entry["logger"], entry["message"]) == ("ERROR", "pricegate.x", "failed: why")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["time"])
    assert entry["exception"].startswith("Traceback") and entry["exception"].endswith("ValueError: boom\nsecond line")


@pytest.mark.integration
async def test_log_format_json_makes_every_stderr_line_one_json_object() -> None:
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pricegate_cli",
        "demo",
        "--port",
        str(port),
        "--shutdown-drain-s",
        "0.2",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PRICEGATE_LOG_FORMAT": "json", "PRICEGATE_PORTT": "1", "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert process.stdout is not None and process.stderr is not None
        async with asyncio.timeout(20):
            while b"pricegate is serving" not in await process.stdout.readline():
                pass
        process.terminate()
        async with asyncio.timeout(20):
            stderr = await process.stderr.read()
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    entries = [json.loads(line) for line in stderr.decode().splitlines()]  # every line is one object
    assert all({"time", "level", "logger", "message"} <= set(entry) for entry in entries)
    loggers = {entry["logger"] for entry in entries}
    assert "uvicorn.error" in loggers  # uvicorn's own lines, in our format
    assert any(entry["message"].startswith("Uvicorn running on") for entry in entries)
    warning = next(entry for entry in entries if entry["logger"] == "pricegate.settings")
    assert (warning["level"], warning["message"]) == (
        "WARNING",
        "unknown setting PRICEGATE_PORTT (did you mean PRICEGATE_PORT?)",
    )
