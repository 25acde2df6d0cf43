"""Server pings for every client from one timer: which connections to ping now and which missed their pong.

Pure: no I/O and no event loop; the node calls :meth:`KeepaliveSchedule.tick` from one repeating timer and does
the writing and closing. Why not uvicorn's keepalive: it keeps two timer handles per connection and builds each
ping frame in Python, which at tens of thousands of clients is memory per idle client and CPU in bursts. Here
connections are spread over ``slots`` buckets, one bucket is due per tick (``interval / slots`` apart), so the
pings of N clients go out as N / slots writes per tick of one pre-encoded frame. Every ping of a tick shares
one deadline, so the pong deadlines are one queue of (deadline, slot) per tick: nothing is allocated per ping
(objects that live for a whole timeout would be promoted to the oldest GC generation and make its collections,
which pause the loop for a time proportional to the number of connections, more frequent) and nothing keeps a
closed connection alive.

Binance's rule, which the gateway mirrors: a ping every ``interval`` (20 s), and a connection whose pong is
``timeout`` (60 s) late is closed. As with uvicorn, no new ping is sent while one is unanswered; any pong
answers it (real clients send empty-payload pongs).
"""

from __future__ import annotations

from collections import deque
from typing import Generic, Protocol, TypeVar

TICK_MAX_S = 0.25  # pings go out in slices at least this often: short bursts, timeouts this precise


class Pingable(Protocol):
    # Deadline of the unanswered ping (schedule clock), or 0.0 when none is outstanding. Kept on the connection
    # so that a pong costs one attribute write.
    ping_deadline: float


class KeptAlive(Pingable, Protocol):
    """A connection the schedule's owner pings and times out (the native uvicorn protocol)."""

    def send_ping(self) -> None:
        """A ping is due: send it, or arm it to ride on the next data write."""
        ...

    def flush_ping(self) -> None:
        """Send an armed ping that no data write carried."""
        ...

    def keepalive_timeout(self) -> None: ...


M = TypeVar("M", bound=Pingable)


class KeepaliveSchedule(Generic[M]):
    def __init__(self, interval_s: float, timeout_s: float) -> None:
        self.tick_s = min(TICK_MAX_S, interval_s / 4)
        self.timeout_s = timeout_s
        slots = max(1, round(interval_s / self.tick_s))
        self._slots: list[dict[M, None]] = [{} for _ in range(slots)]  # dicts as ordered sets
        self._slot_of: dict[M, int] = {}
        self._next = 0  # the slot the next tick serves
        self._assign = 0  # the slot the next new connection joins
        self._deadlines: deque[tuple[float, int]] = deque()  # (deadline, slot) of each tick that pinged

    def __len__(self) -> int:
        return len(self._slot_of)

    def add(self, member: M) -> None:
        """Join the next slot in turn, so that slots stay even however many connections arrive at once (a
        reconnect storm is not pinged as one burst): the first ping comes within one interval."""
        if member in self._slot_of:
            return
        slot = self._assign
        self._assign = (slot + 1) % len(self._slots)
        self._slots[slot][member] = None
        self._slot_of[member] = slot
        member.ping_deadline = 0.0

    def remove(self, member: M) -> None:
        slot = self._slot_of.pop(member, None)
        if slot is not None:
            del self._slots[slot][member]
        member.ping_deadline = 0.0  # a deadline still queued no longer matches: it is skipped

    def tick(self, now: float) -> tuple[list[M], list[M]]:
        """Advance one tick: (members to ping now, members whose pong deadline passed). The caller pings the
        first (``ping_deadline`` is already set) and closes the second (already removed from the schedule)."""
        overdue: list[M] = []
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            deadline, slot_index = deadlines.popleft()
            # Still unanswered since that tick's ping (a pong resets the deadline; a later ping sets another).
            late = [member for member in self._slots[slot_index] if member.ping_deadline == deadline]
            for member in late:
                self.remove(member)
            overdue += late
        slot_index = self._next
        self._next = (slot_index + 1) % len(self._slots)
        due: list[M] = []
        deadline = now + self.timeout_s
        for member in self._slots[slot_index]:
            if not member.ping_deadline:
                member.ping_deadline = deadline
                due.append(member)
        if due:
            deadlines.append((deadline, slot_index))
        return due, overdue
