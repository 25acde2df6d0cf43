"""``pricegate watch``, the pure part: the URL it opens, what each frame means, and the live view it shows.

``pricegate watch`` opens Binance's combined endpoint (``<base>/stream?streams=a/b``) on pricegate or on Binance
itself, so every data frame is ``{"stream": ..., "data": ...}``. :class:`WatchModel` folds frames into one row per
stream (the most telling fields of its kind, messages per second, lag = now minus the event time ``E``) and a rolling
log of the event streams' events (trades, aggregate trades, diff depth), and renders them with rich. Error frames
(``{"error": {"code", "msg"}, "id"}``: an unknown stream, for example) become one-line notices. Time is passed in;
nothing here does I/O (pricegate_cli/watch.py does).
"""

from __future__ import annotations

import re
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

import orjson
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

# What a stream name may hold: Binance's are lowercase symbols, @, kind, options (kline_1M, depth5@100ms, !...@arr).
STREAM_NAME = re.compile(r"!?[A-Za-z0-9_.\-]+(@[A-Za-z0-9_.\-]+)+")
EVENT_KINDS = frozenset({"trade", "aggTrade", "depth"})  # every message matters: shown in the event log too
RATE_WINDOW_S = 5.0
LOG_LINES = 12
NO_VALUE = "-"


class UsageError(ValueError):
    """A command-line value ``pricegate watch`` cannot use (reported in one line, exit code 2)."""


def normalise_stream(name: str) -> str:
    """The stream as Binance spells it: lowercase symbol (the part before the first ``@``), the rest untouched
    (``kline_1M`` is a month, ``kline_1m`` a minute)."""
    text = name.strip()
    if STREAM_NAME.fullmatch(text) is None:
        raise UsageError(f"{name!r} is not a stream name (e.g. btcusdt@trade, ethusdt@kline_1m, !miniTicker@arr)")
    symbol, _, rest = text.partition("@")
    return text if symbol.startswith("!") else f"{symbol.lower()}@{rest}"


def combined_url(base: str, streams: Sequence[str], *, token: str | None = None) -> str:
    """``<base>/stream?streams=a/b[&token=...]`` for a WebSocket base (``ws://host:port``, ``wss://...``; http(s)
    is taken for ws(s), and a trailing ``/ws`` or ``/stream`` is dropped)."""
    text = base.strip().rstrip("/")
    scheme, _, rest = text.partition("://")
    scheme = {"http": "ws", "https": "wss"}.get(scheme.lower(), scheme.lower())
    if scheme not in ("ws", "wss") or not rest:
        raise UsageError(f"--url {base!r}: expected a WebSocket base such as ws://127.0.0.1:8000")
    parts = urlsplit(f"{scheme}://{rest}")
    if not parts.hostname or parts.query or parts.fragment:
        raise UsageError(f"--url {base!r}: expected scheme://host[:port] without a query")
    path = parts.path
    for suffix in ("/stream", "/ws"):
        path = path.removesuffix(suffix)
    if not streams:
        raise UsageError("name at least one stream (e.g. btcusdt@trade)")
    url = f"{scheme}://{parts.netloc}{path}/stream?streams={'/'.join(streams)}"
    return url + (f"&token={quote(token, safe='')}" if token else "")


def shown_url(url: str) -> str:
    """``url`` safe to show: a token's value is hidden."""
    return re.sub(r"([?&]token=)[^&]*", r"\1***", url)


def stream_kind(stream: str) -> str:
    """``trade``, ``aggTrade``, ``kline``, ``miniTicker``, ``miniTickerArr``, ``ticker``, ``bookTicker``,
    ``depthPartial``, ``depth``, ``avgPrice``, or the name's own kind for streams this view does not know."""
    if stream.startswith("!"):
        return "miniTickerArr" if stream.startswith("!miniTicker") else stream[1:].partition("@")[0]
    kind = stream.partition("@")[2].partition("@")[0]
    if kind.startswith("kline_"):
        return "kline"
    if re.fullmatch(r"depth\d+", kind):
        return "depthPartial"
    return kind


def trim(number: Any) -> str:
    """A Binance decimal string without trailing zeros (``"94250.38000000"`` → ``94250.38``)."""
    text = str(number)
    if "." in text and text.replace(".", "", 1).lstrip("-").isdigit():
        text = text.rstrip("0").rstrip(".")
    return text


