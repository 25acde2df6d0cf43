"""Baseline 2, picows (the fastest Python WebSocket library, Cython): a picows server on uvloop that broadcasts
each message to its clients with ``transport.send(WSMsgType.TEXT, payload)``, one call per client.

Input is identical to the gateway's: the publisher's envelopes ``<epoch>:<seq>:<published_ms>:<payload>`` on
``<prefix>:binance:{<stream>}``. So that the baseline measures picows' fan-out and not redis-py's parser, the
subscription is a lean asyncio protocol (the same shape as pricegate's own reader: every message in a socket read
is parsed in one pass without an ``await``); the header fields are stripped with one ``split`` and the payload
bytes go out unchanged to every client of ``/ws/<stream>``. Writes are not coalesced across messages (each
``send`` is one ``transport.write``), and there is no slow-client policy: picows buffers without bound.

``python -m loadtests.baselines.picows_server --port P --redis-url URL --prefix PREFIX --streams a,b,...``
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Callable
from typing import cast
from urllib.parse import urlsplit

from picows import WSFrame, WSListener, WSMsgType, WSTransport, WSUpgradeRequest, ws_create_server


class PubSubProtocol(asyncio.Protocol):
    """Minimal RESP2 Pub/Sub reader: SUBSCRIBE to channels, call ``on_message(channel, data)`` per message."""

    def __init__(self, channels: list[bytes], on_message: Callable[[bytes, bytes], None]) -> None:
        self.channels = channels
        self.on_message = on_message
        self.buffer = b""
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        args = [b"SUBSCRIBE", *self.channels]
        command = b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%b\r\n" % (len(a), a) for a in args)
        cast(asyncio.Transport, transport).write(command)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        buf = self.buffer + data if self.buffer else data
        pos = 0
        size = len(buf)
        while pos < size:
            # Every push is an array of 3 items: kind, channel, then data (bulk) or a count (integer).
            if buf[pos] != 0x2A:
                raise ConnectionError(f"unexpected RESP byte {buf[pos : pos + 1]!r}")
            items: list[bytes] = []
            cursor = buf.find(b"\r\n", pos)
            if cursor < 0:
                break
            count = int(buf[pos + 1 : cursor])
            cursor += 2
            complete = True
            for _ in range(count):
                end = buf.find(b"\r\n", cursor)
                if end < 0:
                    complete = False
                    break
                if buf[cursor] == 0x24:  # $ bulk
                    length = int(buf[cursor + 1 : end])
                    start = end + 2
                    if size < start + length + 2:
                        complete = False
                        break
                    items.append(buf[start : start + length])
                    cursor = start + length + 2
                else:  # : integer (subscription count)
                    items.append(buf[cursor + 1 : end])
                    cursor = end + 2
            if not complete:
                break
            pos = cursor
            if items[0] == b"message":
                self.on_message(items[1], items[2])
        self.buffer = buf[pos:]


class Client(WSListener):
    def __init__(self, clients: set[WSTransport]) -> None:
        self.clients = clients

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.clients.add(transport)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code())
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.clients.discard(transport)


async def serve(host: str, port: int, redis_url: str, prefix: str, streams: list[str]) -> None:
    clients: dict[str, set[WSTransport]] = {stream: set() for stream in streams}
    channels = {f"{prefix}:binance:{{{stream}}}".encode(): clients[stream] for stream in streams}

    def on_message(channel: bytes, data: bytes) -> None:
        subscribers = channels.get(channel)
        if subscribers:
            payload = data.split(b":", 3)[3]
            text = WSMsgType.TEXT
            for transport in subscribers:
                transport.send(text, payload)

    def factory(request: WSUpgradeRequest) -> Client | None:
        path = request.path.decode("latin-1")
        stream = path[4:] if path.startswith("/ws/") else ""
        return Client(clients[stream]) if stream in clients else None

    loop = asyncio.get_running_loop()
    url = urlsplit(redis_url)
    _, protocol = await loop.create_connection(
        lambda: PubSubProtocol(list(channels), on_message), url.hostname or "127.0.0.1", url.port or 6379
    )
    server = await ws_create_server(factory, host, port, backlog=4096, enable_auto_ping=False)
    stop: asyncio.Future[None] = loop.create_future()

    def request_stop() -> None:
        if not stop.done():
            stop.set_result(None)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, request_stop)
    await asyncio.wait([stop, protocol.closed], return_when=asyncio.FIRST_COMPLETED)
    server.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="picows fan-out baseline")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis-url", required=True, help="redis://host:port (no auth, no database: Pub/Sub)")
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--streams", required=True, help="comma-separated stream names")
    args = parser.parse_args(argv)
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(args.host, args.port, args.redis_url, args.prefix, args.streams.split(",")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
