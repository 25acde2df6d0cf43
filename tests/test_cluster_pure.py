"""The pure parts of Redis Cluster and Sentinel support, without a server: the URL forms and their one-line errors,
hash slots and tags (against redis-py's own CRC), the slot map and redirections, the per-slot fence names, a
partly published batch, and the sharded subscription's reader fed byte by byte (``smessage`` on the fast path, the
``sunsubscribe`` a node pushes when a slot leaves it, a ``-MOVED`` answer)."""

from __future__ import annotations

import asyncio

import pytest
from redis.crc import key_slot as redis_py_key_slot

from shared.broker.outcome import PartiallyPublished
from shared.broker.redis_subscription import RedisSubscription, _Pending
from shared.errors import ConfigError
from shared.frames import encode_publication
from shared.redis.slots import SLOTS, SlotMap, fence_tags, hash_tag, key_slot, parse_redirect, redis_version
from shared.redis.urls import parse_redis_url
from shared.settings import Settings
from shared.streams import ChannelNamer

# ---- URL forms ------------------------------------------------------------------------------------------------


def test_the_three_url_forms() -> None:
    assert parse_redis_url("redis://h:6379/0").kind == "standalone"
    assert parse_redis_url("unix:///tmp/r.sock").kind == "standalone"
    cluster = parse_redis_url("redis+cluster://:s%40cret@h1:7000,h2:7001,[::1]:7002/")
    assert cluster.kind == "cluster" and cluster.password == "s@cret"
    assert cluster.nodes == (("h1", 7000), ("h2", 7001), ("::1", 7002))
    sentinel = parse_redis_url("redis+sentinel://s1:26379,s2/mymaster/3")
    assert (sentinel.kind, sentinel.master_name, sentinel.db) == ("sentinel", "mymaster", 3)
    assert sentinel.nodes == (("s1", 26379), ("s2", 26379))  # Sentinel's port by default
    assert parse_redis_url("redis+cluster://h1/").nodes == (("h1", 6379),)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis+cluster:///", "names no seed node"),
        ("redis+cluster://h1:7000/2", "only database 0"),
        ("redis+cluster://h1:x/", "port must be a number"),
        ("redis+cluster://h1:7000,h1:7000/", "twice"),
        ("redis+cluster://h1:7000/?ssl=1", "no query"),
        ("redis+sentinel://s1:26379/", "names no master"),
        ("redis+sentinel://s1:26379", "names no master"),
        ("redis+sentinel://s1:26379/m/x", "must be a number"),
        ("redis+sentinel://::1:26379/m", "IPv6 address in brackets"),
        ("http://h", "must start with redis://"),
    ],
)
def test_a_bad_url_is_one_config_error_naming_the_setting(url: str, problem: str) -> None:
    with pytest.raises(ConfigError) as raised:
        Settings().with_overrides({"redis_url": url})
    assert raised.value.setting == "PRICEGATE_REDIS_URL" and problem in str(raised.value)


def test_a_password_never_shows_in_the_error() -> None:
    with pytest.raises(ConfigError) as raised:
        Settings().with_overrides({"redis_url": "redis+cluster://:hunter2@h1:x/"})
    assert "hunter2" not in str(raised.value)


def test_cluster_names_must_keep_the_streams_hash_tags() -> None:
    with pytest.raises(ConfigError, match="PRICEGATE_CHANNEL_PREFIX"):
        Settings().with_overrides({"redis_url": "redis+cluster://h1:7000/", "channel_prefix": "pg{x}"})
    Settings().with_overrides({"redis_url": "redis://h1:6379/0", "channel_prefix": "pg{x}"})  # one server: fine


# ---- slots ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key", [b"foo", b"{user1000}.following", b"pg:md:binance:{btcusdt@trade}:seq", b"a{}b", b"{}{x}", b"{a", b""]
)
def test_key_slot_is_redis_crc16_of_the_hash_tag(key: bytes) -> None:
    assert key_slot(key) == redis_py_key_slot(key)


def test_every_key_of_a_stream_and_its_channel_share_one_slot() -> None:
    namer = ChannelNamer("pg:md", "binance")
    keys = namer.keys("btcusdt@trade")
    slots = {key_slot(name) for name in (keys.channel, keys.seq, keys.epoch, keys.history, keys.last, keys.event_id)}
    assert slots == {key_slot("btcusdt@trade")} and hash_tag(keys.seq.encode()) == b"btcusdt@trade"


def test_each_slot_has_a_fence_key_of_its_own() -> None:
    tags = fence_tags()
    namer = ChannelNamer("pg:md", "binance")
    assert len(tags) == SLOTS and fence_tags() is tags  # computed once
    assert all(key_slot(namer.slot_fence_key(tag)) == slot for slot, tag in enumerate(tags))


