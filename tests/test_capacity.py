"""The capacity model (docs/capacity.md, ``loadtests/capacity_model.py``) and its check
(``python -m loadtests.capacity_check``): the document's tables are the model's output, the check judges costs and
capacities in the right direction, and a tiny run of the check drives both harnesses it depends on (broker scale
and fan-out) end to end. Figures at tiny scale are meaningless: only the plumbing and the output's shape are
checked."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loadtests.capacity_check import KINDS, judge
from loadtests.capacity_model import MODEL, PROFILES, markdown, shards_for, size
from tests.external_tools import require_programs

ROOT = Path(__file__).resolve().parent.parent


def test_docs_capacity_embeds_the_models_tables() -> None:
    document = (ROOT / "docs" / "capacity.md").read_text()
    assert markdown() in document, "docs/capacity.md is stale: paste `python -m loadtests.capacity_model` into it"


def test_every_checked_constant_has_a_direction() -> None:
    assert set(MODEL.checked) == set(KINDS)
    for name in MODEL.checked:
        assert MODEL.figures()[name].source


def test_costs_may_be_lower_than_the_model_capacities_may_be_higher() -> None:
    cost = MODEL.value("redis_us_per_msg")
    assert judge("redis_us_per_msg", cost * 1.2, "", 0.35).verdict == "ok"
    assert judge("redis_us_per_msg", cost * 1.5, "", 0.35).verdict == "off"  # the model would undersize
    assert judge("redis_us_per_msg", cost / 2, "", 0.35).verdict == "conservative"
    capacity = MODEL.value("shard_msgs_per_s")
    assert judge("shard_msgs_per_s", capacity * 3, "saturated", 0.35).verdict == "ok"
    assert judge("shard_msgs_per_s", capacity / 2, "saturated", 0.35).verdict == "off"
    assert judge("shard_msgs_per_s", capacity / 2, "not saturated: load CPU", 0.35).verdict == "lower bound"
    assert judge("write_us", None, "", 0.35).verdict == "not measured"


def test_sizing_grows_with_clients_and_subscribers() -> None:
    watcher = PROFILES[0]
    small, large = size(100_000, watcher, 2_000), size(10_000_000, watcher, 2_000)
    assert large.processes >= 100 * small.processes * 0.99 and large.memory_gib > 90 * small.memory_gib
    shards = [shards_for(72_000, subscribers)[0] or 0 for subscribers in (1, 100, 1000)]
    assert 0 < shards[0] < shards[1] < shards[2], shards  # the fan-out to gateways costs shards


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_capacity_check_drives_both_harnesses_at_tiny_scale(tmp_path: Path) -> None:
    require_programs("redis-server", "cc")
    command = [sys.executable, "-m", "loadtests.capacity_check", "--tiny", "--out", str(tmp_path)]
    started = time.monotonic()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=55, check=False)
    elapsed = time.monotonic() - started
    assert result.returncode in (0, 3), result.stderr[-4000:]  # 3: tiny figures are off the model, as expected
    assert elapsed < 40, f"took {elapsed:.0f}s"
    verdict = json.loads(result.stdout.strip().splitlines()[-1])
    assert verdict["ok"] is (result.returncode == 0)
    assert [check["name"] for check in verdict["checks"]] == list(MODEL.checked)
    for check in verdict["checks"]:  # every constant was measured by one of the runs (a slope may be ~0 this small)
        assert check["measured"] is not None, check
        assert check["verdict"] in ("ok", "conservative", "off", "lower bound"), check

    broker = json.loads((tmp_path / "broker" / "results.json").read_text())
    assert broker["completed"] is True
    assert [(entry["shards"], entry["via"]) for entry in broker["results"]] == [(1, "packed"), (1, "broker")]
    packed = broker["results"][0]
    assert packed["error"] is None and packed["classic_channels"] == 0
    assert all(step["delivered_ratio"] > 0.9 for step in packed["steps"])
    ceiling = packed["ceiling"]  # the shard alone, then 1 and 2 raw subscribers per channel
    assert ceiling["steps"] and [row["subscribers"] for row in ceiling["fanout"]] == [1, 2]
    assert all(row["delivered_ratio"] > 0.9 for row in ceiling["fanout"])
    final = broker["final"]
    assert final["per_shard_ceiling"]["redis_us_per_msg"] > 0 and final["shards_alone_max_msgs_per_s"][0] > 0
    for name in ("fanout", "fanout-idle"):
        assert json.loads((tmp_path / name / "results.json").read_text())["completed"] is True
