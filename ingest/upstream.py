"""The live Binance market source: WebSocket connections to Binance's combined-stream endpoint, kept
subscribed to what ingest wants, and Binance's exchangeInfo over REST.

:class:`BinanceSource` implements the ``MarketSource`` interface. It spreads the wanted streams (the
always-on set plus whatever :meth:`BinanceSource.set_wanted` last said) over as many ``<ws_url>/stream``
connections as Binance's 1024-streams-per-connection cap requires, keeping each stream on the connection
that already carries it. Each connection runs three small tasks: a reader that turns frames into
:class:`~shared.broker.OutgoingMessage` values (payload bytes verbatim), a controller that sends
SUBSCRIBE/UNSUBSCRIBE requests paced under Binance's 5 messages/s limit, and a watchdog that reconnects a
connection gone silent. Any failure reconnects that connection alone, after a jittered exponential backoff
(none after ``serverShutdown``, which means "reconnect now"), and resubscribes everything it carried.
Messages from every connection go through one bounded outbox to a single publisher task, so ``publish`` is
never called concurrently and receives batches in arrival order. The protocol rules themselves (parsing,
planning, pacing) live in the pure :mod:`ingest.binance`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import Counter
from collections.abc import Callable, Collection, Iterator

import httpx
import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.frames import Frame, Opcode
from websockets.protocol import Event

from ingest.binance import (
    MAX_PARAMS_PER_MESSAGE,
    MAX_STREAMS_PER_CONNECTION,
    ControlError,
    ControlPacer,
    ControlReply,
    ControlRequest,
    DataFrame,
    Malformed,
    ServerShutdown,
    assign_streams,
    parse_frame,
    plan_changes,
)
from ingest.sources import Publish
from shared.backoff import backoff_delays
from shared.broker import OutgoingMessage
from shared.errors import ConfigError, ProtocolError, UpstreamError
from shared.streams import parse_stream

log = logging.getLogger(__name__)

# Reconnect reasons: the keys of BinanceSource.reconnects and, later, a bounded metrics label.
REASON_CLOSED = "closed"  # the connection closed or broke (network error, server close, protocol error)
REASON_CONNECT_FAILED = "connect_failed"  # TCP connect, TLS or WebSocket handshake failed or timed out
REASON_STALL = "stall"  # no frame at all (data or ping) for stall_timeout_s
REASON_SERVER_SHUTDOWN = "server_shutdown"  # Binance announced it is closing this connection

_CLOSE_TIMEOUT_S = 2.0  # a closing handshake with a dying server must not hold up a reconnect for long
_MAX_FRAME_BYTES = 4 * 2**20  # all-market arrays (!miniTicker@arr) run to a few hundred KiB
_RECV_QUEUE_FRAMES = 1024  # frames websockets buffers before it stops reading the socket
_OUTBOX_HIGH_WATER = 10_000  # messages waiting for publish before readers pause (and TCP pushes back)


class _ServerShutdownError(Exception):
    """The server sent ``serverShutdown``: leave this connection and open a new one at once."""


class _Outbox:
    """Messages from every connection waiting for the single publisher, in arrival order.

    Bounded: past the high-water mark readers wait, websockets stops reading the socket, and TCP flow
    control pushes back on Binance instead of memory growing without limit."""

    def __init__(self, high_water: int) -> None:
        self._items: list[OutgoingMessage] = []
        self._high_water = high_water
        self._ready = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()

    @property
    def full(self) -> bool:
        return not self._room.is_set()

    def put(self, message: OutgoingMessage) -> None:
        self._items.append(message)
        self._ready.set()
        if len(self._items) >= self._high_water:
            self._room.clear()

    async def wait_for_room(self) -> None:
        await self._room.wait()

    async def take(self) -> list[OutgoingMessage]:
        """Everything queued so far (waits for at least one message)."""
        await self._ready.wait()
        items, self._items = self._items, []
        self._ready.clear()
        self._room.set()
        return items


class _WatchedConnection(ClientConnection):
    """A client connection that notes when any frame last arrived and reports Binance's pings.

    Pings never reach ``recv()`` (websockets answers them itself, echoing the payload as Binance wants), so
    this is the one place that sees them: they prove the connection alive to the watchdog, and the pongs
    they trigger count against Binance's inbound message limit, so the pacer is charged for each."""

    last_frame_at: float = 0.0
    on_ping: Callable[[], None] | None = None

    def process_event(self, event: Event) -> None:
        if isinstance(event, Frame):
            self.last_frame_at = self.loop.time()
            if event.opcode is Opcode.PING and self.on_ping is not None:
                self.on_ping()
        super().process_event(event)


