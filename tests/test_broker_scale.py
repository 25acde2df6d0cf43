"""The broker-scale benchmark's plumbing (``python -m loadtests.broker_scale``), so it cannot rot: its packed publisher
sends exactly what ``ClusterBroker.publish`` sends, its streams are spread evenly over the shards, and a tiny run
against a real two-shard cluster (redis-server processes of its own), a real ``pricegate gateway`` and the load
generator delivers every message through ``SSUBSCRIBE`` on both shards. Figures are not checked (this is no
benchmark), only that they were measured and that the output has its documented shape."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loadtests.broker_scale import balanced_streams
from loadtests.cluster_publisher import PackedCalls, bulk, record_publish
from loadtests.publisher import ticker_template
from loadtests.redis_cluster import slot_ranges
from shared.broker.contract import EventId, OutgoingMessage
from shared.broker.redis_cluster import ClusterBroker
from shared.redis.scripts import PUBLISH_KEYS
from shared.redis.slots import SLOTS, fence_tags, key_slot
from tests.external_tools import require_programs

ROOT = Path(__file__).resolve().parent.parent


def test_slot_ranges_cover_every_slot_once() -> None:
    for primaries in (1, 2, 3, 5):
        ranges = slot_ranges(primaries)
        assert ranges[0][0] == 0 and ranges[-1][1] == SLOTS - 1
        assert all(ranges[i][1] + 1 == ranges[i + 1][0] for i in range(primaries - 1))


def test_balanced_streams_give_every_shard_the_same_number() -> None:
    for shards in (1, 2, 3):
        streams = balanced_streams(60, shards)
        assert len(set(streams)) == 60
        owners = [
            next(i for i, (a, b) in enumerate(slot_ranges(shards)) if a <= key_slot("{" + s + "}") <= b)
            for s in streams
        ]
        assert [owners.count(i) for i in range(shards)] == [60 // shards] * shards
        assert owners[:shards] == list(range(shards))  # interleaved: every batch touches every shard


async def test_packed_calls_are_exactly_what_cluster_broker_publish_sends(monkeypatch: pytest.MonkeyPatch) -> None:
    from redis.asyncio.connection import Connection

    monkeypatch.setattr("shared.broker.redis_cluster.random.randrange", lambda *_: 4242)
    broker = ClusterBroker("redis+cluster://127.0.0.1:1/", prefix="pgbs:test", history_maxlen=1000)
    broker._script_sha = "0123456789abcdef0123456789abcdef01234567"
    broker._fence_keys = tuple(broker.namer.slot_fence_key(tag) for tag in fence_tags())
    broker._started = True
    broker.fencing_epoch = 1_700_000_000_000
    streams = balanced_streams(6, 3)
    packed = await PackedCalls.from_broker(broker, streams)
    assert broker._calls.floors == {}  # recording left the broker as it was
    payload = ticker_template("X") % 1_700_000_000_123_456
    for floor in (None, (77, 1234)):  # a stream's first publication, then one with a floor
        if floor is not None:
            broker._calls.floors[streams[4]] = floor
        (call,) = await record_publish(broker, [OutgoingMessage(streams[4], payload, True, EventId(99, 99))])
        theirs = b"".join(Connection().pack_command("EVALSHA", broker._script_sha, PUBLISH_KEYS, *call))
        published_ms = call[call.index(payload) - 1]
        floor_parts = (bulk(""), bulk("")) if floor is None else (bulk(floor[0]), bulk(floor[1]))
        ours = packed.command(4, (bulk(4242), bulk(published_ms), bulk(payload), bulk(99), *floor_parts))
        assert ours == theirs
    assert packed.slots == {stream: key_slot(broker.namer.channel(stream)) for stream in streams}


def _needs_cluster_tools() -> None:
    require_programs("redis-server", "cc")


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_two_shards_both_publish_paths_at_tiny_scale(tmp_path: Path) -> None:
    _needs_cluster_tools()
    command = [
        sys.executable, "-m", "loadtests.broker_scale",
        "--shards", "2", "--via", "packed,broker", "--streams", "6",
        "--step-seconds", "0.4", "--start-rate", "300", "--max-steps", "2", "--bisect", "0", "--no-ceiling",
        "--layout", "none", "--out", str(tmp_path / "out"),
    ]  # fmt: skip
    started = time.monotonic()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=55, check=False)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-4000:]
    assert elapsed < 40, f"took {elapsed:.0f}s"
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 3, result.stdout  # one per configuration, then the summary
    packed, broker, final = lines
    assert (packed["via"], broker["via"]) == ("packed", "broker")
    for line in (packed, broker):
        assert line["shards"] == 2 and line["error"] is None, line
        assert line["max_msgs_per_s"] > 0, line
        # CPU comes from /proc/<pid>/stat in 10 ms ticks: a 0.4 s step of ~120 messages may cost Redis less than
        # one tick, so at this scale the figures are present and non-negative, not necessarily above zero.
        assert line["redis_us_per_msg"] >= 0 and line["gateway_us_per_msg"] is not None, line
        assert line["gateway_us_per_msg"] >= 0, line
        # The gateway holds one shard subscription per stream on each of the two primaries (3 streams each; the
        # heartbeat channel on one of them), and messages reached the clients through them.
        assert sorted(line["shard_channels"].values()) in ([3, 4], [3, 3]), line
    assert final["shards"] == [2]
    assert final["packed_max_msgs_per_s"] == [packed["max_msgs_per_s"]]
    assert final["broker_max_msgs_per_s"] == [broker["max_msgs_per_s"]]
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    assert report["completed"] is True and report["final"] == final
    for entry in report["results"]:
        assert entry["classic_channels"] == 0
        assert len(entry["steps"]) >= 2
        for step in entry["steps"]:  # frames really arrived, were counted and timed (late ones count as missing)
            assert step["delivered_ratio"] > 0.9 and step["lost_messages"] == 0, step
            assert step["p99_ms"] > 0 and len(step["redis_cpu_pct"]) == 2
            assert step["gateway_received"] >= 0.9 * step["sent"], step  # through the gateway's shard subscriptions
