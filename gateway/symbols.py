"""The symbols clients may ask for on this replica, from the exchangeInfo document ingest caches in the broker.

Until ingest has written one, the configured symbols are known. The document is polled (fast until the first one
arrives, then every :data:`EXCHANGE_INFO_POLL_S`); a malformed one is ignored and the last good copy kept. Both
the WebSocket admission/control path and REST validate symbols here and nowhere else.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from shared.binance.exchange_info import symbols_from_exchange_info
from shared.broker.contract import Broker
from shared.cancellation import raise_if_cancel_was_lost

logger = logging.getLogger("pricegate.gateway.symbols")

EXCHANGE_INFO_POLL_S = 30.0
FIRST_POLL_S = 0.1  # until ingest has written its first exchangeInfo


class SymbolDirectory:
    def __init__(self, broker: Broker, configured: Iterable[str]) -> None:
        self.broker = broker
        self.known: frozenset[str] = frozenset(configured)
        self.exchange_info: bytes | None = None  # the document as ingest cached it (served by REST verbatim)

    def is_known(self, symbol: str) -> bool:
        return symbol in self.known

    def update(self, document: bytes) -> None:
        """Take a new exchangeInfo document (ignored, with a warning, when malformed or empty)."""
        try:
            symbols = frozenset(symbols_from_exchange_info(document))
        except ValueError as error:
            logger.warning("ignoring malformed exchangeInfo from the broker: %s", error)
            return
        if symbols:
            self.exchange_info = document
            self.known = symbols

    async def load(self) -> bytes | None:
        """Read the cached exchangeInfo from the broker (keeping the last good copy on failure)."""
        try:
            document = await self.broker.get_exchange_info()
        except Exception as error:  # keep the last good copy
            logger.warning("reading exchangeInfo from the broker failed: %r", error)
            document = None
        if document is not None and document != self.exchange_info:
            self.update(document)
        return self.exchange_info

    async def poll_forever(self) -> None:
        """Keep the exchangeInfo (and so the known symbols) current."""
        while True:
            await self.load()
            raise_if_cancel_was_lost()
            await asyncio.sleep(EXCHANGE_INFO_POLL_S if self.exchange_info is not None else FIRST_POLL_S)
