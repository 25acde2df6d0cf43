"""Faults around the batch publish script (PUBLISH_BATCH_SCRIPT, RedisBroker.publish in batch calls):
``PublishIncomplete.confirmed`` counts only what Redis ran when the connection breaks after a batch call answered
with an error (a failed message, NOSCRIPT), and a message failing inside a batch call reports the error the
one-message script reports (WRONGTYPE, not ERR WRONGTYPE)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis.asyncio as aioredis
import redis.exceptions as redis_errors

from shared.broker.contract import OutgoingMessage
from shared.broker.redis import BATCH_CALL_MESSAGES, RedisBroker
from shared.errors import PublishIncomplete
from shared.redis.packed_pipeline import run_packed, run_packed_batches
from shared.redis.packed_publish import PublishPacker
from shared.redis.scripts import PUBLISH_BATCH_SCRIPT, PUBLISH_SCRIPT
from shared.streams import ChannelNamer
from tests.tcp_proxy import TcpProxy

pytestmark = pytest.mark.timeout(30)

TRADE = "btcusdt@trade"
OTHER = "ethusdt@trade"


class CutAfterLine(TcpProxy):
    """Forwards everything, line by line from the server; the first server line holding ``marker`` is delivered,
    then the connection is cut (the replies after it never reach the client, as when Redis goes away mid-batch)."""

    def __init__(self, target_port: int, marker: bytes) -> None:
        super().__init__(target_port)
        self.marker = marker
        self.armed = False
        self.cuts = 0

    def connect(
        self,
        client_reader: asyncio.StreamReader,
        client_writer: asyncio.StreamWriter,
        server_reader: asyncio.StreamReader,
        server_writer: asyncio.StreamWriter,
    ) -> None:
        self._spawn(self._pump(client_reader, server_writer))
        self._spawn(self._replies(server_reader, client_writer, server_writer))

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def _replies(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: asyncio.StreamWriter
    ) -> None:
        pending = b""
        with contextlib.suppress(OSError):
            while data := await reader.read(1 << 16):
                pending += data
                out = b""
                while (end := pending.find(b"\r\n")) >= 0:
                    line, pending = pending[: end + 2], pending[end + 2 :]
                    out += line
                    if self.armed and self.marker in line:
                        self.cuts += 1
                        writer.write(out)
                        await writer.drain()
                        writer.close()
                        upstream.close()
                        return
                writer.write(out)
                await writer.drain()
        writer.close()


@contextlib.asynccontextmanager
async def broker_behind(
    redis_url: str, key_prefix: str, marker: bytes
) -> AsyncIterator[tuple[RedisBroker, CutAfterLine, aioredis.Redis]]:
    """A started RedisBroker reaching the test Redis through a proxy that cuts after ``marker``; a direct client."""
    parts = urlsplit(redis_url)
    assert parts.scheme == "redis" and parts.hostname in ("127.0.0.1", "localhost"), (
        f"the proxy needs Redis on loopback TCP, not {redis_url}"
    )
    direct = aioredis.from_url(redis_url)
    async with CutAfterLine(parts.port or 6379, marker) as proxy:
        broker = RedisBroker(f"redis://127.0.0.1:{proxy.port}{parts.path}", prefix=key_prefix)
        await broker.start()
        try:
            yield broker, proxy, direct
        finally:
            await broker.close()
            keys = [key async for key in direct.scan_iter(match=f"{key_prefix}*", count=1000)]
            if keys:
                await direct.delete(*keys)
            await direct.aclose()


async def history_payloads(client: aioredis.Redis, stream: str, prefix: str) -> list[bytes]:
    entries = await client.xrange(ChannelNamer(prefix, "binance").keys(stream).history)
    payloads: list[bytes] = []
    for _, fields in entries or []:
        envelope = fields[b"e"] if fields is not None else None
        if isinstance(envelope, bytes):
            payloads.append(envelope.split(b":", 3)[3])
    return payloads


@pytest.mark.parametrize("failure", ["message-fails", "noscript"])
async def test_confirmed_counts_only_messages_redis_ran_when_the_connection_breaks_after_a_failed_call(
    redis_url: str, key_prefix: str, failure: str
) -> None:
    """Two batch calls in one round trip; the first answers with an error (a message whose history key holds a
    string ends the call: the messages after it in that call are not run; or NOSCRIPT: nothing of it ran), and the
    connection breaks before the second call's answer arrives. ``PublishIncomplete.confirmed`` must count only
    messages Redis published (ingest drops the confirmed ones and resends the rest): every message it counts must
    be in Redis (counting every message of the answered call, those never run included, lost them)."""
    count = BATCH_CALL_MESSAGES + 1  # two calls: 32 and 33 messages
    marker = b"WRONGTYPE" if failure == "message-fails" else b"NOSCRIPT"
    async with broker_behind(redis_url, key_prefix, marker) as (broker, proxy, direct):
        batch = [OutgoingMessage(TRADE, b"m%d" % n, False) for n in range(count)]
        if failure == "message-fails":
            batch[2] = OutgoingMessage(OTHER, b"m2", False)
            keys = ChannelNamer(key_prefix, "binance").keys(OTHER)
            await direct.mset({keys.epoch: "77", keys.seq: "5"})  # an epoch and a seq: no clean start
            await direct.set(keys.history, "not a stream")
        else:
            broker._batch_script_sha = "0" * 40  # as after SCRIPT FLUSH / a restart: NOSCRIPT for every batch call
        proxy.armed = True
        with pytest.raises(PublishIncomplete) as failed:
            await broker.publish(batch)
        assert proxy.cuts == 1
        in_redis = set(await history_payloads(direct, TRADE, key_prefix))
        claimed = [message.payload for message in batch[: failed.value.confirmed] if message.stream == TRADE]
        never_published = [payload for payload in claimed if payload not in in_redis]
        assert never_published == [], (
            f"confirmed={failed.value.confirmed}, but {len(never_published)} of those were never published"
        )


async def test_a_message_failing_in_a_batch_call_reports_the_error_the_one_message_script_reports(
    redis_url: str, key_prefix: str
) -> None:
    """The same failing message (history key of the wrong type), once through the one-message script and once in a
    batch call: Redis' error reply carries the same error code (``WRONGTYPE``). On Redis 7.0 pcall hands the batch
    script the error as a string that already starts with its code, which must not get an ``ERR`` in front (nor
    ``OOM`` or ``READONLY``)."""
    client = aioredis.from_url(redis_url)
    try:
        namer = ChannelNamer(key_prefix, "binance")
        packer = PublishPacker(namer, lease_key=namer.leader_key, fence_key=namer.fence_key)
        packer.set_script(await client.script_load(PUBLISH_SCRIPT))
        packer.set_batch_script(await client.script_load(PUBLISH_BATCH_SCRIPT))
        keys = namer.keys(OTHER)
        await client.mset({keys.epoch: "77", keys.seq: "5"})
        await client.set(keys.history, "not a stream")
        options: dict[str, Any] = {"candidate_epoch": 77, "published_at_ms": 1000, "history_maxlen": 10, "ttl_ms": 0,
                                   "token": "", "fencing_epoch": None, "floors": {}}  # fmt: skip
        failing = [OutgoingMessage(OTHER, b"x", False)]
        one: list[object] = []
        batched: list[object] = []
        connection = await client.connection_pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            await run_packed(connection, packer.pack(failing, **options), 1, one, timeout_s=5)
            data = packer.pack([*failing, *failing], batch_call=True, **options)
            await run_packed_batches(connection, data, [2], batched, timeout_s=5)
        finally:
            await client.connection_pool.release(connection)
        assert isinstance(one[0], redis_errors.ResponseError) and isinstance(batched[0], redis_errors.ResponseError)
        assert str(one[0]).split()[0] == "WRONGTYPE"
        assert str(batched[0]).split()[0] == str(one[0]).split()[0], (one[0], batched[0])
    finally:
        keys_left = [key async for key in client.scan_iter(match=f"{key_prefix}*", count=1000)]
        if keys_left:
            await client.delete(*keys_left)
        await client.aclose()
        await client.aclose()
