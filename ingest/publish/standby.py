"""What ingest keeps of the feed it cannot publish, to publish later in order (pure; time is passed in).

One buffer, two regimes:

- **Standby** (another process leads, or this one never led): the last ``window_s`` seconds of events, at most
  ``max_events``. When this process takes over it publishes the buffer first; the broker drops what the old leader
  already published (by event identity), so the new leader continues exactly where the old one stopped, as long as
  the window spans the failover (lease TTL plus a renewal period). Only events with an exchange identity are kept:
  a synthetic or replayed feed has none and differs per process, so it could not be told apart from what the
  leader published.
- **Holding** (:meth:`hold`; this process led and cannot publish: Redis is unreachable, or the lease went with it):
  everything, messages without an exchange identity included, since nobody else published them; no time window,
  at most ``outage_max_events`` (``PRICEGATE_OUTAGE_BUFFER_MESSAGES``). What goes beyond is dropped oldest first
  and reported by :meth:`take_lost` (the publisher counts and logs it). The publisher publishes the buffer, in
  order, once Redis and the lease are back. :meth:`stand_by` returns to the standby regime when another process
  turned out to lead meanwhile.

In both, a state stream (tickers, books, klines) keeps only its newest value (one per stream: bounded by the number
of streams), and event streams (trades, diff depth) keep every message, in arrival order. The bound on events is
one total over all streams, not one per stream: memory stays bounded whatever the number of streams, and what goes
first is the oldest, on every stream alike. The buffer's order is the state values, then the events in arrival
order; each stream's own order is kept (a stream is either state or event), which is all the broker's per-stream
sequences need.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence

from shared.broker.contract import OutgoingMessage


class StandbyBuffer:
    def __init__(self, window_s: float, max_events: int = 500_000, *, outage_max_events: int = 100_000) -> None:
        if window_s < 0:
            raise ValueError(f"window_s must be >= 0, not {window_s!r}")
        if max_events < 1:
            raise ValueError(f"max_events must be >= 1, not {max_events!r}")
        if outage_max_events < 1:
            raise ValueError(f"outage_max_events must be >= 1, not {outage_max_events!r}")
        self.window_s = window_s
        self.max_events = max_events
        self.outage_max_events = outage_max_events
        self.holding = False
        self._events: deque[tuple[float, OutgoingMessage]] = deque()
        self._states: dict[str, tuple[float, OutgoingMessage]] = {}
        self.evicted = 0  # standby: events dropped for age or size (what a takeover after them may have to backfill)
        self._lost: dict[str, int] = {}  # holding: events dropped for size, per stream, until take_lost()

    def __len__(self) -> int:
        return len(self._events) + len(self._states)

    # ---- regimes ----

    def hold(self) -> None:
        """Keep everything from now on (this process led and cannot publish), bounded by ``outage_max_events``."""
        self.holding = True

    def stand_by(self, now: float) -> int:
        """Back to the standby regime: messages without an exchange identity go (another process publishes its own
        feed), and the window and ``max_events`` apply again. Returns how many identity-less messages went."""
        self.holding = False
        before = len(self)
        self._events = deque(entry for entry in self._events if entry[1].event is not None)
        for stream in [stream for stream, (_, message) in self._states.items() if message.event is None]:
            del self._states[stream]
        dropped = before - len(self)
        self._bound()
        self._expire_events(now)
        return dropped

    # ---- adding ----

    def add(self, messages: Iterable[OutgoingMessage], now: float) -> None:
        """Append in arrival order. Standing by, messages without an exchange identity are not kept."""
        events = self._events
        holding = self.holding
        for message in messages:
            if not holding and message.event is None:
                continue
            if message.keep_last:
                # Re-inserting moves the stream to the end: the dict stays ordered by arrival of the newest value.
                self._states.pop(message.stream, None)
                self._states[message.stream] = (now, message)
            else:
                events.append((now, message))
        self._bound()
        if not holding:
            self._expire_events(now)

    def restore(self, messages: Sequence[OutgoingMessage], now: float) -> None:
        """Put messages taken by :meth:`take` and not published back in front, in their order. A state stream that
        got a newer value meanwhile keeps the newer one. Beyond the bound, the oldest (these) go first."""
        for message in messages:
            if message.keep_last:
                if message.stream not in self._states:
                    self._states[message.stream] = (now, message)
        self._events.extendleft((now, message) for message in reversed(messages) if not message.keep_last)
        self._bound()

    def _bound(self) -> None:
        events = self._events
        overflow = len(events) - (self.outage_max_events if self.holding else self.max_events)
        if overflow <= 0:
            return
        lost = self._lost
        for _ in range(overflow):
            _, message = events.popleft()
            if self.holding:
                lost[message.stream] = lost.get(message.stream, 0) + 1
            else:
                self.evicted += 1

    def _expire_events(self, now: float) -> None:
        oldest = now - self.window_s
        events = self._events
        while events and events[0][0] < oldest:
            events.popleft()
            self.evicted += 1

    def _expire(self, now: float) -> None:
        # State values are at most one per stream, so they are only aged out when drained, not on every batch.
        if self.holding:
            return
        self._expire_events(now)
        oldest = now - self.window_s
        for stream in [stream for stream, (at, _) in self._states.items() if at < oldest]:
            del self._states[stream]

    # ---- taking out ----

    def take(self, limit: int) -> list[OutgoingMessage]:
        """Remove and return up to ``limit`` messages from the front (state values first, then events in order)."""
        taken: list[OutgoingMessage] = []
        states = self._states
        while states and len(taken) < limit:
            stream = next(iter(states))
            taken.append(states.pop(stream)[1])
        events = self._events
        while events and len(taken) < limit:
            taken.append(events.popleft()[1])
        return taken

    def drain(self, now: float) -> list[OutgoingMessage]:
        """Everything still kept (standing by: within the window), oldest first per stream, and empty the buffer."""
        self._expire(now)
        return self.take(len(self))

    def take_lost(self) -> dict[str, int]:
        """Events dropped for size while holding, per stream, since the last call."""
        lost, self._lost = self._lost, {}
        return lost

    def discard(self, streams: Iterable[str]) -> None:
        """Forget what is buffered for streams no longer carried."""
        gone = set(streams)
        if not gone:
            return
        self._events = deque(entry for entry in self._events if entry[1].stream not in gone)
        for stream in gone:
            self._states.pop(stream, None)

    def streams(self) -> set[str]:
        return {message.stream for _, message in self._events} | set(self._states)
