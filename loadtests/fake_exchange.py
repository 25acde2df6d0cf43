"""A fast fake Binance for the ingest firehose benchmark: the REST calls ingest makes at start and the combined
market-stream endpoint, pushing ``@trade``, ``@bookTicker`` and ``@depth@100ms`` events of N symbols at a rate the
benchmark sets.

    python -m loadtests.fake_exchange --symbols 2000 [--port 0]

It is a lean asyncio protocol (uvloop when installed) with hand-written HTTP and WebSocket frames, so one core
pushes well over 100 000 messages/s; ``tests/fake_binance.py`` is the faithful but slow fake of the test suite
(loadtests do not import tests). What it speaks, as Binance does (``/work/shared/binance-protocol.md``):

- ``GET /api/v3/exchangeInfo`` (every symbol, ``TRADING``), ``/api/v3/ping``, ``/api/v3/time``; the trade
  endpoints backfill would call answer ``[]`` (the fake keeps no trades: a gap would show up as lost trades).
  Keep-alive, ``Content-Length``, ``X-MBX-USED-WEIGHT-1M``.
- ``GET /stream`` upgraded to a WebSocket (no extensions): SUBSCRIBE / UNSUBSCRIBE / LIST_SUBSCRIPTIONS with
  ``{"result":null,"id":…}`` replies and Binance's ``{"error":{"code":2,"msg":"Invalid request: …"},"id":…}``
  envelope for a bad request or stream; more than 1024 streams, or more than 5 inbound messages in a second
  (text, ping, pong), closes the connection with 1008 like Binance does; a ping every 20 s; pongs answer pings.
- Combined frames ``{"stream":"<name>","data":{…}}``: trades with contiguous ``t`` per stream, diff depth with
  contiguous ``U``..``u`` ranges, bookTicker with rising ``u``, so ingest sees no gap and no duplicate.
  ``E`` is the send time in **microseconds** (Binance's ``timeUnit=MICROSECOND`` shape) so the benchmark's Redis
  subscriber measures exchange-send -> Redis-delivery lag with one byte search. Spot bookTicker carries no
  ``E`` (as on Binance); those messages are counted, not timed.

Control is one JSON command per line on stdin, answered by one JSON line on stdout (like ``loadtests.publisher``):
``{"cmd":"status"}`` -> connections, subscribed streams and what the fake saw of the control protocol;
``{"cmd":"run","rate":R,"duration":D}`` -> pushes R messages/s, spread evenly over every subscribed stream (one
global round robin, sent every millisecond), for D seconds, then answers what it sent (``offered``), how far its
schedule ever fell behind and its own CPU time; ``{"cmd":"quit"}``. It prints ``{"event":"ready","port":…}`` once
listening, and exits when stdin closes.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import hashlib
import itertools
import json
import resource
import string
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import orjson

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_STREAMS_PER_CONNECTION = 1024
MAX_INBOUND_PER_S = 5
PING_INTERVAL_S = 20.0
TICK_S = 0.001  # the pump sends what is due every millisecond
MAX_WRITE_BUFFER = 256 * 2**20  # a reader this far behind is cut off (Binance drops slow consumers too)
KINDS = ("trade", "bookTicker", "depth@100ms")
FIRST_ID = 1_000_000


def symbol_names(count: int) -> list[str]:
    """``count`` distinct 8-character symbols (four letters + USDT), deterministic: 2 000 symbols' three streams fit
    in one environment variable (Linux caps one at 128 KiB) as ``PRICEGATE_ALWAYS_ON_STREAMS``."""
    letters = string.ascii_uppercase
    names = []
    for combo in itertools.product(letters, repeat=4):
        names.append("".join(combo) + "USDT")
        if len(names) == count:
            break
    return names


def stream_names(symbols: Sequence[str]) -> list[str]:
    """Every symbol's three streams, canonical names (lowercase symbol)."""
    return [f"{symbol.lower()}@{kind}" for symbol in symbols for kind in KINDS]


def _price(symbol: str) -> str:
    return f"{100 + sum(symbol.encode()) % 900}.{sum(symbol.encode()) % 100:02d}000000"


