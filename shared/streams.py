"""Stream-name grammar: parse and normalise Binance stream names, classify them, and name their broker keys.

A stream name is what clients put in SUBSCRIBE (``btcusdt@trade``, ``BTCUSDT@depth5@1000ms``,
``!miniTicker@arr``). Parsing returns the canonical name (lowercase symbol, canonical kind spelling, the
default ``@1000ms`` speed dropped) together with its kind. Kinds are split into *state* streams, where only
the newest value matters (a slow client may be conflated to it, a new subscriber may get the last value),
and *event* streams, where every message matters (trades, diff depth, the changed-only ticker array).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from shared.errors import ProtocolError

KLINE_INTERVALS: tuple[str, ...] = (
    "1s",
    "1m",
    "3m",
    "5m",
    "15m",
    "30m",
    "1h",
    "2h",
    "4h",
    "6h",
    "8h",
    "12h",
    "1d",
    "3d",
    "1w",
    "1M",
)
DEPTH_LEVELS: tuple[int, ...] = (5, 10, 20)
MAX_STREAM_NAME_LENGTH = 64
_SYMBOL_RE = re.compile(r"[A-Za-z0-9]{2,20}")

# Binance error code for a bad request; every grammar error maps to it.
INVALID_REQUEST = 2


class StreamKind(Enum):
    """What a stream carries. The value is the bounded metrics label."""

    TRADE = "trade"
    AGG_TRADE = "aggTrade"
    KLINE = "kline"
    MINI_TICKER = "miniTicker"
    MINI_TICKER_ARR = "miniTickerArr"
    TICKER = "ticker"
    BOOK_TICKER = "bookTicker"
    DEPTH_PARTIAL = "depthPartial"
    DEPTH = "depth"
    AVG_PRICE = "avgPrice"

    @property
    def is_state(self) -> bool:
        """True when only the newest message matters (conflatable, has a last value)."""
        return self in _STATE_KINDS


_STATE_KINDS = frozenset(
    {
        StreamKind.KLINE,
        StreamKind.MINI_TICKER,
        StreamKind.TICKER,
        StreamKind.BOOK_TICKER,
        StreamKind.DEPTH_PARTIAL,
        StreamKind.AVG_PRICE,
    }
)

# Lowercased kind token -> (canonical spelling, kind). Kline and depth are handled separately.
_SIMPLE_KINDS: dict[str, tuple[str, StreamKind]] = {
    "trade": ("trade", StreamKind.TRADE),
    "aggtrade": ("aggTrade", StreamKind.AGG_TRADE),
    "miniticker": ("miniTicker", StreamKind.MINI_TICKER),
    "ticker": ("ticker", StreamKind.TICKER),
    "bookticker": ("bookTicker", StreamKind.BOOK_TICKER),
    "avgprice": ("avgPrice", StreamKind.AVG_PRICE),
}
MINI_TICKER_ARR = "!miniTicker@arr"
_RETIRED = {
    "!ticker@arr": "!ticker@arr was retired by Binance on 2026-03-26; use <symbol>@ticker or !miniTicker@arr",
    "!bookticker": "!bookTicker was removed by Binance in 2022; use <symbol>@bookTicker",
}


@dataclass(frozen=True, slots=True)
class Stream:
    """A parsed, canonical stream."""

    name: str
    kind: StreamKind
    symbol: str | None  # uppercase exchange symbol, None for all-market streams
    interval: str | None = None  # kline interval
    levels: int | None = None  # partial-depth levels
    fast: bool = False  # @100ms variant of depth streams

    @property
    def is_state(self) -> bool:
        return self.kind.is_state


def invalid_stream(name: object, why: str) -> ProtocolError:
    return ProtocolError(INVALID_REQUEST, f"Invalid request: invalid stream {name!r}: {why}")


def parse_stream(raw: str) -> Stream:
    """Parse one stream name, raising ProtocolError(code 2) with a precise reason when it is invalid."""
    if not isinstance(raw, str):
        raise invalid_stream(raw, "stream names must be strings")
    if not raw or len(raw) > MAX_STREAM_NAME_LENGTH:
        raise invalid_stream(raw[:MAX_STREAM_NAME_LENGTH], "empty or too long")
    lowered = raw.lower()
    for retired, why in _RETIRED.items():
        if lowered == retired or lowered.startswith(retired + "@"):
            raise invalid_stream(raw, why)
    if not raw.isascii():
        raise invalid_stream(raw, "stream names are ASCII")
    parts = raw.split("@")
    if lowered == "!miniticker@arr" or lowered.startswith("!miniticker@arr@"):
        rest = parts[2:]
        if rest and rest != ["1000ms"]:
            raise invalid_stream(raw, "the only speed of !miniTicker@arr is 1000ms")
        return Stream(MINI_TICKER_ARR, StreamKind.MINI_TICKER_ARR, None)
    if len(parts) < 2 or len(parts) > 3:
        raise invalid_stream(raw, "expected <symbol>@<kind>[@<speed>]")
    symbol_token, kind_token = parts[0], parts[1]
    speed = parts[2] if len(parts) == 3 else None
    if not _SYMBOL_RE.fullmatch(symbol_token):
        raise invalid_stream(raw, "symbol must be 2-20 letters or digits")
    symbol = symbol_token.lower()
    kind_lower = kind_token.lower()

    if kind_lower.startswith("kline_"):
        interval = kind_token[len("kline_") :]
        if interval not in KLINE_INTERVALS:
            raise invalid_stream(raw, f"kline interval must be one of {' '.join(KLINE_INTERVALS)}")
        if speed is not None:
            raise invalid_stream(raw, "kline streams take no speed suffix")
        return Stream(f"{symbol}@kline_{interval}", StreamKind.KLINE, symbol.upper(), interval=interval)

    if kind_lower.startswith("depth"):
        levels_token = kind_lower[len("depth") :]
        fast = False
        if speed is not None:
            if speed == "100ms":
                fast = True
            elif speed != "1000ms":
                raise invalid_stream(raw, "depth speed must be 100ms or 1000ms")
        suffix = "@100ms" if fast else ""
        if levels_token == "":
            return Stream(f"{symbol}@depth{suffix}", StreamKind.DEPTH, symbol.upper(), fast=fast)
        if levels_token.isascii() and levels_token.isdigit() and int(levels_token) in DEPTH_LEVELS:
            levels = int(levels_token)
            return Stream(
                f"{symbol}@depth{levels}{suffix}",
                StreamKind.DEPTH_PARTIAL,
                symbol.upper(),
                levels=levels,
                fast=fast,
            )
        raise invalid_stream(raw, "partial depth levels must be 5, 10 or 20")

    simple = _SIMPLE_KINDS.get(kind_lower)
    if simple is None:
        raise invalid_stream(raw, f"unknown stream kind {kind_token!r}")
    if speed is not None:
        raise invalid_stream(raw, f"{simple[0]} streams take no speed suffix")
    canonical, kind = simple
    return Stream(f"{symbol}@{canonical}", kind, symbol.upper())


@dataclass(frozen=True, slots=True)
class ChannelKeys:
    """Broker names for one stream. Every key shares the ``{stream}`` hash tag so that in Redis Cluster the
    channel's sequence, epoch, history and last value live on the shard that carries its sharded pub/sub."""

    channel: str
    seq: str
    epoch: str
    history: str
    last: str
    event_id: str  # identity of the last event published (ingest's duplicate filter across processes)