def summarise(kind: str, data: Any) -> tuple[str, str]:
    """``(last, details)``: the price a person looks for first, then the other telling fields of the kind."""
    if isinstance(data, list):
        shown = ", ".join(
            f"{item.get('s', '?')} {trim(item.get('c', ''))}" for item in data[:3] if isinstance(item, dict)
        )
        return f"{len(data)} symbols", shown + (" ..." if len(data) > 3 else "")
    if not isinstance(data, dict):
        return NO_VALUE, _compact(data)
    event = data.get("e")
    if kind in ("trade", "aggTrade") or event in ("trade", "aggTrade"):
        side = "sell" if data.get("m") else "buy"
        return trim(data.get("p", NO_VALUE)), f"{side} {trim(data.get('q', ''))}"
    if kind == "kline" or event == "kline":
        k = data.get("k", {})
        closed = " closed" if k.get("x") else ""
        return trim(k.get("c", NO_VALUE)), (
            f"{k.get('i', '')} o {trim(k.get('o'))} h {trim(k.get('h'))} l {trim(k.get('l'))} v {trim(k.get('v'))}"
            + closed
        )
    if kind == "ticker" or event == "24hrTicker":
        return trim(data.get("c", NO_VALUE)), (
            f"{trim(data.get('P'))}% h {trim(data.get('h'))} l {trim(data.get('l'))} vol {trim(data.get('v'))}"
        )
    if kind == "miniTicker" or event == "24hrMiniTicker":
        return trim(data.get("c", NO_VALUE)), (
            f"o {trim(data.get('o'))} h {trim(data.get('h'))} l {trim(data.get('l'))} vol {trim(data.get('v'))}"
        )
    if kind == "bookTicker":
        return f"{trim(data.get('b'))} / {trim(data.get('a'))}", f"qty {trim(data.get('B'))} / {trim(data.get('A'))}"
    if kind == "depthPartial" and "bids" in data:
        bids, asks = data.get("bids") or [], data.get("asks") or []
        best = f"{trim(bids[0][0]) if bids else NO_VALUE} / {trim(asks[0][0]) if asks else NO_VALUE}"
        return best, f"{len(bids)}x{len(asks)} levels, id {data.get('lastUpdateId')}"
    if kind == "depth" or event == "depthUpdate":
        bids, asks = data.get("b") or [], data.get("a") or []
        return NO_VALUE, f"{len(bids)} bids, {len(asks)} asks changed, u {data.get('u')}"
    if kind == "avgPrice" or event == "avgPrice":
        return trim(data.get("w", NO_VALUE)), f"average over {data.get('i', '?')}"
    return NO_VALUE, _compact(data)


def _compact(data: Any, limit: int = 60) -> str:
    text = orjson.dumps(data).decode()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def event_time_ms(data: Any) -> int | None:
    """The payload's event time ``E`` (the newest of an array's), or None (bookTicker and partial books carry none)."""
    if isinstance(data, list):
        times = [item["E"] for item in data if isinstance(item, dict) and isinstance(item.get("E"), int)]
        return max(times) if times else None
    if isinstance(data, dict) and isinstance(data.get("E"), int):
        return int(data["E"])
    return None


@dataclass(frozen=True)
class Frame:
    """One received frame: ``data`` (``stream`` and ``payload`` set), ``error`` (``message`` set), ``reply`` (a
    ``{"result", "id"}``) or ``other``."""

    kind: str
    stream: str = ""
    payload: Any = None
    message: str = ""


def parse_frame(raw: bytes | str) -> Frame:
    try:
        decoded = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return Frame(
            "other", message=f"not JSON: {_compact(raw if isinstance(raw, str) else raw.decode(errors='replace'))}"
        )
    if isinstance(decoded, dict):
        if isinstance(decoded.get("stream"), str) and "data" in decoded:
            return Frame("data", stream=decoded["stream"], payload=decoded["data"])
        error = decoded.get("error")
        if isinstance(error, dict):
            return Frame("error", message=f"{error.get('msg', 'error')} (code {error.get('code')})")
        if "result" in decoded and "id" in decoded:
            return Frame("reply", payload=decoded["result"])
    return Frame("other", message=_compact(decoded))


