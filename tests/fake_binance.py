"""A local fake of Binance's market-stream server and the REST calls ingest makes, for tests.

It listens on 127.0.0.1 (port 0) with real sockets and speaks the real protocol: ``/stream?streams=a/b``,
``/stream``, ``/ws`` and ``/ws/<stream>`` paths; SUBSCRIBE / UNSUBSCRIBE / LIST_SUBSCRIPTIONS /
SET_PROPERTY / GET_PROPERTY with Binance's replies and error envelope; combined ``{"stream","data"}`` frames
(raw frames on ``/ws``); server pings; and Binance's limits: a connection that sends more than 5 messages
in a second (text, binary, ping and pong frames all count) or holds more than 1024 streams is disconnected.
It generates Binance-shaped payloads for every subscribed stream (contiguous trade ids per symbol, rising
bookTicker update ids, …) and keeps the exact payload bytes it sent so tests can check they arrived
verbatim. ``GET /api/v3/ping``, ``/api/v3/time``, ``/api/v3/exchangeInfo``, ``/api/v3/klines`` (deterministic
candles, see :func:`fake_kline_row`, with Binance's 12-element arrays and error codes), ``/api/v3/depth`` and
``/api/v3/ticker/price`` are answered over plain HTTP from websockets' ``process_request`` hook on the same port.
``GET /api/v3/aggTrades`` and ``/api/v3/historicalTrades`` (``fromId``, ``limit``) answer from the trades the fake
generated, delivered or not. REST weight is enforced like Binance's: each endpoint's weight counts against
``rest_weight_limit`` per wall-clock minute, reported in ``X-MBX-USED-WEIGHT-1M``; over it the answer is 429 with
``Retry-After``, and a request during that 429 block is answered 418 (an IP ban of ``ban_s``).
REST faults: :meth:`FakeBinance.fail_next_rest` (an HTTP status, e.g. 500, or 429 with ``Retry-After``),
:meth:`~FakeBinance.script_rest` (a sequence of statuses, e.g. 429 then 418) and
:attr:`FakeBinance.rest_delay_s` (every REST answer waits that long).

Fault controls: :meth:`FakeBinance.drop_all`, :meth:`~FakeBinance.drop_mid_burst`,
:meth:`~FakeBinance.send_server_shutdown`, :meth:`~FakeBinance.send_garbage`, :meth:`~FakeBinance.stall`,
:meth:`~FakeBinance.fail_next_connections`. Connection attempts beyond ``max_connection_attempts`` per
``attempt_window_s`` are refused with 429 (what Binance answers there is not documented) and recorded.
With ``keep_trading`` the market goes on generating events for every stream that was ever subscribed even while
no connection holds it, as a real exchange does during a reconnect, so missed events show up as gaps.
Records: :attr:`~FakeBinance.connections` (per connection: path, control messages received, subscriptions
now and at most, pings/pongs, the most inbound messages in any second, why it closed),
:attr:`~FakeBinance.connection_attempts` (and their times), :attr:`~FakeBinance.sent`,
:attr:`~FakeBinance.rest_requests` and :attr:`~FakeBinance.rest_log` (time, path, status).
"""

from __future__ import annotations

import asyncio
import http
import json
import time
import zlib
from collections import deque
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

import orjson
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import Event

from loadtests.fake_exchange import exchange_info
from shared.errors import ProtocolError
from shared.frames import combined_frame
from shared.streams import Stream, StreamKind, parse_stream

DEFAULT_SYMBOLS: tuple[str, ...] = ("BTCUSDT", "ETHUSDT", "BNBUSDT", "SOLUSDT", "XRPUSDT")
_COUNTED_OPCODES = frozenset({Opcode.TEXT, Opcode.BINARY, Opcode.PING, Opcode.PONG})
_METHODS = ("SUBSCRIBE", "UNSUBSCRIBE", "LIST_SUBSCRIPTIONS", "SET_PROPERTY", "GET_PROPERTY")

# What send_garbage() sends by default: not JSON, a broken payload in a valid envelope, a bare array, an
# unknown object, and a binary frame that is not even UTF-8.
GARBAGE_FRAMES: tuple[str | bytes, ...] = (
    "this is not json",
    '{"stream":"btcusdt@trade","data":{"e":"trade",',
    '{"stream":"btcusdt@trade","data":}',
    "[1,2,3]",
    '{"unexpected":true}',
    b"\xff\xfe\x00garbage",
)