class ChannelNamer:
    """Maps stream names to broker channel/key names under a prefix and venue (``pg:md:binance``)."""

    def __init__(self, prefix: str, venue: str) -> None:
        self.base = f"{prefix}:{venue}"
        self._prefix_len = len(self.base) + 2  # "<base>:{"

    def channel(self, stream: str) -> str:
        return f"{self.base}:{{{stream}}}"

    def stream_of(self, channel: str) -> str:
        """Inverse of :meth:`channel`."""
        return channel[self._prefix_len : -1]

    def keys(self, stream: str) -> ChannelKeys:
        channel = self.channel(stream)
        return ChannelKeys(
            channel=channel,
            seq=channel + ":seq",
            epoch=channel + ":epoch",
            history=channel + ":hist",
            last=channel + ":last",
            event_id=channel + ":eid",
        )

    @property
    def demand_key(self) -> str:
        """Sorted set: stream -> expiry (unix seconds) of the newest gateway interest in it."""
        return f"{self.base}:demand"

    @property
    def exchange_info_key(self) -> str:
        """Cached exchangeInfo JSON (bytes, Binance's layout) written by ingest, read by gateways."""
        return f"{self.base}:exchangeInfo"

    @property
    def leader_key(self) -> str:
        """Ingest's leader lease: the token of the one ingest process allowed to publish, with a TTL."""
        return f"{self.base}:ingest:leader"

    @property
    def fence_key(self) -> str:
        """Sorted set whose member ``e`` scores the highest fencing epoch a leader announced (one Redis: one fence;
        a cluster has one per slot, :meth:`slot_fence_key`)."""
        return f"{self.base}:fence"

    def slot_fence_key(self, tag: str) -> str:
        """The fence of the slot ``tag`` hashes to (``shared.redis.slots.fence_tags``)."""
        return f"{self.base}:fence:{{{tag}}}"

    @property
    def heartbeat_channel(self) -> str:
        """Ingest publishes its wall clock here every second so gateways can see data is flowing."""
        return f"{self.base}:heartbeat"
