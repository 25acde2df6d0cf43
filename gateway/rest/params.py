"""Query parameters of the Binance-compatible REST endpoints: parsing, validation and Binance's error answers.

Every rule rejects with a :class:`RestError` carrying Binance's code and message (``-1100`` illegal characters,
``-1101`` duplicated parameter, ``-1102`` mandatory parameter missing, ``-1108`` overflow, ``-1120`` invalid
interval, ``-1121`` invalid symbol, ``-1128`` bad combination, ``-1130`` invalid value (a ``limit`` out of range,
a time outside ``shared.intervals``' supported range), ``-1151`` duplicate symbols, ``-1023`` start after end),
so outside input never reaches a query, a date computation or a cache key unchecked. The
request weights (the cost charged against an IP's per-minute budget) follow Binance's published table. Pure:
strings in, values or errors out.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

import orjson

from shared.binance.weight import (
    WEIGHT_EXCHANGE_INFO as WEIGHT_EXCHANGE_INFO,
    WEIGHT_KLINES as WEIGHT_KLINES,
    WEIGHT_TICKER_MANY,
    WEIGHT_TICKER_ONE,
    depth_weight as depth_limit_weight,
)
from shared.intervals import MAX_TIME_MS, MIN_TIME_MS
from shared.streams import KLINE_INTERVALS

Query = Mapping[str, Sequence[str]]

SYMBOL_PATTERN = "^[A-Z0-9-_.]{1,20}$"
_SYMBOL = re.compile(SYMBOL_PATTERN[1:-1])
NUMBER_PATTERN = "^[0-9]{1,20}$"
_NUMBER = re.compile(NUMBER_PATTERN[1:-1])
SYMBOLS_PATTERN = '^\\[("[A-Z0-9-_.]{1,20}"(,"[A-Z0-9-_.]{1,20}"){0,}){0,1}\\]$'
INT64_MAX = 2**63 - 1
MAX_SYMBOLS = 100  # per request; a longer `symbols` list is refused before it is parsed
KLINES_DEFAULT_LIMIT, KLINES_MAX_LIMIT = 500, 1000
DEPTH_DEFAULT_LIMIT, DEPTH_MAX_LIMIT = 100, 5000
_UTC_TIME_ZONES = frozenset({"0", "+0", "-0", "00:00", "0:00", "+00:00", "-00:00", "+0:00", "-0:00"})

# Request weights: Binance's figures (the rest from shared.binance.weight); technicals is ours.
WEIGHT_PING = WEIGHT_TIME = 1
WEIGHT_TECHNICALS = 5


class RestError(Exception):
    """A request Binance would refuse: HTTP ``status`` with body ``{"code": code, "msg": msg}``."""

    def __init__(self, code: int, msg: str, status: int = 400) -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.status = status

    def body(self) -> bytes:
        return orjson.dumps({"code": self.code, "msg": self.msg})


def query_from_pairs(pairs: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    query: dict[str, list[str]] = {}
    for name, value in pairs:
        query.setdefault(name, []).append(value)
    return query


def illegal(name: str, pattern: str) -> RestError:
    return RestError(-1100, f"Illegal characters found in parameter '{name}'; legal range is '{pattern}'.")


def invalid(name: str, why: str = "") -> RestError:
    return RestError(-1130, f"Data sent for parameter '{name}' is not valid.{' ' + why if why else ''}")


def optional(query: Query, name: str) -> str | None:
    values = query.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise RestError(-1101, "Duplicate values for a parameter detected.")
    value = values[0]
    if value == "":
        raise RestError(-1105, f"Parameter '{name}' was empty.")
    return value


def mandatory(query: Query, name: str) -> str:
    value = optional(query, name)
    if value is None:
        raise RestError(-1102, f"Mandatory parameter '{name}' was not sent, was empty/null, or malformed.")
    return value


def check_symbol(value: str, known: Collection[str], name: str = "symbol") -> str:
    if _SYMBOL.fullmatch(value) is None:
        raise illegal(name, SYMBOL_PATTERN)
    if value not in known:
        raise RestError(-1121, "Invalid symbol.")
    return value


def symbol(query: Query, known: Collection[str]) -> str:
    return check_symbol(mandatory(query, "symbol"), known)


def interval(query: Query) -> str:
    value = mandatory(query, "interval")
    if value not in KLINE_INTERVALS:
        raise RestError(-1120, "Invalid interval.")
    return value


def number(query: Query, name: str) -> int | None:
    value = optional(query, name)
    if value is None:
        return None
    if _NUMBER.fullmatch(value) is None:
        raise illegal(name, NUMBER_PATTERN)
    parsed = int(value)
    if parsed > INT64_MAX:
        raise RestError(-1108, f"Parameter '{name}' overflowed.")
    return parsed


def time_ms(query: Query, name: str) -> int | None:
    """A time in Unix ms within the supported range: up to 9999-11-30, whose candles of every interval close
    within year 9999 (beyond a signed 64-bit integer it is Binance's overflow error)."""
    value = number(query, name)
    if value is not None and not MIN_TIME_MS <= value <= MAX_TIME_MS:
        raise invalid(name, f"It must be between {MIN_TIME_MS} and {MAX_TIME_MS} (9999-11-30T23:59:59.999Z).")
    return value


def limit(query: Query, *, default: int, maximum: int, clamp: bool = False) -> int:
    """``limit`` in 1..maximum; above the maximum it is refused, or cut down with ``clamp`` (depth)."""
    value = number(query, "limit")
    if value is None:
        return default
    if value < 1 or (value > maximum and not clamp):
        raise invalid("limit", f"It must be between 1 and {maximum}.")
    return min(value, maximum)


def symbols(query: Query, known: Collection[str]) -> list[str]:
    """The ``symbols`` JSON array (``["BTCUSDT","BNBUSDT"]``): at most MAX_SYMBOLS, no duplicates, all known."""
    raw = mandatory(query, "symbols")
    if len(raw) > MAX_SYMBOLS * 24 + 2:  # refuse a huge list before parsing it
        raise invalid("symbols", f"At most {MAX_SYMBOLS} symbols per request.")
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise illegal("symbols", SYMBOLS_PATTERN) from None
    if not isinstance(parsed, list) or not all(isinstance(item, str) for item in parsed):
        raise illegal("symbols", SYMBOLS_PATTERN)
    if not parsed:
        raise RestError(-1102, "Mandatory parameter 'symbols' was not sent, was empty/null, or malformed.")
    if len(parsed) > MAX_SYMBOLS:
        raise invalid("symbols", f"At most {MAX_SYMBOLS} symbols per request.")
    for item in parsed:
        if _SYMBOL.fullmatch(item) is None:
            raise illegal("symbols", SYMBOLS_PATTERN)
    if len(set(parsed)) != len(parsed):
        raise RestError(-1151, "Symbol is present multiple times in the list.")
    for item in parsed:
        check_symbol(item, known, "symbols")
    return list(parsed)


def one_or_many_symbols(query: Query, known: Collection[str]) -> list[str] | None:
    """``symbol`` (a list of one), ``symbols`` (the list) or neither (None: all symbols); never both."""
    if "symbol" in query and "symbols" in query:
        raise RestError(-1128, "Combination of optional parameters invalid.")
    if "symbol" in query:
        return [symbol(query, known)]
    if "symbols" in query:
        return symbols(query, known)
    return None


@dataclass(frozen=True, slots=True)
class KlinesRequest:
    symbol: str
    interval: str
    start_ms: int | None
    end_ms: int | None
    limit: int


def klines_request(query: Query, known: Collection[str]) -> KlinesRequest:
    request = KlinesRequest(
        symbol=symbol(query, known),
        interval=interval(query),
        start_ms=time_ms(query, "startTime"),
        end_ms=time_ms(query, "endTime"),
        limit=limit(query, default=KLINES_DEFAULT_LIMIT, maximum=KLINES_MAX_LIMIT),
    )
    time_zone = optional(query, "timeZone")
    if time_zone is not None and time_zone not in _UTC_TIME_ZONES:
        raise invalid("timeZone", "Only UTC (0) is served by this gateway.")
    if request.start_ms is not None and request.end_ms is not None and request.start_ms > request.end_ms:
        raise RestError(-1023, "Start time is greater than end time.")
    return request


def depth_weight(query: Query) -> int:
    """Binance's weight for ``GET /api/v3/depth``, by limit (an unreadable limit weighs as the default)."""
    values = query.get("limit") or ["100"]
    requested = int(values[0]) if _NUMBER.fullmatch(values[0]) else DEPTH_DEFAULT_LIMIT
    return depth_limit_weight(requested)


def ticker_weight(query: Query) -> int:
    return WEIGHT_TICKER_ONE if "symbol" in query and "symbols" not in query else WEIGHT_TICKER_MANY
