"""uvicorn's httptools HTTP protocol with the edge's bounds: accept-time limits, a header deadline, header caps.

Every TCP connection first reaches this protocol (WebSockets too: uvicorn hands the socket to the WebSocket
protocol once the upgrade request's headers are complete). Changes from uvicorn's behaviour:

1. **Counted from accept.** The socket is charged to the process and (unless the peer is a trusted proxy) to its
   IP the moment it is accepted: beyond ``max_connections`` it gets 503, beyond the IP's connection or attempt
   limit 429 with ``Retry-After`` — before it can send a byte of request.
2. **A deadline for the request headers.** From accept (and from the start of each later keep-alive request) the
   headers must be complete within ``handshake_timeout_s`` in total, so a client dripping one byte a second is
   closed too (uvicorn waits forever).
3. **Header caps.** A request target over ``max_request_line_bytes`` is answered 414, headers over
   ``max_header_bytes`` in total, one header line over 8000 bytes or more than ``max_headers`` headers 431, and
   the connection is closed (uvicorn accepts any size, and websockets' handshake parser then fails silently on
   lines over 8 KiB or more than 128 headers, leaving the socket hanging).

Selected with ``uvicorn.Config(http=PricegateHttpProtocol)``; it finds the :class:`~gateway.edge.guard.EdgeGuard`
in the lifespan state. What we borrow from uvicorn is checked by tests/test_uvicorn_hooks.py.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.edge.guard import EdgeGuard
from gateway.edge.ip_limits import LimitHit

EDGE_STATE_KEY = "pricegate.edge"
MAX_HEADER_LINE_BYTES = 8000  # below websockets' 8192-byte line limit, so the handshake parser never chokes
_REASONS = {
    408: b"Request Timeout",
    414: b"URI Too Long",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    503: b"Service Unavailable",
}


class _Refused(Exception):
    """Raised from a parser callback to stop parsing a request we refuse."""


class PricegateHttpProtocol(HttpToolsProtocol):
    edge: EdgeGuard | None = None
    _deadline: asyncio.TimerHandle | None = None
    _refusal: tuple[int, str, dict[str, str]] | None = None
    _upgraded = False
    _gated = False  # this connection's first request went through the handshake gate
    _held: list[bytes] | None = None  # bytes received while queued at the gate

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        edge: EdgeGuard | None = self.app_state.get(EDGE_STATE_KEY)
        if edge is None:
            return  # an app without the edge (e.g. a plain ASGI app under this protocol): uvicorn's behaviour
        self.edge = edge
        self._url_bytes = 0
        self._header_bytes = 0
        self._header_count = 0
        hit = edge.accept(transport, self.client[0] if self.client else None)
        if hit is not None:
            self._refuse_now(_limit_status(hit), f"refused: {hit.reason}", _retry_after(hit))
            return
        self._start_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_deadline()
        if self.edge is not None and not self._upgraded:
            self.edge.release(self.transport)
        super().connection_lost(exc)

    # ---- request parsing ----
    def data_received(self, data: bytes) -> None:
        if self.edge is None:
            super().data_received(data)
            return
        if self._refusal is not None:
            return  # refused: the response is out, the socket closing
        if self._held is not None:
            self._held.append(data)  # queued at the gate: keep the bytes in order until our turn
            return
        if not self._gated:
            # The first request of a connection waits for a slot of this loop turn (gateway/turn_gate.py).
            self._gated = True
            if not self.edge.gate.enter(self._through_the_gate):
                self._held = [data]
                self.transport.pause_reading()
                return
        self._parse(data)

    def _through_the_gate(self) -> None:
        held, self._held = self._held or [], None
        if self.transport.is_closing():
            return
        self.transport.resume_reading()
        self._parse(b"".join(held))

    def _parse(self, data: bytes) -> None:
        assert self.edge is not None
        # uvicorn's data_received, except that a request our caps refused gets its own answer (and no warning
        # in the log: a client flooding oversized headers must not flood the log too).
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
        except httptools.HttpParserError:
            if self._refusal is not None:
                self._write_response(*self._refusal)
                return
            msg = "Invalid HTTP request received."
            self.logger.warning(msg)
            self.send_400_response(msg)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self.edge is not None:
            self._url_bytes = self._header_bytes = self._header_count = 0
            if self._deadline is None:
                self._start_deadline()  # the next keep-alive request's headers are due within the same bound

    def on_url(self, url: bytes) -> None:
        if self.edge is not None:
            self._url_bytes += len(url)
            if self._url_bytes > self.edge.limits.max_request_line_bytes:
                self._refusal = (414, "request target too long", {})
                raise _Refused
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        edge = self.edge
        if edge is not None:
            size = len(name) + len(value) + 4
            self._header_bytes += size
            self._header_count += 1
            limits = edge.limits
            if (
                self._header_bytes > limits.max_header_bytes
                or self._header_count > limits.max_headers
                or size > MAX_HEADER_LINE_BYTES
            ):
                self._refusal = (431, "request headers too large", {})
                raise _Refused
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._stop_deadline()
        super().on_headers_complete()

    def handle_websocket_upgrade(self) -> None:
        # From here on the WebSocket protocol owns the socket (and releases the edge's count when it closes).
        self._upgraded = True
        self._stop_deadline()
        super().handle_websocket_upgrade()
        # This protocol is done: drop the parser, which holds us as its callbacks (a reference cycle otherwise
        # left to the cycle collector for every WebSocket ever opened).
        self.parser = None  # type: ignore[assignment]

    # ---- internals ----
    def _start_deadline(self) -> None:
        assert self.edge is not None
        self._deadline = self.loop.call_later(self.edge.limits.handshake_timeout_s, self._headers_too_slow)

    def _stop_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _headers_too_slow(self) -> None:
        self._deadline = None
        if self.edge is not None:
            self.edge.on_refused("handshake_timeout")
        self._refuse_now(408, "request headers not received in time", {})

    def _refuse_now(self, status: int, text: str, headers: dict[str, str]) -> None:
        self._refusal = (status, text, headers)
        self._write_response(status, text, headers)

    def _write_response(self, status: int, text: str, headers: dict[str, str]) -> None:
        if self.transport.is_closing():
            return
        body = text.encode()
        lines = [b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Error"))]
        for name, value in (*headers.items(), ("content-type", "text/plain; charset=utf-8")):
            lines.append(f"{name}: {value}\r\n".encode("latin-1"))
        lines.append(b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body))
        self.transport.write(b"".join(lines) + body)
        self.transport.close()


def _limit_status(hit: LimitHit) -> int:
    return 503 if hit.reason in ("max_connections", "tracked_ips") else 429


def _retry_after(hit: LimitHit) -> dict[str, str]:
    return {"retry-after": str(max(1, round(hit.retry_after_s + 0.499)))}


def http_protocol_state(edge: EdgeGuard) -> dict[str, Any]:
    """The lifespan-state entry that turns the edge on for this protocol."""
    return {EDGE_STATE_KEY: edge}
