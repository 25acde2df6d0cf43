"""``SyntheticSource``: the synthetic market (:mod:`ingest.sources.synthetic.market`) driven on the wall clock."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Sequence

from ingest.sources.base import Publish, wall_clock_ms
from ingest.sources.synthetic.market import SyntheticMarket
from shared.binance.exchange_info import build_exchange_info
from shared.broker.contract import OutgoingMessage
from shared.streams import parse_stream

logger = logging.getLogger(__name__)

# After a stall (a suspended machine, a blocked loop) the synthetic market catches up in slices this long, so
# no single batch is huge and other tasks run in between.
CATCH_UP_SLICE_MS = 1000


class SyntheticSource:
    """The synthetic market on the wall clock: every ``tick_interval_s`` it advances the market to now and
    publishes what the wanted streams produced, one publish call per tick (empty ticks are skipped)."""

    def __init__(
        self,
        symbols: Sequence[str],
        *,
        seed: int,
        trade_rate_per_s: float = 5.0,
        tick_interval_s: float = 0.05,
        clock: Callable[[], int] = wall_clock_ms,
    ) -> None:
        if not tick_interval_s > 0 or math.isinf(tick_interval_s):
            raise ValueError(f"tick_interval_s must be a positive number of seconds, got {tick_interval_s!r}")
        self.name = "synthetic"
        self._clock = clock
        self._tick_interval_s = tick_interval_s
        self.market = SyntheticMarket(symbols, seed=seed, trade_rate_per_s=trade_rate_per_s, start_ms=clock())
        self._wanted: frozenset[str] = frozenset()
        self._keep_last: dict[str, bool] = {}

    def set_wanted(self, streams: frozenset[str]) -> None:
        self._wanted = frozenset(streams)

    async def exchange_info(self) -> bytes:
        return build_exchange_info(self.market.symbols_info(), self._clock())

    def _message(self, stream: str, payload: bytes) -> OutgoingMessage:
        keep_last = self._keep_last.get(stream)
        if keep_last is None:
            keep_last = self._keep_last[stream] = parse_stream(stream).is_state
        return OutgoingMessage(stream, payload, keep_last)

    async def run(self, publish: Publish) -> None:
        loop = asyncio.get_running_loop()
        next_tick = loop.time()
        while True:
            target_ms = self._clock()
            while self.market.now_ms < target_ms:
                step_ms = min(target_ms, self.market.now_ms + CATCH_UP_SLICE_MS)
                batch = self.market.advance(step_ms, self._wanted)
                if batch:
                    await publish([self._message(stream, payload) for stream, payload in batch])
                if step_ms < target_ms:
                    await asyncio.sleep(0)
            next_tick += self._tick_interval_s
            delay = next_tick - loop.time()
            if delay < 0:
                # Behind schedule: carry on from now rather than firing a burst of make-up ticks.
                next_tick = loop.time()
                delay = 0.0
            await asyncio.sleep(delay)
