"""The hand-packed publish calls and their raw replies (shared/redis/packed_publish.py and packed_pipeline.py): the
bytes equal what redis-py packs from ``PublishCalls.args`` (the broker's layout of the script's KEYS/ARGV), the
reply reader agrees with the general RESP parser at every split of the input, and a packed batch run on a real
Redis publishes exactly what the script promises (envelope, seq, history, last value, duplicates, refusals)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
import redis.exceptions as redis_errors
from hypothesis import given, strategies as st
from redis.asyncio.connection import Connection

from shared.broker.contract import EventId, OutgoingMessage
from shared.broker.redis import PublishCalls
from shared.redis.packed_pipeline import run_packed
from shared.redis.packed_publish import PublishPacker, bulk, parse_publish_replies
from shared.redis.resp import ErrorReply, parse_reply
from shared.redis.scripts import PUBLISH_KEYS, PUBLISH_SCRIPT
from shared.streams import ChannelNamer

SHA = "0123456789abcdef0123456789abcdef01234567"

MESSAGES = [
    OutgoingMessage("btcusdt@trade", b'{"e":"trade","t":7}', False, EventId(7, 7, 1700)),
    OutgoingMessage("btcusdt@bookTicker", b'{"u":9,"b":"1"}', True, EventId(9, 9, None)),
    OutgoingMessage("ethusdt@kline_1m", b"{}", True),  # no identity
    OutgoingMessage("btcusdt@trade", '{"p":"\u00e9"}'.encode(), False, EventId(8, 8, 1701)),
]


def redis_py_bytes(
    calls: PublishCalls, messages: list[OutgoingMessage], *, token: str, fencing_epoch: int | None
) -> bytes:
    """What the broker handed redis-py for the same batch (``PublishCalls.args``), packed by redis-py."""
    packer = Connection()
    namer = calls.namer
    commands = []
    for message in messages:
        args = calls.args(
            message,
            namer.keys(message.stream),
            lease_key=namer.leader_key,
            fence_key=namer.fence_key,
            candidate_epoch=987654321,
            published_at_ms=1_796_141_568_401,
            history_maxlen=1000,
            ttl_ms=300_000,
            token=token,
            fencing_epoch=fencing_epoch,
        )
        commands.append(b"".join(packer.pack_command("EVALSHA", SHA, PUBLISH_KEYS, *args)))
    return b"".join(commands)


@pytest.mark.parametrize("sharded", [False, True])
@pytest.mark.parametrize("floors", [False, True])
@pytest.mark.parametrize("token, fencing_epoch", [("", None), ("host:1:abc", 1_796_141_568_401)])
def test_packed_calls_are_byte_for_byte_what_redis_py_packs(
    sharded: bool, floors: bool, token: str, fencing_epoch: int | None
) -> None:
    namer = ChannelNamer("pg:md", "binance")
    calls = PublishCalls(namer, sharded=sharded, floors=floors)
    calls.answered("btcusdt@trade", 123, 45)  # with floors: a floor for one stream, none for the others
    packer = PublishPacker(namer, lease_key=namer.leader_key, fence_key=namer.fence_key, sharded=sharded)
    packer.set_script(SHA)
    expected = redis_py_bytes(calls, MESSAGES, token=token, fencing_epoch=fencing_epoch)
    for _ in range(2):  # the second time from the cached per-stream heads
        packed = packer.pack(
            MESSAGES,
            candidate_epoch=987654321,
            published_at_ms=1_796_141_568_401,
            history_maxlen=1000,
            ttl_ms=300_000,
            token=token,
            fencing_epoch=fencing_epoch,
            floors=calls.floors,
        )
        assert packed == expected


def test_fence_and_lease_keys_may_depend_on_the_stream() -> None:
    namer = ChannelNamer("pg:md", "binance")
    packer = PublishPacker(namer, lease_key=lambda s: f"lease:{s}", fence_key=lambda s: f"fence:{{{s}}}")
    packer.set_script(SHA)
    data = packer.pack(MESSAGES[:1], candidate_epoch=1, published_at_ms=2, history_maxlen=3, ttl_ms=4, token="",
                       fencing_epoch=None, floors={})  # fmt: skip
    assert bulk("lease:btcusdt@trade") in data and bulk("fence:{btcusdt@trade}") in data
    packer.set_script("f" * 40)  # a new digest: heads are rebuilt
    assert b"f" * 40 in packer.pack(MESSAGES[:1], candidate_epoch=1, published_at_ms=2, history_maxlen=3, ttl_ms=4,
                                     token="", fencing_epoch=None, floors={})  # fmt: skip


def test_pack_before_set_script_is_refused() -> None:
    namer = ChannelNamer("pg:md", "binance")
    with pytest.raises(ValueError, match="set_script"):
        PublishPacker(namer, lease_key="l", fence_key="f").pack(
            MESSAGES, candidate_epoch=1, published_at_ms=2, history_maxlen=3, ttl_ms=4, token="", fencing_epoch=None,
            floors={},
        )  # fmt: skip


REPLIES = (
    b"*2\r\n:12\r\n:1\r\n:0\r\n-NOTLEADER this ingest does not hold the leader lease\r\n*2\r\n:12\r\n:2\r\n$2\r\nok\r\n"
)


def test_replies_fast_path_and_fallback() -> None:
    replies, pos = parse_publish_replies(REPLIES, 0, 10)
    assert replies == [(12, 1), 0, ErrorReply(b"NOTLEADER this ingest does not hold the leader lease"), (12, 2), b"ok"]
    assert pos == len(REPLIES)
    assert parse_publish_replies(REPLIES, 0, 2) == ([(12, 1), 0], REPLIES.index(b"-"))


@pytest.mark.parametrize("cut", range(len(REPLIES) + 1))
def test_replies_split_anywhere_resume_where_they_stopped(cut: int) -> None:
    first, pos = parse_publish_replies(REPLIES[:cut], 0, 10)
    rest, end = parse_publish_replies(REPLIES[pos:], 0, 10)
    assert first + rest == parse_publish_replies(REPLIES, 0, 10)[0]
    assert pos + end == len(REPLIES)


@given(st.lists(st.tuples(st.integers(0, 2**40), st.integers(0, 2**40)), max_size=20))
def test_replies_agree_with_the_general_parser(pairs: list[tuple[int, int]]) -> None:
    data = b"".join(b"*2\r\n:%d\r\n:%d\r\n" % pair for pair in pairs)
    replies, pos = parse_publish_replies(data, 0, len(pairs))
    general = []
    cursor = 0
    while cursor < len(data):
        parsed = parse_reply(data, cursor)
        assert parsed is not None
        general.append(tuple(parsed[0]))  # type: ignore[arg-type]
        cursor = parsed[1]
    assert replies == general and pos == len(data)


# ---- on a real Redis ----


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_url)
    yield client
    await client.aclose()


async def test_a_packed_batch_runs_the_script_as_the_broker_would(client: aioredis.Redis, key_prefix: str) -> None:
    namer = ChannelNamer(key_prefix, "binance")
    sha = await client.script_load(PUBLISH_SCRIPT)
    packer = PublishPacker(namer, lease_key=namer.leader_key, fence_key=namer.fence_key)
    packer.set_script(sha)
    await client.set(namer.leader_key, "me")
    messages = [*MESSAGES, MESSAGES[0]]  # the last one repeats an identity: a duplicate
    data = packer.pack(messages, candidate_epoch=77, published_at_ms=1000, history_maxlen=10, ttl_ms=60_000,
                       token="me", fencing_epoch=5, floors={})  # fmt: skip
    results: list[object] = []
    connection = await client.connection_pool.get_connection()  # type: ignore[no-untyped-call]
    try:
        await run_packed(connection, data, len(messages), results, timeout_s=5)
    finally:
        await client.connection_pool.release(connection)
    assert results == [(77, 1), (77, 1), (77, 1), (77, 2), 0]
    keys = namer.keys("btcusdt@trade")
    assert await client.get(keys.seq) == b"2" and await client.get(keys.event_id) == b"8"
    history = await client.xrange(keys.history)
    assert history is not None
    assert [fields[b"e"] for _, fields in history if fields is not None] == [
        b"77:1:1000:" + MESSAGES[0].payload,
        b"77:2:1000:" + MESSAGES[3].payload,
    ]
    assert await client.get(namer.keys("btcusdt@bookTicker").last) == b"77:1:1000:" + MESSAGES[1].payload

    # Another holder's lease: refused, as redis-py's pipeline would give it; an unknown script: NOSCRIPT.
    await client.set(namer.leader_key, "someone else")
    data = packer.pack(MESSAGES[:1], candidate_epoch=77, published_at_ms=1001, history_maxlen=10, ttl_ms=60_000,
                       token="me", fencing_epoch=5, floors={})  # fmt: skip
    packer.set_script("0" * 40)
    unknown = packer.pack(MESSAGES[:1], candidate_epoch=77, published_at_ms=1001, history_maxlen=10, ttl_ms=60_000,
                          token="me", fencing_epoch=5, floors={})  # fmt: skip
    results = []
    connection = await client.connection_pool.get_connection()  # type: ignore[no-untyped-call]
    try:
        await run_packed(connection, data + unknown, 2, results, timeout_s=5)
    finally:
        await client.connection_pool.release(connection)
    assert isinstance(results[0], redis_errors.ResponseError) and str(results[0]).startswith("NOTLEADER")
    assert isinstance(results[1], redis_errors.NoScriptError)
    assert await client.get(keys.seq) == b"2"


async def test_a_connection_lost_mid_batch_leaves_the_answered_calls_in_the_list(redis_url: str) -> None:
    """A server that answers two of three calls and hangs up: two results, then ConnectionError."""
    answered = b"*2\r\n:1\r\n:1\r\n*2\r\n:1\r\n:2\r\n"

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1 << 16)
        writer.write(answered)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    connection = Connection(host="127.0.0.1", port=port, driver_info=None, protocol=2)  # no CLIENT SETINFO: not a Redis
    await connection.connect()  # type: ignore[no-untyped-call]
    results: list[object] = []
    try:
        with pytest.raises(redis_errors.ConnectionError):
            await run_packed(connection, b"*1\r\n$4\r\nPING\r\n" * 3, 3, results, timeout_s=5)
        assert results == [(1, 1), (1, 2)]
    finally:
        await connection.disconnect()
        server.close()
        await server.wait_closed()


async def test_a_silent_server_times_out() -> None:
    done = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1 << 16)
        await done.wait()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    connection = Connection(host="127.0.0.1", port=server.sockets[0].getsockname()[1], driver_info=None, protocol=2)
    await connection.connect()  # type: ignore[no-untyped-call]
    try:
        with pytest.raises(redis_errors.TimeoutError):
            await run_packed(connection, b"*1\r\n$4\r\nPING\r\n", 1, [], timeout_s=0.2)
    finally:
        done.set()
        await connection.disconnect()
        server.close()
        await server.wait_closed()
