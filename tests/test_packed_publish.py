"""The hand-packed publish calls and their raw replies (shared/redis/packed_publish.py and packed_pipeline.py): the
bytes equal what redis-py packs from ``PublishCalls.args`` (the broker's layout of the script's KEYS/ARGV), the
reply reader agrees with the general RESP parser at every split of the input, and a packed batch run on a real
Redis publishes exactly what the script promises (envelope, seq, history, last value, duplicates, refusals)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
import redis.exceptions as redis_errors
from hypothesis import given, strategies as st
from redis.asyncio.connection import Connection

from shared.broker.contract import EventId, OutgoingMessage
from shared.broker.redis import PublishCalls
from shared.redis.packed_pipeline import run_packed, run_packed_batches, split_batch_reply
from shared.redis.packed_publish import PublishPacker, bulk, parse_publish_replies
from shared.redis.resp import ErrorReply, parse_reply
from shared.redis.scripts import PUBLISH_BATCH_SCRIPT, PUBLISH_KEYS, PUBLISH_SCRIPT
from shared.streams import ChannelNamer

SHA = "0123456789abcdef0123456789abcdef01234567"
CONSTANTS: dict[str, Any] = {
    "candidate_epoch": 987654321,
    "published_at_ms": 1_796_141_568_401,
    "history_maxlen": 1000,
    "ttl_ms": 300_000,
}

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
    commands = []
    for message in messages:
        args = broker_args(calls, message, token=token, fencing_epoch=fencing_epoch)
        commands.append(b"".join(packer.pack_command("EVALSHA", SHA, PUBLISH_KEYS, *args)))
    return b"".join(commands)


def broker_args(
    calls: PublishCalls, message: OutgoingMessage, *, token: str, fencing_epoch: int | None
) -> tuple[Any, ...]:
    """The one-message script's KEYS and ARGV for ``message``, as the broker lays them out."""
    namer = calls.namer
    return calls.args(
        message,
        namer.keys(message.stream),
        lease_key=namer.leader_key,
        fence_key=namer.fence_key,
        token=token,
        fencing_epoch=fencing_epoch,
        **CONSTANTS,
    )


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
        packed = packer.pack(MESSAGES, token=token, fencing_epoch=fencing_epoch, floors=calls.floors, **CONSTANTS)
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


@pytest.mark.parametrize("batch_calls", [False, True], ids=["calls", "batch-calls"])
async def test_a_connection_lost_mid_batch_leaves_the_answered_calls_in_the_list(batch_calls: bool) -> None:
    """A server that answers some calls and hangs up: their results, then ConnectionError. Three one-message calls
    of which two are answered; or two batch calls of 2 and 3 messages of which the first is answered."""
    answered = b"*4\r\n:1\r\n:1\r\n:1\r\n:2\r\n" if batch_calls else b"*2\r\n:1\r\n:1\r\n*2\r\n:1\r\n:2\r\n"

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
            if batch_calls:
                await run_packed_batches(connection, b"*1\r\n$4\r\nPING\r\n" * 2, [2, 3], results, timeout_s=5)
            else:
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


# ---- the batch script: many messages in one call, on one Redis server ----

BATCH_SHA = "fedcba9876543210fedcba9876543210fedcba98"
SINGLE_KEYS = slice(0, 5)  # PublishCalls.args: epoch, seq, history, last, event id (then lease, fence)
BATCH_SHARED = (8, 9, 12, 13, 14, 16, 19)  # candidate, published_at, maxlen, ttl, token, fencing epoch, command
BATCH_PER_MESSAGE = (7, 10, 11, 15, 17, 18)  # channel, payload, keep_last, event id, floor epoch, floor seq


def redis_py_batch_bytes(
    calls: PublishCalls, messages: list[OutgoingMessage], *, token: str, fencing_epoch: int | None
) -> bytes:
    """The batch call redis-py would pack for the same batch, its values taken from ``PublishCalls.args`` (the
    one-message layout) as the batch script's contract in shared/redis/scripts.py rearranges them."""
    namer = calls.namer
    per_message = [broker_args(calls, message, token=token, fencing_epoch=fencing_epoch) for message in messages]
    keys: list[Any] = [namer.leader_key, namer.fence_key, *(key for args in per_message for key in args[SINGLE_KEYS])]
    argv: list[Any] = [per_message[0][index] for index in BATCH_SHARED]
    argv += [args[index] for args in per_message for index in BATCH_PER_MESSAGE]
    return b"".join(Connection().pack_command("EVALSHA", BATCH_SHA, len(keys), *keys, *argv))


