"""Locust load test: real WebSocket clients on pricegate's raw streams, measured as their users see them.

Each locust user does what a person's client does: opens ``/ws/<stream>`` with ``websockets.sync.client``
(threads, which work under gevent's monkey-patching; asyncio does not, so nothing here imports asyncio code or
the project), as a context manager (websockets 16 and 17 without a deprecation warning, and 18), then reads
frames until locust stops it, and reconnects after a lost connection. It reports locust ``request`` events of
type ``WS``:

- ``ws connect``: the opening handshake's duration (a failure if it does not complete);
- ``ws first message``: time to first message, from the start of the connection attempt to the first frame
  (a failure if none arrives within ``LOCUST_RECV_TIMEOUT_S``);
- ``ws lag``: for every frame, now minus the frame's event time ``E``, the lag from the event to this client
  (a failure when no frame arrives within ``LOCUST_RECV_TIMEOUT_S``, or the connection is lost).
  ``E`` is read as microseconds when it is that large (``loadtests.publisher``'s payloads) and as milliseconds
  otherwise (Binance's default, what ``pricegate demo``/``ingest`` publish).

Locust registers a pytest plugin and pins its own dependencies: run it from a virtualenv of its own, as
``./run-tests`` does (``.venv-locust``; tests/test_locust.py runs a 10-second headless smoke run against the
demo and fails on any failure). Bounded and loopback-only, e.g. against the demo (5 symbols, tickers once a
second):

    pricegate demo &                                   # http://127.0.0.1:8000
    .venv-locust/bin/locust -f loadtests/locustfile.py --headless -u 200 -r 50 -t 60s -H http://127.0.0.1:8000 \\
        --csv out/locust/run --html out/locust/report.html --only-summary --exit-code-on-error 1

Streams: ``LOCUST_STREAMS`` (comma-separated; default the demo's five ``<symbol>@ticker`` streams), assigned to
users round-robin.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from urllib.parse import urlsplit

from locust import User, between, task
from websockets.exceptions import ConnectionClosed, WebSocketException
from websockets.sync.client import ClientConnection, connect

DEFAULT_STREAMS = "btcusdt@ticker,ethusdt@ticker,bnbusdt@ticker,solusdt@ticker,xrpusdt@ticker"
STREAMS = [s.strip() for s in os.environ.get("LOCUST_STREAMS", DEFAULT_STREAMS).split(",") if s.strip()]
RECV_TIMEOUT_S = float(os.environ.get("LOCUST_RECV_TIMEOUT_S", "10"))
RECONNECT_PAUSE_S = 1.0  # after a failed or lost connection, as a client backs off
CONNECT, FIRST_MESSAGE, LAG = "ws connect", "ws first message", "ws lag"
_assignments = itertools.cycle(STREAMS)


def event_time_ms(frame: str | bytes) -> float | None:
    """The payload's ``E`` (ms since the epoch; µs values are scaled), without decoding the whole frame when
    it sits near the start as in Binance payloads."""
    text = frame.decode() if isinstance(frame, bytes) else frame
    start = text.find('"E":', 0, 80)
    if start >= 0:
        end = start + 4
        while end < len(text) and text[end].isdigit():
            end += 1
        value = int(text[start + 4 : end]) if end > start + 4 else None
    else:  # combined frames or another layout: fall back to JSON
        try:
            parsed = json.loads(text)
        except ValueError:
            return None
        data = parsed.get("data", parsed) if isinstance(parsed, dict) else None
        value = data.get("E") if isinstance(data, dict) else None
    if not isinstance(value, int):
        return None
    return value / 1000 if value > 10**14 else float(value)


def lag_ms(frame: str | bytes, now_ms: float) -> float:
    """Now minus the frame's event time (0 without one, or for an event stamped ahead of this clock)."""
    sent_ms = event_time_ms(frame)
    return max(0.0, now_ms - sent_ms) if sent_ms is not None else 0.0


class StreamUser(User):
    """One WebSocket client on one raw stream, connected for as long as locust runs it."""

    wait_time = between(0, 0)  # a session is one long task: no think time between sessions
    host = "http://127.0.0.1:8000"

    def on_start(self) -> None:
        self.stream = next(_assignments)
        base = urlsplit(self.host or "http://127.0.0.1:8000")
        scheme = "wss" if base.scheme == "https" else "ws"
        self.url = f"{scheme}://{base.netloc}/ws/{self.stream}"

    def _fire(self, name: str, response_time_ms: float, length: int, exception: BaseException | None) -> None:
        self.environment.events.request.fire(
            request_type="WS",
            name=name,
            response_time=response_time_ms,
            response_length=length,
            exception=exception,
            context={"stream": self.stream},
        )

    @task
    def session(self) -> None:
        """Connect, read until the connection ends or locust stops the user (it raises GreenletExit, which the
        ``with`` turns into a clean close), and report each step."""
        started = time.perf_counter()
        try:
            with connect(self.url, open_timeout=10, close_timeout=2) as ws:
                self._fire(CONNECT, (time.perf_counter() - started) * 1000, 0, None)
                self._read(ws, started)
        except ConnectionClosed as error:  # lost once open
            self._fire(LAG, 0, 0, error)
        except (OSError, TimeoutError, WebSocketException) as error:  # refused, reset, timed out, or HTTP not 101
            self._fire(CONNECT, (time.perf_counter() - started) * 1000, 0, error)
        time.sleep(RECONNECT_PAUSE_S)

    def _read(self, ws: ClientConnection, started: float) -> None:
        try:
            frame = ws.recv(timeout=RECV_TIMEOUT_S)
        except TimeoutError as error:
            self._fire(FIRST_MESSAGE, RECV_TIMEOUT_S * 1000, 0, error)
            return
        self._fire(FIRST_MESSAGE, (time.perf_counter() - started) * 1000, len(frame), None)
        self._fire(LAG, lag_ms(frame, time.time() * 1000), len(frame), None)
        while True:
            try:
                frame = ws.recv(timeout=RECV_TIMEOUT_S)
            except TimeoutError as error:
                self._fire(LAG, RECV_TIMEOUT_S * 1000, 0, error)
                return
            self._fire(LAG, lag_ms(frame, time.time() * 1000), len(frame), None)
