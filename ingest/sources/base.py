"""What every market source is: runs until cancelled, hands batches of ``OutgoingMessage`` (canonical stream,
exchange payload bytes, keep-last flag) to a ``publish`` callable in order, is told which streams clients want,
and describes its symbols as a Binance exchangeInfo document. Implemented by the synthetic market
(:mod:`ingest.sources.synthetic`), a replayed recording (:mod:`ingest.sources.replay`) and the live exchange
(:mod:`ingest.sources.binance`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from shared.broker.contract import OutgoingMessage
from shared.clock import wall_clock_ms as wall_clock_ms  # the sources' default clock, re-exported

Publish = Callable[[Sequence[OutgoingMessage]], Awaitable[None]]


class MarketSource(Protocol):
    """Where market data comes from (Binance upstream, replay, synthetic)."""

    name: str

    async def run(self, publish: Publish) -> None:
        """Publish batches in order until cancelled."""
        ...

    def set_wanted(self, streams: frozenset[str]) -> None:
        """Canonical stream names clients want (demand plus the always-on set)."""
        ...

    async def exchange_info(self) -> bytes:
        """A Binance-layout exchangeInfo document for the symbols this source serves."""
        ...
