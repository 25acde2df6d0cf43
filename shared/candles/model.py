"""Candles (klines): the value type, the ``CandleStore`` protocol, and conversions to and from Binance's shapes.

A :class:`Candle` keeps prices and volumes as the exchange's decimal strings, so a candle read from a kline
stream, stored, and served again by ``GET /api/v3/klines`` is byte-for-byte what the exchange said. Stores
(in-memory for the embedded demo, PostgreSQL for scaled mode) upsert closed candles idempotently on
(symbol, interval, open time) and return ranges by open time. Pure: no I/O here.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from shared.streams import KLINE_INTERVALS

_DECIMAL = re.compile(r"-?[0-9]{1,30}(\.[0-9]{1,20})?")
_INT64_MAX = 2**63 - 1  # times and trade counts are bigint columns
_SYMBOL = re.compile(r"[A-Z0-9_.-]{1,20}")


@dataclass(frozen=True, slots=True)
class Candle:
    """One kline. Times are Unix ms; ``close_time`` is the window's last millisecond, as on Binance."""

    symbol: str
    interval: str
    open_time: int
    close_time: int
    open: str
    high: str
    low: str
    close: str
    volume: str
    quote_volume: str
    trades: int
    taker_buy_base_volume: str
    taker_buy_quote_volume: str

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.symbol, self.interval, self.open_time)

    def kline_row(self) -> list[Any]:
        """Binance's 12-element klines array (the last element is unused and always "0")."""
        return [
            self.open_time,
            self.open,
            self.high,
            self.low,
            self.close,
            self.volume,
            self.close_time,
            self.quote_volume,
            self.trades,
            self.taker_buy_base_volume,
            self.taker_buy_quote_volume,
            "0",
        ]


class CandleStore(Protocol):
    """Where closed candles live. ``upsert`` is idempotent: writing a candle again replaces it."""

    async def upsert(self, candles: Sequence[Candle]) -> int:
        """Insert or replace ``candles``; returns how many were written."""
        ...

    async def range(self, symbol: str, interval: str, first_open: int, last_open: int) -> list[Candle]:
        """Stored candles with ``first_open <= open_time <= last_open``, oldest first."""
        ...

    async def close(self) -> None: ...


def klines_json(candles: Sequence[Candle]) -> bytes:
    """The body of ``GET /api/v3/klines`` for ``candles`` (already sorted by open time)."""
    return orjson.dumps([candle.kline_row() for candle in candles])


class MalformedKline(ValueError):
    """A kline payload or REST row that does not have Binance's shape."""


def _decimal_string(value: object, what: str) -> str:
    # Plain decimals only ("94250.01000000"): they go into a numeric column and back out unchanged.
    if not isinstance(value, str) or _DECIMAL.fullmatch(value) is None:
        raise MalformedKline(f"{what} is not a decimal string: {value!r}")
    return value


def _integer(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _INT64_MAX:
        raise MalformedKline(f"{what} is not a non-negative 64-bit integer: {value!r}")
    return value


def _symbol(value: object) -> str:
    if not isinstance(value, str) or _SYMBOL.fullmatch(value.upper()) is None:
        raise MalformedKline(f"not a symbol: {value!r}")
    return value.upper()


def _checked(candle: Candle) -> Candle:
    if candle.close_time <= candle.open_time:
        raise MalformedKline(f"close time {candle.close_time} is not after open time {candle.open_time}")
    return candle


def candle_from_event(payload: bytes) -> tuple[Candle, bool]:
    """Parse a ``<symbol>@kline_<interval>`` payload into (candle, closed). Raises MalformedKline."""
    try:
        event = orjson.loads(payload)
    except orjson.JSONDecodeError as error:
        raise MalformedKline(f"kline payload is not JSON: {error}") from None
    k = event.get("k") if isinstance(event, dict) else None
    if not isinstance(k, dict):
        raise MalformedKline("kline payload has no 'k' object")
    symbol, interval, closed = k.get("s"), k.get("i"), k.get("x")
    if interval not in KLINE_INTERVALS or not isinstance(closed, bool):
        raise MalformedKline(f"kline payload has a bad interval or 'x': {interval!r} {closed!r}")
    candle = Candle(
        symbol=_symbol(symbol),
        interval=interval,
        open_time=_integer(k.get("t"), "t"),
        close_time=_integer(k.get("T"), "T"),
        open=_decimal_string(k.get("o"), "o"),
        high=_decimal_string(k.get("h"), "h"),
        low=_decimal_string(k.get("l"), "l"),
        close=_decimal_string(k.get("c"), "c"),
        volume=_decimal_string(k.get("v"), "v"),
        quote_volume=_decimal_string(k.get("q"), "q"),
        trades=_integer(k.get("n"), "n"),
        taker_buy_base_volume=_decimal_string(k.get("V"), "V"),
        taker_buy_quote_volume=_decimal_string(k.get("Q"), "Q"),
    )
    return _checked(candle), closed


def candle_from_row(symbol: str, interval: str, row: object) -> Candle:
    """Parse one element of a ``GET /api/v3/klines`` response. Raises MalformedKline."""
    if not isinstance(row, list) or len(row) < 11:
        raise MalformedKline(f"klines row is not a 12-element array: {row!r}")
    candle = Candle(
        symbol=_symbol(symbol),
        interval=interval,
        open_time=_integer(row[0], "open time"),
        close_time=_integer(row[6], "close time"),
        open=_decimal_string(row[1], "open"),
        high=_decimal_string(row[2], "high"),
        low=_decimal_string(row[3], "low"),
        close=_decimal_string(row[4], "close"),
        volume=_decimal_string(row[5], "volume"),
        quote_volume=_decimal_string(row[7], "quote volume"),
        trades=_integer(row[8], "trades"),
        taker_buy_base_volume=_decimal_string(row[9], "taker buy base volume"),
        taker_buy_quote_volume=_decimal_string(row[10], "taker buy quote volume"),
    )
    return _checked(candle)


def kline_stream(symbol: str, interval: str) -> str:
    """The canonical stream name carrying ``symbol``'s ``interval`` candles."""
    return f"{symbol.lower()}@kline_{interval}"