@dataclass
class FakeConnection:
    """What the fake saw on one WebSocket connection."""

    number: int
    path: str
    combined: bool
    subscriptions: set[str] = field(default_factory=set)
    received: list[str | bytes] = field(default_factory=list)  # text/binary frames, in order
    max_subscriptions: int = 0
    pings_sent: int = 0
    pings_received: int = 0
    pongs_received: int = 0
    close_reason: str | None = None  # "rate_limit", "too_many_streams", "pong_timeout", "dropped", ...
    closed: bool = False
    last_pong_at: float = field(default_factory=time.monotonic)
    inbound_times: deque[float] = field(default_factory=deque)
    max_inbound_per_s: int = 0  # the most inbound messages (text, binary, ping, pong) in any 1 s window
    opened_at: float = field(default_factory=time.monotonic)
    closed_at: float | None = None
    ws: ServerConnection | None = field(default=None, repr=False)

    @property
    def control_messages(self) -> list[dict[str, Any]]:
        """Received JSON control messages, decoded (anything undecodable is skipped)."""
        decoded: list[dict[str, Any]] = []
        for message in self.received:
            try:
                value = json.loads(message)
            except ValueError:
                continue
            if isinstance(value, dict):
                decoded.append(value)
        return decoded


class _CountingConnection(ServerConnection):
    """Server connection that counts inbound frames against the message-rate limit, like Binance.

    Pings and pongs never reach the handler (websockets answers and consumes them), so the count has to
    happen here, where every frame passes."""

    record: FakeConnection | None = None
    fake: FakeBinance | None = None

    def process_event(self, event: Event) -> None:
        super().process_event(event)
        if isinstance(event, Frame) and self.record is not None and self.fake is not None:
            self.fake._count_inbound(self, self.record, event)


