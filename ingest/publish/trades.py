"""Missed trades fetched over REST, turned back into the stream events clients expect (pure).

After an unplanned upstream drop (or a failover the standby's buffer did not cover) ingest asks Binance's REST
API for the trades it missed, by id: ``GET /api/v3/aggTrades?fromId=`` for ``<symbol>@aggTrade`` and ``GET
/api/v3/historicalTrades?fromId=`` for ``<symbol>@trade``. REST rows are not stream events: they lack the event
type, event time and symbol, and historicalTrades spells its fields out. These functions rebuild the stream's
payload with Binance's field order; the event time ``E`` of a backfilled event is its trade time ``T`` (the
real push time is unknown). These payloads are the one place where ingest publishes bytes the exchange did not
send on the stream. A row that does not have the documented shape is skipped, and its id counts as not backfilled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeGuard

import orjson

from shared.broker.contract import EventId, OutgoingMessage
from shared.streams import StreamKind

REST_PAGE_LIMIT = 1000
"""Most rows Binance returns per aggTrades/historicalTrades call."""


@dataclass(frozen=True, slots=True)
class TradeEndpoint:
    path: str
    weight: int
    id_field: str


# Weights from Binance's REST docs (market-data endpoints).
AGG_TRADES = TradeEndpoint("/api/v3/aggTrades", 4, "a")
HISTORICAL_TRADES = TradeEndpoint("/api/v3/historicalTrades", 25, "id")
ENDPOINTS = {StreamKind.AGG_TRADE: AGG_TRADES, StreamKind.TRADE: HISTORICAL_TRADES}


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _agg_trade(symbol: str, row: dict[str, Any]) -> tuple[int, int, bytes] | None:
    a, f, last, t = row.get("a"), row.get("f"), row.get("l"), row.get("T")
    p, q, m, big_m = row.get("p"), row.get("q"), row.get("m"), row.get("M", True)
    if not (_is_int(a) and _is_int(f) and _is_int(last) and _is_int(t)):
        return None
    if not (isinstance(p, str) and isinstance(q, str) and isinstance(m, bool) and isinstance(big_m, bool)):
        return None
    payload = orjson.dumps(
        {"e": "aggTrade", "E": t, "s": symbol, "a": a, "p": p, "q": q, "f": f, "l": last, "T": t, "m": m, "M": big_m}
    )
    return a, t, payload


def _trade(symbol: str, row: dict[str, Any]) -> tuple[int, int, bytes] | None:
    trade_id, price, qty, t = row.get("id"), row.get("price"), row.get("qty"), row.get("time")
    m, big_m = row.get("isBuyerMaker"), row.get("isBestMatch", True)
    if not (_is_int(trade_id) and _is_int(t) and isinstance(price, str) and isinstance(qty, str)):
        return None
    if not (isinstance(m, bool) and isinstance(big_m, bool)):
        return None
    payload = orjson.dumps(
        {"e": "trade", "E": t, "s": symbol, "t": trade_id, "p": price, "q": qty, "T": t, "m": m, "M": big_m}
    )
    return trade_id, t, payload


def events_from_rest(
    kind: StreamKind, stream: str, symbol: str, rows: object, first_id: int, last_id: int
) -> list[OutgoingMessage]:
    """Stream events for the rows of one REST page whose ids fall in ``first_id..last_id``, in id order."""
    if not isinstance(rows, list):
        return []
    convert = _agg_trade if kind is StreamKind.AGG_TRADE else _trade
    events: dict[int, OutgoingMessage] = {}
    for row in rows:
        if not isinstance(row, dict):
            continue
        converted = convert(symbol, row)
        if converted is None:
            continue
        event_id, trade_time, payload = converted
        if first_id <= event_id <= last_id:
            events[event_id] = OutgoingMessage(stream, payload, False, EventId(event_id, event_id, trade_time))
    return [events[event_id] for event_id in sorted(events)]


def last_row_id(kind: StreamKind, rows: object) -> int | None:
    """The highest id in a REST page (to continue paging from), whatever the rows' other fields hold."""
    if not isinstance(rows, list):
        return None
    key = ENDPOINTS[kind].id_field
    ids = [row[key] for row in rows if isinstance(row, dict) and _is_int(row.get(key))]
    return max(ids) if ids else None
