"""The gateway half of the Redis broker: one dedicated subscription connection per process and the task that
reads it. A small RESP parser (:mod:`shared.redis.resp`) handles every message of a socket read without an
``await`` per message and hands each to the listener synchronously; the reader detects a half-open socket with
its own PING deadline and reconnects with jittered backoff, resubscribing every channel before it reports
``on_broker_reconnect`` so the relay can repair from history. SUBSCRIBE and UNSUBSCRIBE are written straight to
the socket and wait for Redis to confirm each channel.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

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
    ) -> None:
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

    async def open(self, url: str, options: dict[str, Any]) -> None:
        """Connect to ``url`` (redis-py connection ``options``), subscribe the heartbeat and every desired channel
        and start the reader; returns once Redis confirmed them all. A failure to connect propagates as redis-py's
        error, an OSError or a ValueError (a bad URL); a subscription refused or not confirmed within the socket
        timeout raises BrokerError. After any failure the subscription is closed again."""
        if self._pool is not None:
            raise BrokerError("the Redis subscription is already open")
        self._ever_connected = False
        self.failure = None
        # RESP2 keeps pub/sub replies plain arrays.
        self._pool = ConnectionPool.from_url(url, protocol=2, **options)
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
        channels: list[bytes] = []
        for stream in streams:
            channel = self._namer.channel(stream).encode()
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
        """See :meth:`shared.broker.redis.RedisBroker.unsubscribe`."""
        channels: list[bytes] = []
        for stream in streams:
            channel = self._namer.channel(stream).encode()
            if self._streams_by_channel.pop(channel, None) is not None:
                channels.append(channel)
        if channels:
            await self._send_and_confirm(b"UNSUBSCRIBE", channels)

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
        channels = [self._heartbeat_channel, *self._streams_by_channel]
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(len(channels), ready, self._on_subscribed))
        writer.write(pack_command(b"SUBSCRIBE", *channels))
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
        """The reader task: read until the connection fails, then reconnect with backoff, forever."""
        try:
            while True:
                try:
                    await self._read_loop()
                except Exception as error:
                    if not is_retryable(error, retryable=_RETRYABLE, fatal=_FATAL):
                        raise
                    logger.warning("Redis subscription connection to %s lost: %r", self.safe_url, error)
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
        prefix_len = len(_MESSAGE_PREFIX)
        while pos < size:
            if buf.startswith(_MESSAGE_PREFIX, pos):
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
            raise ProtocolDesync("pub/sub message without channel or data")
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
