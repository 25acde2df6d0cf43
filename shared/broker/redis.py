"""Redis broker: the only Redis pub/sub code in pricegate, implementing :class:`shared.broker.contract.Broker` over a
standalone Redis reached by a ``redis://``, ``rediss://`` or ``unix://`` URL (Sentinel and Cluster with sharded
pub/sub are later work and are not pretended here). Ingest publishes through one Lua script per message,
pipelined per batch, that atomically assigns the channel's epoch and sequence, appends the envelope to the
channel's history stream (ID ``<seq>-0``, trimmed by length; age is bounded by a key TTL refreshed on every
publish plus an age filter on read), stores the last value of state streams and PUBLISHes the envelope.
Gateways get one dedicated subscription connection per process, read by a broker-owned task with a small
RESP parser that handles every message in a socket read without an ``await`` per message, calls the listener
synchronously, detects half-open sockets with its own PING deadline, and reconnects with jittered backoff,
resubscribing every channel before it reports ``on_broker_reconnect`` so the relay can repair from history.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import redis.asyncio as aioredis
import redis.exceptions as redis_errors
from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from shared.backoff import backoff_delays, is_retryable
from shared.broker.contract import BrokerListener, OutgoingMessage
from shared.errors import BrokerError, NotLeaderError
from shared.frames import Publication, decode_publication
from shared.streams import ChannelNamer

logger = logging.getLogger(__name__)

# KEYS: epoch, seq, history, last, event id, ingest leader lease.  ARGV: channel, candidate epoch,
# published_at_ms, payload, keep_last (0/1), history maxlen, history TTL in ms (0 = none), fencing token ('' = not
# fenced), event identity ('' = none). Returns {epoch, seq}, or 0 for a duplicate event (nothing written), or a
# NOTLEADER error when the fencing token does not hold the lease (nothing written).
# The envelope is built exactly like shared.frames.encode_publication: b"%d:%d:%d:%b".
# Fencing lives here, not in the caller: checked in the same atomic step as the write, an ingest paused or cut off
# after it lost the lease cannot publish even once, whatever it still believes. The event identity (Lua numbers
# are doubles: exact below 2^53, far above Binance's ids and millisecond times) survives a change of ingest
# process, so the new leader's overlap with the old one is dropped here even though it never saw the old one's.
# The leader key is not in the channel's hash slot: fenced publishing needs standalone Redis (as does the rest).
# Called with only the first 4 keys and 7 arguments (the load generator, tests), it publishes unfenced and
# without a duplicate filter, as before those two were added.
PUBLISH_SCRIPT = """
local token = ARGV[8] or ''
if token ~= '' and redis.call('GET', KEYS[6]) ~= token then
  return redis.error_reply('NOTLEADER this ingest does not hold the leader lease')
end
local eid = ARGV[9] or ''
if eid ~= '' then
  local previous = redis.call('GET', KEYS[5])
  if previous and tonumber(eid) <= tonumber(previous) then
    return 0
  end
end
local epoch = redis.call('GET', KEYS[1])
local seq
if not epoch then
  -- First publication, or Redis lost the epoch: whatever seq, history or last value survived belongs to an
  -- epoch no gateway can tell apart any more, so start clean.
  epoch = ARGV[2]
  redis.call('SET', KEYS[1], epoch)
  redis.call('DEL', KEYS[2], KEYS[3], KEYS[4])
  seq = redis.call('INCR', KEYS[2])
else
  seq = redis.call('INCR', KEYS[2])
  if seq == 1 then
    -- The seq key was lost but the epoch survived: restarting at 1 in the same epoch would look like old
    -- messages to gateways, so move to a new (different) epoch and drop the old epoch's history.
    if epoch == ARGV[2] then
      epoch = string.format('%d', tonumber(epoch) % 2147483647 + 1)
    else
      epoch = ARGV[2]
    end
    redis.call('SET', KEYS[1], epoch)
    redis.call('DEL', KEYS[3], KEYS[4])
  end