def test_the_slot_map_and_redirections() -> None:
    reply = [
        [0, 5460, [b"10.0.0.1", 7000, b"id1", {}], [b"10.0.0.4", 7003, b"id4", {}]],
        [5461, 16383, [b"", 7001, b"id2"]],
    ]
    slot_map = SlotMap.from_cluster_slots(reply, fallback_host="seed")
    assert slot_map.owner(0) == ("10.0.0.1", 7000) and slot_map.owner(16383) == ("seed", 7001)
    assert slot_map.primaries == (("10.0.0.1", 7000), ("seed", 7001)) and slot_map.covered() == SLOTS
    assert ("10.0.0.4", 7003) in slot_map.nodes
    redirect = parse_redirect("MOVED 42 10.0.0.9:7009")
    assert redirect is not None and not redirect.ask and redirect.slot == 42
    slot_map.moved_to(redirect.slot, redirect.address)
    assert slot_map.owner(42) == ("10.0.0.9", 7009) and ("10.0.0.9", 7009) in slot_map.primaries
    assert parse_redirect("ASK 7 [::1]:7000") == type(redirect)(True, 7, ("::1", 7000))
    assert parse_redirect("ERR nope") is None and parse_redirect("MOVED x y") is None
    assert SlotMap.empty().covered() == 0
    with pytest.raises(ValueError):
        SlotMap.from_cluster_slots([[0, 99999, [b"h", 1]]], fallback_host="x")


def test_redis_versions_are_read_from_info() -> None:
    assert redis_version("# Server\r\nredis_version:7.0.15\r\nredis_mode:cluster\r\n") == (7, 0, 15)
    assert redis_version("redis_version:6.2.14") < (7, 0)
    assert redis_version("nothing") == (0,)


# ---- a partly published batch ---------------------------------------------------------------------------------


def test_a_partly_published_batch_names_what_was_not_published_in_order() -> None:
    error = PartiallyPublished("shard down", [4, 1, 2])
    assert error.unconfirmed == (1, 2, 4) and error.confirmed == 1
    assert error.split(["a", "b", "c", "d", "e"]) == (["a", "d"], ["b", "c", "e"])


# ---- the sharded reader ---------------------------------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.seqs: list[tuple[str, int]] = []
        self.heartbeats: list[int] = []

    def on_publication(self, stream: str, publication: object) -> None:
        self.seqs.append((stream, publication.seq))  # type: ignore[attr-defined]

    def on_heartbeat(self, published_at_ms: int) -> None:
        self.heartbeats.append(published_at_ms)

    def on_broker_reconnect(self) -> None:
        raise AssertionError("a shard's connection never reports reconnects itself")


def bulk(data: bytes) -> bytes:
    return b"$%d\r\n%b\r\n" % (len(data), data)


async def test_the_sharded_reader_handles_every_split_point_and_the_nodes_own_messages() -> None:
    namer = ChannelNamer("pg:md", "binance")
    trade, ticker = namer.channel("btcusdt@trade").encode(), namer.channel("btcusdt@ticker").encode()
    heartbeat = namer.heartbeat_channel.encode()
    envelope = encode_publication(5, 1, 1000, b'{"p":"1.0"}')
    wire = (
        b"*3\r\n" + bulk(b"smessage") + bulk(trade) + bulk(envelope)
        + b"*3\r\n" + bulk(b"smessage") + bulk(heartbeat) + bulk(b"1234")
        + b"*3\r\n" + bulk(b"sunsubscribe") + bulk(ticker) + b":1\r\n"  # pushed: the ticker's slot moved away
        + b"*3\r\n" + bulk(b"smessage") + bulk(ticker) + bulk(envelope)  # in flight before the move: dropped
        + b">3\r\n" + bulk(b"smessage") + bulk(trade) + bulk(envelope.replace(b":1:", b":2:"))
    )  # fmt: skip
    for cut in range(len(wire) + 1):
        moved: list[list[bytes]] = []

        def on_moved(_: RedisSubscription, channels: list[bytes], why: str, moved: list[list[bytes]] = moved) -> None:
            moved.append(channels)

        subscription = RedisSubscription(
            namer, safe_url="redis://127.0.0.1:1", socket_timeout_s=1, health_check_interval_s=1,
            reconnect_initial_s=0.1, reconnect_max_s=1, sharded=True, slot_of=key_slot,
            on_moved=on_moved,
        )  # fmt: skip
        recorder = Recorder()
        subscription.set_listener(recorder)
        subscription.add_channel(heartbeat, "")
        await subscription.subscribe(["btcusdt@trade", "btcusdt@ticker"])  # not open: only recorded
        buffer = b""
        for piece in (wire[:cut], wire[cut:]):
            buffer += piece
            buffer = buffer[subscription.dispatch(buffer) :]
        assert buffer == b""
        assert recorder.seqs == [("btcusdt@trade", 1), ("btcusdt@trade", 2)], cut
        assert recorder.heartbeats == [1234] and moved == [[ticker]], cut
        assert ticker not in subscription.channels


async def test_a_moved_answer_to_a_sharded_subscribe_hands_its_channels_back() -> None:
    namer = ChannelNamer("pg:md", "binance")
    moved: list[tuple[list[bytes], str]] = []
    subscription = RedisSubscription(
        namer, safe_url="redis://127.0.0.1:1", socket_timeout_s=1, health_check_interval_s=1,
        reconnect_initial_s=0.1, reconnect_max_s=1, sharded=True, slot_of=key_slot,
        on_moved=lambda _, channels, why: moved.append((channels, why)),
    )  # fmt: skip
    trade = namer.channel("btcusdt@trade").encode()
    # As if the SSUBSCRIBE had been written: the reader matches answers to it in order.
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    subscription.add_channel(trade, "btcusdt@trade")
    subscription._pending.append(_Pending(1, done, channels={trade}))
    subscription.dispatch(b"-MOVED %d 127.0.0.1:7002\r\n" % key_slot(trade))
    assert done.done() and moved == [([trade], f"MOVED {key_slot(trade)} 127.0.0.1:7002")]
    assert trade not in subscription.channels