@pytest.mark.parametrize("floors", [False, True])
@pytest.mark.parametrize("token, fencing_epoch", [("", None), ("host:1:abc", 1_796_141_568_401)])
def test_a_packed_batch_call_is_byte_for_byte_what_redis_py_packs(
    floors: bool, token: str, fencing_epoch: int | None
) -> None:
    namer = ChannelNamer("pg:md", "binance")
    calls = PublishCalls(namer, sharded=False, floors=floors)
    calls.answered("btcusdt@trade", 123, 45)
    packer = PublishPacker(namer, lease_key=namer.leader_key, fence_key=namer.fence_key)
    packer.set_batch_script(BATCH_SHA)
    for batch in (MESSAGES, MESSAGES[:1], MESSAGES * 3):
        expected = redis_py_batch_bytes(calls, batch, token=token, fencing_epoch=fencing_epoch)
        for _ in range(2):  # the second time from the cached per-stream parts
            packed = packer.pack(
                batch, batch_call=True, token=token, fencing_epoch=fencing_epoch, floors=calls.floors, **CONSTANTS
            )
            assert packed == expected


def test_the_batch_form_needs_its_script_and_one_lease_key() -> None:
    namer = ChannelNamer("pg:md", "binance")
    options: dict[str, Any] = {"candidate_epoch": 1, "published_at_ms": 2, "history_maxlen": 3, "ttl_ms": 4,
                               "token": "", "fencing_epoch": None, "floors": {}}  # fmt: skip
    with pytest.raises(ValueError, match="set_batch_script"):
        PublishPacker(namer, lease_key="l", fence_key="f").pack(MESSAGES, batch_call=True, **options)
    per_slot = PublishPacker(namer, lease_key="l", fence_key=lambda stream: f"fence:{{{stream}}}", sharded=True)
    per_slot.set_batch_script(BATCH_SHA)
    with pytest.raises(ValueError, match="one Redis server"):
        per_slot.pack(MESSAGES, batch_call=True, **options)


def test_a_batch_answer_splits_into_one_result_per_message() -> None:
    assert split_batch_reply([7, 1, 0, 0, 7, 2], 3) == [(7, 1), 0, (7, 2)]
    assert split_batch_reply((7, 1), 1) == [(7, 1)]  # a batch of one reads like a one-message answer
    assert split_batch_reply((0, 0), 1) == [0]
    refusal = redis_errors.ResponseError("NOTLEADER this ingest does not hold the leader lease")
    assert split_batch_reply(refusal, 3) == [refusal] * 3  # the whole call refused: nothing was written
    # The second message failed: it and the third (not run) carry its error; the first was published.
    first, *failed = split_batch_reply([7, 1, ErrorReply(b"WRONGTYPE Operation against a key")], 3)
    assert first == (7, 1) and len(failed) == 2 and failed[0] is failed[1]
    assert isinstance(failed[0], redis_errors.ResponseError) and str(failed[0]).startswith("WRONGTYPE")
    # Read the slow way (redis-py's parser), the error inside the array is already an exception: kept as it is.
    slow = redis_errors.ResponseError("WRONGTYPE Operation against a key")
    assert split_batch_reply([7, 1, slow], 2) == [(7, 1), slow]
    # An answer of the wrong shape is an error for whatever it does not cover, never a silent success.
    short = split_batch_reply([7, 1], 2)
    assert short[0] == (7, 1) and isinstance(short[1], redis_errors.ResponseError)
    assert all(isinstance(result, redis_errors.ResponseError) for result in split_batch_reply(b"OK", 2))


