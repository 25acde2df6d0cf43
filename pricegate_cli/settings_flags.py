"""Which settings each command reads, as flags grouped in its ``--help``, and warnings for unknown PRICEGATE_* names.

:data:`COMMAND_SETTINGS` is the one place that says which settings a command reads: whole groups of
``shared.settings.SETTING_GROUPS``, plus single settings of groups it otherwise ignores, less the settings of its
groups it does not read. ``--help`` shows exactly those, group by group, each with its variable and default;
tests/test_cli_help.py checks the list against the settings the command's code actually reads.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from shared.settings import ENV_PREFIX, SETTING_GROUPS, SettingGroup, Settings, env_name

# Flags whose names differ from their settings field (short forms the issue tracker and docs use).
FLAG_ALIASES = {"replay_speed": ["--speed"]}
# PRICEGATE_* variables that are not settings: the test suite's, the load generator's and tests/test_k8s.py's own.
NOT_SETTINGS_PREFIXES = ("PRICEGATE_TEST_",)
NOT_SETTINGS = frozenset({"PRICEGATE_KUBECTL", "PRICEGATE_LOADGEN_CACHE"})
# How alike a mistyped name must be to a setting's to be suggested (difflib's ratio, on the part after the prefix).
SUGGEST_CUTOFF = 0.7
EPILOG = "Each setting is also read from its PRICEGATE_* variable (shown in brackets with its default); flags win."


@dataclass(frozen=True)
class CommandSettings:
    """The settings a command reads: ``groups``, plus ``plus``, less ``without`` (setting names)."""

    groups: tuple[str, ...]
    plus: tuple[str, ...] = ()
    without: tuple[str, ...] = ()

    def names(self) -> set[str]:
        by_group = {group.name: group.settings for group in SETTING_GROUPS}
        return ({name for group in self.groups for name in by_group[group]} | set(self.plus)) - set(self.without)


COMMAND_SETTINGS: dict[str, CommandSettings] = {
    # The demo runs a gateway and ingest in one process on the in-memory broker: no workers, no leader lease, no
    # Redis channel names (the REST cache still uses Redis when PRICEGATE_REDIS_URL is set), no trade backfill.
    "demo": CommandSettings(
        groups=(
            "logging",
            "network",
            "broker",
            "sources",
            "ingest",
            "upstream",
            "database",
            "candles",
            "rest",
            "limits",
            "edge",
            "auth",
        ),
        without=(
            "workers",
            "venue",
            "history_max_age_s",
            "ingest_metrics_port",
            "leader_ttl_s",
            "leader_renew_s",
            "backfill_trades",
        ),
    ),
    "gateway": CommandSettings(
        groups=("logging", "network", "broker", "database", "rest", "limits", "edge", "auth"),
        # The market's symbols before exchangeInfo is cached, whether the exchange may be asked (binance), its REST
        # base, and which kline intervals the candle store holds.
        plus=("symbols", "source", "binance_rest_url", "candle_intervals"),
    ),
    "ingest": CommandSettings(
        groups=("logging", "broker", "sources", "ingest", "upstream", "database", "candles"),
        plus=("host",),  # the address of its /metrics server
        without=("demand_ttl_s", "demo_history_candles"),
    ),
    "record": CommandSettings(groups=("logging",), plus=("binance_ws_url",)),
    "db": CommandSettings(groups=("logging", "database")),
    # revoke clears the key's entry in the gateways' Redis cache and says how soon gateways notice.
    "keys": CommandSettings(groups=("logging", "database"), plus=("redis_url", "channel_prefix", "auth_cache_ttl_s")),
}


def shown_default(spec: dataclasses.Field[Any]) -> str:
    """A setting's default as a user would type it (the README table's form; ``unset`` for none)."""
    default = spec.default
    if isinstance(default, bool):
        return str(default).lower()
    if isinstance(default, tuple):
        return ",".join(default) or "empty"
    return "unset" if default is None else str(default)


def grouped_settings(command: str) -> list[tuple[SettingGroup, list[dataclasses.Field[Any]]]]:
    """The settings ``command`` reads, in SETTING_GROUPS order, each group's in declaration order."""
    wanted = COMMAND_SETTINGS[command].names()
    fields = {spec.name: spec for spec in dataclasses.fields(Settings)}
    grouped = []
    for group in SETTING_GROUPS:
        specs = [fields[name] for name in fields if name in wanted and name in group.settings]
        if specs:
            grouped.append((group, specs))
    return grouped


def setting_help(spec: dataclasses.Field[Any]) -> str:
    """A flag's help: the setting's meaning, then ``[PRICEGATE_X, default: Y]`` (escaped for argparse)."""
    text = f"{spec.metadata['doc']} [{env_name(spec.name)}, default: {shown_default(spec)}]"
    return text.replace("%", "%%")


def add_settings_flags(parser: argparse.ArgumentParser, command: str, *, skip: Iterable[str] = ()) -> None:
    """One ``--flag VALUE`` per setting ``command`` reads, in one argument group per settings group."""
    skipped = set(skip)
    for group, specs in grouped_settings(command):
        section = parser.add_argument_group(group.title)
        for spec in specs:
            if spec.name in skipped:
                continue
            section.add_argument(
                "--" + spec.name.replace("_", "-"),
                *FLAG_ALIASES.get(spec.name, []),
                dest=spec.name,
                default=None,
                metavar="VALUE",
                help=setting_help(spec),
            )


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """One warning per PRICEGATE_* variable that is no setting, naming the closest setting when one is alike."""
    known = {env_name(spec.name) for spec in dataclasses.fields(Settings)}
    suffixes = {name.removeprefix(ENV_PREFIX): name for name in known}
    warnings = []
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or name in known or name in NOT_SETTINGS:
            continue
        if name.startswith(NOT_SETTINGS_PREFIXES):
            continue
        close = difflib.get_close_matches(name.removeprefix(ENV_PREFIX), suffixes, n=1, cutoff=SUGGEST_CUTOFF)
        hint = f"did you mean {suffixes[close[0]]}?" if close else "no setting has a similar name"
        warnings.append(f"unknown setting {name} ({hint})")
    return warnings
