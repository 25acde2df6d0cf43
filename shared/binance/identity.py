"""The exchange's own identity of each market event, read from its decoded payload (pure).

Binance numbers what it streams: trades by trade id ``t``, aggregate trades by ``a``, diff-depth events by their
update-id range ``U``..``u``, bookTicker by update id ``u``, partial books by ``lastUpdateId``; every other event
(klines, tickers, avgPrice, the miniTicker array) carries its event time ``E``. Those numbers only grow within a
stream, so they tell a duplicate (the overlap of two upstream connections during a rotation, or of two ingest
processes at a failover) from a new event, and — for trades, aggregate trades and diff depth, whose ids are
contiguous — a gap from the next event. :func:`event_identity` maps a payload to an
:class:`~shared.broker.contract.EventId` without knowing its stream name: the event type ``e`` (or, for the two payloads
without one, their distinctive keys) says which number is the identity. It never raises: a payload it cannot
place gets None, and is then published without duplicate or gap checks.
"""

from __future__ import annotations

from shared.broker.contract import EventId
from shared.streams import StreamKind

CONTIGUOUS_KINDS = frozenset({StreamKind.TRADE, StreamKind.AGG_TRADE, StreamKind.DEPTH})
"""Kinds whose consecutive events carry consecutive ids (``first`` = previous ``last`` + 1): a jump is a gap."""

BACKFILL_KINDS = frozenset({StreamKind.TRADE, StreamKind.AGG_TRADE})
"""Kinds whose missed events Binance's REST API can return by id (``historicalTrades`` and ``aggTrades``)."""

# Event type -> the key holding its identity. Diff depth also has a first id (U).
_ID_KEY_BY_EVENT = {"trade": "t", "aggTrade": "a", "depthUpdate": "u"}


def _int(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return None


def event_identity(document: object) -> EventId | None:
    """The identity of one decoded Binance stream payload, or None if it has none we recognise."""
    if type(document) is dict:  # what orjson makes; the loop below is ingest's hot path, so no helper calls on it
        get = document.get
        event_time = get("E")
        if type(event_time) is not int:
            event_time = _int(event_time)
        event_type = get("e")
        if isinstance(event_type, str):
            key = _ID_KEY_BY_EVENT.get(event_type)
            if key is None:
                # kline, 24hrTicker, 24hrMiniTicker, avgPrice, ...: state pushed on a clock, identified by its time.
                return None if event_time is None else EventId(event_time, event_time, event_time)
            last = get(key)
            if type(last) is not int:
                last = _int(last)
                if last is None:
                    return None
            if key != "u":
                return EventId(last, last, event_time)
            first = get("U")  # depthUpdate: U..u
            if type(first) is not int:
                first = _int(first)
            if first is None or first > last:
                first = last
            return EventId(first, last, event_time)
        # Spot bookTicker and partial books carry no "e" (and no "E").
        book_update = _int(get("lastUpdateId"))
        if book_update is not None:
            return EventId(book_update, book_update, None)
        update = get("u")
        if type(update) is not int:
            update = _int(update)
        if update is not None and "b" in document:
            return EventId(update, update, event_time)
        return None
    if isinstance(document, list):
        # !miniTicker@arr: only symbols that changed, all stamped with the same push; the newest time identifies it.
        times = [t for entry in document if isinstance(entry, dict) and (t := _int(entry.get("E"))) is not None]
        if not times:
            return None
        newest = max(times)
        return EventId(newest, newest, newest)
    if isinstance(document, dict):  # a dict subclass: the same rules, the slow way
        return event_identity(dict(document))
    return None
