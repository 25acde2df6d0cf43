"""Fetch the trades of a gap from Binance's REST API, page by page, within the REST budget and a deadline.

``<symbol>@aggTrade`` gaps are filled from ``GET /api/v3/aggTrades?fromId=`` (weight 4 per page of up to 1000),
``<symbol>@trade`` gaps from ``GET /api/v3/historicalTrades?fromId=`` (weight 25 per page) unless that is turned
off or the exchange refuses it (older API versions wanted an API key for it: then it is off for the rest of the
process, and trade gaps are only counted). Whatever could not be fetched before the deadline — the exchange
banned us, the budget is spent, the ids are not (yet) there — comes back as missing ranges for the caller to
count and log.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from ingest.publish.continuity import IdRange, missing_ranges
from ingest.publish.trades import ENDPOINTS, REST_PAGE_LIMIT, events_from_rest, last_row_id
from shared.binance.rest import BinanceRest, RestRefused
from shared.broker.contract import OutgoingMessage
from shared.errors import UpstreamError
from shared.streams import StreamKind

logger = logging.getLogger("pricegate.ingest.backfill")

# Binance's answers when an endpoint wants an API key we do not send.
_NEEDS_API_KEY = frozenset({-2014, -2015})


@dataclass(frozen=True, slots=True)
class Backfilled:
    messages: list[OutgoingMessage]  # stream events of the fetched ids, in id order
    missing: list[IdRange] = field(default_factory=list)  # ids asked for and not obtained


class TradeBackfiller:
    def __init__(self, rest: BinanceRest, *, trades: bool = True) -> None:
        self.rest = rest
        self.trades = trades  # whether @trade gaps are fetched (historicalTrades)

    def can_fill(self, kind: StreamKind) -> bool:
        return kind is StreamKind.AGG_TRADE or (kind is StreamKind.TRADE and self.trades)

    async def fetch_trades(
        self, kind: StreamKind, stream: str, symbol: str, wanted: IdRange, deadline: float
    ) -> Backfilled:
        if not self.can_fill(kind):
            return Backfilled([], [wanted])
        endpoint = ENDPOINTS[kind]
        fetched: list[OutgoingMessage] = []
        next_id = wanted.first
        try:
            while next_id <= wanted.last:
                limit = min(REST_PAGE_LIMIT, wanted.last - next_id + 1)
                rows, _ = await self.rest.get_json(
                    endpoint.path,
                    {"symbol": symbol, "fromId": next_id, "limit": limit},
                    endpoint.weight,
                    deadline=deadline,
                )
                fetched.extend(events_from_rest(kind, stream, symbol, rows, next_id, wanted.last))
                last = last_row_id(kind, rows)
                if last is None or last < next_id:
                    break  # the exchange has nothing from next_id on
                next_id = last + 1
        except RestRefused as error:
            if kind is StreamKind.TRADE and (error.code in _NEEDS_API_KEY or error.status in (401, 403)):
                self.trades = False
                logger.warning(
                    "Binance refuses historicalTrades without an API key (%s): @trade gaps are not filled", error
                )
            else:
                logger.warning("backfill of %s %s stopped: %s", stream, wanted, error)
        except UpstreamError as error:
            logger.warning("backfill of %s %s stopped: %s", stream, wanted, error)
        except asyncio.CancelledError:
            raise
        got = {message.event.last for message in fetched if message.event is not None}
        return Backfilled(fetched, missing_ranges(wanted, got))
