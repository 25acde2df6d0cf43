"""Baseline 3, a bare uvloop protocol: the least a Python fan-out can do per delivery — one ``transport.write``
of a pre-built frame per client per message — with nothing else (no protocol library, no control messages, no
keepalive, no limits, no slow-client policy).

It answers the WebSocket handshake by hand (RFC 6455: ``Sec-WebSocket-Accept`` from the key), then writes each
message of ``/ws/<stream>`` as one unmasked text frame to every client of that stream, the frame built once per
message. Input is the gateway's: the publisher's envelopes on ``<prefix>:binance:{<stream>}``, read by the same
lean Pub/Sub protocol the picows baseline uses. It reads and discards whatever clients send (the load generator
sends nothing after its handshake but pongs). Its CPU per delivery is the floor any server written in Python
on this event loop pays on this machine.

``python -m loadtests.baselines.uvloop_server --port P --redis-url URL --prefix PREFIX --streams a,b,...``
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import sys
from typing import cast

from loadtests.baselines import common

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def text_frame(payload: bytes) -> bytes:
    length = len(payload)
    if length < 126:
        return bytes((0x81, length)) + payload
    if length < 65536:
        return b"\x81\x7e" + length.to_bytes(2, "big") + payload
    return b"\x81\x7f" + length.to_bytes(8, "big") + payload


class Client(asyncio.Protocol):
    def __init__(self, streams: dict[str, set[asyncio.Transport]]) -> None:
        self.streams = streams
        self.transport: asyncio.Transport | None = None
        self.request = b""
        self.subscribers: set[asyncio.Transport] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.subscribers is not None:
            return  # frames from the client (pongs): nothing to do
        self.request += data
        if b"\r\n\r\n" not in self.request or self.transport is None:
            return
        head = self.request.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
        path = head[0].split(" ")[1]
        headers = dict(line.split(":", 1) for line in head[1:] if ":" in line)
        key = next((value.strip() for name, value in headers.items() if name.lower() == "sec-websocket-key"), "")
        subscribers = self.streams.get(path[4:]) if path.startswith("/ws/") else None
        if subscribers is None or not key:
            self.transport.write(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
            self.transport.close()
            return
        accept = base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest())
        self.transport.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        )
        self.subscribers = subscribers
        subscribers.add(self.transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.subscribers is not None and self.transport is not None:
            self.subscribers.discard(self.transport)


async def serve(host: str, port: int, redis_url: str, prefix: str, streams: list[str]) -> None:
    clients: dict[str, set[asyncio.Transport]] = {stream: set() for stream in streams}
    channels = {f"{prefix}:binance:{{{stream}}}".encode(): clients[stream] for stream in streams}

    def on_message(channel: bytes, data: bytes) -> None:
        subscribers = channels.get(channel)
        if subscribers:
            frame = text_frame(data.split(b":", 3)[3])
            for transport in subscribers:
                transport.write(frame)

    loop = asyncio.get_running_loop()
    await common.serve(
        redis_url,
        list(channels),
        on_message,
        lambda: loop.create_server(lambda: Client(clients), host, port, backlog=4096),
    )


def main(argv: list[str] | None = None) -> int:
    args = common.parse_args("bare uvloop fan-out baseline", argv)
    common.run(serve(args.host, args.port, args.redis_url, args.prefix, args.streams.split(",")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
