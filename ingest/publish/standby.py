"""What a standby ingest keeps of the feed it is not publishing, so that taking over leaves no gap (pure).

A standby runs the same upstream connections as the leader (warm) and keeps the last ``window_s`` seconds of
events here. When it becomes leader it publishes this buffer first: the broker drops what the old leader already
published (by event identity), so the new leader continues exactly where the old one stopped, as long as the
window spans the failover (lease TTL plus a renewal period, a few seconds). State streams (tickers, books,
klines) only need their newest value, so the buffer keeps one per state stream; event streams (trades, diff
depth) keep every event in the window, bounded by ``max_events`` as well. Time is passed in.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from shared.broker.contract import OutgoingMessage


class StandbyBuffer:
    def __init__(self, window_s: float, max_events: int = 500_000) -> None:
        if window_s < 0:
            raise ValueError(f"window_s must be >= 0, not {window_s!r}")
        if max_events < 1:
            raise ValueError(f"max_events must be >= 1, not {max_events!r}")
        self.window_s = window_s
        self.max_events = max_events
        self._events: deque[tuple[float, OutgoingMessage]] = deque()
        self._states: dict[str, tuple[float, OutgoingMessage]] = {}
        self.evicted = 0  # events dropped for age or size (what a takeover after them may have to backfill)

    def __len__(self) -> int:
        return len(self._events) + len(self._states)

    def add(self, messages: Iterable[OutgoingMessage], now: float) -> None:
        events = self._events
        for message in messages:
            if message.keep_last:
                # Re-inserting moves the stream to the end: the dict stays ordered by arrival of the newest value.
                self._states.pop(message.stream, None)
                self._states[message.stream] = (now, message)
            else:
                events.append((now, message))
        overflow = len(events) - self.max_events
        for _ in range(max(0, overflow)):
            events.popleft()
            self.evicted += 1
        self._expire_events(now)

    def _expire_events(self, now: float) -> None:
        oldest = now - self.window_s
        events = self._events
        while events and events[0][0] < oldest:
            events.popleft()
            self.evicted += 1

    def _expire(self, now: float) -> None:
        # State values are at most one per stream, so they are only aged out when drained, not on every batch.
        self._expire_events(now)
        oldest = now - self.window_s
        for stream in [stream for stream, (at, _) in self._states.items() if at < oldest]:
            del self._states[stream]

    def drain(self, now: float) -> list[OutgoingMessage]:
        """Everything still in the window, oldest first per stream, and empty the buffer."""
        self._expire(now)
        messages = [message for _, message in self._states.values()]
        messages.extend(message for _, message in self._events)
        self._events.clear()
        self._states.clear()
        return messages

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
