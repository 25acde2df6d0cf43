"""uvicorn WebSocket protocol for the gateway: uvicorn's websockets-sansio implementation, with stream
sessions run natively.

For the stream endpoints (``/ws…``, ``/stream…``) this protocol completes the handshake itself and drives a
:class:`~gateway.ws.session.Session` by direct calls — no ASGI task, queue or coroutine chain per client, which
keeps an idle client to a few KiB and lets the hub write pre-encoded frame blocks straight to the transport.
Every other WebSocket path goes through the ASGI app as usual. Changes from uvicorn's behaviour:

1. **Pongs are not payload-checked.** Binance only requires *a* pong within 60 s, and real clients
   (binance-connector) answer pings with an empty payload; uvicorn would ignore those and drop the client.
2. **Stuck clients are closed without waiting for them**: :meth:`close_now` sends the close frame and aborts
   the socket if it has not drained within a few seconds (a client that does not read cannot receive it).
3. **One keepalive timer per process** (:mod:`gateway.ws.keepalive`): native sessions are pinged by the node in
   slices with one pre-encoded frame, instead of two timer handles per connection; a missed pong closes 1011.
4. **Drain on shutdown.** On server shutdown uvicorn closes every socket with 1012 at once; instead we ask
   the gateway to close its clients with 1001 spread over a few seconds.

Selected with ``uvicorn.Config(ws=PricegateWebSocketProtocol)``; it finds its
:class:`~gateway.ws.host.ConnectionHost` in the lifespan state. What it borrows from uvicorn's class (and why) is
listed in docs/architecture.md, "What we borrow from uvicorn"; tests/test_uvicorn_hooks.py fails loudly when an
upgrade changes those hooks.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.frames import Frame
from websockets.http11 import Request, Response

from gateway.edge.client_ip import forwarded_for
from gateway.ws.admission import Admitted, Decision, Rejection, handshake_from
from gateway.ws.close_codes import REASONS, CloseCode
from gateway.ws.frames import encode_text_frames
from gateway.ws.host import HOST_STATE_KEY, ConnectionHost
from gateway.ws.hub import StreamBatch
from gateway.ws.session import Session

DRAIN_STATE_KEY = "pricegate.drain"  # a plain-ASGI WebSocket route's drain hook (see shutdown())
READ_SLICE_BYTES = 16384  # bytes parsed at a time for native sessions (see data_received)
PING_FRAME = b"\x89\x00"  # FIN + ping, unmasked, empty payload: the same bytes for every connection
ABORT_AFTER_CLOSE_S = 5.0  # a client that does not read cannot receive our close frame either
STREAM_PREFIXES = ("/ws/", "/stream/")
STREAM_PATHS = ("/ws", "/stream")

logger = logging.getLogger("pricegate.gateway.ws")
# websockets logs "connection open"/"closed" per client at INFO: at tens of thousands of clients that is noise,
# so native sessions log through this logger, quiet unless explicitly lowered (e.g. for debugging).
_connection_logger = logging.getLogger("pricegate.gateway.ws.connections")
_connection_logger.setLevel(logging.WARNING)


class _Discard:
    """Stands in for uvicorn's per-connection ASGI queue and writable event on native sessions (nothing reads
    them there), so an idle client does not carry them."""

    def put_nowait(self, item: object) -> None:
        pass

    def set(self) -> None:
        pass

    def clear(self) -> None:
        pass


_DISCARD = _Discard()


class PricegateWebSocketProtocol(WebSocketsSansIOProtocol):
    session: Session | None = None
    host: ConnectionHost | None = None
    # The session's direct write: the transport's own write, set once the handshake is accepted.
    write: Callable[[bytes], object] | None = None
    dropped = (0, 0)  # no queue of our own: a full socket buffer pauses the session instead
    # A fragmented inbound message being assembled (text), or counted only (binary: refused whatever it holds).
    _fragments: list[bytes] | None = None
    _fragments_are_text = True
    _fragment_bytes = 0
    _max_fragments = 64
    _max_message_bytes = 1 << 20
    ping_deadline = 0.0  # the node's keepalive schedule: unanswered ping's deadline, 0.0 when none
    peer_gone = False  # the client went away (EOF or reset); the rest of the close waits its turn (_leave)

    # ---- Connection (what a Session needs) ----
    @property
    def peer(self) -> tuple[str, int] | None:
        return self.client

    @property
    def is_closed(self) -> bool:
        return bool(self.close_sent or self.disconnected or self.peer_gone or self.transport.is_closing())

    def write_frames(self, payloads: list[bytes]) -> int:
        """Write text frames in one transport write; returns bytes written (0 if the socket is closing). Frames
        are built by hand (no extension is ever negotiated: uvicorn_config turns permessage-deflate off)."""
        if self.is_closed:
            return 0
        data = encode_text_frames(payloads)
        self.transport.write(data)
        return len(data)

    def enqueue(self, batch: StreamBatch, combined: bool) -> None:
        raise AssertionError("native sessions write directly")  # Session only queues when write is None

    def close_now(self, code: CloseCode, reason: str) -> None:
        """Send a close frame and end the connection without waiting on a client that does not read."""
        if self.is_closed:
            return
        self.stop_keepalive()
        self.queue.put_nowait({"type": "websocket.disconnect", "code": code, "reason": reason})
        self.conn.send_close(code, reason)
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.close_sent = True
        self.transport.close()
        self.loop.call_later(ABORT_AFTER_CLOSE_S, self._abort_if_open)
        if self.session is not None:
            self.session.closed(code)

    def _abort_if_open(self) -> None:
        if not self.disconnected:
            self.transport.abort()

    # ---- handshake ----
    def handle_connect(self, event: Request) -> None:
        host: ConnectionHost | None = self.app_state.get(HOST_STATE_KEY)
        raw_path, _, query = event.path.partition("?")
        path = unquote(raw_path)
        if host is None or not (path in STREAM_PATHS or path.startswith(STREAM_PREFIXES)):
            super().handle_connect(event)
            return
        self.handshake_initiated = True
        self.host = host
        self.conn.logger = _connection_logger
        response = self.conn.accept(event)
        if response.status_code != 101:
            self._answer_refused(response)
            return
        headers = event.headers
        peer = self.client[0] if self.client else None
        # (websockets' Headers.get raises for a header sent twice: every lookup here goes through get_all.)
        identity = host.identify(self.transport, peer, forwarded_for(headers.get_all("X-Forwarded-For")))
        if isinstance(identity, Rejection):
            self._refuse(identity)
            return
        handshake = handshake_from(path, query, headers.get_all, identity)
        if isinstance(handshake, Rejection):
            self._refuse(handshake)
            return
        decision = host.admit(handshake)
        if isinstance(decision, Admitted | Rejection):
            self._complete_handshake(event, response, decision)
            return
        # Deciding needs I/O (an API key no cache knows): hold the client's bytes until the answer.
        self.transport.pause_reading()
        task = self.loop.create_task(_awaited(decision))
        task.add_done_callback(functools.partial(self._decided, event, response))

    def _decided(self, event: Request, response: Response, task: asyncio.Task[Decision]) -> None:
        if self.disconnected or task.cancelled():
            return
        error = task.exception()
        if error is not None:
            logger.error("admission failed", exc_info=error)
            decision: Decision = Rejection(503, "gateway unavailable: admission failed", {"Retry-After": "1"})
        else:
            decision = task.result()
        self._complete_handshake(event, response, decision)
        if not self.disconnected and not self.close_sent:
            self.transport.resume_reading()

    def _complete_handshake(self, event: Request, response: Response, decision: Decision) -> None:
        if isinstance(decision, Rejection):
            self._refuse(decision)
            return
        host = self.host
        assert host is not None
        self.handshake_complete = True
        self.conn.send_response(response)
        self.transport.write(b"".join(self.conn.data_to_send()))
        # websockets' parser generator keeps the handshake Request alive for the connection's lifetime; its
        # headers are the bulk of an idle client's memory and nothing needs them any more.
        event.headers.clear()
        self.queue = _DISCARD  # type: ignore[assignment]
        self.writable = _DISCARD  # type: ignore[assignment]
        if host.client_sndbuf_bytes:
            # A fixed kernel send buffer: with autotuning, a client that stops reading makes the kernel hold up
            # to tcp_wmem's maximum (4 MiB) for it before any backpressure reaches us (measured in BENCHMARKS.md).
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, host.client_sndbuf_bytes)
        limit = host.client_buffer_bytes
        # Pause (and so later resume, which resends stale state) around our own limit, not the loop's default.
        self.transport.set_write_buffer_limits(high=limit, low=limit // 4)
        self.write = self.transport.write
        self._max_fragments = host.max_fragments_per_message
        self._max_message_bytes = host.max_message_bytes
        self.session = host.open_session(self, decision)
        self.start_keepalive()
        self.session.start(decision.connect)

    def _refuse(self, rejection: Rejection) -> None:
        response = self.conn.reject(rejection.status, rejection.reason)
        for name, value in rejection.headers.items():
            response.headers[name] = value
        self._answer_refused(response)

    def _answer_refused(self, response: Response) -> None:
        self.handshake_complete = True
        self.close_sent = True
        self.conn.send_response(response)
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.transport.close()

    # ---- inbound frames on native sessions ----
    def data_received(self, data: bytes) -> None:
        if self.session is None or len(data) <= READ_SLICE_BYTES:
            super().data_received(data)
            return
        # websockets parses everything it is given into events at once: a read full of tiny frames would be
        # parsed whole even after the first few got the client closed. Slices bound the work done after that.
        view = memoryview(data)
        for start in range(0, len(data), READ_SLICE_BYTES):
            if self.close_sent or self.disconnected:
                return
            super().data_received(bytes(view[start : start + READ_SLICE_BYTES]))

    def handle_text(self, event: Frame) -> None:
        session = self.session
        if session is None:
            super().handle_text(event)
        elif not session.allow_frame():
            return
        elif event.fin:
            self._dispatch_text(event.data)
        else:
            self._start_fragments(event, text=True)

    def handle_bytes(self, event: Frame) -> None:
        session = self.session
        if session is None:
            super().handle_bytes(event)
        elif not session.allow_frame():
            return
        elif event.fin:
            session.on_binary(bytes(event.data))
        else:
            self._start_fragments(event, text=False)

    def handle_cont(self, event: Frame) -> None:
        session = self.session
        if session is None:
            super().handle_cont(event)
            return
        # Every frame counts against the control-message rate, continuations included (an unfinished message
        # of empty fragments would otherwise be free and endless).
        if not session.allow_frame():
            return
        fragments = self._fragments
        if fragments is None:
            return  # a continuation without a start: websockets' parser refuses those; nothing to assemble
        self._fragment_bytes += len(event.data)
        if len(fragments) >= self._max_fragments or self._fragment_bytes > self._max_message_bytes:
            self._fragments = None
            self.close_now(CloseCode.MESSAGE_TOO_BIG, "message too big or in too many fragments")
            return
        if self._fragments_are_text:
            fragments.append(bytes(event.data))
        if not event.fin:
            return
        self._fragments = None
        if self._fragments_are_text:
            self._dispatch_text(b"".join(fragments))
        else:
            session.on_binary(b"")  # binary messages are refused whatever they hold: keep none of it

    def _start_fragments(self, event: Frame, *, text: bool) -> None:
        self._fragments = [bytes(event.data)] if text else []
        self._fragments_are_text = text
        self._fragment_bytes = len(event.data)

    def _dispatch_text(self, data: bytes | bytearray | memoryview) -> None:
        assert self.session is not None
        try:
            text = bytes(data).decode()
        except UnicodeDecodeError:
            self.close_now(CloseCode.INVALID_PAYLOAD, REASONS[CloseCode.INVALID_PAYLOAD])
            return
        self.session.on_text(text)

    def handle_ping(self) -> None:
        session = self.session
        if session is not None and not session.allow_frame():
            return  # closed for the rate: the pong websockets queued goes out before the close frame, no more
        super().handle_ping()

    def handle_pong(self, event: Frame) -> None:
        # Any pong answers the outstanding ping (see the module docstring).
        session = self.session
        if session is not None:
            if session.allow_frame():
                self.ping_deadline = 0.0
            return
        if self.pending_ping_payload is not None:
            self.pending_ping_payload = bytes(event.data)
        super().handle_pong(event)

    def handle_close(self, event: Frame) -> None:
        super().handle_close(event)
        if self.session is not None and self.conn.close_rcvd is not None:
            self.session.closed(self.conn.close_rcvd.code)

    def handle_parser_exception(self) -> None:
        super().handle_parser_exception()
        if self.session is not None and self.conn.close_sent is not None:
            self.session.closed(self.conn.close_sent.code)

    # ---- keepalive: native sessions are pinged by the node (gateway.ws.keepalive), others by uvicorn ----
    def start_keepalive(self) -> None:
        if self.host is None:
            super().start_keepalive()
        else:
            self.host.keep_alive(self)

    def stop_keepalive(self) -> None:
        if self.host is not None:
            self.host.stop_keeping_alive(self)
        super().stop_keepalive()

    def send_ping(self) -> None:
        """The node's keepalive says a ping is due: it rides on this client's next data write (see
        :meth:`Session.carry_on_next_write`); :meth:`flush_ping` sends it alone if none came."""
        if self.is_closed:
            return
        if self.session is not None:
            self.session.carry_on_next_write(PING_FRAME)
        else:
            self.transport.write(PING_FRAME)

    def flush_ping(self) -> None:
        if self.session is not None and not self.is_closed:
            self.session.flush_carried()

    def keepalive_timeout(self) -> None:
        if self.session is None:
            super().keepalive_timeout()
        elif self.is_closed:
            # Closing already but still connected after a whole pong timeout: the peer reads nothing, so our
            # close frame cannot reach it either.
            if not self.disconnected:
                self.transport.abort()
        else:
            self.close_now(CloseCode.INTERNAL_ERROR, REASONS[CloseCode.INTERNAL_ERROR])

    def eof_received(self) -> bool | None:  # type: ignore[override]  # asyncio.Protocol: bool | None; uvicorn says None
        """The client closed its side. uvicorn closes the socket at once; a session's socket is closed a few per
        loop turn instead (the host's closer), because when thousands of clients drop together uvloop reports all
        their EOFs in one turn, and closing them there (the kernel's TCP teardown, the session's bookkeeping) held
        the fan-out back for hundreds of milliseconds (docs/architecture.md, "The hot path and why")."""
        session, host = self.session, self.host
        if session is None or host is None or self.is_closed or self.scheme == "wss":
            # (Over TLS the SSL protocol closes on close_notify itself, whatever we return: uvicorn's way.)
            return super().eof_received()
        host.connection_closed(self.transport)  # the client's per-IP slot is free now, not a few turns later
        self._leave(session, host, self._close_left)  # connection_lost follows the close
        return True  # keep the transport (reading has stopped) until the closer's turn

    def _leave(self, session: Session, host: ConnectionHost, rest: Callable[[], None]) -> None:
        """The client is gone: its session delivers nothing from now on, ``rest`` of the close runs on the
        closer's turn."""
        self.peer_gone = True
        session.peer_gone()
        host.close_soon(rest)

    def _close_left(self) -> None:
        # The client sends nothing more and its session delivers nothing: bytes still buffered for it would hold
        # the socket (no longer counted by the edge) until a client that may never read drained them.
        if self.transport.get_write_buffer_size():
            self.transport.abort()
        else:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        host: ConnectionHost | None = self.app_state.get(HOST_STATE_KEY)
        if host is not None:
            host.connection_closed(self.transport)  # every upgraded socket was counted by the edge at accept
        if self.session is None or self.host is None or self.peer_gone or self.session.ended:
            # No session; the closer's turn already (eof_received); or our own close, its bookkeeping done.
            self._end(exc)
            return
        # Lost without an EOF first (a reset: a crashed client with unread data, a dead route): uvloop reports a
        # burst of those in one turn too, so the session's bookkeeping takes the closer's turns as well.
        self._leave(self.session, self.host, functools.partial(self._end, exc))

    def _end(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        session = self.session
        if session is not None:
            session.closed(CloseCode.ABNORMAL)
            # Nothing calls us after this: break the cycles a connection is made of (protocol <-> session, and
            # websockets' parser generator <-> its protocol) so closed connections are freed by reference
            # counting alone, never left to the cycle collector (docs/architecture.md, "The hot path and why").
            self.session = None
            self.conn.parser.close()

    def pause_writing(self) -> None:
        super().pause_writing()
        if self.session is not None:
            # A client that does not read gets nothing more read from it either: its pings would pile up pongs
            # (and its requests replies) in our buffer without bound.
            self.transport.pause_reading()
            self.session.on_pause()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.session is not None:
            if not self.transport.is_closing():
                self.transport.resume_reading()
            self.session.on_writable()

    # ---- shutdown: let the gateway drain with 1001 instead of an instant 1012 ----
    def shutdown(self) -> None:
        if self.session is not None:
            if not self.close_sent and not self.disconnected:
                self.app_state[HOST_STATE_KEY].begin_drain()
                return
        else:
            scope: Any = getattr(self, "scope", None)
            drain = scope["state"].get(DRAIN_STATE_KEY) if scope is not None else None
            if drain is not None and self.handshake_complete and not self.close_sent and not self.disconnected:
                drain()
                return
        super().shutdown()


async def _awaited(decision: Awaitable[Decision]) -> Decision:
    return await decision
