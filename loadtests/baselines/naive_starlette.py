"""Baseline 1, the naive Starlette loop (pricegate's seed design): Starlette on uvicorn (default settings, uvloop
and the default WebSocket implementation), one ``redis.asyncio`` Pub/Sub subscription to the benchmark's ticker
channels, and per message ``for ws in clients: await ws.send_text(m)``.

Input is identical to the gateway's: the publisher's envelopes ``<epoch>:<seq>:<published_ms>:<payload>`` on
``<prefix>:binance:{<stream>}``; this server strips the three header fields (one ``split``) and sends the
payload bytes, unchanged, to every client of ``/ws/<stream>``. There is no gap repair, no slow-client policy
and no coalescing: that is the point of the baseline.

``python -m loadtests.baselines.naive_starlette --port P --redis-url URL --prefix PREFIX --streams a,b,...``
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis.asyncio as aioredis
import uvicorn
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect


def create_app(redis_url: str, prefix: str, streams: list[str]) -> Starlette:
    clients: dict[str, set[WebSocket]] = {stream: set() for stream in streams}
    base = f"{prefix}:binance:{{"
    channels = {f"{base}{stream}}}".encode(): stream for stream in streams}

    async def relay() -> None:
        client = aioredis.Redis.from_url(redis_url)
        pubsub = client.pubsub()
        await pubsub.subscribe(*channels)
        async for message in pubsub.listen():
            if message["type"] != "message":
                continue
            stream = channels.get(message["channel"])
            if stream is None:
                continue
            text = message["data"].split(b":", 3)[3].decode()
            for ws in list(clients[stream]):
                try:
                    await ws.send_text(text)
                except Exception:
                    clients[stream].discard(ws)

    async def endpoint(websocket: WebSocket) -> None:
        stream = websocket.path_params["stream"]
        if stream not in clients:
            await websocket.close(1008)
            return
        await websocket.accept()
        clients[stream].add(websocket)
        try:
            while True:
                await websocket.receive_text()
        except WebSocketDisconnect:
            pass
        finally:
            clients[stream].discard(websocket)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        task = asyncio.create_task(relay())
        yield
        task.cancel()

    return Starlette(routes=[WebSocketRoute("/ws/{stream}", endpoint)], lifespan=lifespan)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="naive Starlette fan-out baseline")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--streams", required=True, help="comma-separated stream names")
    args = parser.parse_args(argv)
    app = create_app(args.redis_url, args.prefix, args.streams.split(","))
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", backlog=4096)
    return 0


if __name__ == "__main__":
    sys.exit(main())
