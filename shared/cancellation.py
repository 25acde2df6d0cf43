"""Honour cancellations that a library call swallowed (used by every long-lived loop that awaits Redis)."""

from __future__ import annotations

import asyncio


def raise_if_cancel_was_lost() -> None:
    """Raise CancelledError if this task was asked to stop while the call that just returned was running.

    On Python 3.11, ``asyncio.wait_for`` (redis-py wraps socket writes in it when a socket timeout is set) drops
    a cancellation that arrives just as the wrapped operation completes: the call returns normally, and a
    ``while True`` loop would go on forever, holding up its TaskGroup, shutdown and SIGTERM (about one stop in
    30 under load hung). The request is still counted on the task, so it is honoured here."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
