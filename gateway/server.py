"""How a gateway app is served: the uvicorn configuration every entry point (CLI, tests, benchmarks) shares, the
banner that says where, and the sockets of workers that share one port (``pricegate gateway --workers``)."""

from __future__ import annotations

import socket
from typing import Any

import uvicorn
from starlette.applications import Starlette

from gateway.edge.http_protocol import PricegateHttpProtocol
from gateway.ws.uvicorn_protocol import PricegateWebSocketProtocol
from shared.settings import Settings


def uvicorn_config(app: Starlette, settings: Settings) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=PricegateHttpProtocol,
        ws=PricegateWebSocketProtocol,
        # uvicorn's own cap counts connections and running requests; the edge refuses beyond max_connections
        # already at accept (gateway.edge.http_protocol), this is the backstop for requests in flight. Twice: a
        # session whose client left stays in uvicorn's count until its close has had its turn (gateway/turn_gate.py)
        # while the edge has let a new client in already, so up to max_connections more are legitimately there.
        limit_concurrency=2 * settings.max_connections + 1,
        # uvicorn would otherwise rewrite every request's client address from X-Forwarded-For whenever the peer
        # is 127.0.0.1 (its default trust): a local spoofer could pick the address it is charged to. Whose
        # X-Forwarded-For counts is PRICEGATE_FORWARDED_ALLOW_IPS's decision alone (gateway.edge.client_ip).
        proxy_headers=False,
        ws_max_size=settings.max_frame_bytes,
        ws_ping_interval=settings.ping_interval_s,
        ws_ping_timeout=settings.ping_timeout_s,
        # Compression costs CPU per connection per message and our frames are small JSON: off.
        ws_per_message_deflate=False,
        lifespan="on",
        ssl_certfile=settings.ssl_certfile,
        ssl_keyfile=settings.ssl_keyfile,
        log_level=settings.log_level.lower(),
        # Long enough for the staggered 1001 drain, short enough for lifespan shutdown to close the broker.
        timeout_graceful_shutdown=int(settings.shutdown_drain_s) + 5,
        access_log=False,
    )


def bound_port(server: uvicorn.Server) -> int:
    """The port the started server listens on (useful with port 0)."""
    return int(server.servers[0].sockets[0].getsockname()[1])


def serving_banner(settings: Settings, port: int, *, workers: int = 1) -> str:
    """What ``pricegate gateway``/``demo`` print once they serve: where clients, REST and operators connect."""
    scheme = "wss" if settings.ssl_certfile else "ws"
    http = "https" if settings.ssl_certfile else "http"
    base = f"{settings.host}:{port}"
    ops = f"{http}://{base}/metrics  /livez  /readyz"
    if settings.metrics_port:
        # /metrics is then plain HTTP on its own port (prometheus_client's server), one per worker under --workers.
        ops = f"{http}://{base}/livez  /readyz   metrics: http://{settings.host}:{settings.metrics_port}/metrics"
        if workers > 1:
            ops += f" (worker i: port {settings.metrics_port} + i, i < {workers})"
    return (
        f"pricegate is serving on {http}://{base}\n"
        f"  raw streams:      {scheme}://{base}/ws/btcusdt@trade   (or {scheme}://{base}/ws + SUBSCRIBE)\n"
        f"  combined streams: {scheme}://{base}/stream?streams=btcusdt@trade/ethusdt@bookTicker\n"
        f"  REST:             {http}://{base}/api/v3/exchangeInfo\n"
        f"                    {http}://{base}/api/v3/klines?symbol=BTCUSDT&interval=1h\n"
        f"                    {http}://{base}/api/v1/technical/BTCUSDT?interval=1h\n"
        f"  ops:              {ops}"
    )


def _addresses(host: str, port: int) -> list[tuple[socket.AddressFamily, tuple[Any, ...]]]:
    # Every address the host names, as asyncio's create_server binds them for uvicorn ("localhost" may be IPv4 and
    # IPv6; "" is every interface).
    found: list[tuple[socket.AddressFamily, tuple[Any, ...]]] = []
    for family, _, _, _, address in socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    ):
        if family in (socket.AF_INET, socket.AF_INET6) and (family, address) not in found:
            found.append((family, address))
    return found


def _tcp_socket(family: socket.AddressFamily) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    # As uvicorn and asyncio do: a restarted server binds over connections still in TIME_WAIT.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # asyncio's choice: IPv4 gets its own socket
    return sock


def hold_port(host: str, port: int) -> tuple[list[socket.socket], int]:
    """Bind host:port without listening, for a supervisor of workers (``pricegate gateway --workers``); returns the
    sockets (keep them open) and the port (chosen by the kernel when ``port`` is 0).

    The bind is made *without* SO_REUSEPORT, so it fails (``OSError``) when any server listens there already, even
    one that itself shares the port; only then is SO_REUSEPORT turned on, so the workers' sockets
    (:func:`shared_port_sockets`) bind beside these. A socket that never listens receives no connections."""
    held: list[socket.socket] = []
    try:
        for family, address in _addresses(host, port):
            sock = _tcp_socket(family)
            held.append(sock)
            sock.bind((address[0], port, *address[2:]))
            port = sock.getsockname()[1]  # with port 0: every address on the port the first one got
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    except OSError:
        for sock in held:
            sock.close()
        raise
    return held, port


def shared_port_sockets(host: str, port: int) -> list[socket.socket]:
    """One worker's sockets on host:port, bound with SO_REUSEPORT so that every worker has its own accept queue
    and the kernel spreads new connections over the workers. They are not listening yet: uvicorn's server listens
    when it starts serving (``Server.serve(sockets=...)``), so no connection waits on a worker still starting.

    Written here because ``socket.create_server(reuse_port=True)`` listens at once and uvicorn's
    ``Config.bind_socket`` sets no SO_REUSEPORT."""
    sockets: list[socket.socket] = []
    try:
        for family, address in _addresses(host, port):
            sock = _tcp_socket(family)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(address)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets
