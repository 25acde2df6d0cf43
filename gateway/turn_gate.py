"""At most a few pieces of bursty per-connection work per event-loop turn, so a storm of it cannot starve the
fan-out (docs/architecture.md, "The hot path and why").

Two kinds of work arrive by the thousand in one loop turn when many clients come or go together:

- **handshakes** (about 0.2 ms each: HTTP parse, WebSocket upgrade, admission, session). Measured: 5 000 clients
  reconnecting in 2 s pushed the steady clients' p99 from 5 to 159 ms before the gate;
- **closes** of clients that went away (about 40 µs each: the socket's close, with the kernel's part of the TCP
  teardown, and the session's bookkeeping). uvloop reports every peer's EOF of one poll in the same turn: 9 500
  clients dropping at once stalled the loop for ~370 ms in two turns.

A gate lets ``per_turn`` callables through per loop turn and queues the rest, first come first served; each turn
it runs the next ``per_turn``. The fan-out's flush, queued on the same loop, so gets a turn between every few of
them. What waits in the queue is the caller's business to keep harmless (a queued request has its socket's reading
paused; a queued close has its session delivering nothing).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable


class TurnGate:
    def __init__(self, per_turn: int, what: str) -> None:
        self.per_turn = per_turn
        self.what = what  # for the loop's error report
        self._passed = 0  # callables let through in the current loop turn
        self._reset_scheduled = False
        self._waiting: deque[Callable[[], None]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def enter(self, resume: Callable[[], None]) -> bool:
        """True: go ahead now. False: ``resume`` will be called on a later turn (in arrival order)."""
        if self.per_turn <= 0:
            return True
        self._schedule_turn()
        if self._passed < self.per_turn and not self._waiting:
            self._passed += 1
            return True
        self._waiting.append(resume)
        return False

    def run_soon(self, work: Callable[[], None]) -> None:
        """Run ``work`` now if this turn has room, else on a later turn."""
        if self.enter(work):
            work()

    def _schedule_turn(self) -> None:
        if not self._reset_scheduled:
            self._reset_scheduled = True
            asyncio.get_running_loop().call_soon(self._next_turn)

    def _next_turn(self) -> None:
        self._reset_scheduled = False
        self._passed = 0
        waiting = self._waiting
        while waiting and self._passed < self.per_turn:
            self._passed += 1
            resume = waiting.popleft()
            try:
                resume()
            except Exception as error:  # one broken socket must not stop the queue
                asyncio.get_running_loop().call_exception_handler(
                    {"message": f"{self.what} from the gate's queue failed", "exception": error}
                )
        if waiting or self._passed:
            self._schedule_turn()