end
local seqs = string.format('%d', seq)
local envelope = epoch .. ':' .. seqs .. ':' .. ARGV[3] .. ':' .. ARGV[4]
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[6], seqs .. '-0', 'e', envelope)
local ttl = tonumber(ARGV[7])
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[3], ttl)
end
if ARGV[5] == '1' then
  redis.call('SET', KEYS[4], envelope)
end
redis.call('PUBLISH', ARGV[1], envelope)
if eid ~= '' then
  if ttl > 0 then
    redis.call('SET', KEYS[5], eid, 'PX', ttl)
  else
    redis.call('SET', KEYS[5], eid)
  end
end
return {tonumber(epoch), seq}
"""
_NOT_LEADER = "NOTLEADER"

_HISTORY_FIELD = b"e"
_READ_SIZE = 1 << 18  # what one transport read can deliver; many messages are parsed per read
_MESSAGE_PREFIX = b"*3\r\n$7\r\nmessage\r\n"

# redis-py raises its own ConnectionError/TimeoutError (not the builtins); authentication and ACL failures
# subclass its ConnectionError but retrying them cannot help. Any OSError on the subscription socket (a TLS
# error included) leaves it unusable, and a new connection is the only repair, so the reader retries those too.
_RETRYABLE: tuple[type[BaseException], ...] = (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError)
_FATAL: tuple[type[BaseException], ...] = (
    redis_errors.AuthenticationError,
    redis_errors.AuthorizationError,
    redis_errors.NoPermissionError,
)


def redact_url(url: str) -> str:
    """``url`` with any password (in the userinfo or a ``password=`` query argument) replaced by ``***``."""
    parts = urlsplit(url)
    userinfo, at, host = parts.netloc.rpartition("@")
    if at and ":" in userinfo:
        # Replace in place rather than urlunsplit(), which would turn "unix:///path" into "unix:/path".
        url = url.replace(f"//{parts.netloc}", f"//{userinfo.split(':', 1)[0]}:***@{host}", 1)
    if "password" in parts.query:
        pairs = parse_qsl(parts.query, keep_blank_values=True)
        redacted = urlencode([(key, "***" if key == "password" else value) for key, value in pairs], safe="*")
        url = url.replace(f"?{parts.query}", f"?{redacted}", 1)
    return url


class _ProtocolDesync(ConnectionError):
    """The subscription connection sent bytes that are not RESP: its state is unknown, so reconnect."""


@dataclass(frozen=True, slots=True)
class _ErrorReply:
    message: bytes


_Reply = bytes | int | list[Any] | _ErrorReply | None


def _parse_reply(buf: bytes, pos: int) -> tuple[_Reply, int] | None:
    """One RESP2 reply (or RESP3 push) starting at ``pos``: ``(value, next_pos)``, or None if incomplete."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        return None
    kind = buf[pos]
    try:
        if kind == 0x24:  # $ bulk string
            length = int(buf[pos + 1 : end])
            if length < 0:
                return None, end + 2
            start = end + 2
            stop = start + length
            if len(buf) < stop + 2:
                return None
            return buf[start:stop], stop + 2
        if kind == 0x2A or kind == 0x3E:  # * array, > push
            count = int(buf[pos + 1 : end])
            items: list[Any] = []
            cursor = end + 2
            for _ in range(count):
                parsed = _parse_reply(buf, cursor)
                if parsed is None:
                    return None
                items.append(parsed[0])
                cursor = parsed[1]
            return items, cursor
        if kind == 0x3A:  # : integer
            return int(buf[pos + 1 : end]), end + 2
        if kind == 0x2B:  # + simple string
            return buf[pos + 1 : end], end + 2
        if kind == 0x2D:  # - error
            return _ErrorReply(buf[pos + 1 : end]), end + 2
    except ValueError as error:
        raise _ProtocolDesync(f"malformed RESP length at byte {pos}: {buf[pos:end][:40]!r}") from error
    raise _ProtocolDesync(f"unexpected RESP type byte {buf[pos : pos + 1]!r}")