@dataclass
class RateMeter:
    """Messages per second over the last ``window`` seconds (over the time since the first message, if shorter)."""

    window: float = RATE_WINDOW_S
    times: deque[float] = field(default_factory=deque)
    first: float | None = None

    def record(self, now: float) -> None:
        if self.first is None:
            self.first = now
        self.times.append(now)
        self._drop(now)

    def rate(self, now: float) -> float:
        self._drop(now)
        if self.first is None or not self.times:
            return 0.0
        span = min(self.window, max(now - self.first, 1.0))
        return len(self.times) / span

    def _drop(self, now: float) -> None:
        while self.times and self.times[0] <= now - self.window:
            self.times.popleft()


@dataclass
class StreamView:
    name: str
    kind: str
    last: str = NO_VALUE
    details: str = "waiting for the first message"
    lag_ms: float | None = None
    count: int = 0
    meter: RateMeter = field(default_factory=RateMeter)


def format_lag(lag_ms: float | None) -> str:
    if lag_ms is None:
        return NO_VALUE
    return f"{lag_ms:.0f} ms" if abs(lag_ms) < 10_000 else f"{lag_ms / 1000:.1f} s"


def clock_time(ms: float) -> str:
    """``HH:MM:SS.mmm`` local time of a unix millisecond timestamp."""
    return time.strftime("%H:%M:%S", time.localtime(ms / 1000)) + f".{int(ms % 1000):03d}"


class WatchModel:
    """The state behind the view: one row per requested stream, the event log, and the connection's status."""

    def __init__(self, streams: Sequence[str], *, log_lines: int = LOG_LINES) -> None:
        self.views = {name: StreamView(name, stream_kind(name)) for name in streams}
        self.log: deque[str] = deque(maxlen=log_lines)
        self.status = "connecting"
        self.refused = 0  # error frames since the connection opened

    def connected(self, url: str) -> None:
        self.status = f"live: {shown_url(url)}"
        self.refused = 0

    def disconnected(self, message: str) -> None:
        self.status = message

    def on_frame(self, raw: bytes | str, now: float) -> Frame:
        """Fold one frame in (``now``: unix seconds); returns what it was."""
        frame = parse_frame(raw)
        if frame.kind == "data":
            view = self.views.get(frame.stream)
            if view is None:  # a stream the server named differently (or added): shown all the same
                view = self.views[frame.stream] = StreamView(frame.stream, stream_kind(frame.stream))
            view.count += 1
            view.meter.record(now)
            view.last, view.details = summarise(view.kind, frame.payload)
            event_ms = event_time_ms(frame.payload)
            view.lag_ms = None if event_ms is None else now * 1000 - event_ms
            if view.kind in EVENT_KINDS:
                at = clock_time(event_ms if event_ms is not None else now * 1000)
                self.log.append(f"{at}  {view.name}  {view.last}  {view.details}")
        elif frame.kind == "error":
            self.refused += 1
            self.status = f"server error: {frame.message}"
            self.log.append(f"{clock_time(now * 1000)}  server error: {frame.message}")
        return frame

    def all_refused(self) -> bool:
        """Every requested stream was answered with an error and none sent data: nothing will come."""
        return self.refused >= len(self.views) and not any(view.count for view in self.views.values())

    def rows(self, now: float) -> list[tuple[str, str, str, str, str]]:
        """``(stream, last, details, msg/s, lag)`` per stream, in the order asked for."""
        return [
            (view.name, view.last, view.details, f"{view.meter.rate(now):.1f}", format_lag(view.lag_ms))
            for view in self.views.values()
        ]

    def render(self, now: float) -> RenderableType:
        table = Table(expand=False, show_edge=False, pad_edge=False)
        table.add_column("stream", style="bold", no_wrap=True)
        table.add_column("last", justify="right", no_wrap=True)
        table.add_column("details", overflow="ellipsis", no_wrap=True)
        table.add_column("msg/s", justify="right", no_wrap=True)
        table.add_column("lag", justify="right", no_wrap=True)
        for row in self.rows(now):
            table.add_row(*row)
        parts: list[RenderableType] = [table]
        if any(view.kind in EVENT_KINDS for view in self.views.values()) or self.log:
            parts.append(Text("events", style="bold"))
            parts.append(Text("\n".join(self.log) if self.log else "(none yet)", no_wrap=True, overflow="ellipsis"))
        parts.append(Text(self.status, style="dim" if self.status.startswith("live") else "yellow"))
        return Group(*parts)