async def run_on(client: aioredis.Redis, data: bytes, sizes: list[int] | int) -> list[object]:
    results: list[object] = []
    connection = await client.connection_pool.get_connection()  # type: ignore[no-untyped-call]
    try:
        if isinstance(sizes, int):
            await run_packed(connection, data, sizes, results, timeout_s=5)
        else:
            await run_packed_batches(connection, data, sizes, results, timeout_s=5)
    finally:
        await client.connection_pool.release(connection)
    return results


async def stored_state(client: aioredis.Redis, namer: ChannelNamer, streams: set[str]) -> dict[str, object]:
    """Everything the publish scripts write for ``streams``, with the prefix taken out of names and envelopes."""
    state: dict[str, object] = {}
    for stream in sorted(streams):
        keys = namer.keys(stream)
        history = await client.xrange(keys.history)
        state[stream] = (
            await client.get(keys.epoch),
            await client.get(keys.seq),
            await client.get(keys.last),
            await client.get(keys.event_id),
            [(entry_id, fields) for entry_id, fields in history or []],
            await client.pttl(keys.history) > 0,
            await client.pttl(keys.event_id) > 0 if await client.exists(keys.event_id) else None,
        )
    return state


async def test_the_batch_script_writes_exactly_what_the_one_message_script_writes(
    client: aioredis.Redis, key_prefix: str
) -> None:
    """The same messages, once call by call and once in batch calls, under two prefixes: the same answers, the same
    keys, history, last values, identities and TTLs, the same publications on the channels, in the same order."""
    single_namer = ChannelNamer(key_prefix + ":one", "binance")
    batch_namer = ChannelNamer(key_prefix + ":batch", "binance")
    sha = await client.script_load(PUBLISH_SCRIPT)
    batch_sha = await client.script_load(PUBLISH_BATCH_SCRIPT)
    single = PublishPacker(single_namer, lease_key=single_namer.leader_key, fence_key=single_namer.fence_key)
    single.set_script(sha)
    batch = PublishPacker(batch_namer, lease_key=batch_namer.leader_key, fence_key=batch_namer.fence_key)
    batch.set_batch_script(batch_sha)
    for namer in (single_namer, batch_namer):
        await client.set(namer.leader_key, "me")
        # A floor above the stored seq (as after a failover to a replica that missed writes) for one stream.
        await client.set(namer.keys("ethusdt@kline_1m").epoch, "77")
        await client.set(namer.keys("ethusdt@kline_1m").seq, "3")
    floors = {"ethusdt@kline_1m": (77, 9)}
    rounds = [
        [*MESSAGES, MESSAGES[0], MESSAGES[2]],  # a repeated identity (a duplicate), identity-less twice
        [OutgoingMessage("btcusdt@trade", b'{"t":6}', False, EventId(6, 6, 1)), MESSAGES[1], MESSAGES[1]],
        [OutgoingMessage("xrpusdt@trade", b"%d" % n, n % 2 == 0, EventId(n, n, 1)) for n in range(1, 40)],
    ]
    pubsub = client.pubsub()
    await pubsub.psubscribe(f"{key_prefix}:*")
    options: dict[str, Any] = {"candidate_epoch": 77, "history_maxlen": 25, "ttl_ms": 60_000, "token": "me",
                               "fencing_epoch": 5, "floors": floors}  # fmt: skip
    answers: dict[str, list[object]] = {"one": [], "batch": []}
    for number, messages in enumerate(rounds):
        answers["one"] += await run_on(
            client, single.pack(messages, published_at_ms=1000 + number, **options), len(messages)
        )
        answers["batch"] += await run_on(
            client, batch.pack(messages, published_at_ms=1000 + number, batch_call=True, **options), [len(messages)]
        )
    assert answers["one"] == answers["batch"]
    assert answers["one"][:7] == [(77, 1), (77, 1), (77, 10), (77, 2), 0, (77, 11), 0]
    streams = {message.stream for messages in rounds for message in messages}
    assert await stored_state(client, single_namer, streams) == await stored_state(client, batch_namer, streams)
    received: dict[str, list[bytes]] = {"one": [], "batch": []}
    while (message := await pubsub.get_message(timeout=0.2)) is not None:
        if message["type"] == "pmessage":
            received["one" if message["channel"].startswith(f"{key_prefix}:one:".encode()) else "batch"].append(
                message["data"]
            )
    await pubsub.aclose()  # type: ignore[no-untyped-call]
    duplicates = answers["one"].count(0)  # MESSAGES[0] again, trade 6 (below 8), the bookTicker twice more
    assert duplicates == 4
    assert received["one"] == received["batch"] and len(received["one"]) == sum(map(len, rounds)) - duplicates


