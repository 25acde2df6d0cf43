"""``pricegate watch STREAM [STREAM...] [--url URL] [--json]``: a terminal client of any Binance-compatible endpoint.

It opens ``<url>/stream?streams=...`` (pricegate, or Binance itself: ``--url wss://stream.binance.com:9443``) and
shows a live table (rich.live) with each stream's newest values, messages per second and lag, and a rolling log of
the event streams; or, with ``--json``, writes every data frame to stdout exactly as received, one per line, for
piping. It reconnects by itself with jittered exponential backoff (shared/backoff.py). Whatever goes wrong (the
server unreachable or refusing the handshake, every stream refused, the connection closed) is one line (in the table,
or on stderr with ``--json``), never a traceback, and it tries again. What frames mean and how they look is
pricegate_cli/watch_view.py; this module only does the I/O.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from typing import Protocol

from rich.console import Console
from rich.live import Live
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from pricegate_cli.watch_view import UsageError, WatchModel, combined_url, normalise_stream, shown_url
from shared.backoff import backoff_delays

DEFAULT_URL = "ws://127.0.0.1:8000"
RETRY_FIRST_S = 0.5
RETRY_MAX_S = 30.0
REFRESH_S = 0.25
MAX_FRAME_BYTES = 16 * 1024 * 1024  # !miniTicker@arr on Binance is a few hundred kB
EXIT_USAGE = 2


def add_watch_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    watch = commands.add_parser(
        "watch",
        help="a live terminal view of streams from pricegate or Binance (or --json for the raw frames)",
        description="Subscribe to STREAMs over Binance's protocol (combined endpoint) on any compatible server and "
        "show a live table (last values, messages/s, lag = now - event time E) and a log of event streams, or print "
        "the raw frames with --json. Reconnects by itself.",
        epilog="examples:\n"
        "  pricegate watch btcusdt@trade ethusdt@ticker                     # the local demo\n"
        "  pricegate watch btcusdt@bookTicker --url wss://stream.binance.com:9443\n"
        "  pricegate watch btcusdt@trade --json | head -3                    # raw frames, one per line",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    watch.add_argument("streams", nargs="+", metavar="STREAM", help="e.g. btcusdt@trade, ethusdt@kline_1m")
    watch.add_argument("--url", default=DEFAULT_URL, help=f"WebSocket base URL (default: {DEFAULT_URL})")
    watch.add_argument("--json", action="store_true", help="print each data frame as received, one per line")
    watch.add_argument("--token", default=None, help="connection token (JWT) for a gateway with PRICEGATE_AUTH=jwt")
    watch.add_argument("--api-key", default=None, help="API key (sent as X-MBX-APIKEY) for PRICEGATE_AUTH=apikey")


class OutputClosed(Exception):
    """stdout was closed by its reader."""


class Output(Protocol):
    def connected(self, url: str) -> None: ...
    def frame(self, raw: bytes) -> None: ...
    def notice(self, message: str) -> None: ...


class JsonOutput:
    """Data frames to stdout, byte for byte; everything else to stderr as one line."""

    def __init__(self, model: WatchModel) -> None:
        self.model = model
        self.stdout = sys.stdout.buffer

    def connected(self, url: str) -> None:
        self.model.connected(url)
        self.notice(f"connected to {shown_url(url)}")

    def frame(self, raw: bytes) -> None:
        frame = self.model.on_frame(raw, time.time())
        if frame.kind == "data":
            try:
                self.stdout.write(raw + b"\n")
                self.stdout.flush()
            except BrokenPipeError:  # piped into something that stopped reading (head -3): done, not a retry
                raise OutputClosed from None
        elif frame.kind == "error":
            self.notice(f"server error: {frame.message}")
        elif frame.kind == "other":
            self.notice(f"unexpected frame: {frame.message}")

    def notice(self, message: str) -> None:
        print(f"pricegate watch: {message}", file=sys.stderr, flush=True)


class TableOutput:
    """The live table: redrawn every REFRESH_S from the model (in the event loop's thread: no locking)."""

    def __init__(self, model: WatchModel, live: Live) -> None:
        self.model = model
        self.live = live

    def connected(self, url: str) -> None:
        self.model.connected(url)

    def frame(self, raw: bytes) -> None:
        self.model.on_frame(raw, time.time())

    def notice(self, message: str) -> None:
        self.model.disconnected(message)
        self.redraw()

    def redraw(self) -> None:
        self.live.update(self.model.render(time.time()), refresh=True)

    async def refresh(self) -> None:
        while True:
            self.redraw()
            await asyncio.sleep(REFRESH_S)


def _quiet_logger() -> logging.Logger:
    # websockets logs connection trouble itself; here every problem is one line of ours.
    logger = logging.getLogger("pricegate.watch.websockets")
    logger.addHandler(logging.NullHandler())
    logger.propagate = False
    return logger


def _describe(error: BaseException) -> str:
    if isinstance(error, InvalidStatus):
        body = error.response.body.decode(errors="replace").strip().replace("\n", " ") if error.response.body else ""
        return f"the server refused the connection: HTTP {error.response.status_code}" + (
            f" {body[:200]}" if body else ""
        )
    if isinstance(error, ConnectionClosed):
        close = error.rcvd
        if close is None:
            return "the connection was lost (no close frame)"
        reason = f" {close.reason}" if close.reason else ""
        return f"the server closed the connection ({close.code}{reason})"
    if isinstance(error, TimeoutError):
        return "no answer in time (timeout)"
    if isinstance(error, socket.gaierror):
        return f"cannot resolve the host: {error.strerror or error}"
    if isinstance(error, OSError) and error.errno:
        return f"cannot connect: {os.strerror(error.errno)}"
    return f"cannot connect: {error or type(error).__name__}"


class AllRefused(Exception):
    """Every stream asked for was refused (error frames, no data)."""


async def _session(url: str, headers: dict[str, str], model: WatchModel, output: Output) -> None:
    """One connection, until it ends (raises what ended it)."""
    async with connect(
        url, additional_headers=headers, max_size=MAX_FRAME_BYTES, open_timeout=10, logger=_quiet_logger()
    ) as websocket:
        output.connected(url)
        await _receive(websocket, model, output)


async def _receive(websocket: ClientConnection, model: WatchModel, output: Output) -> None:
    while True:
        raw = await websocket.recv(decode=False)
        output.frame(raw)
        if model.all_refused():
            await websocket.close()
            raise AllRefused("the server refused every stream asked for")


async def watch(url: str, headers: dict[str, str], model: WatchModel, output: Output) -> None:
    """Connect, receive, and after any end wait a jittered, growing delay and connect again; forever."""
    delays: Iterator[float] = backoff_delays(initial=RETRY_FIRST_S, maximum=RETRY_MAX_S)
    while True:
        started = time.monotonic()
        try:
            await _session(url, headers, model, output)
            problem = "the connection ended"
        except AllRefused as error:
            problem = str(error)
        except (OSError, TimeoutError, WebSocketException) as error:
            problem = _describe(error)
        if time.monotonic() - started > RETRY_MAX_S:
            delays = backoff_delays(initial=RETRY_FIRST_S, maximum=RETRY_MAX_S)  # it had worked: start short again
        delay = next(delays)
        output.notice(f"{problem}; retrying in {delay:.1f} s")
        await asyncio.sleep(delay)


async def _run(args: argparse.Namespace, url: str, streams: list[str]) -> None:
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel if task is not None else (lambda: None))
    headers = {"X-MBX-APIKEY": args.api_key} if args.api_key else {}
    model = WatchModel(streams)
    if args.json:
        with contextlib.suppress(asyncio.CancelledError):
            await watch(url, headers, model, JsonOutput(model))
        return
    console = Console()
    with Live(model.render(time.time()), console=console, auto_refresh=False, transient=False) as live:
        output = TableOutput(model, live)
        refresher = asyncio.create_task(output.refresh())
        try:
            with contextlib.suppress(asyncio.CancelledError):
                await watch(url, headers, model, output)
        finally:
            refresher.cancel()
            output.redraw()


def run_watch(args: argparse.Namespace) -> int:
    """The command: exit 2 with one line for unusable arguments; otherwise runs until Ctrl-C or SIGTERM (exit 0)."""
    try:
        streams = list(dict.fromkeys(normalise_stream(name) for name in args.streams))
        url = combined_url(args.url, streams, token=args.token)
    except UsageError as error:
        print(f"pricegate watch: {error}", file=sys.stderr)
        return EXIT_USAGE
    try:
        asyncio.run(_run(args, url, streams))
    except KeyboardInterrupt:
        pass
    except OutputClosed:  # nobody reads stdout any more; keep Python's exit flush from complaining about it
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