class FakeBinance:
    """``async with FakeBinance() as fake:`` then point clients at ``fake.ws_url`` / ``fake.rest_url``."""

    def __init__(
        self,
        *,
        ping_interval_s: float = 1.0,
        pong_timeout_s: float = 60.0,
        data_interval_s: float = 0.05,
        max_messages_per_s: int = 5,
        max_streams_per_connection: int = 1024,
        symbols: Sequence[str] = DEFAULT_SYMBOLS,
        spaced_payloads: bool = False,
        reject_unknown_symbols: bool = False,
        keep_trading: bool = False,
        max_connection_attempts: int = 300,
        attempt_window_s: float = 300.0,
        rest_weight_limit: int = 6000,
        ban_s: float = 120.0,
    ) -> None:
        """``spaced_payloads`` writes payloads with spaces after separators (still valid JSON) so a test can
        tell a verbatim payload from a re-encoded one; ``reject_unknown_symbols`` answers a SUBSCRIBE that
        names a symbol outside ``symbols`` with Binance's "invalid stream" error (for the whole request)."""
        self.ping_interval_s = ping_interval_s
        self.pong_timeout_s = pong_timeout_s
        self.data_interval_s = data_interval_s
        self.max_messages_per_s = max_messages_per_s
        self.max_streams_per_connection = max_streams_per_connection
        self.symbols = tuple(symbol.upper() for symbol in symbols)
        self.spaced_payloads = spaced_payloads
        self.reject_unknown_symbols = reject_unknown_symbols
        self.keep_trading = keep_trading
        self.max_connection_attempts = max_connection_attempts
        self.attempt_window_s = attempt_window_s
        self.rest_weight_limit = rest_weight_limit
        self.ban_s = ban_s
        self.connections: list[FakeConnection] = []
        self.connection_attempts = 0
        self.attempt_times: list[float] = []  # monotonic time of every handshake attempt
        self.attempts_refused = 0  # attempts over the limit (answered 429)
        self.rest_log: list[tuple[float, str, int]] = []  # (monotonic time, path with query, status)
        self._rest_script: list[tuple[int, float]] = []
        self._rest_minute = -1
        self._rest_used = 0
        self._rest_blocked_until = 0.0  # wall clock: 429'd until then; a request before it is banned (418)
        self._rest_banned_until = 0.0
        self._traded: set[str] = set()  # with keep_trading: every stream ever subscribed
        self.wall_clock: Callable[[], float] = time.time  # the REST weight minutes (tests may pin it)
        self.rest_requests: list[str] = []
        self.rest_delay_s = 0.0
        self._rest_failures = 0
        self._rest_failure_status = http.HTTPStatus.INTERNAL_SERVER_ERROR
        self.sent: dict[str, list[bytes]] = {}  # stream -> payloads generated, in order
        self._generator = _PayloadGenerator()
        self._stalled_until = 0.0
        self._fail_next = 0
        self._fail_status = http.HTTPStatus.SERVICE_UNAVAILABLE
        self._server: Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._port = 0

    # ---- lifecycle ----

    async def __aenter__(self) -> Self:
        self._server = await serve(
            self._handle,
            "127.0.0.1",
            0,
            process_request=self._process_request,
            create_connection=_CountingConnection,
            ping_interval=None,  # the fake sends its own pings so that stall() can stop them
            close_timeout=1,
            compression=None,
        )
        self._port = self._server.sockets[0].getsockname()[1]
        self._spawn(self._tick_forever())
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self._port}"

    @property
    def rest_url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    # ---- what tests look at ----

    @property
    def open_connections(self) -> list[FakeConnection]:
        return [connection for connection in self.connections if not connection.closed]

    def subscription_counts(self) -> list[int]:
        """Streams held by each open connection."""
        return [len(connection.subscriptions) for connection in self.open_connections]

    def subscribed(self) -> set[str]:
        """Union of the open connections' subscriptions."""
        return {stream for connection in self.open_connections for stream in connection.subscriptions}

    # ---- fault controls ----

    def drop_all(self) -> int:
        """Abort every open connection without a close frame (a network failure); returns how many."""
        dropped = 0
        for connection in self.open_connections:
            if connection.ws is not None:
                connection.close_reason = connection.close_reason or "dropped"
                connection.ws.transport.abort()
                dropped += 1
        return dropped

    def stall(self, seconds: float) -> None:
        """Send no data and no pings (on any connection) for ``seconds``; connections stay open."""
        self._stalled_until = time.monotonic() + seconds

    @property
    def stalled(self) -> bool:
        return time.monotonic() < self._stalled_until

    def fail_next_connections(self, count: int, status: int = 503) -> None:
        """Answer the next ``count`` WebSocket handshakes with HTTP ``status`` instead of upgrading."""
        self._fail_next = count
        self._fail_status = http.HTTPStatus(status)

    def fail_next_rest(self, count: int, status: int = 500) -> None:
        """Answer the next ``count`` REST calls with HTTP ``status`` (429 and 418 carry ``Retry-After: 1``)."""
        self._rest_failures = count
        self._rest_failure_status = http.HTTPStatus(status)

    def script_rest(self, *statuses: int, retry_after_s: float = 1.0) -> None:
        """Answer the next REST calls with these statuses, in order (429/418 with ``Retry-After``), then normally."""
        self._rest_script.extend((status, retry_after_s) for status in statuses)

    @property
    def rest_used_weight(self) -> int:
        """Weight used in the current minute, as the fake counts it."""
        return self._rest_used if self._rest_minute == int(self.wall_clock() // 60) else 0

    def rest_statuses(self, endpoint: str) -> list[int]:
        return [status for _, path, status in self.rest_log if urlsplit(path).path == f"/api/v3/{endpoint}"]

    async def drop_mid_burst(self, streams: Iterable[str], count: int, delivered: int) -> None:
        """A burst of ``count`` events on each of ``streams``: the first ``delivered`` reach the subscribed
        connections, then every connection is aborted (no close frame) and the rest are generated but never sent
        (they exist for REST, like trades that happened while a client was away)."""
        connections = [c for c in self.open_connections if c.ws is not None and c.close_reason is None]
        for index in range(count):
            if index == delivered:
                self.drop_all()
            for stream in streams:
                payload = self._generate(stream)
                if index < delivered:
                    for connection in connections:
                        if stream in connection.subscriptions:
                            frame = combined_frame(stream, payload) if connection.combined else payload
                            await self._send(connection, frame)

    def rest_calls(self, endpoint: str) -> list[str]:
        """Recorded REST request paths (with query) of one endpoint, e.g. ``"klines"``."""
        return [path for path in self.rest_requests if urlsplit(path).path == f"/api/v3/{endpoint}"]

    async def send_server_shutdown(self) -> int:
        """Send the ``serverShutdown`` event (combined or raw form, per connection); returns how many."""
        payload = orjson.dumps({"e": "serverShutdown", "E": int(time.time() * 1000)})
        sent = 0
        for connection in self.open_connections:
            frame = combined_frame("!serverShutdown", payload) if connection.combined else payload
            if await self._send(connection, frame):
                sent += 1
        return sent

    async def send_garbage(self, frames: Iterable[str | bytes] = GARBAGE_FRAMES) -> int:
        """Send each of ``frames`` (str: text frame, bytes: binary frame) on every open connection;
        returns the number of frames sent in total."""
        frames = list(frames)
        sent = 0
        for connection in self.open_connections:
            for frame in frames:
                if connection.ws is None:
                    break
                try:
                    await connection.ws.send(frame)
                except ConnectionClosed:
                    break
                sent += 1
        return sent

    # ---- HTTP ----

    async def _process_request(self, ws: ServerConnection, request: Request) -> Response | None:
        parts = urlsplit(request.path)
        path, query = parts.path, parse_qs(parts.query)
        if path.startswith("/api/"):
            self.rest_requests.append(request.path)
            if self.rest_delay_s:
                await asyncio.sleep(self.rest_delay_s)
            response = self._rest_limited(path, query)
            self.rest_log.append((time.monotonic(), request.path, response.status_code))
            return response
        if path not in ("/ws", "/stream") and not path.startswith("/ws/"):
            return _json_response(http.HTTPStatus.NOT_FOUND, {"code": -1, "msg": f"no route {path}"})
        self.connection_attempts += 1
        now = time.monotonic()
        recent = [t for t in self.attempt_times if t > now - self.attempt_window_s]
        self.attempt_times.append(now)
        if len(recent) >= self.max_connection_attempts:
            self.attempts_refused += 1
            response = ws.respond(http.HTTPStatus.TOO_MANY_REQUESTS, "too many connection attempts\n")
            response.headers["Retry-After"] = str(max(1, round(recent[0] + self.attempt_window_s - now)))
            return response
        if self._fail_next > 0:
            self._fail_next -= 1
            return ws.respond(self._fail_status, "fake failure\n")
        combined = path == "/stream"
        names: list[str] = []
        if combined and "streams" in query:
            names = [name for name in query["streams"][0].split("/") if name]
        elif path.startswith("/ws/"):
            # /ws/<stream>; /ws/0 and other non-stream names are accepted with no subscription, like ccxt's.
            names = [path[len("/ws/") :]]
        initial: set[str] = set()
        for name in names:
            try:
                initial.add(parse_stream(name).name)
            except ProtocolError:
                if combined:
                    return ws.respond(http.HTTPStatus.BAD_REQUEST, f"invalid stream {name}\n")
        if len(initial) > self.max_streams_per_connection:
            return ws.respond(http.HTTPStatus.BAD_REQUEST, "too many streams\n")
        record = FakeConnection(number=len(self.connections), path=request.path, combined=combined)
        record.subscriptions = initial
        record.max_subscriptions = len(initial)
        assert isinstance(ws, _CountingConnection)
        ws.record, ws.fake = record, self
        return None

    def _rest_limited(self, path: str, query: dict[str, list[str]]) -> Response:
        """Scripted faults first, then Binance's weight rules (429 over the limit, 418 for calling during a 429)."""
        now = self.wall_clock()
        if self._rest_failures > 0:
            self._rest_failures -= 1
            return self._rest_error(self._rest_failure_status, 1.0)
        if self._rest_script:
            status, retry_after = self._rest_script.pop(0)
            return self._rest_error(http.HTTPStatus(status), retry_after)
        if now < self._rest_banned_until:
            return self._rest_error(http.HTTPStatus.IM_A_TEAPOT, self._rest_banned_until - now)
        if now < self._rest_blocked_until:
            self._rest_banned_until = now + self.ban_s
            return self._rest_error(http.HTTPStatus.IM_A_TEAPOT, self.ban_s)
        minute = int(now // 60)
        if minute != self._rest_minute:
            self._rest_minute, self._rest_used = minute, 0
        weight = _REST_WEIGHTS.get(path, 1)
        if self._rest_used + weight > self.rest_weight_limit:
            self._rest_blocked_until = (minute + 1) * 60
            return self._rest_error(http.HTTPStatus.TOO_MANY_REQUESTS, self._rest_blocked_until - now)
        self._rest_used += weight
        response = self._rest(path, query)
        response.headers["X-MBX-USED-WEIGHT-1M"] = str(self._rest_used)
        return response

    def _rest_error(self, status: http.HTTPStatus, retry_after_s: float) -> Response:
        response = _json_response(status, {"code": -1003 if status in (418, 429) else -1000, "msg": "fake"})
        response.headers["X-MBX-USED-WEIGHT-1M"] = str(self.rest_used_weight)
        if status in (418, 429):
            response.headers["Retry-After"] = str(max(1, round(retry_after_s)))
        return response

    def _trades(self, query: dict[str, list[str]], kind: str) -> Response:
        """aggTrades / historicalTrades from what the fake generated for ``<symbol>@aggTrade`` / ``@trade``."""
        symbol = query.get("symbol", [""])[0]
        if symbol not in self.symbols:
            return _json_response(http.HTTPStatus.BAD_REQUEST, {"code": -1121, "msg": "Invalid symbol."})
        limit = int(query.get("limit", ["500"])[0])
        if not 1 <= limit <= 1000:
            return _json_response(http.HTTPStatus.BAD_REQUEST, {"code": -1130, "msg": "Invalid limit."})
        events = [orjson.loads(payload) for payload in self.sent.get(f"{symbol.lower()}@{kind}", [])]
        key = "a" if kind == "aggTrade" else "t"
        if "fromId" in query:
            from_id = int(query["fromId"][0])
            events = [event for event in events if event[key] >= from_id][:limit]
        else:
            events = events[-limit:]
        if kind == "aggTrade":
            fields = ("a", "p", "q", "f", "l", "T", "m", "M")
            rows: list[dict[str, Any]] = [{key: event[key] for key in fields} for event in events]
        else:
            rows = [
                {
                    "id": event["t"], "price": event["p"], "qty": event["q"],
                    "quoteQty": f"{float(event['p']) * float(event['q']):.8f}", "time": event["T"],
                    "isBuyerMaker": event["m"], "isBestMatch": event["M"],
                }
                for event in events
            ]  # fmt: skip
        return _json_response(http.HTTPStatus.OK, rows)

    def _rest(self, path: str, query: dict[str, list[str]]) -> Response:
        if path == "/api/v3/aggTrades":
            return self._trades(query, "aggTrade")
        if path == "/api/v3/historicalTrades":
            return self._trades(query, "trade")
        if path == "/api/v3/ping":
            return _json_response(http.HTTPStatus.OK, {})
        if path == "/api/v3/time":
            return _json_response(http.HTTPStatus.OK, {"serverTime": int(time.time() * 1000)})
        if path == "/api/v3/exchangeInfo":
            symbols = list(self.symbols)
            if "symbol" in query:
                symbols = [query["symbol"][0].upper()]
            elif "symbols" in query:
                try:
                    asked = json.loads(query["symbols"][0])
                except ValueError:
                    return _json_response(http.HTTPStatus.BAD_REQUEST, {"code": -1100, "msg": "bad symbols"})
                symbols = [str(symbol).upper() for symbol in asked]
            unknown = [symbol for symbol in symbols if symbol not in self.symbols]
            if unknown:
                return _json_response(http.HTTPStatus.BAD_REQUEST, {"code": -1121, "msg": "Invalid symbol."})
            return _json_response(http.HTTPStatus.OK, exchange_info(symbols))
        if path == "/api/v3/klines":
            return self._klines(query)
        if path == "/api/v3/depth":
            symbol = query.get("symbol", [""])[0]
            if symbol not in self.symbols:
                return _json_response(http.HTTPStatus.BAD_REQUEST, {"code": -1121, "msg": "Invalid symbol."})
            levels = min(int(query.get("limit", ["100"])[0]), 5000)
            price = 100.0 + zlib.crc32(symbol.encode()) % 90_000
            book = {
                "lastUpdateId": 1_000_000,
                "bids": [[f"{price - 0.01 * (i + 1):.8f}", "1.00000000"] for i in range(levels)],
                "asks": [[f"{price + 0.01 * i:.8f}", "1.00000000"] for i in range(levels)],
            }
            return _json_response(http.HTTPStatus.OK, book)
        if path == "/api/v3/ticker/price":
            if "symbols" in query:
                asked = [str(symbol) for symbol in json.loads(query["symbols"][0])]
            elif "symbol" in query:
                asked = [query["symbol"][0]]
            else:
                asked = list(self.symbols)
            if any(symbol not in self.symbols for symbol in asked):
                return _json_response(http.HTTPStatus.BAD_REQUEST, {"code": -1121, "msg": "Invalid symbol."})
            prices = [{"symbol": s, "price": f"{100.0 + zlib.crc32(s.encode()) % 90_000:.8f}"} for s in asked]
            return _json_response(http.HTTPStatus.OK, prices[0] if "symbol" in query else prices)
        return _json_response(http.HTTPStatus.NOT_FOUND, {"code": -1, "msg": f"no route {path}"})

    def _klines(self, query: dict[str, list[str]]) -> Response:
        """``GET /api/v3/klines`` with Binance's parameter rules (open times in [startTime, endTime], ``limit``
        from startTime forward or back from endTime/now, never a candle that has not opened yet)."""
        symbol = query.get("symbol", [""])[0]
        interval = query.get("interval", [""])[0]
        if symbol not in self.symbols:
            return _json_response(http.HTTPStatus.BAD_REQUEST, {"code": -1121, "msg": "Invalid symbol."})
        if interval not in _FAKE_INTERVAL_MS:
            return _json_response(http.HTTPStatus.BAD_REQUEST, {"code": -1120, "msg": "Invalid interval."})
        length = _FAKE_INTERVAL_MS[interval]
        limit = int(query.get("limit", ["500"])[0])
        if not 1 <= limit <= 1000:
            return _json_response(http.HTTPStatus.BAD_REQUEST, {"code": -1130, "msg": "Invalid limit."})
        newest = int(time.time() * 1000) // length * length
        end = min(newest, int(query["endTime"][0]) // length * length) if "endTime" in query else newest
        if "startTime" in query:
            start = -(-int(query["startTime"][0]) // length) * length
            opens = list(range(start, end + 1, length))[:limit]
        else:
            opens = list(range(end - (limit - 1) * length, end + 1, length))
        return _json_response(http.HTTPStatus.OK, [fake_kline_row(symbol, interval, t) for t in opens if t >= 0])

    # ---- WebSocket ----

    async def _handle(self, ws: ServerConnection) -> None:
        assert isinstance(ws, _CountingConnection) and ws.record is not None
        record = ws.record
        record.ws = ws
        self.connections.append(record)
        pinger = self._spawn(self._ping_forever(record, ws))
        try:
            async for message in ws:
                record.received.append(message)
                if record.close_reason is not None:
                    continue  # being disconnected for breaking a limit: answer nothing more
                await self._control(record, ws, message)
        except ConnectionClosed:
            pass
        finally:
            record.closed = True
            record.closed_at = time.monotonic()
            record.close_reason = record.close_reason or "client"
            pinger.cancel()

    async def _control(self, record: FakeConnection, ws: ServerConnection, message: str | bytes) -> None:
        try:
            request = json.loads(message)
        except ValueError as error:
            await self._reply(ws, {"error": {"code": 3, "msg": f"Invalid JSON: {error}"}, "id": None})
            return
        if not isinstance(request, dict):
            await self._reply(ws, {"error": {"code": 2, "msg": "Invalid request"}, "id": None})
            return
        request_id = request.get("id")
        if isinstance(request_id, bool) or (request_id is not None and not isinstance(request_id, int | str)):
            await self._reply(
                ws, {"error": {"code": 2, "msg": "Invalid request: request ID must be an unsigned integer"}}
            )
            return
        method = request.get("method")
        params = request.get("params", [])
        if method not in _METHODS or not isinstance(params, list):
            await self._reply(
                ws, {"error": {"code": 2, "msg": f"Invalid request: unknown variant {method}"}, "id": request_id}
            )
            return
        if method in ("SUBSCRIBE", "UNSUBSCRIBE"):
            try:
                parsed = [parse_stream(name) for name in params]
            except ProtocolError:
                parsed = []
            unknown = self.reject_unknown_symbols and any(
                stream.symbol is not None and stream.symbol not in self.symbols for stream in parsed
            )
            if len(parsed) != len(params) or (method == "SUBSCRIBE" and unknown):
                await self._reply(
                    ws, {"error": {"code": 2, "msg": "Invalid request: invalid stream"}, "id": request_id}
                )
                return
            names = {stream.name for stream in parsed}
            if method == "SUBSCRIBE":
                record.subscriptions |= names
                record.max_subscriptions = max(record.max_subscriptions, len(record.subscriptions))
                if len(record.subscriptions) > self.max_streams_per_connection:
                    record.close_reason = "too_many_streams"
                    await ws.close(1008, "Too many streams")
                    return
            else:
                record.subscriptions -= names
            await self._reply(ws, {"result": None, "id": request_id})
        elif method == "LIST_SUBSCRIPTIONS":
            await self._reply(ws, {"result": sorted(record.subscriptions), "id": request_id})
        elif method == "SET_PROPERTY":
            if params[:1] != ["combined"]:
                await self._reply(ws, {"error": {"code": 0, "msg": "Unknown property"}, "id": request_id})
            elif len(params) != 2 or not isinstance(params[1], bool):
                await self._reply(
                    ws, {"error": {"code": 1, "msg": "Invalid value type: expected Boolean"}, "id": request_id}
                )
            else:
                record.combined = params[1]
                await self._reply(ws, {"result": None, "id": request_id})
        elif params[:1] != ["combined"]:
            await self._reply(ws, {"error": {"code": 0, "msg": "Unknown property"}, "id": request_id})
        else:
            await self._reply(ws, {"result": record.combined, "id": request_id})

    async def _reply(self, ws: ServerConnection, reply: dict[str, Any]) -> None:
        try:
            await ws.send(orjson.dumps(reply), text=True)
        except ConnectionClosed:
            pass

    def _count_inbound(self, ws: ServerConnection, record: FakeConnection, frame: Frame) -> None:
        if frame.opcode is Opcode.PING:
            record.pings_received += 1
        elif frame.opcode is Opcode.PONG:
            record.pongs_received += 1
            record.last_pong_at = time.monotonic()
        if frame.opcode not in _COUNTED_OPCODES or record.close_reason is not None:
            return
        now = time.monotonic()
        window = record.inbound_times
        window.append(now)
        while window and window[0] <= now - 1.0:
            window.popleft()
        record.max_inbound_per_s = max(record.max_inbound_per_s, len(window))
        if len(window) > self.max_messages_per_s:
            record.close_reason = "rate_limit"
            self._spawn(ws.close(1008, "Too many messages"))

    async def _ping_forever(self, record: FakeConnection, ws: ServerConnection) -> None:
        try:
            while True:
                await asyncio.sleep(self.ping_interval_s)
                if self.stalled:
                    continue
                if time.monotonic() - record.last_pong_at > self.pong_timeout_s:
                    record.close_reason = "pong_timeout"
                    await ws.close(1008, "Pong timeout")
                    return
                await ws.ping()
                record.pings_sent += 1
        except ConnectionClosed:
            pass

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(self.data_interval_s)
            if self.stalled:
                continue
            await self.tick()

    async def tick(self) -> None:
        """Generate one payload per subscribed stream and send it to every subscriber."""
        connections = [c for c in self.open_connections if c.ws is not None and c.close_reason is None]
        subscribed = {stream for connection in connections for stream in connection.subscriptions}
        if self.keep_trading:
            self._traded |= subscribed
            subscribed = self._traded
        payloads = {stream: self._generate(stream) for stream in sorted(subscribed)}
        for connection in connections:
            for stream in sorted(connection.subscriptions):
                if stream not in payloads:
                    continue
                payload = payloads[stream]
                frame = combined_frame(stream, payload) if connection.combined else payload
                if not await self._send(connection, frame):
                    break

    def _generate(self, stream: str) -> bytes:
        """The next payload of ``stream``, recorded in :attr:`sent`."""
        document = self._generator.payload(parse_stream(stream))
        if self.spaced_payloads:
            payload = json.dumps(document, separators=(", ", ": ")).encode()
        else:
            payload = orjson.dumps(document)
        self.sent.setdefault(stream, []).append(payload)
        return payload

    async def _send(self, connection: FakeConnection, frame: bytes) -> bool:
        if connection.ws is None or connection.closed:
            return False
        try:
            await connection.ws.send(frame, text=True)  # Binance sends text frames
        except ConnectionClosed:
            return False
        return True

    def _spawn(self, coroutine: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


# Fixed-length intervals only (enough for tests); 1w and 1M have calendar alignment the fake does not model.
_FAKE_INTERVAL_MS = {
    "1s": 1000, "1m": 60_000, "3m": 180_000, "5m": 300_000, "15m": 900_000, "30m": 1_800_000, "1h": 3_600_000,
    "2h": 7_200_000, "4h": 14_400_000, "6h": 21_600_000, "8h": 28_800_000, "12h": 43_200_000, "1d": 86_400_000,
    "3d": 259_200_000,
}  # fmt: skip


def fake_kline_row(symbol: str, interval: str, open_time: int) -> list[Any]:
    """The fake exchange's candle for (symbol, interval, open time): deterministic, Binance's 12 elements."""
    length = _FAKE_INTERVAL_MS[interval]
    step = open_time // length
    base = 100 + zlib.crc32(symbol.encode()) % 900 + (step % 50)
    o, c = base, base + (1 if step % 3 else -1)
    return [
        open_time, f"{o:.8f}", f"{max(o, c) + 0.5:.8f}", f"{min(o, c) - 0.5:.8f}", f"{c:.8f}", "10.00000000",
        open_time + length - 1, f"{10 * c:.8f}", 7, "4.00000000", f"{4 * c:.8f}", "0",
    ]  # fmt: skip


# Request weights of the REST endpoints the fake serves (Binance's docs; depth and ticker simplified).
_REST_WEIGHTS = {
    "/api/v3/ping": 1, "/api/v3/time": 1, "/api/v3/exchangeInfo": 20, "/api/v3/klines": 2, "/api/v3/depth": 5,
    "/api/v3/ticker/price": 2, "/api/v3/aggTrades": 4, "/api/v3/historicalTrades": 25,
}  # fmt: skip


def _json_response(status: http.HTTPStatus, document: object) -> Response:
    body = orjson.dumps(document)
    headers = Headers(
        [
            ("Content-Type", "application/json;charset=UTF-8"),
            ("Content-Length", str(len(body))),
            ("Connection", "close"),
        ]
    )
    return Response(status.value, status.phrase, headers, body)


class _PayloadGenerator:
    """Binance-shaped payloads with per-stream counters: trade ids, aggregate ids and book update ids are
    contiguous, so tests can detect loss, duplication and reordering."""

    def __init__(self) -> None:
        self._counters: dict[str, int] = {}
        self._prices: dict[str, float] = {}

    def _next(self, key: str) -> int:
        value = self._counters.get(key, 1_000_000) + 1
        self._counters[key] = value
        return value

    def _price(self, symbol: str) -> float:
        # Deterministic per symbol, drifting by one tick per call.
        price = self._prices.get(symbol, 100.0 + zlib.crc32(symbol.encode()) % 90_000)
        price += 0.01 if self._next(symbol + ":walk") % 3 else -0.02
        self._prices[symbol] = price
        return price

    def payload(self, stream: Stream) -> object:
        now = int(time.time() * 1000)
        if stream.kind is StreamKind.MINI_TICKER_ARR:
            return [self._mini_ticker(symbol, now) for symbol in DEFAULT_SYMBOLS]
        symbol = stream.symbol or "BTCUSDT"
        price = self._price(symbol)
        p, q = f"{price:.8f}", "0.00210000"
        builders: dict[StreamKind, Callable[[], object]] = {
            StreamKind.TRADE: lambda: {
                "e": "trade",
                "E": now,
                "s": symbol,
                "t": self._next(stream.name),
                "p": p,
                "q": q,
                "T": now - 1,
                "m": True,
                "M": True,
            },
            StreamKind.AGG_TRADE: lambda: self._agg_trade(stream.name, symbol, now, p, q),
            StreamKind.BOOK_TICKER: lambda: {
                "u": self._next(stream.name),
                "s": symbol,
                "b": f"{price - 0.01:.8f}",
                "B": "2.10456000",
                "a": p,
                "A": "0.50321000",
            },
            StreamKind.KLINE: lambda: self._kline(stream, symbol, now, p),
            StreamKind.MINI_TICKER: lambda: self._mini_ticker(symbol, now),
            StreamKind.TICKER: lambda: {
                "e": "24hrTicker",
                "E": now,
                "s": symbol,
                "p": "1.00000000",
                "P": "0.100",
                "w": p,
                "x": p,
                "c": p,
                "Q": q,
                "b": p,
                "B": "1.00000000",
                "a": p,
                "A": "1.00000000",
                "o": p,
                "h": p,
                "l": p,
                "v": "10.00000000",
                "q": "1000.00000000",
                "O": now - 86_400_000,
                "C": now,
                "F": 1,
                "L": 2,
                "n": 2,
            },
            StreamKind.DEPTH_PARTIAL: lambda: {
                "lastUpdateId": self._next(stream.name),
                "bids": [[f"{price - 0.01 * (i + 1):.8f}", q] for i in range(stream.levels or 5)],
                "asks": [[f"{price + 0.01 * i:.8f}", q] for i in range(stream.levels or 5)],
            },
            StreamKind.DEPTH: lambda: self._depth_update(stream.name, symbol, now, p, q),
            StreamKind.AVG_PRICE: lambda: {"e": "avgPrice", "E": now, "s": symbol, "i": "5m", "w": p, "T": now},
        }
        return builders[stream.kind]()

    def _agg_trade(self, name: str, symbol: str, now: int, p: str, q: str) -> object:
        first = self._next(name + ":trade")
        return {
            "e": "aggTrade",
            "E": now,
            "s": symbol,
            "a": self._next(name),
            "p": p,
            "q": q,
            "f": first,
            "l": first,
            "T": now - 1,
            "m": False,
            "M": True,
        }

    def _depth_update(self, name: str, symbol: str, now: int, p: str, q: str) -> object:
        last = self._next(name)
        return {"e": "depthUpdate", "E": now, "s": symbol, "U": last, "u": last, "b": [[p, q]], "a": []}

    def _kline(self, stream: Stream, symbol: str, now: int, p: str) -> object:
        start = now - now % 60_000
        return {
            "e": "kline",
            "E": now,
            "s": symbol,
            "k": {
                "t": start,
                "T": start + 59_999,
                "s": symbol,
                "i": stream.interval,
                "f": 1,
                "L": 2,
                "o": p,
                "c": p,
                "h": p,
                "l": p,
                "v": "1.00000000",
                "n": 2,
                "x": False,
                "q": "100.00000000",
                "V": "0.50000000",
                "Q": "50.00000000",
                "B": "0",
            },
        }

    def _mini_ticker(self, symbol: str, now: int) -> object:
        p = f"{self._prices.get(symbol, 100.0):.8f}"
        return {
            "e": "24hrMiniTicker",
            "E": now,
            "s": symbol,
            "c": p,
            "o": p,
            "h": p,
            "l": p,
            "v": "10.00000000",
            "q": "1000.00000000",
        }
