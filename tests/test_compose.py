"""compose.yaml stays runnable, checked offline: no Docker engine runs on the development and CI machines.

Parsed as YAML (anchors and merge keys resolved as Compose does) and checked against the code: every
``PRICEGATE_*`` key and value against ``Settings``, each command against the CLI, image and build context against
the Dockerfile and pyproject, URLs against the services they name, ports, ``depends_on`` conditions against
healthchecks, Prometheus's scrape targets against the metrics ports, and its rules file against the
PrometheusRule (the one source of truth for the alerts).
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from pricegate_cli.__main__ import build_parser
from shared.settings import Settings, env_name

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose.yaml"
PROMETHEUS_DIR = ROOT / "deploy" / "compose" / "prometheus"
RULE_SOURCE = ROOT / "k8s" / "base" / "prometheusrule.yaml"
KUSTOMIZATION = ROOT / "k8s" / "base" / "kustomization.yaml"
ROLES = {"migrate": ["db", "migrate"], "ingest-1": ["ingest"], "ingest-2": ["ingest"]}
ROLES |= {"gateway-1": ["gateway"], "gateway-2": ["gateway"]}
INTERPOLATION = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")

Obj = dict[str, Any]


def compose() -> Obj:
    document: Obj = yaml.safe_load(COMPOSE.read_text())
    return document


def services() -> dict[str, Obj]:
    found: dict[str, Obj] = compose()["services"]
    return found


def interpolate(value: str) -> str:
    """Compose's ``${VAR:-default}`` with the variable unset: every variable must have a default."""

    def default(match: re.Match[str]) -> str:
        assert match.group(2) is not None, f"${{{match.group(1)}}} has no default: compose.yaml must run as is"
        return match.group(2)

    return INTERPOLATION.sub(default, value)


def environment(service: Obj) -> dict[str, str]:
    env = service.get("environment") or {}
    assert isinstance(env, dict), "environment as a mapping"
    return {key: interpolate(str(value)) for key, value in env.items()}


def pricegate_services() -> dict[str, Obj]:
    return {name: service for name, service in services().items() if "build" in service}


def settings_of(name: str) -> Settings:
    return Settings.from_env(environment(services()[name]))


def test_the_stack_has_every_part_of_scaled_mode() -> None:
    assert set(services()) == {"redis", "postgres", "prometheus", *ROLES}
    assert set(pricegate_services()) == set(ROLES)
    for name, command in ROLES.items():
        service = services()[name]
        assert service["command"] == command, name
        build_parser().parse_args(command)  # a real `pricegate` command line


def test_pricegate_services_build_the_projects_image() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    for name, service in pricegate_services().items():
        assert service["image"] == f"pricegate:{version}", name
        build = service["build"]
        assert (ROOT / build["context"]).resolve() == ROOT and (ROOT / build["dockerfile"]).is_file(), name
    # The image's entrypoint is the pricegate command and it has the HEALTHCHECK the depends_on conditions rely on.
    assert 'ENTRYPOINT ["pricegate"]' in dockerfile and "\nHEALTHCHECK " in dockerfile


def test_every_environment_key_is_a_setting_and_every_value_is_accepted() -> None:
    known = {env_name(spec.name) for spec in dataclasses.fields(Settings)}
    for name, service in pricegate_services().items():
        env = environment(service)
        assert set(env) <= known, f"{name}: not pricegate settings: {sorted(set(env) - known)}"
        Settings.from_env(env)  # raises on a value the process would refuse (exit 2)
    # Every role reads the same settings, like the Kubernetes ConfigMap both Deployments share.
    assert len({tuple(sorted(environment(s).items())) for s in pricegate_services().values()}) == 1


def test_urls_name_the_compose_services_and_their_credentials() -> None:
    settings = settings_of("gateway-1")
    redis = urlsplit(settings.redis_url)
    assert (redis.scheme, redis.hostname, redis.port) == ("redis", "redis", 6379)
    database = urlsplit(settings.database_url)
    postgres = environment(services()["postgres"])
    assert (database.hostname, database.port) == ("postgres", 5432)
    assert (database.username, database.password) == (postgres["POSTGRES_USER"], postgres["POSTGRES_PASSWORD"])
    assert database.path == "/" + postgres["POSTGRES_DB"]


def _published(service: Obj) -> list[tuple[int, int]]:
    pairs = []
    for port in service.get("ports") or []:
        host, container = str(port).rsplit(":", 1)
        pairs.append((int(host.rsplit(":", 1)[-1]), int(container)))
    return pairs


def test_gateways_publish_their_client_port_on_different_host_ports_and_nothing_else_leaks() -> None:
    host_ports: list[int] = []
    for name in ("gateway-1", "gateway-2"):
        settings = settings_of(name)
        ((host, container),) = _published(services()[name])
        assert container == settings.port
        assert settings.metrics_port not in (0, settings.port), "metrics stay off the published client port"
        host_ports.append(host)
    assert len(set(host_ports)) == 2
    everything = [host for service in services().values() for host, _ in _published(service)]
    assert len(everything) == len(set(everything)), "two services on one host port"
    for name in ("migrate", "ingest-1", "ingest-2", "redis", "postgres"):
        assert not _published(services()[name]), f"{name} needs no published port"


