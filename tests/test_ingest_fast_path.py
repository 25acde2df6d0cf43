"""Ingest's per-message fast path gives the same answers as the general one: data frames cut out of received bytes
(``wire.read_data_frames``), market-data frames read without a ``DataFrame`` (``wire.read_event`` against
``parse_frame``), event identities (``event_identity`` against the rules as first written), a live connection
whose data frames skip websockets' parser while pings, fragments and odd frames still go through it, and the
garbage collector's freeze of what ``pricegate ingest`` built at start-up."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator

import orjson
import pytest
from hypothesis import given, strategies as st
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from ingest.sources.binance.source import _WatchedConnection
from ingest.sources.binance.wire import DataFrame, frame_size, parse_frame, read_data_frames, read_event
from shared.binance.identity import event_identity
from shared.broker.contract import EventId


def frame(payload: bytes, opcode: int = 0x1, *, fin: bool = True, mask: bytes | None = None) -> bytes:
    first = (0x80 if fin else 0) | opcode
    length = len(payload)
    if length < 126:
        header = bytes((first, length | (0x80 if mask else 0)))
    elif length < 65536:
        header = bytes((first, 126 | (0x80 if mask else 0))) + struct.pack("!H", length)
    else:
        header = bytes((first, 127 | (0x80 if mask else 0))) + struct.pack("!Q", length)
    if mask:
        masked = bytes(byte ^ mask[index % 4] for index, byte in enumerate(payload))
        return header + mask + masked
    return header + payload


# ---- read_data_frames ----


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_every_length_encoding_is_read(size: int) -> None:
    payload = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    data = frame(payload) + frame(b"next", 0x2)
    assert read_data_frames(data, 1 << 20) == ([payload, b"next"], len(data), False)


def test_incomplete_frames_wait_for_more_bytes_at_every_cut() -> None:
    data = frame(b"a" * 10) + frame(b"b" * 300) + frame(b"c" * 70000)
    for cut in range(0, len(data), 97):
        payloads, used, handover = read_data_frames(data[:cut], 1 << 20)
        assert not handover
        rest, end, _ = read_data_frames(data[used:], 1 << 20)
        assert payloads + rest == [b"a" * 10, b"b" * 300, b"c" * 70000] and used + end == len(data)


@pytest.mark.parametrize(
    "other",
    [
        frame(b"ping", 0x9),  # a ping
        frame(b"\x03\xe8", 0x8),  # a close
        frame(b"part", 0x1, fin=False),  # the start of a fragmented message
        frame(b"more", 0x0),  # a continuation
        frame(b"masked", mask=b"abcd"),  # masked (a server never masks)
        bytes((0xC1, 1)) + b"x",  # RSV1 set (an extension's frame)
        frame(b"x" * 200),  # over the size limit below
    ],
)
def test_any_other_frame_is_handed_over_and_its_size_said(other: bytes) -> None:
    data = frame(b"first") + other + frame(b"after")
    assert read_data_frames(data, 100) == ([b"first"], len(frame(b"first")), True)
    assert frame_size(data, len(frame(b"first"))) == len(other)
    assert read_data_frames(data, 100, len(frame(b"first")) + len(other)) == ([b"after"], len(data), False)


def test_frame_size_needs_the_whole_header() -> None:
    for data in (frame(b"x" * 300), frame(b"x" * 70000), frame(b"y", mask=b"abcd")):
        assert frame_size(data[:1]) is None
        assert frame_size(data) == len(data)
    assert frame_size(frame(b"x" * 300)[:3]) is None and frame_size(frame(b"x" * 70000)[:9]) is None


# ---- read_event ----

TRADE = b'{"e":"trade","E":1700000000000,"s":"BTCUSDT","t":42,"p":"1.0","q":"2.0","T":1,"m":true,"M":true}'
FRAMES = [
    b'{"stream":"btcusdt@trade","data":' + TRADE + b"}",
    b'{"stream":"btcusdt@bookTicker","data":{"u":9,"s":"BTCUSDT","b":"1","B":"2","a":"3","A":"4"}}',
    b'{"stream":"btcusdt@depth@100ms","data":{"e":"depthUpdate","E":5,"s":"BTCUSDT","U":3,"u":7,"b":[],"a":[]}}',
    b'{"stream":"!miniTicker@arr","data":[{"e":"24hrMiniTicker","E":8,"s":"BTCUSDT"}]}',
    b'{"stream":"!serverShutdown","data":{"e":"serverShutdown","E":1}}',
    b'{"stream":"btcusdt@trade","data":{"t":}}',
    b'{"stream":"bad name","data":{}}',
    b'{"data":{"e":"trade","t":1},"stream":"btcusdt@trade"}',
    b'{"result":null,"id":1}',
    b"not json",
]


@pytest.mark.parametrize("data", FRAMES)
def test_read_event_is_parse_frames_fast_path(data: bytes) -> None:
    fast = read_event(data)
    parsed = parse_frame(data)
    if fast is None:
        # Not a frame the fast path reads: parse_frame says what it is, and it is no sliced data frame.
        assert not (isinstance(parsed, DataFrame) and data.startswith(b'{"stream":"' + parsed.stream.encode()))
    else:
        assert isinstance(parsed, DataFrame)
        assert (parsed.stream, parsed.payload, parsed.event) == fast


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=5),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=3), children, max_size=4),
    max_leaves=8,
)


@given(st.sampled_from(["btcusdt@trade", "x@depth", "!serverShutdown", "a b"]), json_values)
def test_read_event_agrees_with_parse_frame_on_any_payload(stream: str, document: object) -> None:
    data = b'{"stream":"' + stream.encode() + b'","data":' + orjson.dumps(document) + b"}"
    fast = read_event(data)
    parsed = parse_frame(data)
    if fast is not None:
        assert isinstance(parsed, DataFrame) and (parsed.stream, parsed.payload, parsed.event) == fast
    else:
        assert not isinstance(parsed, DataFrame) or parsed.stream != stream or not isinstance(document, dict | list)


# ---- event_identity against the rules as first written ----


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def reference_identity(document: object) -> EventId | None:
    if isinstance(document, list):
        times = [t for entry in document if isinstance(entry, dict) and (t := _int(entry.get("E"))) is not None]
        return EventId(max(times), max(times), max(times)) if times else None
    if not isinstance(document, dict):
        return None
    event_time = _int(document.get("E"))
    event_type = document.get("e")
    if isinstance(event_type, str):
        key = {"trade": "t", "aggTrade": "a", "depthUpdate": "u"}.get(event_type)
        if key is None:
            return None if event_time is None else EventId(event_time, event_time, event_time)
        last = _int(document.get(key))
        if last is None:
            return None
        first = _int(document.get("U")) if event_type == "depthUpdate" else last
        if first is None or first > last:
            first = last
        return EventId(first, last, event_time)
    book_update = _int(document.get("lastUpdateId"))
    if book_update is not None:
        return EventId(book_update, book_update, None)
    update = _int(document.get("u"))
    if update is not None and "b" in document:
        return EventId(update, update, event_time)
    return None


identity_fields = st.dictionaries(
    st.sampled_from(["e", "E", "t", "a", "u", "U", "b", "lastUpdateId", "s"]),
    st.none()
    | st.booleans()
    | st.integers(-5, 2**53)
    | st.sampled_from(["trade", "aggTrade", "depthUpdate", "kline", "1"]),
    max_size=7,
)


@given(identity_fields | st.lists(identity_fields, max_size=3) | json_values)
def test_event_identity_follows_the_original_rules(document: object) -> None:
    assert event_identity(document) == reference_identity(document)


# ---- a live connection ----


@pytest.fixture
async def server_frames() -> AsyncIterator[tuple[str, asyncio.Queue[list[bytes | str | tuple[str, ...]]]]]:
    """A websockets server that sends, on each connection, what the test puts in the queue: bytes are written raw
    to the socket (split anywhere), str as a text message, a tuple as one fragmented text message, "PING" a ping."""
    scripts: asyncio.Queue[list[bytes | str | tuple[str, ...]]] = asyncio.Queue()

    async def handler(ws: ServerConnection) -> None:
        await ws.recv()  # the client is ready (its on_data is set), as Binance sends nothing before a SUBSCRIBE
        for item in await scripts.get():
            if item == "PING":
                await ws.ping(b"hello")
            elif isinstance(item, bytes):
                ws.transport.write(item)
            elif isinstance(item, tuple):
                await ws.send(iter(item))
            else:
                await ws.send(item)
        await ws.wait_closed()

    async with serve(handler, "127.0.0.1", 0, compression=None) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        yield f"ws://127.0.0.1:{port}", scripts


async def test_data_frames_skip_websockets_and_the_rest_still_goes_through_it(
    server_frames: tuple[str, asyncio.Queue[list[bytes | str | tuple[str, ...]]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, scripts = server_frames
    fast: list[bytes] = []

    def counting(buffer: bytes, max_size: int, start: int = 0) -> tuple[list[bytes], int, bool]:
        result = read_data_frames(buffer, max_size, start)
        fast.extend(result[0])
        return result

    monkeypatch.setattr("ingest.sources.binance.source.read_data_frames", counting)
    big = "x" * 70000
    raw = frame(b"raw-1") + frame(b"raw-2")
    ping = frame(b"split", 0x9)
    split = [frame(b"raw-3") + ping[:1], ping[1:] + frame(b"raw-4")]  # a ping cut between two writes
    await scripts.put(["first", raw[:3], raw[3:], "PING", "after ping", ("frag", "ment", "ed"), big, *split, "last"])
    received: list[bytes] = []
    pings = 0

    def count_ping() -> None:
        nonlocal pings
        pings += 1

    ws = await connect(url, create_connection=_WatchedConnection, max_size=1 << 20, compression=None)
    assert isinstance(ws, _WatchedConnection)
    ws.on_data = received.append
    ws.on_ping = count_ping
    await ws.send("ready")
    expected = [b"first", b"raw-1", b"raw-2", b"after ping", b"fragmented", big.encode(), b"raw-3", b"raw-4", b"last"]
    try:
        for _ in range(200):
            if len(received) >= len(expected):
                break
            await asyncio.sleep(0.01)
    finally:
        await ws.close()
    assert received == expected
    assert pings == 2 and ws.last_frame_at > 0
    # Everything but the fragments took the fast path: a ping or a fragmented message does not leave websockets'
    # parser holding the rest of the stream.
    assert fast == [b"first", b"raw-1", b"raw-2", b"after ping", big.encode(), b"raw-3", b"raw-4", b"last"]


# ---- the start-up freeze ----


async def test_pricegate_ingest_freezes_its_start_up_state_once_built(monkeypatch: pytest.MonkeyPatch) -> None:
    import gc

    from ingest.service import IngestService

    monkeypatch.setattr("ingest.service.GC_FREEZE_AFTER_S", (0.0, 0.0))
    service = object.__new__(IngestService)  # only the freezing job runs here
    before = gc.get_freeze_count()
    try:
        await IngestService._freeze_long_lived(service)
        assert gc.get_freeze_count() > before
    finally:
        gc.unfreeze()  # the test process must not keep its objects frozen
