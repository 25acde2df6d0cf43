"""Locust load test: real WebSocket clients on pricegate's raw streams, reporting end-to-end lag per frame.

Each locust user opens ``/ws/<stream>`` with ``websockets.sync.client`` (threads, which work under gevent's
monkey-patching; asyncio does not, so nothing here imports asyncio code or the project) and then reports one
locust ``request`` event per received frame: ``response_time`` is now minus the frame's event time ``E`` (the
lag from the event to this client, in ms), ``name`` the stream kind (``ticker``, ``trade``...). ``E`` is read
as microseconds when it is that large (``loadtests.publisher``'s payloads) and as milliseconds otherwise
(Binance's default, what ``pricegate demo``/``ingest`` publish). A frame not arriving within
``LOCUST_RECV_TIMEOUT_S`` (default 10 s), or a lost connection, is reported as a failure (then reconnected).

Not run in CI (locust registers a pytest plugin and pins pytest; keep it in the ``load`` extra, ideally in its
own virtualenv). Bounded and loopback-only, e.g. against the demo (5 symbols, tickers once a second):

    pricegate demo &                                   # http://127.0.0.1:8000
    locust -f loadtests/locustfile.py --headless -u 200 -r 50 -t 60s -H http://127.0.0.1:8000 \\
        --csv out/locust/run --html out/locust/report.html --only-summary

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
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

DEFAULT_STREAMS = "btcusdt@ticker,ethusdt@ticker,bnbusdt@ticker,solusdt@ticker,xrpusdt@ticker"
STREAMS = [s.strip() for s in os.environ.get("LOCUST_STREAMS", DEFAULT_STREAMS).split(",") if s.strip()]
RECV_TIMEOUT_S = float(os.environ.get("LOCUST_RECV_TIMEOUT_S", "10"))
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


class StreamUser(User):
    """One WebSocket client on one raw stream."""

    wait_time = between(0, 0)  # recv() blocks until a frame arrives: no think time
    host = "http://127.0.0.1:8000"

    def on_start(self) -> None:
        self.stream = next(_assignments)
        self.kind = self.stream.split("@", 1)[1] if "@" in self.stream else self.stream
        self.ws: ClientConnection | None = None
        self._connect()

    def _connect(self) -> None:
        base = urlsplit(self.host or "http://127.0.0.1:8000")
        scheme = "wss" if base.scheme == "https" else "ws"
        url = f"{scheme}://{base.netloc}/ws/{self.stream}"
        started = time.perf_counter()
        try:
            self.ws = connect(url, open_timeout=10, close_timeout=2)
        except Exception as error:
            self.ws = None
            self._fire("connect", (time.perf_counter() - started) * 1000, 0, error)
            time.sleep(1)
            return
        self._fire("connect", (time.perf_counter() - started) * 1000, 0, None)

    def _fire(self, name: str, response_time: float, length: int, exception: BaseException | None) -> None:
        self.environment.events.request.fire(
            request_type="WS",
            name=name,
            response_time=response_time,
            response_length=length,
            exception=exception,
            context={"stream": getattr(self, "stream", "")},
        )

    @task
    def receive(self) -> None:
        if self.ws is None:
            self._connect()
            return
        try:
            frame = self.ws.recv(timeout=RECV_TIMEOUT_S)
        except TimeoutError as error:
            self._fire(self.kind, RECV_TIMEOUT_S * 1000, 0, error)
            return
        except ConnectionClosed as error:
            self._fire(self.kind, 0, 0, error)
            self.ws = None
            return
        sent_ms = event_time_ms(frame)
        lag_ms = max(0.0, time.time() * 1000 - sent_ms) if sent_ms is not None else 0.0
        self._fire(self.kind, lag_ms, len(frame), None)

    def on_stop(self) -> None:
        if self.ws is not None:
            self.ws.close()