def _has_healthcheck(service: Obj) -> bool:
    test = (service.get("healthcheck") or {}).get("test")
    if test is not None:
        assert isinstance(test, list) and test[0] in ("CMD", "CMD-SHELL"), test
        return True
    return "build" in service  # the Dockerfile's HEALTHCHECK


def test_depends_on_is_coherent() -> None:
    every = services()
    for name, service in every.items():
        depends = service.get("depends_on") or {}
        conditions = {dep: "service_started" for dep in depends} if isinstance(depends, list) else depends
        for dependency, spec in conditions.items():
            assert dependency in every and dependency != name, (name, dependency)
            condition = spec if isinstance(spec, str) else spec["condition"]
            if condition == "service_healthy":
                assert _has_healthcheck(every[dependency]), f"{name} waits for {dependency} to be healthy"
            elif condition == "service_completed_successfully":
                assert every[dependency].get("restart") == "no", f"{dependency} must be a one-shot job"
            else:
                assert condition == "service_started", condition
    # The migration runs once PostgreSQL answers; ingest and the gateways start after it, once Redis is healthy.
    assert every["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    for name in ("ingest-1", "ingest-2", "gateway-1", "gateway-2"):
        assert every[name]["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}
        assert every[name]["depends_on"]["redis"] == {"condition": "service_healthy"}
        assert every[name]["restart"] == "unless-stopped"
    # No cycles.
    graph = {name: set(service.get("depends_on") or ()) for name, service in every.items()}
    done: set[str] = set()
    while graph.keys() - done:
        ready = {name for name in graph.keys() - done if graph[name] <= done}
        assert ready, f"depends_on cycle among {sorted(graph.keys() - done)}"
        done |= ready


def test_two_ingest_processes_share_binances_attempt_limit_and_capacity_matches_kubernetes() -> None:
    settings = settings_of("ingest-1")
    # Both (and one more during a restart) share this host's IP: Binance allows 300 attempts per 5 minutes.
    assert 3 * settings.upstream_connect_attempts <= 300
    literals = yaml.safe_load(KUSTOMIZATION.read_text())["configMapGenerator"][0]["literals"]
    k8s = dict(literal.split("=", 1) for literal in literals)
    # PricegateConnectionsNearCapacity fires at 80 % of this value in both (tests/test_k8s.py checks the alert).
    assert settings.max_connections == int(k8s["PRICEGATE_MAX_CONNECTIONS"])
    assert settings.ingest_metrics_port == int(k8s["PRICEGATE_INGEST_METRICS_PORT"])
    assert settings.metrics_port == int(k8s["PRICEGATE_METRICS_PORT"])


def _mounts(service: Obj) -> dict[str, Path]:
    mounts = {}
    for volume in service["volumes"]:
        source, target, *_ = volume.split(":")
        mounts[target] = (ROOT / source).resolve()
    return mounts


def test_prometheus_loads_the_rules_and_scrapes_every_pricegate_process() -> None:
    prometheus = services()["prometheus"]
    assert _published(prometheus) == [(9090, 9090)]
    mounts = _mounts(prometheus)
    assert all(path.is_file() for path in mounts.values()), mounts
    config = yaml.safe_load(mounts["/etc/prometheus/prometheus.yml"].read_text())
    (rule_file,) = config["rule_files"]
    assert mounts[rule_file] == PROMETHEUS_DIR / "rules.yml"
    targets = {
        target: static["labels"]
        for job in config["scrape_configs"]
        for static in job["static_configs"]
        for target in static["targets"]
    }
    expected = {}
    for name in ("gateway-1", "gateway-2"):
        expected[f"{name}:{settings_of(name).metrics_port}"] = name
    for name in ("ingest-1", "ingest-2"):
        expected[f"{name}:{settings_of(name).ingest_metrics_port}"] = name
    assert set(targets) == set(expected)
    # The alerts group by namespace and pod, as the ServiceMonitors label series in Kubernetes.
    assert all(labels == {"namespace": "pricegate", "pod": expected[t]} for t, labels in targets.items())
    assert all(job.get("metrics_path", "/metrics") == "/metrics" for job in config["scrape_configs"])
    assert set(prometheus["depends_on"]) == set(expected.values())


def test_the_rules_file_is_the_prometheusrules_groups() -> None:
    """One source of truth: regenerate with ``.venv/bin/python deploy/compose/render_rules.py``."""
    generated = yaml.safe_load((PROMETHEUS_DIR / "rules.yml").read_text())
    source = yaml.safe_load(RULE_SOURCE.read_text())
    assert generated == {"groups": source["spec"]["groups"]}, "run: .venv/bin/python deploy/compose/render_rules.py"
