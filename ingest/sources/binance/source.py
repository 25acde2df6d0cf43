"""The live Binance market source: WebSocket connections to Binance's combined-stream endpoint, kept
subscribed to what ingest wants, replaced without gaps, and Binance's REST API within its weight limits.

:class:`BinanceSource` implements the ``MarketSource`` interface. It spreads the wanted streams (the always-on set
plus whatever :meth:`BinanceSource.set_wanted` last said) over as many *slots* as Binance's 1024-streams-per-
connection cap (or a lower configured cap) requires, keeping each stream in the slot that already carries it. A
slot is served by one WebSocket at a time (``<ws_url>/stream``), and each socket runs three small tasks: a reader
that turns frames into :class:`~shared.broker.contract.OutgoingMessage` values (payload bytes verbatim, with the event's
identity), a controller that sends SUBSCRIBE/UNSUBSCRIBE requests in batches, paced under Binance's 5 messages/s
(the pongs answering Binance's pings are charged to the same budget), and a watchdog that aborts a socket on which
no frame at all (data or ping) arrived for ``stall_timeout_s``. Every connection attempt, of every slot, first
passes a sliding-window pacer kept under Binance's 300 attempts per 5 minutes.

Replacing a socket on purpose is make-before-break (see :mod:`ingest.sources.binance.rotation`): at
``rotate_after_s`` (before Binance's 24 h cut-off), on ``serverShutdown`` and after ``malformed_limit`` malformed
frames, the slot opens a successor, subscribes it, buffers its events until the two overlap, then switches: the
successor's events the old socket already delivered are dropped by identity, so each event goes out once and in
order. An unplanned loss (a closed or broken socket, a stall) reconnects that slot alone after a jittered
exponential backoff (none after ``serverShutdown``) and resubscribes; the events missed meanwhile are the
publisher's to backfill over REST.

Events from every slot go through one bounded outbox to a single publisher task, so ``publish`` is never called
concurrently and receives batches in arrival order. The protocol rules themselves (parsing, planning, pacing)
live in the pure :mod:`ingest.sources.binance.wire`; REST calls in :mod:`shared.binance.rest`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import Counter
from collections.abc import Callable, Collection, Iterator

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.frames import Frame, Opcode
from websockets.protocol import Event, State

from ingest.sources.base import Publish
from ingest.sources.binance.rotation import (
    REASON_AGE,
    REASON_MALFORMED,
    REASON_SERVER_SHUTDOWN as ROTATE_SERVER_SHUTDOWN,
    handover_ready,
    uncovered_streams,
)
from ingest.sources.binance.wire import (
    CONNECTION_ATTEMPT_WINDOW_S,
    MAX_PARAMS_PER_MESSAGE,
    MAX_STREAMS_PER_CONNECTION,
    ConnectionAttemptPacer,
    ControlError,
    ControlPacer,
    ControlReply,
    ControlRequest,
    DataFrame,
    Malformed,
    ServerShutdown,
    assign_streams,
    frame_size,
    parse_frame,
    plan_changes,
    read_data_frames,
    read_event,
)
from shared.backoff import backoff_delays
from shared.binance.identity import CONTIGUOUS_KINDS
from shared.binance.rest import BinanceRest
from shared.binance.weight import parse_retry_after
from shared.broker.contract import EventId, OutgoingMessage
from shared.errors import ConfigError, ProtocolError
from shared.settings import BINANCE_REST_URL, BINANCE_WS_URL
from shared.streams import parse_stream

log = logging.getLogger(__name__)

# Reconnect reasons: the keys of BinanceSource.reconnects and a bounded metrics label. (Planned replacements are
# rotations, counted by their own reasons in BinanceSource.rotations: see ingest.sources.binance.rotation.)
REASON_CLOSED = "closed"  # the connection closed or broke (network error, server close, protocol error)
REASON_CONNECT_FAILED = "connect_failed"  # TCP connect, TLS or WebSocket handshake failed or timed out
REASON_STALL = "stall"  # no frame at all (data or ping) for stall_timeout_s
REASON_SERVER_SHUTDOWN = "server_shutdown"  # Binance announced the close and closed before a successor was ready

ROTATE_AFTER_S = 23.5 * 3600  # Binance drops every connection at 24 h: replace ours well before, on our terms
_CLOSE_TIMEOUT_S = 2.0  # a closing handshake with a dying server must not hold up a reconnect for long
_MAX_FRAME_BYTES = 4 * 2**20  # all-market arrays (!miniTicker@arr) run to a few hundred KiB
_RECV_QUEUE_FRAMES = 1024  # frames websockets buffers before it stops reading the socket
_OUTBOX_HIGH_WATER = 10_000  # messages waiting for publish before readers pause (and TCP pushes back)
_HANDOVER_POLL_S = 0.02  # how often a rotation checks whether the successor overlaps the old socket
# A connection closed during the opening handshake (a reset, a server or proxy hanging up) is a failed attempt too.
_CONNECT_ERRORS = (OSError, TimeoutError, InvalidHandshake, ConnectionClosed)
_DATA_OPCODES = frozenset({Opcode.TEXT, Opcode.BINARY, Opcode.CONT})


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
    """A client connection that hands data frames straight to ``on_data``, notes when bytes last arrived and reports
    Binance's pings.

    Data frames never reach ``recv()``: websockets would parse each one with its generic frame parser and queue it
    for a ``recv()`` coroutine, several microseconds a message, which at the whole market's rate is most of a core.
    While the connection is open, :meth:`data_received` cuts complete final, unmasked text and binary frames out of
    the bytes itself (:func:`~ingest.sources.binance.wire.read_data_frames`) and calls ``on_data`` with each payload,
    synchronously. A frame of any other kind (a ping, a close, a fragment, anything unusual) goes to websockets alone
    once complete, so websockets answers pings, runs the closing handshake and enforces the protocol, and is between
    frames again afterwards; its data frames reach ``on_data`` through :meth:`process_event` (fragments joined). An
    oversized frame and everything after a close go to websockets as they come. Without ``on_data`` the connection
    behaves as websockets' own.

    Pings prove the connection alive to the watchdog, and the pongs they trigger count against Binance's inbound
    message limit, so the pacer is charged for each."""

    last_frame_at: float = 0.0
    on_ping: Callable[[], None] | None = None
    on_data: Callable[[bytes], None] | None = None
    _partial: bytes = b""  # the start of a data frame the fast path is waiting to complete
    _fragments: list[bytes] | None = None  # a fragmented message websockets is delivering

    def data_received(self, data: bytes) -> None:
        self.last_frame_at = self.loop.time()
        handler = self.on_data
        protocol = self.protocol
        if handler is None or protocol.state is not State.OPEN or protocol.reader.buffer:
            super().data_received(data)  # not open yet (or any more), or websockets holds a partial frame
            return
        buffer = self._partial + data if self._partial else data
        position = 0
        end = len(buffer)
        while position < end:
            if self._fragmented():
                handover = True  # websockets is inside a fragmented message: its frames go to it one by one
            else:
                payloads, position, handover = read_data_frames(buffer, _MAX_FRAME_BYTES, position)
                for payload in payloads:
                    handler(payload)
                    if self.on_data is None:  # the handler ended the connection
                        self._partial = b""
                        return
                if not handover:
                    break
            # A frame for websockets (a ping, a close, a fragment, anything odd): handed over alone once complete, so
            # that websockets is between frames again after it and the data frames that follow stay on this path.
            size = frame_size(buffer, position)
            if size is not None and size > _MAX_FRAME_BYTES:
                self._partial = b""
                super().data_received(buffer[position:])  # websockets refuses it (and closes the connection)
                return
            if size is None or position + size > end:
                break  # incomplete: kept until the rest arrives
            super().data_received(buffer[position : position + size])
            position += size
            if self.on_data is None or protocol.state is not State.OPEN:  # closing, or the handler failed
                self._partial = b""
                if position < end:
                    super().data_received(buffer[position:])
                return
        self._partial = buffer[position:] if position < end else b""

    def _fragmented(self) -> bool:
        """Websockets is inside a fragmented message (``current_size`` is ``cur_size`` before websockets 16)."""
        protocol = self.protocol
        return getattr(protocol, "current_size", getattr(protocol, "cur_size", None)) is not None

    def process_event(self, event: Event) -> None:
        if isinstance(event, Frame):
            self.last_frame_at = self.loop.time()
            opcode = event.opcode
            handler = self.on_data
            if handler is not None and opcode in _DATA_OPCODES:
                if opcode is not Opcode.CONT:
                    if event.fin:
                        handler(bytes(event.data))
                    else:
                        self._fragments = [bytes(event.data)]
                elif self._fragments is not None:  # websockets checked the order of the fragments
                    self._fragments.append(bytes(event.data))
                    if event.fin:
                        message, self._fragments = b"".join(self._fragments), None
                        handler(message)
                return
            if opcode is Opcode.PING and self.on_ping is not None:
                self.on_ping()
        super().process_event(event)


class BinanceSource:
    """Market data from Binance's public WebSocket streams (``MarketSource``).

    Counters (plain attributes, read by metrics at scrape time): ``reconnects`` (reason -> count, see ``REASON_*``),
    ``rotations`` (reason -> count, see :mod:`ingest.sources.binance.rotation`), ``rotation_timeouts`` (switches
    made without a full overlap), ``connection_attempts``, ``connections_opened``, ``connect_wait_s`` (time spent
    holding attempts back for Binance's 300/5 min), ``frames_received``, ``received`` (stream kind -> data
    messages), ``messages_published``, ``duplicates_dropped`` (events two sockets both delivered),
    ``malformed_frames`` (skipped, never published), ``unwanted_frames`` (data for a stream no longer wanted,
    dropped), ``control_errors`` (error replies to our requests) and ``rejected_streams`` (streams Binance refused).
    REST counters live on :attr:`rest` (:class:`~shared.binance.rest.BinanceRest`).
    """

    name = "binance"

    def __init__(
        self,
        ws_url: str = BINANCE_WS_URL,
        rest_url: str = BINANCE_REST_URL,
        *,
        always_on: Collection[str] = (),
        max_streams_per_connection: int = MAX_STREAMS_PER_CONNECTION,
        control_rate_per_s: float = 3.0,
        connect_timeout_s: float = 10.0,
        stall_timeout_s: float = 60.0,
        rest_timeout_s: float = 30.0,
        max_params_per_message: int = MAX_PARAMS_PER_MESSAGE,
        rotate_after_s: float = ROTATE_AFTER_S,
        overlap_timeout_s: float = 10.0,
        malformed_limit: int = 1,
        connect_attempts: int = 250,
        connect_window_s: float = CONNECTION_ATTEMPT_WINDOW_S,
        rest_weight_limit: int = 3000,
        backoff: Callable[[], Iterator[float]] = backoff_delays,
    ) -> None:
        """``control_rate_per_s`` defaults to 3, under Binance's 5: pongs count against the same limit, a full
        bucket adds one message to any second, and network jitter can bunch messages up on Binance's side.
        ``stall_timeout_s`` defaults to three of Binance's 20 s ping intervals: a connection that has
        received no frame at all for that long is dead even if TCP has not noticed. ``connect_attempts`` per
        ``connect_window_s`` defaults to 250 of Binance's 300 per 5 minutes, leaving room for a restart."""
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
            ("rotate_after_s", rotate_after_s),
            ("overlap_timeout_s", overlap_timeout_s),
            ("connect_window_s", connect_window_s),
        ):
            if not seconds > 0:
                raise ConfigError(setting, seconds, "must be a positive number of seconds")
        if not 1 <= connect_attempts <= 300:
            raise ConfigError("connect_attempts", connect_attempts, "must be between 1 and 300 (Binance's limit)")
        if malformed_limit < 1:
            raise ConfigError("malformed_limit", malformed_limit, "must be at least 1")
        self.ws_url = ws_url.rstrip("/")
        self.rest_url = rest_url.rstrip("/")
        self.max_streams_per_connection = max_streams_per_connection
        self.control_rate_per_s = control_rate_per_s
        self.connect_timeout_s = connect_timeout_s
        self.stall_timeout_s = stall_timeout_s
        self.max_params_per_message = max_params_per_message
        self.rotate_after_s = rotate_after_s
        self.overlap_timeout_s = overlap_timeout_s
        self.malformed_limit = malformed_limit
        self.backoff = backoff
        self.rest = BinanceRest(
            self.rest_url,
            weight_limit_per_min=rest_weight_limit,
            timeout_s=rest_timeout_s,
            connect_timeout_s=connect_timeout_s,
        )
        self._connect_pacer = ConnectionAttemptPacer(connect_attempts, connect_window_s)
        self._keep_last: dict[str, bool] = {}
        self._contiguous: dict[str, bool] = {}
        self._kind: dict[str, str] = {}
        self.always_on = frozenset(self._canonical(always_on, strict=True))
        self._wanted: frozenset[str] = frozenset()
        self._changed = asyncio.Event()
        self._slots: list[_Slot] = []
        self._outbox = _Outbox(_OUTBOX_HIGH_WATER)
        self._running = False
        # Counters.
        self.reconnects: Counter[str] = Counter()
        self.rotations: Counter[str] = Counter()
        self.rotation_timeouts = 0
        self.connection_attempts = 0
        self.connections_opened = 0
        self.connect_wait_s = 0.0
        self.frames_received = 0
        self.received: Counter[str] = Counter()
        self.messages_published = 0
        self.duplicates_dropped = 0
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
            self._slots = []
            self._running = False

    async def exchange_info(self, symbols: Collection[str] | None = None) -> bytes:
        """Binance's ``GET /api/v3/exchangeInfo`` document, as bytes: for ``symbols`` only, or (the
        default) for every symbol, which is what the gateway needs to reject unknown ones. Weight 20."""
        return await self.rest.exchange_info(symbols)

    # ---- state for diagnostics, metrics and tests ----

    @property
    def wanted(self) -> frozenset[str]:
        """Everything this source should be subscribed to: always-on plus wanted."""
        return self.always_on | self._wanted

    @property
    def connected(self) -> int:
        """Slots whose socket is currently open."""
        return sum(1 for slot in self._slots if slot.connected)

    @property
    def sockets_open(self) -> int:
        """Open upstream sockets, successors of a rotation in progress included."""
        return sum(len(slot.sockets) for slot in self._slots)

    @property
    def connection_streams(self) -> list[frozenset[str]]:
        """The streams assigned to each slot (upstream connection)."""
        return [slot.desired for slot in self._slots]

    def kind_of(self, stream: str) -> str:
        return self._kind.get(stream) or parse_stream(stream).kind.value

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
            self._contiguous[stream.name] = stream.kind in CONTIGUOUS_KINDS
            self._kind[stream.name] = stream.kind.value
        return canonical

    def _rebalance(self, tasks: asyncio.TaskGroup) -> None:
        """Fit the wanted streams onto slots: update existing ones, open and close as needed."""
        groups = assign_streams(
            [slot.desired for slot in self._slots],
            self.wanted,
            max_streams_per_connection=self.max_streams_per_connection,
        )
        kept: list[_Slot] = []
        for index, group in enumerate(groups):
            if index < len(self._slots):
                slot = self._slots[index]
                if not group:
                    slot.stop()
                    continue
                slot.set_desired(group)
            else:
                slot = _Slot(self, group)
                slot.start(tasks)
            kept.append(slot)
        self._slots = kept

    async def _pace_connect(self) -> None:
        """Wait until one more connection attempt stays within Binance's limit, and count it."""
        pacer = self._connect_pacer
        while (delay := pacer.delay()) > 0:
            if delay >= 0.1:
                log.warning("holding an upstream connection attempt back %.1f s (Binance allows 300 per 5 min)", delay)
            self.connect_wait_s += delay
            await asyncio.sleep(delay)
        pacer.record()
        self.connection_attempts += 1

    async def _publish_forever(self, publish: Publish) -> None:
        while True:
            batch = await self._outbox.take()
            await publish(batch)
            self.messages_published += len(batch)