async def test_a_batch_call_is_checked_once_and_stops_at_a_failing_message(
    client: aioredis.Redis, key_prefix: str
) -> None:
    namer = ChannelNamer(key_prefix, "binance")
    batch_sha = await client.script_load(PUBLISH_BATCH_SCRIPT)
    packer = PublishPacker(namer, lease_key=namer.leader_key, fence_key=namer.fence_key)
    packer.set_batch_script(batch_sha)
    options: dict[str, Any] = {"candidate_epoch": 77, "published_at_ms": 1000, "history_maxlen": 10,
                               "ttl_ms": 60_000, "token": "me", "fencing_epoch": 5, "floors": {}}  # fmt: skip
    # Another holder's lease, then a later leader's fence: the whole call refused, nothing written.
    await client.set(namer.leader_key, "someone else")
    refused = await run_on(client, packer.pack(MESSAGES, batch_call=True, **options), [len(MESSAGES)])
    await client.set(namer.leader_key, "me")
    await client.zadd(namer.fence_key, {"e": 6})
    fenced = await run_on(client, packer.pack(MESSAGES, batch_call=True, **options), [len(MESSAGES)])
    for results in (refused, fenced):
        assert len(results) == len(MESSAGES)
        assert all(isinstance(r, redis_errors.ResponseError) and str(r).startswith("NOTLEADER") for r in results)
    for message in MESSAGES:
        keys = namer.keys(message.stream)
        assert await client.exists(keys.epoch, keys.seq, keys.history, keys.last, keys.event_id) == 0
    # The third message's history key holds a string: the first two are published, the third fails (its seq is
    # taken first, as in a one-message call), the fourth is not run (its stream has nothing; in one-message calls
    # it would have been published after the failure).
    await client.delete(namer.fence_key)
    # (An epoch and a seq, else the script takes it for a first publication, or a lost seq, and clears the keys.)
    await client.mset({namer.keys(MESSAGES[2].stream).epoch: "77", namer.keys(MESSAGES[2].stream).seq: "5"})
    await client.set(namer.keys(MESSAGES[2].stream).history, "not a stream")
    fourth = OutgoingMessage("solusdt@trade", b"{}", False)
    results = await run_on(client, packer.pack([*MESSAGES[:3], fourth], batch_call=True, **options), [4])
    assert results[:2] == [(77, 1), (77, 1)]
    assert isinstance(results[2], redis_errors.ResponseError) and "WRONGTYPE" in str(results[2])
    assert results[3] is results[2]
    assert await client.get(namer.keys(fourth.stream).seq) is None
    assert await client.xlen(namer.keys(MESSAGES[0].stream).history) == 1


@given(
    st.lists(st.one_of(st.tuples(st.integers(1, 2**31), st.integers(1, 2**40)), st.just((0, 0))), max_size=70),
    st.integers(0, 3),
    st.booleans(),
)
def test_a_batch_answer_always_gives_one_result_per_message_and_counts_only_what_ran(
    answered: list[tuple[int, int]], unanswered: int, failed: bool
) -> None:
    """Whatever prefix of a call's messages Redis answered before an error (or an answer cut short), there is one
    result per message, the answered ones in order, and every message after them is an error: never a success."""
    values: list[Any] = [value for pair in answered for value in pair]
    if failed:
        values.append(ErrorReply(b"OOM command not allowed when used memory > 'maxmemory'"))
    count = len(answered) + unanswered + (1 if failed else 0)
    results = split_batch_reply(values, count)
    assert len(results) == count
    assert results[: len(answered)] == [pair if pair[0] else 0 for pair in answered]
    assert all(isinstance(result, redis_errors.ResponseError) for result in results[len(answered) :])
    if failed:
        assert all(str(result).startswith("OOM") for result in results[len(answered) :])