class BinanceSource:
    """Market data from Binance's public WebSocket streams (``MarketSource``).

    Counters (plain attributes, read by metrics): ``reconnects`` (reason -> count, see ``REASON_*``),
    ``connections_opened``, ``frames_received``, ``messages_published``, ``malformed_frames`` (skipped,
    never published), ``unwanted_frames`` (data for a stream the connection no longer wants, dropped),
    ``control_errors`` (error replies to our requests) and ``rejected_streams`` (streams Binance refused).
    """

    name = "binance"

    def __init__(
        self,
        ws_url: str = "wss://stream.binance.com:9443",
        rest_url: str = "https://api.binance.com",
        *,
        always_on: Collection[str] = (),
        max_streams_per_connection: int = MAX_STREAMS_PER_CONNECTION,
        control_rate_per_s: float = 4.0,
        connect_timeout_s: float = 10.0,
        stall_timeout_s: float = 60.0,
        rest_timeout_s: float = 30.0,
        max_params_per_message: int = MAX_PARAMS_PER_MESSAGE,
        backoff: Callable[[], Iterator[float]] = backoff_delays,
    ) -> None:
        """``control_rate_per_s`` defaults to 4, under Binance's 5: pongs count against the same limit.
        ``stall_timeout_s`` defaults to three of Binance's 20 s ping intervals: a connection that has
        received no frame at all for that long is dead even if TCP has not noticed."""
        if not ws_url.startswith(("ws://", "wss://")):
            raise ConfigError("ws_url", ws_url, "must start with ws:// or wss://")
        if not rest_url.startswith(("http://", "https://")):
            raise ConfigError("rest_url", rest_url, "must start with http:// or https://")
        if not 1 <= max_streams_per_connection <= MAX_STREAMS_PER_CONNECTION:
            raise ConfigError(
                "max_streams_per_connection",
                max_streams_per_connection,
                f"must be between 1 and {MAX_STREAMS_PER_CONNECTION}",
            )
        if not 0 < control_rate_per_s <= 5:
            raise ConfigError("control_rate_per_s", control_rate_per_s, "must be in (0, 5]: Binance allows 5/s")
        for setting, seconds in (
            ("connect_timeout_s", connect_timeout_s),
            ("stall_timeout_s", stall_timeout_s),
            ("rest_timeout_s", rest_timeout_s),
        ):
            if not seconds > 0:
                raise ConfigError(setting, seconds, "must be a positive number of seconds")
        self.ws_url = ws_url.rstrip("/")
        self.rest_url = rest_url.rstrip("/")
        self.max_streams_per_connection = max_streams_per_connection
        self.control_rate_per_s = control_rate_per_s
        self.connect_timeout_s = connect_timeout_s
        self.stall_timeout_s = stall_timeout_s
        self.rest_timeout_s = rest_timeout_s
        self.max_params_per_message = max_params_per_message
        self.backoff = backoff
        self._keep_last: dict[str, bool] = {}
        self.always_on = frozenset(self._canonical(always_on, strict=True))
        self._wanted: frozenset[str] = frozenset()
        self._changed = asyncio.Event()
        self._connections: list[_Upstream] = []
        self._outbox = _Outbox(_OUTBOX_HIGH_WATER)
        self._running = False
        # Counters.
        self.reconnects: Counter[str] = Counter()
        self.connections_opened = 0
        self.frames_received = 0
        self.messages_published = 0
        self.malformed_frames = 0
        self.unwanted_frames = 0
        self.control_errors = 0
        self.rejected_streams: set[str] = set()

    # ---- MarketSource ----

    def set_wanted(self, streams: frozenset[str]) -> None:
        """Streams wanted besides the always-on set. New ones are subscribed promptly (paced), dropped ones
        unsubscribed at once: any linger before dropping is the caller's business."""
        wanted = frozenset(self._canonical(streams, strict=False))
        if wanted != self._wanted:
            self._wanted = wanted
            self._changed.set()

    async def run(self, publish: Publish) -> None:
        """Run until cancelled. Raises only on a bug (or a failing ``publish``): connection trouble is
        handled by reconnecting."""
        if self._running:
            raise RuntimeError("BinanceSource.run() is already running")
        self._running = True
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._publish_forever(publish))
                while True:
                    self._changed.clear()
                    self._rebalance(tasks)
                    await self._changed.wait()
        except ExceptionGroup as group:
            # One task failing cancels the others, so there is one cause: raise it as itself.
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise
        finally:
            self._connections = []
            self._running = False

    async def exchange_info(self, symbols: Collection[str] | None = None) -> bytes:
        """Binance's ``GET /api/v3/exchangeInfo`` document, as bytes: for ``symbols`` only, or (the
        default) for every symbol, which is what the gateway needs to reject unknown ones."""
        params: dict[str, str] = {}
        if symbols:
            params["symbols"] = orjson.dumps(sorted({symbol.upper() for symbol in symbols})).decode()
        url = f"{self.rest_url}/api/v3/exchangeInfo"
        timeout = httpx.Timeout(self.rest_timeout_s, connect=self.connect_timeout_s)
        try:
            async with httpx.AsyncClient(timeout=timeout) as client:
                response = await client.get(url, params=params)
        except httpx.HTTPError as error:
            raise UpstreamError(f"GET {url} failed: {error!r}") from error
        if response.status_code != 200:
            retry_after = response.headers.get("Retry-After")
            hint = f" (Retry-After: {retry_after} s)" if retry_after else ""
            raise UpstreamError(f"GET {url} answered HTTP {response.status_code}{hint}: {response.text[:200]}")
        body = response.content
        try:
            document = orjson.loads(body)
        except ValueError as error:
            raise UpstreamError(f"GET {url} returned invalid JSON: {error}") from error
        if not isinstance(document, dict) or not isinstance(document.get("symbols"), list):
            raise UpstreamError(f"GET {url} returned a document without a symbols list")
        return body

    # ---- state for diagnostics and tests ----

    @property
    def wanted(self) -> frozenset[str]:
        """Everything this source should be subscribed to: always-on plus wanted."""
        return self.always_on | self._wanted

    @property
    def connected(self) -> int:
        """Upstream connections currently open."""
        return sum(1 for connection in self._connections if connection.connected)

    @property
    def connection_streams(self) -> list[frozenset[str]]:
        """The streams assigned to each upstream connection."""
        return [connection.desired for connection in self._connections]

    # ---- internals ----

    def _canonical(self, streams: Collection[str], *, strict: bool) -> set[str]:
        canonical: set[str] = set()
        for raw in streams:
            try:
                stream = parse_stream(raw)
            except ProtocolError as error:
                if strict:
                    raise ConfigError("always_on", raw, error.reason) from error
                log.warning("ignoring invalid wanted stream %r: %s", raw, error.reason)
                continue
            canonical.add(stream.name)
            self._keep_last[stream.name] = stream.is_state
        return canonical

    def _rebalance(self, tasks: asyncio.TaskGroup) -> None:
        """Fit the wanted streams onto connections: update existing ones, open and close as needed."""
        groups = assign_streams(
            [connection.desired for connection in self._connections],
            self.wanted,
            max_streams_per_connection=self.max_streams_per_connection,
        )
        kept: list[_Upstream] = []
        for index, group in enumerate(groups):
            if index < len(self._connections):
                connection = self._connections[index]
                if not group:
                    connection.stop()
                    continue
                connection.set_desired(group)
            else:
                connection = _Upstream(self, group)
                connection.start(tasks)
            kept.append(connection)
        self._connections = kept

    async def _publish_forever(self, publish: Publish) -> None:
        while True:
            batch = await self._outbox.take()
            await publish(batch)
            self.messages_published += len(batch)