class _Socket:
    """One WebSocket of a slot: reads it, keeps its subscriptions equal to the slot's, watches for silence.

    While ``buffer`` is not None the socket is the successor in a rotation and its events wait there; once
    ``retired`` (replaced) whatever it still receives is dropped."""

    _ids = itertools.count(1)  # request ids, unique across sockets so logs can be matched

    def __init__(self, slot: _Slot, ws: _WatchedConnection, *, buffering: bool) -> None:
        self.slot = slot
        self.ws = ws
        loop = asyncio.get_running_loop()
        self.opened_at = loop.time()
        self.pacer = ControlPacer(slot.source.control_rate_per_s, clock=loop.time)
        ws.on_ping = self.pacer.charge
        ws.last_frame_at = loop.time()
        # What we asked Binance for (optimistically, before the reply) and unanswered requests.
        self.subscribed: set[str] = set()
        self.pending: dict[int, ControlRequest] = {}
        self.buffer: list[OutgoingMessage] | None = [] if buffering else None
        self.first_ids: dict[str, int] = {}  # successor: first id seen per contiguous stream
        self.retired = False
        self.rotate_reason: str | None = None
        self.rotate_requested = asyncio.Event()
        self.malformed = 0
        self.stalled = False
        self.healthy = False  # received a frame
        self.wake = asyncio.Event()
        self.wake.set()
        self._helper_error: BaseException | None = None
        self._frame_error: Exception | None = None
        self._resume: asyncio.Task[None] | None = None
        ws.on_data = self._on_frame
        self.task = asyncio.create_task(self._serve())

    @property
    def synced(self) -> bool:
        """Subscribed (and confirmed) to exactly what the slot wants."""
        return not self.pending and self.subscribed == self.slot.desired - self.slot.rejected

    def request_rotation(self, reason: str) -> None:
        if self.rotate_reason is None:
            self.rotate_reason = reason
            self.rotate_requested.set()

    def end_reason(self) -> str:
        """Why the (finished) socket ended, as a reconnect reason; re-raises a bug."""
        error = None if self.task.cancelled() else self.task.exception()
        if error is not None and not isinstance(error, ConnectionClosed | OSError):
            raise error
        if self.stalled:
            log.warning("upstream connection stalled for %.1f s", self.slot.source.stall_timeout_s)
            return REASON_STALL
        if self.rotate_reason == ROTATE_SERVER_SHUTDOWN:
            return REASON_SERVER_SHUTDOWN
        log.warning("upstream connection closed: %s", error)
        return REASON_CLOSED

    async def _serve(self) -> None:
        helpers = [asyncio.create_task(self._control()), asyncio.create_task(self._watch())]
        for helper in helpers:
            helper.add_done_callback(self._on_helper_done)
        try:
            await self._read()
        finally:
            self.ws.on_data = None
            if self._resume is not None:
                helpers.append(self._resume)
            for helper in helpers:
                helper.cancel()
            await asyncio.wait(helpers)
            try:
                await self.ws.close()
            except BaseException:
                self.ws.transport.abort()
                raise
            if self._helper_error is not None:
                raise self._helper_error

    def _on_helper_done(self, task: asyncio.Task[None]) -> None:
        # A helper only ends on its own by crashing (a bug): abort the socket so the reader stops, and let
        # _serve re-raise the error so that run() fails loudly instead of limping on.
        if not task.cancelled() and task.exception() is not None:
            self._helper_error = task.exception()
            self.ws.transport.abort()

    async def _read(self) -> None:
        """Frames arrive through :meth:`_on_frame`, called by the connection; this waits until it closes and ends
        the way a reader of ``recv()`` would: with the close exception (or the error a frame raised)."""
        ws = self.ws
        await ws.wait_closed()
        if self._frame_error is not None:
            raise self._frame_error
        raise ws.protocol.close_exc

    def _on_frame(self, frame: bytes) -> None:
        """One upstream frame, synchronously, in arrival order (from the connection's ``data_received``)."""
        try:
            self._handle_frame(frame)
        except Exception as error:  # a bug: end the socket with it, so run() fails loudly (end_reason re-raises)
            if self._frame_error is None:
                self._frame_error = error
            self.ws.on_data = None
            self.ws.transport.abort()

    def _handle_frame(self, frame: bytes) -> None:
        source = self.slot.source
        source.frames_received += 1
        self.healthy = True
        event = read_event(frame)  # market data (nearly every frame): parse_frame's fast path, without its object
        if event is not None:
            self._deliver(*event)
            return
        parsed = parse_frame(frame)
        if isinstance(parsed, DataFrame):  # a layout the fast path does not read
            self._deliver(parsed.stream, parsed.payload, parsed.event)
        elif isinstance(parsed, ControlReply):
            if isinstance(parsed.id, int):
                self.pending.pop(parsed.id, None)
        elif isinstance(parsed, ControlError):
            self.slot.on_control_error(self, parsed)
        elif isinstance(parsed, ServerShutdown):
            log.info("upstream sent serverShutdown (E=%s): replacing the connection", parsed.event_time_ms)
            self.request_rotation(ROTATE_SERVER_SHUTDOWN)
        elif isinstance(parsed, Malformed):
            source.malformed_frames += 1
            self.malformed += 1
            # Logged at powers of two only: a misbehaving upstream must not flood the log.
            if source.malformed_frames & (source.malformed_frames - 1) == 0:
                log.warning("skipped malformed upstream frame (%d so far): %s", source.malformed_frames, parsed.reason)
            if self.malformed >= source.malformed_limit:
                self.request_rotation(REASON_MALFORMED)

    def _deliver(self, stream: str, payload: bytes, event: EventId | None) -> None:
        """A market-data event: to the publisher (through the slot), or to the buffer while a rotation's successor."""
        if self.retired:
            return
        slot = self.slot
        source = slot.source
        if stream not in slot.desired:
            source.unwanted_frames += 1
            return
        source.received[source._kind[stream]] += 1
        message = OutgoingMessage(stream, payload, source._keep_last[stream], event)
        buffer = self.buffer
        if buffer is not None:
            buffer.append(message)
            if event is not None and source._contiguous[stream] and stream not in self.first_ids:
                self.first_ids[stream] = event.first
        else:
            slot.emit(message)
            if source._outbox.full:
                self._pause_reading()

    def _pause_reading(self) -> None:
        """The outbox is full: stop reading the socket (TCP pushes back on the exchange) until it has room."""
        if self._resume is None:
            self.ws.transport.pause_reading()
            self._resume = asyncio.create_task(self._resume_when_room())

    async def _resume_when_room(self) -> None:
        try:
            await self.slot.source._outbox.wait_for_room()
        finally:
            self._resume = None
        if not self.ws.transport.is_closing():
            self.ws.transport.resume_reading()

    async def _control(self) -> None:
        """Keep the socket's subscriptions equal to the slot's, one paced request at a time."""
        source = self.slot.source
        pacer = self.pacer
        while True:
            self.wake.clear()
            target = self.slot.desired - self.slot.rejected
            first_id = next(self._ids)
            requests = plan_changes(
                self.subscribed,
                target,
                first_id=first_id,
                max_params_per_message=source.max_params_per_message,
                isolated=self.slot.isolated,
            )
            if not requests:
                await self.wake.wait()
                continue
            if not pacer.try_acquire():
                # Re-plan after the wait rather than sending a stale request: wanted may have changed.
                await asyncio.sleep(pacer.delay())
                continue
            request = requests[0]
            if request.method == "SUBSCRIBE":
                self.subscribed.update(request.params)
            else:
                self.subscribed.difference_update(request.params)
            self.pending[request.id] = request
            try:
                await self.ws.send(request.encode(), text=True)
            except ConnectionClosed:
                return  # the reader sees the same closure and reports it

    async def _watch(self) -> None:
        """Abort the socket when no frame at all has arrived for ``stall_timeout_s``."""
        loop = asyncio.get_running_loop()
        source = self.slot.source
        timeout = source.stall_timeout_s
        ws = self.ws
        while True:
            if source._outbox.full:
                # The reader is waiting for publish, so frames are not being read: that is not a stall.
                ws.last_frame_at = loop.time()
            idle = loop.time() - ws.last_frame_at
            if idle >= timeout:
                self.stalled = True
                ws.transport.abort()
                return
            await asyncio.sleep(timeout - idle)