class StreamState:
    """One stream's frame template and id counter: :meth:`frame` is the next combined frame, ``E`` = ``now_us``."""

    __slots__ = ("kind", "name", "next_id", "template")

    def __init__(self, name: str) -> None:
        symbol_lower, kind = name.split("@", 1)
        symbol = symbol_lower.upper().encode()
        price = _price(symbol_lower.upper()).encode()
        self.name = name
        self.kind = kind
        self.next_id = FIRST_ID
        head = b'{"stream":"' + name.encode() + b'","data":'
        if kind == "trade":
            self.template = head + (
                b'{"e":"trade","E":%d,"s":"' + symbol + b'","t":%d,"p":"' + price + b'","q":"0.00210000","T":%d,'
                b'"m":true,"M":true}}'
            )
        elif kind == "bookTicker":
            self.template = head + (
                b'{"u":%d,"s":"' + symbol + b'","b":"' + price + b'","B":"2.10456000","a":"' + price + b'",'
                b'"A":"0.50321000"}}'
            )
        elif kind == "depth@100ms":
            self.template = head + (
                b'{"e":"depthUpdate","E":%d,"s":"' + symbol + b'","U":%d,"u":%d,"b":[["' + price + b'","1.90456000"],'
                b'["' + price + b'","0.00000000"]],"a":[["' + price + b'","0.51321000"]]}}'
            )
        else:
            raise ValueError(f"the fake exchange streams trade, bookTicker and depth@100ms, not {name!r}")

    def frame(self, now_us: int) -> bytes:
        """The next event's combined frame (the WebSocket payload)."""
        ident = self.next_id
        kind = self.kind
        if kind == "trade":
            self.next_id = ident + 1
            return self.template % (now_us, ident, now_us // 1000)
        if kind == "bookTicker":
            self.next_id = ident + 1
            return self.template % ident
        self.next_id = ident + 3  # a diff-depth event covers three update ids: U..u, the next starts at u + 1
        return self.template % (now_us, ident, ident + 2)


_HEADERS: dict[int, bytes] = {}


def text_header(length: int) -> bytes:
    """An unmasked, final text frame's header (server to client)."""
    header = _HEADERS.get(length)
    if header is None:
        if length < 126:
            header = bytes((0x81, length))
        elif length < 65536:
            header = b"\x81\x7e" + length.to_bytes(2, "big")
        else:
            header = b"\x81\x7f" + length.to_bytes(8, "big")
        if len(_HEADERS) < 4096:
            _HEADERS[length] = header
    return header


def control_frame(opcode: int, payload: bytes = b"") -> bytes:
    return bytes((0x80 | opcode, len(payload))) + payload


def parse_client_frame(buf: bytes | bytearray, pos: int) -> tuple[int, bytes, int] | None:
    """One masked client frame at ``pos``: ``(opcode, unmasked payload, next pos)``, or None while incomplete.
    (Fragmented messages are not used by clients for control JSON; a continuation is returned as is.)"""
    if len(buf) - pos < 2:
        return None
    first, second = buf[pos], buf[pos + 1]
    length = second & 0x7F
    cursor = pos + 2
    if length == 126:
        if len(buf) - cursor < 2:
            return None
        length = int.from_bytes(buf[cursor : cursor + 2], "big")
        cursor += 2
    elif length == 127:
        if len(buf) - cursor < 8:
            return None
        length = int.from_bytes(buf[cursor : cursor + 8], "big")
        cursor += 8
    mask = b""
    if second & 0x80:
        if len(buf) - cursor < 4:
            return None
        mask = bytes(buf[cursor : cursor + 4])
        cursor += 4
    if len(buf) - cursor < length:
        return None
    data = bytes(buf[cursor : cursor + length])
    if mask:
        repeated = (mask * (length // 4 + 1))[:length]
        data = (int.from_bytes(data, "big") ^ int.from_bytes(repeated, "big")).to_bytes(length, "big")
    return first & 0x0F, data, cursor + length


@dataclass
class Stats:
    """What the fake saw of the control protocol, over all connections (``status``)."""

    connections_opened: int = 0
    control_messages: int = 0
    subscribe_requests: int = 0
    errors_sent: int = 0
    closed_for_limits: list[str] = field(default_factory=list)
    max_inbound_per_s: int = 0
    max_streams_per_connection: int = 0
    rest_requests: dict[str, int] = field(default_factory=dict)


class FakeExchange:
    def __init__(self, symbols: Sequence[str]) -> None:
        self.symbols = list(symbols)
        self.known = {name: StreamState(name) for name in stream_names(self.symbols)}
        self.connections: list[_Connection] = []
        self.stats = Stats()
        self._exchange_info = orjson.dumps(exchange_info(self.symbols))
        self.server: asyncio.Server | None = None

    async def start(self, port: int = 0) -> int:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _Connection(self), "127.0.0.1", port)
        return int(self.server.sockets[0].getsockname()[1])

    # ---- REST ----

    def rest(self, path: str) -> tuple[int, bytes]:
        endpoint = path.split("?", 1)[0]
        self.stats.rest_requests[endpoint] = self.stats.rest_requests.get(endpoint, 0) + 1
        if endpoint == "/api/v3/exchangeInfo":
            return 200, self._exchange_info
        if endpoint == "/api/v3/ping":
            return 200, b"{}"
        if endpoint == "/api/v3/time":
            return 200, b'{"serverTime":%d}' % (time.time_ns() // 1_000_000)
        if endpoint in ("/api/v3/historicalTrades", "/api/v3/aggTrades"):
            return 200, b"[]"
        return 404, b'{"code":-1000,"msg":"the fake exchange does not serve this endpoint"}'

    # ---- streams ----

    def subscribed(self) -> int:
        return sum(len(connection.streams) for connection in self.connections)

    async def run(self, rate: float, duration: float) -> dict[str, Any]:
        """Push ``rate`` messages/s for ``duration`` s over every subscribed stream, evenly (module docstring)."""
        plan = [(connection, self.known[name]) for connection in self.connections for name in connection.streams]
        # No collection pauses while pushing: a paused fake sends the missed milliseconds in one burst afterwards
        # (the frames are stamped when sent, so the pause itself is never counted as lag, the burst is).
        gc.collect()
        gc.disable()
        usage0 = resource.getrusage(resource.RUSAGE_SELF)
        started = time.monotonic()
        total = max(0, round(rate * duration)) if plan else 0
        sent = 0
        cursor = 0
        behind = 0.0
        per_kind = dict.fromkeys(KINDS, 0)
        sizes = 0
        count = len(plan)
        header = text_header
        while sent < total:
            now = time.monotonic()
            due = min(total, int((now - started) * rate) + 1)
            if due > sent:
                behind = max(behind, (now - started) - sent / rate)
                now_us = time.time_ns() // 1000
                touched: set[_Connection] = set()
                for _ in range(due - sent):
                    connection, stream = plan[cursor]
                    cursor = cursor + 1 if cursor + 1 < count else 0
                    payload = stream.frame(now_us)
                    connection.pending.append(header(len(payload)))
                    connection.pending.append(payload)
                    sizes += len(payload)
                    per_kind[stream.kind] += 1
                    touched.add(connection)
                for connection in touched:
                    connection.flush()
                sent = due
            await asyncio.sleep(TICK_S)
        elapsed = time.monotonic() - started
        gc.enable()
        usage1 = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "event": "ran",
            "rate": rate,
            "offered": sent,
            "per_kind": per_kind,
            "streams": count,
            "connections": len({id(connection) for connection, _ in plan}),
            "elapsed_s": round(elapsed, 4),
            "achieved_per_s": round(sent / max(elapsed, 1e-9), 1),
            "max_behind_ms": round(behind * 1000, 3),
            "mean_payload_bytes": round(sizes / sent, 1) if sent else 0,
            "cpu_s": round(usage1.ru_utime + usage1.ru_stime - usage0.ru_utime - usage0.ru_stime, 4),
        }

    def status(self) -> dict[str, Any]:
        stats = self.stats
        return {
            "event": "status",
            "connections": len(self.connections),
            "subscribed": self.subscribed(),
            "distinct_streams": len({name for connection in self.connections for name in connection.streams}),
            "connections_opened": stats.connections_opened,
            "control_messages": stats.control_messages,
            "subscribe_requests": stats.subscribe_requests,
            "errors_sent": stats.errors_sent,
            "closed_for_limits": stats.closed_for_limits,
            "max_inbound_per_s": stats.max_inbound_per_s,
            "max_streams_per_connection": stats.max_streams_per_connection,
            "rest_requests": stats.rest_requests,
        }


class _Connection(asyncio.Protocol):
    """One client connection: HTTP requests until an upgrade to a WebSocket on ``/stream``."""

    def __init__(self, exchange: FakeExchange) -> None:
        self.exchange = exchange
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.websocket = False
        self.streams: dict[str, None] = {}  # subscribed, in order (dict: ordered set)
        self.pending: list[bytes] = []
        self.inbound: deque[float] = deque()
        self.closing = False
        self.pinger: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not asyncio.Transport's

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        if self in self.exchange.connections:
            self.exchange.connections.remove(self)
        if self.pinger is not None:
            self.pinger.cancel()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.websocket:
            self._frames()
        else:
            self._http()

    # ---- HTTP ----

    def _http(self) -> None:
        while not self.websocket and not self.closing:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end]).decode("latin-1")
            del self.buffer[: end + 4]
            request_line, *header_lines = head.split("\r\n")
            parts = request_line.split(" ")
            path = parts[1] if len(parts) == 3 else "/"
            headers = {}
            for line in header_lines:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            if path.split("?", 1)[0] == "/stream" and headers.get("upgrade", "").lower() == "websocket":
                self._upgrade(headers)
                return
            status, body = self.exchange.rest(path)
            reason = "OK" if status == 200 else "Not Found"
            assert self.transport is not None
            self.transport.write(
                b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                b"X-MBX-USED-WEIGHT-1M: 20\r\n\r\n%b" % (status, reason.encode(), len(body), body)
            )
            if headers.get("connection", "").lower() == "close":
                self.closing = True
                self.transport.close()

    def _upgrade(self, headers: dict[str, str]) -> None:
        assert self.transport is not None
        accept = base64.b64encode(hashlib.sha1(headers.get("sec-websocket-key", "").encode() + WS_GUID).digest())
        self.transport.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: %b\r\n\r\n" % accept
        )
        self.websocket = True
        self.exchange.connections.append(self)
        self.exchange.stats.connections_opened += 1
        self.pinger = asyncio.get_running_loop().call_later(PING_INTERVAL_S, self._ping)
        if self.buffer:
            self._frames()

    # ---- WebSocket ----

    def _ping(self) -> None:
        if self.closing or self.transport is None:
            return
        self.flush()
        self.transport.write(control_frame(0x9, b"%d" % (time.time_ns() // 1_000_000)))
        self.pinger = asyncio.get_running_loop().call_later(PING_INTERVAL_S, self._ping)

    def flush(self) -> None:
        if self.pending and not self.closing and self.transport is not None:
            self.transport.write(b"".join(self.pending))
            if self.transport.get_write_buffer_size() > MAX_WRITE_BUFFER:
                self._close(1008, "Slow consumer", "slow_consumer")
        self.pending.clear()

    def _close(self, code: int, reason: str, record: str | None = None) -> None:
        if self.closing or self.transport is None:
            return
        if record is not None:
            self.exchange.stats.closed_for_limits.append(record)
        self.pending.clear()
        self.transport.write(control_frame(0x8, code.to_bytes(2, "big") + reason.encode()))
        self.closing = True
        if self in self.exchange.connections:
            self.exchange.connections.remove(self)
        self.transport.close()

    def _count_inbound(self) -> bool:
        now = time.monotonic()
        window = self.inbound
        window.append(now)
        while window and window[0] <= now - 1.0:
            window.popleft()
        stats = self.exchange.stats
        stats.max_inbound_per_s = max(stats.max_inbound_per_s, len(window))
        if len(window) > MAX_INBOUND_PER_S:
            self._close(1008, "Too many messages", "rate_limit")
            return False
        return True

    def _frames(self) -> None:
        pos = 0
        while not self.closing:
            parsed = parse_client_frame(self.buffer, pos)
            if parsed is None:
                break
            opcode, payload, pos = parsed
            if opcode in (0x1, 0x2, 0x9, 0xA) and not self._count_inbound():
                return
            if opcode == 0x1:
                self._control(payload)
            elif opcode == 0x9:
                self.flush()
                assert self.transport is not None
                self.transport.write(control_frame(0xA, payload))
            elif opcode == 0x8:
                self._close(1000, "")
                return
        del self.buffer[:pos]

    def _send_json(self, document: object) -> None:
        self.flush()
        body = orjson.dumps(document)
        assert self.transport is not None
        self.transport.write(text_header(len(body)) + body)

    def _error(self, request_id: object, message: str) -> None:
        self.exchange.stats.errors_sent += 1
        self._send_json({"error": {"code": 2, "msg": message}, "id": request_id})

    def _control(self, message: bytes) -> None:
        stats = self.exchange.stats
        stats.control_messages += 1
        try:
            request = orjson.loads(message)
        except orjson.JSONDecodeError as error:
            stats.errors_sent += 1
            self._send_json({"error": {"code": 3, "msg": f"Invalid JSON: {error}"}, "id": None})
            return
        if not isinstance(request, dict):
            self._error(None, "Invalid request")
            return
        request_id = request.get("id")
        if isinstance(request_id, bool) or not (request_id is None or isinstance(request_id, int | str)):
            self._error(None, "Invalid request: request ID must be an unsigned integer")
            return
        method = request.get("method")
        params = request.get("params", [])
        if method == "LIST_SUBSCRIPTIONS":
            self._send_json({"result": list(self.streams), "id": request_id})
            return
        if method not in ("SUBSCRIBE", "UNSUBSCRIBE") or not isinstance(params, list):
            self._error(request_id, f"Invalid request: unknown variant {method}")
            return
        known = self.exchange.known
        if any(not isinstance(name, str) or name not in known for name in params):
            self._error(request_id, "Invalid request: invalid stream")
            return
        if method == "SUBSCRIBE":
            stats.subscribe_requests += 1
            self.streams.update(dict.fromkeys(params))
            stats.max_streams_per_connection = max(stats.max_streams_per_connection, len(self.streams))
            if len(self.streams) > MAX_STREAMS_PER_CONNECTION:
                self._close(1008, "Too many streams", "too_many_streams")
                return
        else:
            for name in params:
                self.streams.pop(name, None)
        self._send_json({"result": None, "id": request_id})


def exchange_info(symbols: Sequence[str]) -> dict[str, Any]:
    """Binance's exchangeInfo document for ``symbols`` (the quote asset read off the name); the test suite's fake
    Binance (tests/fake_binance.py) serves the same one."""

    def describe(symbol: str) -> dict[str, Any]:
        quote = next((q for q in ("USDT", "BTC", "ETH", "BNB") if symbol.endswith(q) and symbol != q), "USDT")
        return {
            "symbol": symbol,
            "status": "TRADING",
            "baseAsset": symbol[: -len(quote)],
            "baseAssetPrecision": 8,
            "quoteAsset": quote,
            "quotePrecision": 8,
            "quoteAssetPrecision": 8,
            "filters": [
                {
                    "filterType": "PRICE_FILTER",
                    "minPrice": "0.01000000",
                    "maxPrice": "1000000.00000000",
                    "tickSize": "0.01000000",
                },
                {
                    "filterType": "LOT_SIZE",
                    "minQty": "0.00001000",
                    "maxQty": "9000.00000000",
                    "stepSize": "0.00001000",
                },
            ],
            "permissions": [],
            "permissionSets": [["SPOT"]],
        }

    return {
        "timezone": "UTC",
        "serverTime": int(time.time() * 1000),
        "rateLimits": [
            {"rateLimitType": "REQUEST_WEIGHT", "interval": "MINUTE", "intervalNum": 1, "limit": 6000},
            {"rateLimitType": "RAW_REQUESTS", "interval": "MINUTE", "intervalNum": 5, "limit": 61000},
        ],
        "exchangeFilters": [],
        "symbols": [describe(symbol) for symbol in symbols],
    }


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def main_async(args: argparse.Namespace) -> None:
    exchange = FakeExchange(symbol_names(args.symbols))
    port = await exchange.start(args.port)
    _emit({"event": "ready", "port": port, "symbols": len(exchange.symbols), "streams": len(exchange.known)})
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    handlers: dict[str, Callable[[dict[str, Any]], Any]] = {
        "status": lambda _: exchange.status(),
    }
    while True:
        line = await reader.readline()
        if not line:
            return  # the orchestrator went away
        command = json.loads(line)
        name = command.get("cmd")
        if name == "run":
            _emit(await exchange.run(float(command["rate"]), float(command["duration"])))
        elif name == "quit":
            return
        elif name in handlers:
            _emit(handlers[name](command))
        else:
            _emit({"event": "error", "error": f"unknown command {name!r}"})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--symbols", type=int, default=2000, help="how many symbols (three streams each)")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: a free one, printed)")
    args = parser.parse_args(argv)
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        runner.run(main_async(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