class _Upstream:
    """One upstream WebSocket connection and the streams assigned to it, reconnecting until stopped."""

    _ids = itertools.count(1)  # request ids, unique across connections so logs can be matched

    def __init__(self, source: BinanceSource, desired: frozenset[str]) -> None:
        self.source = source
        self.desired = desired
        self.connected = False
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # Per socket: what we asked Binance for (optimistically, before the reply) and unanswered requests.
        self._subscribed: set[str] = set()
        self._pending: dict[int, ControlRequest] = {}
        # Across sockets: streams Binance refused (retried only once they leave and re-enter ``desired``)
        # and streams of a refused batch, to be retried one per message.
        self._rejected: set[str] = set()
        self._isolated: set[str] = set()
        self._stalled = False
        self._healthy = False
        self._helper_error: BaseException | None = None

    # ---- lifecycle ----

    def start(self, tasks: asyncio.TaskGroup) -> None:
        self._task = tasks.create_task(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def set_desired(self, streams: frozenset[str]) -> None:
        if streams != self.desired:
            self.desired = streams
            self._rejected &= streams
            self._isolated &= streams
            self._wake.set()

    async def _run(self) -> None:
        source = self.source
        delays: Iterator[float] | None = None
        while True:
            reason, retry_after = await self._connect_once()
            source.reconnects[reason] += 1
            if reason == REASON_SERVER_SHUTDOWN:
                delays, delay = None, 0.0
            else:
                if self._healthy or delays is None:
                    delays = source.backoff()
                delay = max(next(delays), retry_after)
            log.info("upstream connection lost (%s); reconnecting in %.2f s", reason, delay)
            await asyncio.sleep(delay)

    async def _connect_once(self) -> tuple[str, float]:
        """Open one connection and serve it until it fails; returns why it ended and any Retry-After."""
        source = self.source
        url = f"{source.ws_url}/stream"
        self._stalled = self._healthy = False
        try:
            async with connect(
                url,
                open_timeout=source.connect_timeout_s,
                # No client pings: Binance pings us every 20 s and counts our frames against its limit;
                # the watchdog detects dead connections from the absence of any frame instead.
                ping_interval=None,
                close_timeout=_CLOSE_TIMEOUT_S,
                max_size=_MAX_FRAME_BYTES,
                max_queue=_RECV_QUEUE_FRAMES,
                create_connection=_WatchedConnection,
            ) as ws:
                assert isinstance(ws, _WatchedConnection)
                source.connections_opened += 1
                await self._serve(ws)
        except _ServerShutdownError:
            return REASON_SERVER_SHUTDOWN, 0.0
        except ConnectionClosed as error:
            if self._stalled:
                log.warning("upstream connection stalled for %.1f s", source.stall_timeout_s)
                return REASON_STALL, 0.0
            log.warning("upstream connection closed: %s", error)
            return REASON_CLOSED, 0.0
        except (OSError, TimeoutError, InvalidHandshake) as error:
            log.warning("upstream connect to %s failed: %r", url, error)
            return REASON_CONNECT_FAILED, _retry_after(error)
        finally:
            self.connected = False
        # Not reached in practice: the reader only ends by raising.
        return REASON_CLOSED, 0.0

    async def _serve(self, ws: _WatchedConnection) -> None:
        loop = asyncio.get_running_loop()
        pacer = ControlPacer(self.source.control_rate_per_s, clock=loop.time)
        ws.on_ping = pacer.charge
        ws.last_frame_at = loop.time()
        self._subscribed = set()
        self._pending = {}
        self._helper_error = None
        self.connected = True
        helpers = [
            asyncio.create_task(self._control(ws, pacer)),
            asyncio.create_task(self._watch(ws)),
        ]
        for helper in helpers:
            helper.add_done_callback(lambda task: self._on_helper_done(task, ws))
        try:
            await self._read(ws)
        finally:
            for helper in helpers:
                helper.cancel()
            await asyncio.wait(helpers)
            if self._helper_error is not None:
                raise self._helper_error

    def _on_helper_done(self, task: asyncio.Task[None], ws: _WatchedConnection) -> None:
        # A helper only ends on its own by crashing (a bug): abort the socket so the reader stops, and let
        # _serve re-raise the error so that run() fails loudly instead of limping on.
        if not task.cancelled() and task.exception() is not None:
            self._helper_error = task.exception()
            ws.transport.abort()

    async def _read(self, ws: _WatchedConnection) -> None:
        source = self.source
        outbox = source._outbox
        keep_last = source._keep_last
        while True:
            frame = await ws.recv(decode=False)
            source.frames_received += 1
            self._healthy = True
            parsed = parse_frame(frame)
            if isinstance(parsed, DataFrame):
                if parsed.stream in self.desired:
                    outbox.put(OutgoingMessage(parsed.stream, parsed.payload, keep_last[parsed.stream]))
                    if outbox.full:
                        await outbox.wait_for_room()
                else:
                    source.unwanted_frames += 1
            elif isinstance(parsed, ControlReply):
                if isinstance(parsed.id, int):
                    self._pending.pop(parsed.id, None)
            elif isinstance(parsed, ControlError):
                self._on_control_error(parsed)
            elif isinstance(parsed, ServerShutdown):
                log.info("upstream sent serverShutdown (E=%s); reconnecting now", parsed.event_time_ms)
                raise _ServerShutdownError
            elif isinstance(parsed, Malformed):
                source.malformed_frames += 1
                # Logged at powers of two only: a misbehaving upstream must not flood the log.
                if source.malformed_frames & (source.malformed_frames - 1) == 0:
                    log.warning(
                        "skipped malformed upstream frame (%d so far): %s", source.malformed_frames, parsed.reason
                    )

    def _on_control_error(self, error: ControlError) -> None:
        self.source.control_errors += 1
        request = self._pending.pop(error.id, None) if isinstance(error.id, int) else None
        log.warning("upstream refused request %r: code %s %s", request or error.id, error.code, error.msg)
        if request is None or request.method != "SUBSCRIBE":
            return
        self._subscribed.difference_update(request.params)
        if len(request.params) == 1:
            self._rejected.update(request.params)
            self.source.rejected_streams.update(request.params)
        else:
            self._isolated.update(request.params)
        self._wake.set()

    async def _control(self, ws: _WatchedConnection, pacer: ControlPacer) -> None:
        """Keep the socket's subscriptions equal to ``desired``, one paced request at a time."""
        source = self.source
        while True:
            self._wake.clear()
            target = self.desired - self._rejected
            first_id = next(self._ids)
            requests = plan_changes(
                self._subscribed,
                target,
                first_id=first_id,
                max_params_per_message=source.max_params_per_message,
                isolated=self._isolated,
            )
            if not requests:
                await self._wake.wait()
                continue
            if not pacer.try_acquire():
                # Re-plan after the wait rather than sending a stale request: wanted may have changed.
                await asyncio.sleep(pacer.delay())
                continue
            request = requests[0]
            if request.method == "SUBSCRIBE":
                self._subscribed.update(request.params)
            else:
                self._subscribed.difference_update(request.params)
            self._pending[request.id] = request
            try:
                await ws.send(request.encode(), text=True)
            except ConnectionClosed:
                return  # the reader sees the same closure and reports it

    async def _watch(self, ws: _WatchedConnection) -> None:
        """Abort the socket when no frame at all has arrived for ``stall_timeout_s``."""
        loop = asyncio.get_running_loop()
        timeout = self.source.stall_timeout_s
        while True:
            if self.source._outbox.full:
                # The reader is waiting for publish, so frames are not being read: that is not a stall.
                ws.last_frame_at = loop.time()
            idle = loop.time() - ws.last_frame_at
            if idle >= timeout:
                self._stalled = True
                ws.transport.abort()
                return
            await asyncio.sleep(timeout - idle)


def _retry_after(error: BaseException) -> float:
    """Seconds a rejected handshake asks us to wait (429/418 carry Retry-After), else 0."""
    if isinstance(error, InvalidStatus):
        value = error.response.headers.get("Retry-After")
        if value is not None:
            try:
                return max(0.0, float(value))
            except ValueError:
                return 0.0
    return 0.0


__all__ = [
    "REASON_CLOSED",
    "REASON_CONNECT_FAILED",
    "REASON_SERVER_SHUTDOWN",
    "REASON_STALL",
    "BinanceSource",
]