class _Slot:
    """One share of the wanted streams (at most ``max_streams_per_connection``) and the socket(s) serving it:
    normally one, two during a rotation. Reconnects until stopped."""

    def __init__(self, source: BinanceSource, desired: frozenset[str]) -> None:
        self.source = source
        self.desired = desired
        # Across sockets: streams Binance refused (retried only once they leave and re-enter ``desired``) and
        # streams of a refused batch, to be retried one per message.
        self.rejected: set[str] = set()
        self.isolated: set[str] = set()
        # Identity of the last event this slot delivered per stream: the duplicate filter of a rotation.
        self.delivered: dict[str, int] = {}
        self.sockets: list[_Socket] = []
        self.current: _Socket | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def connected(self) -> bool:
        return self.current is not None and not self.current.task.done()

    # ---- lifecycle ----

    def start(self, tasks: asyncio.TaskGroup) -> None:
        self._task = tasks.create_task(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def set_desired(self, streams: frozenset[str]) -> None:
        if streams != self.desired:
            self.desired = streams
            self.rejected &= streams
            self.isolated &= streams
            for stream in [stream for stream in self.delivered if stream not in streams]:
                del self.delivered[stream]
            for sock in self.sockets:
                sock.wake.set()

    def emit(self, message: OutgoingMessage) -> None:
        """Hand an event to the publisher unless this slot already delivered it (a rotation's overlap)."""
        event = message.event
        if event is not None:
            last = self.delivered.get(message.stream)
            if last is not None and event.last <= last:
                self.source.duplicates_dropped += 1
                return
            self.delivered[message.stream] = event.last
        self.source._outbox.put(message)

    def on_control_error(self, sock: _Socket, error: ControlError) -> None:
        self.source.control_errors += 1
        request = sock.pending.pop(error.id, None) if isinstance(error.id, int) else None
        log.warning("upstream refused request %r: code %s %s", request or error.id, error.code, error.msg)
        if request is None or request.method != "SUBSCRIBE":
            return
        sock.subscribed.difference_update(request.params)
        if len(request.params) == 1:
            self.rejected.update(request.params)
            self.source.rejected_streams.update(request.params)
        else:
            self.isolated.update(request.params)
        for other in self.sockets:
            other.wake.set()

    async def _run(self) -> None:
        source = self.source
        delays: Iterator[float] | None = None
        try:
            while True:
                reason, retry_after, healthy = await self._session()
                source.reconnects[reason] += 1
                if reason == REASON_SERVER_SHUTDOWN:
                    delays, delay = None, 0.0  # "reconnect now"
                else:
                    if healthy or delays is None:
                        delays = source.backoff()
                    delay = max(next(delays), retry_after)
                log.info("upstream connection lost (%s); reconnecting in %.2f s", reason, delay)
                await asyncio.sleep(delay)
        finally:
            await self._close_all()

    async def _open(self, *, buffering: bool) -> _Socket:
        source = self.source
        await source._pace_connect()
        ws = await connect(
            f"{source.ws_url}/stream",
            open_timeout=source.connect_timeout_s,
            # No client pings: Binance pings us every 20 s and counts our frames against its limit; the watchdog
            # detects dead connections from the absence of any frame instead.
            ping_interval=None,
            close_timeout=_CLOSE_TIMEOUT_S,
            max_size=_MAX_FRAME_BYTES,
            max_queue=_RECV_QUEUE_FRAMES,
            create_connection=_WatchedConnection,
        )
        assert isinstance(ws, _WatchedConnection)
        source.connections_opened += 1
        sock = _Socket(self, ws, buffering=buffering)
        self.sockets.append(sock)
        sock.task.add_done_callback(lambda _: self.sockets.remove(sock) if sock in self.sockets else None)
        return sock

    async def _session(self) -> tuple[str, float, bool]:
        """Serve the slot with one socket and its successors until one fails unplanned; returns why, the
        exchange's Retry-After (for a refused handshake) and whether data had flowed."""
        try:
            primary = await self._open(buffering=False)
        except _CONNECT_ERRORS as error:
            log.warning("upstream connect to %s failed: %r", self.source.ws_url, error)
            return REASON_CONNECT_FAILED, _retry_after(error), False
        try:
            while True:
                self.current = primary
                reason = await self._until_rotation(primary)
                if reason is None:
                    return primary.end_reason(), 0.0, primary.healthy
                successor = await self._rotate(primary, reason)
                if successor is None:
                    return primary.end_reason(), 0.0, primary.healthy
                primary = successor
        finally:
            self.current = None
            await self._close_all()

    async def _until_rotation(self, primary: _Socket) -> str | None:
        """Wait until ``primary`` should be replaced (returns why) or has ended (returns None)."""
        loop = asyncio.get_running_loop()
        while True:
            if primary.task.done():
                return None
            if primary.rotate_reason is not None:
                return primary.rotate_reason
            remaining = primary.opened_at + self.source.rotate_after_s - loop.time()
            if remaining <= 0:
                return REASON_AGE
            waiter = asyncio.ensure_future(primary.rotate_requested.wait())
            try:
                await asyncio.wait({primary.task, waiter}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()

    async def _rotate(self, primary: _Socket, reason: str) -> _Socket | None:
        """Open a successor, let it overlap ``primary`` and switch to it; None if ``primary`` ended first and no
        successor could be opened."""
        source = self.source
        source.rotations[reason] += 1
        log.info("replacing upstream connection (%s): opening its successor first", reason)
        delays = source.backoff()
        while True:
            try:
                successor = await self._open(buffering=True)
            except _CONNECT_ERRORS as error:
                log.warning("upstream connect for a rotation failed: %r", error)
                source.reconnects[REASON_CONNECT_FAILED] += 1
                if primary.task.done():
                    return None
                await asyncio.wait({primary.task}, timeout=max(next(delays), _retry_after(error)))
                if primary.task.done():
                    return None
                continue
            await self._await_overlap(primary, successor)
            if successor.task.done():
                log.warning("the successor connection ended before it could take over")
                if primary.task.done():
                    return None
                await asyncio.wait({primary.task}, timeout=next(delays))
                continue
            self._promote(successor, primary)
            return successor

    async def _await_overlap(self, primary: _Socket, successor: _Socket) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.source.overlap_timeout_s
        while not successor.task.done() and not primary.task.done():
            if handover_ready(successor.synced, self.delivered, successor.first_ids, self.desired):
                return
            if loop.time() >= deadline:
                self.source.rotation_timeouts += 1
                waiting = uncovered_streams(self.delivered, successor.first_ids, self.desired)
                log.warning(
                    "rotation: the successor did not overlap within %.1f s (subscribed: %s; waiting for %d streams, "
                    "e.g. %s): switching anyway",
                    self.source.overlap_timeout_s,
                    successor.synced,
                    len(waiting),
                    waiting[:3],
                )
                return
            await asyncio.wait({primary.task, successor.task}, timeout=_HANDOVER_POLL_S)

    def _promote(self, successor: _Socket, old: _Socket) -> None:
        """Switch the slot to ``successor``: flush its buffer (dropping what ``old`` delivered), retire ``old``.
        Synchronous, so no event of either socket can slip in between."""
        old.retired = True
        buffered, successor.buffer = successor.buffer or [], None
        successor.first_ids.clear()
        for message in buffered:
            self.emit(message)
        old.task.cancel()  # closes its socket with a normal closing handshake
        log.info("upstream connection replaced (%d buffered events handed over)", len(buffered))

    async def _close_all(self) -> None:
        sockets = list(self.sockets)
        for sock in sockets:
            sock.task.cancel()
        if sockets:
            await asyncio.wait([sock.task for sock in sockets])
        self.sockets.clear()


def _retry_after(error: BaseException) -> float:
    """Seconds a rejected handshake asks us to wait (429/418 carry Retry-After), else 0."""
    if isinstance(error, InvalidStatus):
        return parse_retry_after(error.response.headers.get("Retry-After")) or 0.0
    return 0.0


__all__ = [
    "REASON_AGE",
    "REASON_CLOSED",
    "REASON_CONNECT_FAILED",
    "REASON_MALFORMED",
    "REASON_SERVER_SHUTDOWN",
    "REASON_STALL",
    "ROTATE_SERVER_SHUTDOWN",
    "BinanceSource",
]
