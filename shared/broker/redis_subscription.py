"""The gateway half of the Redis broker: one dedicated subscription connection per process and the task that
reads it. A small RESP parser (:mod:`shared.redis.resp`) handles every message of a socket read without an
``await`` per message and hands each to the listener synchronously; the reader detects a half-open socket with
its own PING deadline and reconnects with jittered backoff, resubscribing every channel before it reports
``on_broker_reconnect`` so the relay can repair from history. SUBSCRIBE and UNSUBSCRIBE are written straight to
the socket and wait for Redis to confirm each channel.

On a Redis Cluster the same class is one shard's connection (``sharded=True``): SSUBSCRIBE/SUNSUBSCRIBE, one command
per hash slot (a sharded command's channels must share a slot), ``smessage`` on the fast path, and no reconnecting
of its own: a lost connection, a ``-MOVED`` answer and the ``sunsubscribe`` a node pushes when a slot leaves it
are reported to its owner (:mod:`shared.broker.redis_sharded`), which knows where each slot lives now.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import redis.exceptions as redis_errors
from redis.asyncio.connection import AbstractConnection, ConnectionPool

from shared.backoff import backoff_delays, is_retryable
from shared.broker.contract import BrokerListener
from shared.errors import BrokerError
from shared.frames import decode_publication
from shared.redis.resp import ErrorReply, ProtocolDesync, Reply, pack_command, parse_reply
from shared.streams import ChannelNamer

# The Redis broker's one logger, as before its subscription code had a module of its own: log filters keep working.
logger = logging.getLogger("shared.broker.redis")

_READ_SIZE = 1 << 18  # what one transport read can deliver; many messages are parsed per read
_MESSAGE_PREFIX = b"*3\r\n$7\r\nmessage\r\n"
_SHARD_MESSAGE_PREFIX = b"*3\r\n$8\r\nsmessage\r\n"
# A cluster node's refusal of a sharded subscription that another look at the cluster can fix.
_CLUSTER_RETRYABLE = (b"MOVED ", b"ASK ", b"TRYAGAIN", b"CLUSTERDOWN")

# redis-py raises its own ConnectionError/TimeoutError (not the builtins); authentication and ACL failures
# subclass its ConnectionError but retrying them cannot help. Any OSError on the subscription socket (a TLS
# error included) leaves it unusable, and a new connection is the only repair, so the reader retries those too.
_RETRYABLE: tuple[type[BaseException], ...] = (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError)
_FATAL: tuple[type[BaseException], ...] = (
    redis_errors.AuthenticationError,
    redis_errors.AuthorizationError,
    redis_errors.NoPermissionError,
)


@dataclass(slots=True)
class _Pending:
    """A SUBSCRIBE/UNSUBSCRIBE sent on the subscription connection, waiting for one confirmation per channel.
    Redis answers commands in order, so a FIFO of these matches confirmations to commands."""

    remaining: int
    future: asyncio.Future[None] | None = None
    on_done: Callable[[], None] | None = None
    # Sharded only: the command's channels not yet confirmed. A node also pushes ``sunsubscribe`` by itself when a
    # slot leaves it; a reply for a channel the head command does not wait for is such a push.
    channels: set[bytes] | None = None
    unsubscribing: bool = False


class RedisSubscription:
    """The subscription connection of one :class:`shared.broker.redis.RedisBroker`. It remembers the desired
    channels from construction on (subscribing while closed or disconnected only records them); :meth:`open`
    connects and starts the reader, :meth:`close` stops it. Counters are plain ints for the metrics layer."""

    def __init__(
        self,
        namer: ChannelNamer,
        *,
        safe_url: str,
        socket_timeout_s: float,
        health_check_interval_s: float,
        reconnect_initial_s: float,
        reconnect_max_s: float,
        sharded: bool = False,
        slot_of: Callable[[bytes], int] | None = None,
        on_lost: Callable[[RedisSubscription, BaseException], None] | None = None,
        on_moved: Callable[[RedisSubscription, list[bytes], str], None] | None = None,
    ) -> None:
        """``sharded``: a cluster shard's connection; ``slot_of`` gives a channel's hash slot, ``on_lost`` is told
        when the connection is lost (it is not reconnected here) and ``on_moved`` which channels the node gave up
        (they are no longer subscribed here), with the node's words."""
        self.safe_url = safe_url  # the URL with its password redacted, for logs and errors
        self.socket_timeout_s = socket_timeout_s
        self.health_check_interval_s = health_check_interval_s
        self.reconnect_initial_s = reconnect_initial_s
        self.reconnect_max_s = reconnect_max_s

        self.malformed_messages = 0  # envelopes/heartbeats that did not decode (skipped)
        self.reconnects = 0  # subscription connection re-established after a loss
        self.listener_errors = 0  # exceptions raised by the listener (logged, delivery continues)
        self.client_id: int | None = None  # CLIENT ID of the live subscription connection
        self.task: asyncio.Task[None] | None = None  # the reader; completes with its fatal error, if any
        self.failure: BaseException | None = None  # that fatal error
        self.problem: str | None = None  # why the last connection was lost or could not be made (for /readyz)

        self._sharded = sharded
        self._slot_of = slot_of
        self._on_lost = on_lost
        self._on_moved = on_moved
        self._message_prefix = _SHARD_MESSAGE_PREFIX if sharded else _MESSAGE_PREFIX
        self._subscribe_command = b"SSUBSCRIBE" if sharded else b"SUBSCRIBE"
        self._unsubscribe_command = b"SUNSUBSCRIBE" if sharded else b"UNSUBSCRIBE"
        self._namer = namer
        self._pool: ConnectionPool | None = None
        self._conn: AbstractConnection | None = None
        self._listener: BrokerListener | None = None
        self._heartbeat_channel = namer.heartbeat_channel.encode()
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

    def set_listener(self, listener: BrokerListener) -> None:
        self._listener = listener

    @property
    def channels(self) -> dict[bytes, str]:
        """The channels this connection should hold (channel bytes -> stream name; read only)."""
        return self._streams_by_channel

    async def open(self, pool: ConnectionPool) -> None:
        """Connect through ``pool`` (a redis-py pool of RESP2 connections, which this subscription owns from now on),
        subscribe the heartbeat and every desired channel and start the reader; returns once Redis confirmed them
        all. A failure to connect propagates as redis-py's error, an OSError or a ValueError (a bad URL); a
        subscription refused or not confirmed within the socket timeout raises BrokerError. After any failure the
        subscription is closed again."""
        if self._pool is not None:
            raise BrokerError("the Redis subscription is already open")
        self._ever_connected = False
        self.failure = None
        self._pool = pool
        try:
            ready = await self._connect()
            self.task = asyncio.create_task(self._run(), name="pricegate-redis-subscriber")
            try:
                async with asyncio.timeout(self.socket_timeout_s):
                    await ready
            except TimeoutError:
                raise BrokerError(
                    f"Redis at {self.safe_url} did not confirm the subscription within {self.socket_timeout_s}s"
                ) from None
            if self.task.done() and self.failure is not None:
                raise BrokerError(f"Redis subscription at {self.safe_url} failed: {self.failure}") from self.failure
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Stop the reader, then close the connection and its pool (idempotent)."""
        self._connected = False
        task, self.task = self.task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                if not task.cancelled():  # close() itself was cancelled, not just the reader
                    raise
            except Exception:
                pass  # already logged by the reader when it died; kept in self.failure
        self._drop()
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.disconnect(nowait=True)
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.aclose()

    # ---- channels ----
    async def subscribe(self, streams: Iterable[str]) -> None:
        """See :meth:`shared.broker.redis.RedisBroker.subscribe`."""
        await self.subscribe_channels({self._namer.channel(stream).encode(): stream for stream in streams})

    async def subscribe_channels(self, wanted: dict[bytes, str]) -> None:
        """:meth:`subscribe` by channel (channel bytes -> the stream name delivered with its messages)."""
        channels: list[bytes] = []
        for channel, stream in wanted.items():
            if channel not in self._streams_by_channel:
                self._streams_by_channel[channel] = stream
                channels.append(channel)
        if channels:
            try:
                await self._send_and_confirm(self._subscribe_command, channels)
            except BrokerError:
                # Refused as a whole (e.g. an ACL): forget them, or every reconnect would be refused too.
                for channel in channels:
                    self._streams_by_channel.pop(channel, None)
                raise

    async def unsubscribe(self, streams: Iterable[str]) -> None:
        """See :meth:`shared.broker.redis.RedisBroker.unsubscribe`."""
        await self.unsubscribe_channels([self._namer.channel(stream).encode() for stream in streams])

    async def unsubscribe_channels(self, unwanted: Iterable[bytes]) -> None:
        """:meth:`unsubscribe` by channel."""
        channels: list[bytes] = []
        for channel in unwanted:
            if self._streams_by_channel.pop(channel, None) is not None:
                channels.append(channel)
        if channels:
            await self._send_and_confirm(self._unsubscribe_command, channels)

    def add_channel(self, channel: bytes, stream: str) -> None:
        """Record a channel to hold without sending anything (the heartbeat of a shard, before :meth:`open`)."""
        self._streams_by_channel[channel] = stream

    # ---- connection ----
    async def _connect(self) -> asyncio.Future[None]:
        """Connect the subscription socket and send one SUBSCRIBE for the heartbeat and every desired channel.
        The returned future resolves when all are confirmed (or the connection is lost first); the reader
        task processes the confirmations, then ``_on_subscribed`` flips ``connected``."""
        pool = self._pool
        if pool is None:
            raise BrokerError("RedisBroker is closed")
        conn = self._conn
        if conn is None:
            conn = self._conn = pool.make_connection()  # type: ignore[no-untyped-call]  # untyped in redis-py
        async with asyncio.timeout(self.socket_timeout_s):
            await conn.connect()  # TCP/TLS/unix, AUTH, SELECT
            # The id lets operators (and tests) find or kill exactly this connection; an ACL may forbid it.
            await conn.send_command("CLIENT", "ID", check_health=False)
            try:
                self.client_id = int(await conn.read_response())
            except redis_errors.ResponseError:
                self.client_id = None
        # From here on this module owns the socket: the reader parses it, subscribe()/unsubscribe() write to it.
        # redis-py keeps the streams in these attributes on every connection class (TCP, TLS, unix). Its own
        # health check would read from a socket our reader owns, so the reader checks health itself (_read_loop).
        reader, writer = conn._reader, conn._writer
        if not isinstance(reader, asyncio.StreamReader) or not isinstance(writer, asyncio.StreamWriter):
            raise BrokerError("unsupported redis-py connection internals: no asyncio streams on the connection")
        self._reader = reader
        self._writer = writer
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._sharded:
            groups = self._by_slot(list(self._streams_by_channel))
            if not groups:
                self._on_subscribed()
                ready.set_result(None)
                return ready
            for index, group in enumerate(groups):
                last = index == len(groups) - 1
                self._pending.append(
                    _Pending(
                        len(group),
                        ready if last else None,
                        self._on_subscribed if last else None,
                        channels=set(group),
                    )
                )
            writer.write(b"".join(pack_command(b"SSUBSCRIBE", *group) for group in groups))
        else:
            channels = [self._heartbeat_channel, *self._streams_by_channel]
            self._pending.append(_Pending(len(channels), ready, self._on_subscribed))
            writer.write(pack_command(b"SUBSCRIBE", *channels))
        async with asyncio.timeout(self.socket_timeout_s):
            await writer.drain()
        return ready

    def _by_slot(self, channels: list[bytes]) -> list[list[bytes]]:
        """Sharded commands, one per hash slot (a sharded command's channels must share one)."""
        slot_of = self._slot_of
        if slot_of is None:
            return [channels] if channels else []
        groups: dict[int, list[bytes]] = {}
        for channel in channels:
            groups.setdefault(slot_of(channel), []).append(channel)
        return list(groups.values())

    def _on_subscribed(self) -> None:
        """Every channel is subscribed (again): only now can history repair close a gap without a hole."""
        self._connected = True
        self.problem = None
        if self._sharded:
            return  # the owner of the shard connections reports reconnects, once for all of them
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
        if self._sharded:
            groups = self._by_slot(channels)
            for index, group in enumerate(groups):
                future = done if index == len(groups) - 1 else None
                self._pending.append(
                    _Pending(len(group), future, channels=set(group), unsubscribing=command == b"SUNSUBSCRIBE")
                )
            writer.write(b"".join(pack_command(command, *group) for group in groups))
        else:
            self._pending.append(_Pending(len(channels), done))
            writer.write(pack_command(command, *channels))
        try:
            await writer.drain()
        except ConnectionError:
            return  # the reader sees the loss too, resolves `done` and reconnects
        await done

    def _drop(self) -> None:
        """Forget the current subscription socket: waiters are released (the reconnect resubscribes)."""
        self._connected = False
        self._writer = None
        self._reader = None
        pending, self._pending = self._pending, deque()
        for entry in pending:
            if entry.future is not None and not entry.future.done():
                entry.future.set_result(None)

    async def _run(self) -> None:
        """The reader task: read until the connection fails, then reconnect with backoff, forever (a shard's
        connection reports the loss to its owner instead and ends)."""
        try:
            while True:
                try:
                    await self._read_loop()
                except Exception as error:
                    if not is_retryable(error, retryable=_RETRYABLE, fatal=_FATAL):
                        raise
                    logger.warning("Redis subscription connection to %s lost: %r", self.safe_url, error)
                    self.problem = f"subscription connection to {self.safe_url} lost: {error!r}"
                    if self._on_lost is not None:
                        await self._disconnect()
                        self._on_lost(self, error)
                        return
                await self._disconnect()
                await self._reconnect()
        except asyncio.CancelledError:
            raise
        except Exception as error:
            self.failure = error
            logger.exception("Redis subscription reader for %s stopped; broker is down", self.safe_url)
            await self._disconnect()
            raise

    async def _disconnect(self) -> None:
        """Mark the subscription down and close its connection without waiting on the peer."""
        self._drop()
        conn = self._conn
        if conn is not None:
            await conn.disconnect(nowait=True)

    async def _reconnect(self) -> None:
        for delay in backoff_delays(self.reconnect_initial_s, self.reconnect_max_s):
            await asyncio.sleep(delay)
            try:
                await self._connect()
                return
            except Exception as error:
                if not is_retryable(error, retryable=_RETRYABLE, fatal=_FATAL):
                    raise
                logger.warning("Redis at %s still unreachable (%r); retrying", self.safe_url, error)
                self.problem = f"Redis at {self.safe_url} unreachable: {error!r}"
                await self._disconnect()

    # ---- reading ----
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
                writer.write(pack_command(b"PING"))
                ping_sent = True
                continue
            if not chunk:
                raise ConnectionError("Redis closed the subscription connection")
            ping_sent = False
            buffer = buffer + chunk if buffer else chunk
            consumed = self.dispatch(buffer)
            buffer = buffer[consumed:] if consumed < len(buffer) else b""

    def dispatch(self, buf: bytes) -> int:
        """Handle every complete reply in ``buf`` synchronously; returns the bytes consumed (the caller keeps the
        rest for the next read). The reader's step, public so a test can feed it reads split anywhere."""
        pos = 0
        size = len(buf)
        streams = self._streams_by_channel
        heartbeat = self._heartbeat_channel
        message_prefix = self._message_prefix
        prefix_len = len(message_prefix)
        while pos < size:
            if buf.startswith(message_prefix, pos):
                # Fast path for the overwhelmingly common reply: a published message.
                channel_reply = parse_reply(buf, pos + prefix_len)
                if channel_reply is None:
                    return pos
                data_reply = parse_reply(buf, channel_reply[1])
                if data_reply is None:
                    return pos
                pos = data_reply[1]
                channel, data = channel_reply[0], data_reply[0]
                if not isinstance(channel, bytes) or not isinstance(data, bytes):
                    raise ProtocolDesync("pub/sub message without channel or data")
                if channel == heartbeat:
                    self._deliver_heartbeat(data)
                else:
                    stream = streams.get(channel)
                    if stream is not None:  # else: unsubscribed while the message was in flight
                        self._deliver(stream, data)
                continue
            parsed = parse_reply(buf, pos)
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

    def _handle_reply(self, reply: Reply) -> None:
        """Everything but the fast path: confirmations, PONGs, errors, and messages in a RESP3 push frame."""
        if isinstance(reply, ErrorReply):
            # Redis answers a refused SUBSCRIBE/UNSUBSCRIBE (e.g. an ACL) with one error for the whole command.
            text = reply.message.decode(errors="replace")
            entry = self._pending.popleft() if self._pending else None
            if self._sharded and entry is not None and reply.message.startswith(_CLUSTER_RETRYABLE):
                self._refused_by_cluster(entry, text)
                return
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
        if (kind == b"message" or kind == b"smessage") and len(reply) == 3:
            channel, data = reply[1], reply[2]
            if isinstance(channel, bytes) and isinstance(data, bytes):
                if channel == self._heartbeat_channel:
                    self._deliver_heartbeat(data)
                elif (stream := self._streams_by_channel.get(channel)) is not None:
                    self._deliver(stream, data)
                return
            raise ProtocolDesync("pub/sub message without channel or data")
        if kind in (b"ssubscribe", b"sunsubscribe") and len(reply) >= 2 and isinstance(reply[1], bytes):
            self._sharded_confirmation(kind == b"sunsubscribe", reply[1])
            return
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

    # ---- sharded replies ----
    def _sharded_confirmation(self, unsubscribed: bool, channel: bytes) -> None:
        entry = self._pending[0] if self._pending else None
        waiting = entry is not None and entry.channels is not None and channel in entry.channels
        if entry is not None and waiting and entry.unsubscribing == unsubscribed:
            assert entry.channels is not None
            entry.channels.discard(channel)
            entry.remaining -= 1
            if entry.remaining <= 0:
                self._pending.popleft()
                if entry.future is not None and not entry.future.done():
                    entry.future.set_result(None)
                if entry.on_done is not None:
                    entry.on_done()
            return
        if unsubscribed and self._streams_by_channel.pop(channel, None) is not None:
            # Pushed by the node: the channel's slot left it (migrated, or the node is a replica now).
            logger.info("Redis at %s gave up shard channel %r (its slot moved)", self.safe_url, channel)
            if self._on_moved is not None:
                self._on_moved(self, [channel], "sunsubscribe pushed by the node")

    def _refused_by_cluster(self, entry: _Pending, text: str) -> None:
        """A sharded command refused with a redirection or a cluster state the owner can wait out: its channels are
        not held here; the owner looks where they live now."""
        channels = sorted(entry.channels or ())
        if not entry.unsubscribing:
            for channel in channels:
                self._streams_by_channel.pop(channel, None)
        if entry.future is not None and not entry.future.done():
            entry.future.set_result(None)
        if entry.on_done is not None:
            entry.on_done()
        if channels and not entry.unsubscribing and self._on_moved is not None:
            self._on_moved(self, channels, text)