def _pack(*args: bytes) -> bytes:
    """A command in RESP (what redis-py's pack_command produces), for the connection we write to directly."""
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%b\r\n" % (len(arg), arg) for arg in args)


@dataclass(slots=True)
class _Pending:
    """A SUBSCRIBE/UNSUBSCRIBE sent on the subscription connection, waiting for one confirmation per channel.
    Redis answers commands in order, so a FIFO of these matches confirmations to commands."""

    remaining: int
    future: asyncio.Future[None] | None = None
    on_done: Callable[[], None] | None = None


class RedisBroker:
    """A :class:`shared.broker.contract.Broker` on Redis. Counters are plain ints for the metrics layer to read."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "pg:md",
        venue: str = "binance",
        history_maxlen: int = 1000,
        history_max_age_s: float = 300.0,
        health_check_interval_s: float = 5.0,
        socket_timeout_s: float = 5.0,
        reconnect_initial_s: float = 0.1,
        reconnect_max_s: float = 5.0,
    ) -> None:
        if history_maxlen < 1:
            raise ValueError(f"history_maxlen must be >= 1, got {history_maxlen!r}")
        self.url = url
        self.safe_url = redact_url(url)
        self.namer = ChannelNamer(prefix, venue)
        self.history_maxlen = history_maxlen
        self.history_max_age_s = history_max_age_s
        self.health_check_interval_s = health_check_interval_s
        self.socket_timeout_s = socket_timeout_s
        self.reconnect_initial_s = reconnect_initial_s
        self.reconnect_max_s = reconnect_max_s

        # Counters and state for metrics, health and tests.
        self.malformed_messages = 0  # envelopes/heartbeats that did not decode (skipped)
        self.reconnects = 0  # subscription connection re-established after a loss
        self.listener_errors = 0  # exceptions raised by the listener (logged, delivery continues)
        self.duplicates_dropped = 0  # events not published because their identity was not new (ingest side)
        self.subscriber_client_id: int | None = None  # CLIENT ID of the live subscription connection
        self.reader_task: asyncio.Task[None] | None = None  # completes with the reader's fatal error, if any
        self.failure: BaseException | None = None  # that fatal error

        self._client: aioredis.Redis | None = None
        self._sub_pool: ConnectionPool | None = None
        self._sub_conn: AbstractConnection | None = None
        self._script_sha = ""
        self._listener: BrokerListener | None = None
        self._heartbeat_channel = self.namer.heartbeat_channel.encode()
        # Desired subscriptions: channel bytes (as Redis sends them back) -> stream name.
        self._streams_by_channel: dict[bytes, str] = {}
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None  # set only while the subscription socket is usable
        self._pending: deque[_Pending] = deque()
        self._connected = False
        self._ever_connected = False  # the first confirmation is the start, later ones are reconnects

    # ---- lifecycle ----
    @property
    def connected(self) -> bool:
        return self._connected

    async def start(self) -> None:
        if self._client is not None:
            raise BrokerError("RedisBroker.start() called twice")
        self._ever_connected = False
        self.failure = None
        options: dict[str, Any] = {
            "decode_responses": False,
            "socket_timeout": self.socket_timeout_s,
            "socket_connect_timeout": self.socket_timeout_s,
            # No hidden retries: a retried pipeline could publish a batch twice. Callers own the policy.
            "retry": Retry(NoBackoff(), 0),
        }
        if urlsplit(self.url).scheme != "unix":
            options["socket_keepalive"] = True  # UnixDomainSocketConnection does not take it
        try:
            self._client = aioredis.Redis.from_url(
                self.url, health_check_interval=self.health_check_interval_s, **options
            )
            # The subscription connection checks its own health (see _read_loop); redis-py's check would read
            # from a socket our reader owns. RESP2 keeps pub/sub replies plain arrays.
            self._sub_pool = ConnectionPool.from_url(self.url, protocol=2, **options)
            await self._client.ping()
            self._script_sha = str(await self._client.script_load(PUBLISH_SCRIPT))
            ready = await self._open_subscriber()
        except (redis_errors.RedisError, OSError, ValueError) as error:  # OSError includes TimeoutError
            self._drop_subscriber()
            await self._release()
            # Worded to follow the CLI's "PRICEGATE_REDIS_URL=...: cannot reach Redis: " prefix.
            raise BrokerError(f"Redis at {self.safe_url}: {error}") from error
        self.reader_task = asyncio.create_task(self._run_subscriber(), name="pricegate-redis-subscriber")
        try:
            async with asyncio.timeout(self.socket_timeout_s):
                await ready
        except TimeoutError:
            await self.close()
            raise BrokerError(
                f"Redis at {self.safe_url} did not confirm the subscription within {self.socket_timeout_s}s"
            ) from None
        if self.reader_task.done() and self.failure is not None:
            failure = self.failure
            await self.close()
            raise BrokerError(f"Redis subscription at {self.safe_url} failed: {failure}") from failure

    async def close(self) -> None:
        self._connected = False
        task, self.reader_task = self.reader_task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                if not task.cancelled():  # close() itself was cancelled, not just the reader
                    raise
            except Exception:
                pass  # already logged by the reader when it died; kept in self.failure
        self._drop_subscriber()
        await self._release()

    async def _release(self) -> None:
        """Close every socket and pool (idempotent)."""
        conn, self._sub_conn = self._sub_conn, None
        if conn is not None:
            await conn.disconnect(nowait=True)
        pool, self._sub_pool = self._sub_pool, None
        if pool is not None:
            await pool.aclose()
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def _require_client(self) -> aioredis.Redis:
        if self._client is None:
            raise BrokerError("RedisBroker is not started")
        return self._client

    # ---- ingest side ----
    async def publish(
        self, messages: Sequence[OutgoingMessage], *, fencing_token: str | None = None
    ) -> list[Publication]:
        if not messages:
            return []
        client = self._require_client()
        published_at_ms = time.time_ns() // 1_000_000
        # Used only by channels whose epoch is missing (first publish or data loss); sharing one value across
        # the batch is harmless because epochs are compared per channel.
        candidate_epoch = random.randrange(1, 2**31)
        ttl_ms = max(0, int(self.history_max_age_s * 1000))
        calls: list[tuple[Any, ...]] = []
        leader_key = self.namer.leader_key
        token = fencing_token or ""
        for message in messages:
            keys = self.namer.keys(message.stream)
            event = message.event
            calls.append(
                (
                    keys.epoch,
                    keys.seq,
                    keys.history,
                    keys.last,
                    keys.event_id,
                    leader_key,
                    keys.channel,
                    candidate_epoch,
                    published_at_ms,
                    message.payload,
                    1 if message.keep_last else 0,
                    self.history_maxlen,
                    ttl_ms,
                    token,
                    "" if event is None else event.last,
                )
            )
        results = await self._run_script(client, calls)
        missing = [index for index, result in enumerate(results) if isinstance(result, redis_errors.NoScriptError)]
        if missing:
            # Redis restarted or SCRIPT FLUSH ran: nothing of those calls executed, so running them again is
            # safe. (Every call of a batch fails alike unless the flush lands mid-batch.)
            try:
                self._script_sha = str(await client.script_load(PUBLISH_SCRIPT))
            except redis_errors.RedisError as error:
                raise BrokerError(f"publish to {self.safe_url}: cannot load the publish script: {error}") from error
            retried = await self._run_script(client, [calls[index] for index in missing])
            for index, result in zip(missing, retried, strict=True):
                results[index] = result
        publications: list[Publication] = []
        for message, result in zip(messages, results, strict=True):
            if isinstance(result, BaseException):
                done = sum(1 for r in results if not isinstance(r, BaseException))
                if str(result).startswith(_NOT_LEADER):
                    raise NotLeaderError(
                        f"publish to {self.safe_url} refused from {message.stream!r} on: the fencing token no longer "
                        f"holds the leader lease ({done}/{len(messages)} of the batch were published before)"
                    ) from result
                raise BrokerError(
                    f"publish to {self.safe_url} failed for {message.stream!r} "
                    f"({done}/{len(messages)} of the batch were published): {result}"
                ) from result
            if result == 0:
                self.duplicates_dropped += 1
                continue
            epoch, seq = result
            publications.append(Publication(int(epoch), int(seq), published_at_ms, message.payload))
        return publications

    async def _run_script(self, client: aioredis.Redis, calls: list[tuple[Any, ...]]) -> list[Any]:
        """All calls in one pipeline round trip; per-call errors come back as exception values."""
        pipe = client.pipeline(transaction=False)
        for args in calls:
            pipe.evalsha(self._script_sha, 6, *args)
        try:
            return list(await pipe.execute(raise_on_error=False))
        except redis_errors.RedisError as error:
            raise BrokerError(f"publish to {self.safe_url} failed: {error}") from error

    async def last_event_ids(self, streams: Iterable[str]) -> dict[str, int]:
        names = list(dict.fromkeys(streams))
        if not names:
            return {}
        values = await self._command(
            "last event ids", self._require_client().mget([self.namer.keys(stream).event_id for stream in names])
        )
        found: dict[str, int] = {}
        for stream, value in zip(names, values, strict=True):
            if value is not None:
                try:
                    found[stream] = int(value)
                except ValueError:
                    continue  # not ours to interpret: publishing then starts without a duplicate filter
        return found

    async def publish_heartbeat(self, now_ms: int) -> None:
        await self._command("heartbeat", self._require_client().publish(self.namer.heartbeat_channel, b"%d" % now_ms))

    async def read_demand(self, now_s: float) -> set[str]:
        key = self.namer.demand_key
        pipe = self._require_client().pipeline(transaction=True)
        pipe.zremrangebyscore(key, "-inf", now_s)
        pipe.zrange(key, 0, -1)
        try:
            _, members = await pipe.execute()
        except redis_errors.RedisError as error:
            raise BrokerError(f"read demand from {self.safe_url}: {error}") from error
        return {member.decode() for member in members}

    async def put_exchange_info(self, document: bytes) -> None:
        await self._command("put exchangeInfo", self._require_client().set(self.namer.exchange_info_key, document))

    # ---- gateway side ----
    def set_listener(self, listener: BrokerListener) -> None:
        self._listener = listener

    async def subscribe(self, streams: Iterable[str]) -> None:
        """Returns once Redis confirmed the new subscriptions, or at once while disconnected: the channels are
        then subscribed on reconnect, which ends with ``on_broker_reconnect``. Raises BrokerError if Redis
        refuses them (an ACL), and then does not keep them."""
        channels: list[bytes] = []
        for stream in streams:
            channel = self.namer.channel(stream).encode()
            if channel not in self._streams_by_channel:
                self._streams_by_channel[channel] = stream
                channels.append(channel)
        if channels:
            try:
                await self._send_and_confirm(b"SUBSCRIBE", channels)
            except BrokerError:
                # Refused as a whole (e.g. an ACL): forget them, or every reconnect would be refused too.
                for channel in channels:
                    self._streams_by_channel.pop(channel, None)
                raise

    async def unsubscribe(self, streams: Iterable[str]) -> None:
        """Delivery for these streams stops at once (messages already in flight are dropped)."""
        channels: list[bytes] = []
        for stream in streams:
            channel = self.namer.channel(stream).encode()
            if self._streams_by_channel.pop(channel, None) is not None:
                channels.append(channel)
        if channels:
            await self._send_and_confirm(b"UNSUBSCRIBE", channels)

    async def history(self, stream: str, after_seq: int) -> list[Publication]:
        """Retained publications after ``after_seq``: at most ``history_maxlen`` (the stream is trimmed
        approximately, reads are exact) and none older than ``history_max_age_s`` by the publisher's clock."""
        key = self.namer.keys(stream).history
        entries = await self._command(
            "history", self._require_client().xrange(key, min=f"{max(after_seq, 0) + 1}-0", max="+")
        )
        oldest_ms = time.time_ns() // 1_000_000 - int(self.history_max_age_s * 1000)
        publications: list[Publication] = []
        for _entry_id, fields in entries or ():
            publication = self._decode(fields.get(_HISTORY_FIELD))
            if publication is not None and publication.published_at_ms >= oldest_ms:
                publications.append(publication)
        return publications[-self.history_maxlen :]

    async def last_value(self, stream: str) -> Publication | None:
        data = await self._command("last value", self._require_client().get(self.namer.keys(stream).last))
        return None if data is None else self._decode(data)

    async def announce_demand(self, streams: Iterable[str], expires_at_s: float) -> None:
        mapping = {stream: expires_at_s for stream in streams}
        if mapping:
            # GT: a gateway with a shorter horizon never shortens another gateway's interest.
            await self._command("announce demand", self._require_client().zadd(self.namer.demand_key, mapping, gt=True))

    async def get_exchange_info(self) -> bytes | None:
        data = await self._command("get exchangeInfo", self._require_client().get(self.namer.exchange_info_key))
        return None if data is None else bytes(data)

    # ---- helpers ----
    async def _command(self, what: str, awaitable: Any) -> Any:
        try:
            return await awaitable
        except redis_errors.RedisError as error:
            raise BrokerError(f"{what} on {self.safe_url}: {error}") from error

    def _decode(self, data: bytes | None) -> Publication | None:
        if data is None:
            return None
        try:
            return decode_publication(data)
        except ValueError:
            self.malformed_messages += 1
            return None

    # ---- subscription connection ----
    async def _open_subscriber(self) -> asyncio.Future[None]:
        """Connect the subscription socket and send one SUBSCRIBE for the heartbeat and every desired channel.
        The returned future resolves when all are confirmed (or the connection is lost first); the reader
        task processes the confirmations, then ``_on_subscribed`` flips ``connected``."""
        pool = self._sub_pool
        if pool is None:
            raise BrokerError("RedisBroker is closed")
        conn = self._sub_conn
        if conn is None:
            conn = self._sub_conn = pool.make_connection()  # type: ignore[no-untyped-call]  # untyped in redis-py
        async with asyncio.timeout(self.socket_timeout_s):
            await conn.connect()  # TCP/TLS/unix, AUTH, SELECT
            # The id lets operators (and tests) find or kill exactly this connection; an ACL may forbid it.
            await conn.send_command("CLIENT", "ID", check_health=False)
            try:
                self.subscriber_client_id = int(await conn.read_response())
            except redis_errors.ResponseError:
                self.subscriber_client_id = None
        # From here on this module owns the socket: the reader parses it, subscribe()/unsubscribe() write to it.
        # redis-py keeps the streams in these attributes on every connection class (TCP, TLS, unix).
        reader, writer = conn._reader, conn._writer
        if not isinstance(reader, asyncio.StreamReader) or not isinstance(writer, asyncio.StreamWriter):
            raise BrokerError("unsupported redis-py connection internals: no asyncio streams on the connection")
        self._reader = reader
        self._writer = writer
        channels = [self._heartbeat_channel, *self._streams_by_channel]
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(len(channels), ready, self._on_subscribed))
        writer.write(_pack(b"SUBSCRIBE", *channels))
        async with asyncio.timeout(self.socket_timeout_s):
            await writer.drain()
        return ready

    def _on_subscribed(self) -> None:
        """Every channel is subscribed (again): only now can history repair close a gap without a hole."""
        self._connected = True
        if not self._ever_connected:
            self._ever_connected = True
            return
        self.reconnects += 1
        logger.info(
            "Redis subscription to %s re-established (%d channels)", self.safe_url, len(self._streams_by_channel)
        )
        listener = self._listener
        if listener is not None:
            try:
                listener.on_broker_reconnect()
            except Exception:
                self.listener_errors += 1
                logger.exception("broker listener failed in on_broker_reconnect")

    async def _send_and_confirm(self, command: bytes, channels: list[bytes]) -> None:
        writer = self._writer
        if writer is None or writer.is_closing():
            return  # disconnected or not started: the (re)connect subscribes the desired set
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # Append and write without an await in between so the FIFO order is the order on the wire.
        self._pending.append(_Pending(len(channels), done))
        writer.write(_pack(command, *channels))
        try:
            await writer.drain()
        except ConnectionError:
            return  # the reader sees the loss too, resolves `done` and reconnects
        await done

    def _drop_subscriber(self) -> None:
        """Forget the current subscription socket: waiters are released (the reconnect resubscribes)."""
        self._connected = False
        self._writer = None
        self._reader = None
        pending, self._pending = self._pending, deque()
        for entry in pending:
            if entry.future is not None and not entry.future.done():
                entry.future.set_result(None)

    async def _run_subscriber(self) -> None:
        """The reader task: read until the connection fails, then reconnect with backoff, forever."""
        try:
            while True:
                try:
                    await self._read_loop()
                except Exception as error:
                    if not is_retryable(error, retryable=_RETRYABLE, fatal=_FATAL):
                        raise
                    logger.warning("Redis subscription connection to %s lost: %r", self.safe_url, error)
                await self._close_subscriber()
                await self._reconnect()
        except asyncio.CancelledError:
            raise
        except Exception as error:
            self.failure = error
            logger.exception("Redis subscription reader for %s stopped; broker is down", self.safe_url)
            await self._close_subscriber()
            raise

    async def _close_subscriber(self) -> None:
        """Mark the subscription down and close its connection without waiting on the peer."""
        self._drop_subscriber()
        conn = self._sub_conn
        if conn is not None:
            await conn.disconnect(nowait=True)

    async def _reconnect(self) -> None:
        for delay in backoff_delays(self.reconnect_initial_s, self.reconnect_max_s):
            await asyncio.sleep(delay)
            try:
                await self._open_subscriber()
                return
            except Exception as error:
                if not is_retryable(error, retryable=_RETRYABLE, fatal=_FATAL):
                    raise
                logger.warning("Redis at %s still unreachable (%r); retrying", self.safe_url, error)
                await self._close_subscriber()

    async def _read_loop(self) -> None:
        reader = self._reader
        writer = self._writer
        if reader is None or writer is None:
            raise ConnectionError("subscription connection not open")
        interval = self.health_check_interval_s if self.health_check_interval_s > 0 else None
        ping_sent = False
        buffer = b""
        while True:
            try:
                async with asyncio.timeout(interval):
                    chunk = await reader.read(_READ_SIZE)
            except TimeoutError:
                # Silence can be a quiet channel or a half-open socket: a PING tells them apart. A socket that
                # stays silent for another interval after the PING is dead.
                if ping_sent:
                    raise TimeoutError(
                        f"no reply from Redis within {2 * self.health_check_interval_s:g}s after PING; "
                        "assuming a half-open connection"
                    ) from None
                writer.write(_pack(b"PING"))
                ping_sent = True
                continue
            if not chunk:
                raise ConnectionError("Redis closed the subscription connection")
            ping_sent = False
            buffer = buffer + chunk if buffer else chunk
            consumed = self._dispatch(buffer)
            buffer = buffer[consumed:] if consumed < len(buffer) else b""

    def _dispatch(self, buf: bytes) -> int:
        """Handle every complete reply in ``buf`` synchronously; returns the bytes consumed."""
        pos = 0
        size = len(buf)
        streams = self._streams_by_channel
        heartbeat = self._heartbeat_channel
        prefix_len = len(_MESSAGE_PREFIX)
        while pos < size:
            if buf.startswith(_MESSAGE_PREFIX, pos):
                # Fast path for the overwhelmingly common reply: a published message.
                channel_reply = _parse_reply(buf, pos + prefix_len)
                if channel_reply is None:
                    return pos
                data_reply = _parse_reply(buf, channel_reply[1])
                if data_reply is None:
                    return pos
                pos = data_reply[1]
                channel, data = channel_reply[0], data_reply[0]
                if not isinstance(channel, bytes) or not isinstance(data, bytes):
                    raise _ProtocolDesync("pub/sub message without channel or data")
                if channel == heartbeat:
                    self._deliver_heartbeat(data)
                else:
                    stream = streams.get(channel)
                    if stream is not None:  # else: unsubscribed while the message was in flight
                        self._deliver(stream, data)
                continue
            parsed = _parse_reply(buf, pos)
            if parsed is None:
                return pos
            reply, pos = parsed
            self._handle_reply(reply)
        return pos

    def _deliver(self, stream: str, data: bytes) -> None:
        try:
            publication = decode_publication(data)
        except ValueError:
            self.malformed_messages += 1
            return
        listener = self._listener
        if listener is None:
            return
        try:
            listener.on_publication(stream, publication)
        except Exception:
            # A listener bug must not take the feed of every other stream down with it: log loudly, count.
            self.listener_errors += 1
            logger.exception("broker listener failed on %s seq %d", stream, publication.seq)

    def _deliver_heartbeat(self, data: bytes) -> None:
        try:
            published_at_ms = int(data)
        except ValueError:
            self.malformed_messages += 1
            return
        listener = self._listener
        if listener is None:
            return
        try:
            listener.on_heartbeat(published_at_ms)
        except Exception:
            self.listener_errors += 1
            logger.exception("broker listener failed on heartbeat")

    def _handle_reply(self, reply: _Reply) -> None:
        """Everything but the fast path: confirmations, PONGs, errors, and messages in a RESP3 push frame."""
        if isinstance(reply, _ErrorReply):
            # Redis answers a refused SUBSCRIBE/UNSUBSCRIBE (e.g. an ACL) with one error for the whole command.
            text = reply.message.decode(errors="replace")
            entry = self._pending.popleft() if self._pending else None
            if entry is not None and entry.on_done is not None:
                # The (re)subscription of every channel was refused: nothing would ever be delivered and no
                # retry can change that, so the reader stops loudly.
                if entry.future is not None and not entry.future.done():
                    entry.future.set_result(None)
                raise BrokerError(f"Redis at {self.safe_url} refused the subscriptions: {text}")
            logger.error("Redis refused a command on the subscription connection: %s", text)
            if entry is not None and entry.future is not None and not entry.future.done():
                entry.future.set_exception(BrokerError(f"Redis refused a subscription command: {text}"))
            return
        if not isinstance(reply, list) or not reply:
            return  # e.g. a RESP3 +PONG
        kind = reply[0]
        if kind == b"message" and len(reply) == 3:
            channel, data = reply[1], reply[2]
            if isinstance(channel, bytes) and isinstance(data, bytes):
                if channel == self._heartbeat_channel:
                    self._deliver_heartbeat(data)
                elif (stream := self._streams_by_channel.get(channel)) is not None:
                    self._deliver(stream, data)
                return
            raise _ProtocolDesync("pub/sub message without channel or data")
        if kind in (b"subscribe", b"unsubscribe"):
            if not self._pending:
                return  # nothing waits for it
            entry = self._pending[0]
            entry.remaining -= 1
            if entry.remaining <= 0:
                self._pending.popleft()
                if entry.future is not None and not entry.future.done():
                    entry.future.set_result(None)
                if entry.on_done is not None:
                    entry.on_done()
        # anything else (pong, ...) needs no action
