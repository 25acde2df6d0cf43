"""Write deploy/compose/prometheus/rules.yml from k8s/base/prometheusrule.yaml: one source of truth for the alerts.

The PrometheusRule's ``spec.groups`` is exactly a Prometheus rule file's ``groups``, so the compose stack's
Prometheus evaluates the same alerts as the Kubernetes one. Run after editing the PrometheusRule:

    .venv/bin/python deploy/compose/render_rules.py

tests/test_compose.py fails while the two differ.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "k8s" / "base" / "prometheusrule.yaml"
TARGET = ROOT / "deploy" / "compose" / "prometheus" / "rules.yml"
HEADER = (
    "# Generated from k8s/base/prometheusrule.yaml (spec.groups) by deploy/compose/render_rules.py: do not edit.\n"
    "# Edit the PrometheusRule and run: .venv/bin/python deploy/compose/render_rules.py\n"
)


def rule_groups() -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = yaml.safe_load(SOURCE.read_text())["spec"]["groups"]
    return groups


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the longer expressions) as literal blocks, as in the PrometheusRule."""


def _string(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_Dumper.add_representer(str, _string)


def render() -> str:
    body: str = yaml.dump({"groups": rule_groups()}, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=120)
    return HEADER + body


def main() -> int:
    TARGET.write_text(render())
    print(f"wrote {TARGET.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
