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

import sys

from picows import WSFrame, WSListener, WSMsgType, WSTransport, WSUpgradeRequest, ws_create_server

from loadtests.baselines import common


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

    await common.serve(
        redis_url,
        list(channels),
        on_message,
        lambda: ws_create_server(factory, host, port, backlog=4096, enable_auto_ping=False),
    )


def main(argv: list[str] | None = None) -> int:
    args = common.parse_args("picows fan-out baseline", argv)
    common.run(serve(args.host, args.port, args.redis_url, args.prefix, args.streams.split(",")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
