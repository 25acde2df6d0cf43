"""The tests' one way to wait for a condition that has no event to await: :func:`eventually` checks it every
``interval`` until it holds, and fails the test naming what it waited for and for how long. Poll only for a state
that stays true once reached (a counter that only grows, a recorded transition, a connection that stays open): a
state that may hold for a moment only (a lease not held between a failed renewal and the next acquisition) can fall
between two checks, so record it where it happens and wait for the record instead.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable

# Generous: a condition that holds in milliseconds on a laptop can take seconds on a CI runner with two busy cores,
# and a condition that never holds fails the test after this long anyway.
TIMEOUT_S = 10.0
INTERVAL_S = 0.01


async def eventually(
    condition: Callable[[], bool | Awaitable[bool]],
    *,
    what: str,
    timeout: float = TIMEOUT_S,
    interval: float = INTERVAL_S,
) -> None:
    """Return once ``condition()`` is true (it may be a coroutine function, e.g. a query to Redis or PostgreSQL);
    raise :class:`AssertionError` naming ``what`` if it is still false after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        outcome = condition()
        if inspect.isawaitable(outcome):
            outcome = await outcome
        if outcome:
            return
        if loop.time() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(interval)
