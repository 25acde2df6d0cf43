"""Whether ingest can reach its broker, judged by the outcome of its broker calls, and logged once per outage.

Every ingest loop that talks to Redis (publishing, reading demand, the heartbeat, writing exchangeInfo) reports
each call's outcome here under its own operation name. An operation's first failure is one warning; further
failures of it are debug lines (the loops retry on their own schedule, some every half second, and an outage of
minutes must not write thousands of lines); its first success afterwards is one info line with how long it failed.
``pricegate_ingest_broker_up`` is 0 while any operation is failing: ingest has no readiness endpoint (its process
must keep running through an outage, holding what it could not publish), so this gauge is what says "broker
unavailable".
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

from prometheus_client import Gauge

from shared.errors import BrokerError

logger = logging.getLogger("pricegate.ingest.broker")

T = TypeVar("T")
FIRST_CALL_ATTEMPTS = 3  # right after a Redis restart the first command may meet a pooled connection to the old one


async def first_calls(call: Callable[[], Awaitable[T]], delays: Iterator[float]) -> T:
    """An idempotent broker call made right after Redis came back (a takeover's fence and reads), tried
    FIRST_CALL_ATTEMPTS times with ``delays`` between: the first command may meet a pooled connection to the
    restarted server's predecessor and fail although Redis answers. Still failing, the BrokerError propagates."""
    for _ in range(FIRST_CALL_ATTEMPTS - 1):
        try:
            return await call()
        except BrokerError:
            await asyncio.sleep(next(delays))
    return await call()


class BrokerHealth:
    def __init__(self, gauge: Gauge | None = None, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._gauge = gauge
        self._clock = clock
        self._failing: dict[str, float] = {}  # operation -> when its current run of failures began
        if gauge is not None:
            gauge.set(1)

    @property
    def available(self) -> bool:
        """No broker operation is failing now."""
        return not self._failing

    def failing_for(self) -> float:
        """Seconds since the longest-failing operation began failing (0 when available)."""
        if not self._failing:
            return 0.0
        return self._clock() - min(self._failing.values())

    def failed(self, operation: str, error: BaseException) -> None:
        if operation in self._failing:
            logger.debug("%s failed again: %r", operation, error)
            return
        self._failing[operation] = self._clock()
        logger.warning("%s failed (%s); ingest keeps running and retries", operation, _describe(error))
        if self._gauge is not None:
            self._gauge.set(0)

    def succeeded(self, operation: str) -> None:
        if not self._failing:
            return  # the common case, once per published batch: one truth test
        began = self._failing.pop(operation, None)
        if began is None:
            return
        logger.info("%s works again after %.1f s", operation, self._clock() - began)
        if not self._failing and self._gauge is not None:
            self._gauge.set(1)


def _describe(error: BaseException) -> str:
    # BrokerError messages already name the operation and the URL (without its password); others get their type.
    text = str(error)
    return text if text else type(error).__name__
