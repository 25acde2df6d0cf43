"""What the lean baselines share: the Pub/Sub reader, serving until SIGTERM/SIGINT or Redis goes away, the CLI.

Both lean baselines (picows and bare uvloop) read the publisher's envelopes with the same protocol (every message
in a socket read parsed in one pass, no ``await`` per message: the shape of pricegate's own reader), so they
measure their fan-out, not a Redis client library.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, cast
from urllib.parse import urlsplit

OnMessage = Callable[[bytes, bytes], None]


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


async def serve(
    redis_url: str, channels: list[bytes], on_message: OnMessage, start_server: Callable[[], Awaitable[object]]
) -> None:
    """Subscribe ``channels`` (``on_message(channel, data)`` per message), start the server, run until a signal
    or until the Redis connection ends."""
    loop = asyncio.get_running_loop()
    url = urlsplit(redis_url)
    _, protocol = await loop.create_connection(
        lambda: PubSubProtocol(channels, on_message), url.hostname or "127.0.0.1", url.port or 6379
    )
    server = await start_server()
    stop: asyncio.Future[None] = loop.create_future()

    def request_stop() -> None:
        if not stop.done():
            stop.set_result(None)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, request_stop)
    await asyncio.wait([stop, protocol.closed], return_when=asyncio.FIRST_COMPLETED)
    cast(asyncio.AbstractServer, server).close()


def parse_args(description: str, argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis-url", required=True, help="redis://host:port (no auth, no database: Pub/Sub)")
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--streams", required=True, help="comma-separated stream names")
    return parser.parse_args(argv)


def run(main: Coroutine[Any, Any, None]) -> None:
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main)
