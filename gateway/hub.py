"""Local fan-out: which outboxes want which stream, and a bounded, conflating outbox per client.

Pure: no I/O and no event loop. The relay calls :meth:`Hub.broadcast` once per broker message; the hub
builds each frame variant (raw payload, combined envelope) at most once and appends the *same* bytes object
to every subscriber's :class:`Outbox` without awaiting anything. Outboxes that received frames are collected
in ``dirty`` so the I/O layer can flush them all in one pass per loop turn (one socket write per client per
flush, not per message).

Slow clients: an outbox holds at most ``limit`` bytes. When a frame does not fit, frames of *state* streams
(tickers, book tops, klines, partial depth) are conflated to the newest per stream; if the frame still does
not fit and belongs to an *event* stream (trades, diff depth), the outbox is marked ``overflowed`` and the I/O
layer closes that client with :data:`CLOSE_SLOW_CONSUMER`. A state frame that still does not fit is dropped
(the next update supersedes it). Memory per client is therefore bounded by ``limit``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable

from shared.frames import combined_frame
from shared.streams import Stream, StreamKind

CLOSE_SLOW_CONSUMER = 4000
CLOSE_SLOW_CONSUMER_REASON = "slow consumer: send buffer overflow"


class Outbox:
    """Frames waiting to be written to one client, bounded in bytes."""

    __slots__ = ("combined", "conflated", "dropped", "flush", "frames", "limit", "overflowed", "queued", "size")

    def __init__(self, limit: int, *, combined: bool, flush: Callable[[Outbox], None] | None = None) -> None:
        self.limit = limit
        self.combined = combined
        # (stream name, is_state, frame bytes); the stream name lets conflation find superseded frames.
        self.frames: deque[tuple[str, bool, bytes]] = deque()
        self.size = 0
        self.overflowed = False
        self.queued = False  # already listed in Hub.dirty
        self.conflated = 0  # frames removed by conflation
        self.dropped = 0  # state frames dropped because even conflated they did not fit
        self.flush = flush  # set by the I/O layer: write what is pending (called from Hub.flush_dirty)

    def push(self, stream: str, is_state: bool, frame: bytes) -> bool:
        """Queue a frame; False when it was not queued (overflow or dropped)."""
        size = len(frame)
        if self.size + size > self.limit:
            if self.overflowed:
                return False
            self._conflate(stream if is_state else None)
            if self.size + size > self.limit:
                if is_state:
                    self.dropped += 1
                    return False
                self.overflowed = True
                return False
        self.frames.append((stream, is_state, frame))
        self.size += size
        return True

    def push_control(self, frame: bytes) -> None:
        """Queue a control reply. Replies are tiny and never dropped; they count toward the limit."""
        self.frames.append(("", False, frame))
        self.size += len(frame)

    def take(self, max_bytes: int | None = None) -> list[bytes]:
        """Remove and return pending frames, oldest first: all of them, or as many as fit in ``max_bytes``
        (always at least one, so a frame larger than ``max_bytes`` still goes out)."""
        if max_bytes is None or self.size <= max_bytes:
            frames = [frame for _, _, frame in self.frames]
            self.frames.clear()
            self.size = 0
            return frames
        # Partial take (a client whose socket is backing up): the rest stays queued, and conflatable.
        pending = self.frames
        frames = [pending.popleft()[2]]
        taken = len(frames[0])
        while pending and taken + len(pending[0][2]) <= max_bytes:
            frame = pending.popleft()[2]
            frames.append(frame)
            taken += len(frame)
        self.size -= taken
        return frames

    def _conflate(self, superseded: str | None) -> None:
        """Keep only the newest pending frame per state stream (and none of ``superseded``, which the
        caller is about to replace). Event frames and replies are kept in order."""
        newest: dict[str, int] = {}
        for index, (stream, is_state, _) in enumerate(self.frames):
            if is_state:
                newest[stream] = index
        kept: deque[tuple[str, bool, bytes]] = deque()
        size = 0
        for index, entry in enumerate(self.frames):
            stream, is_state, frame = entry
            if is_state and (newest[stream] != index or stream == superseded):
                continue
            kept.append(entry)
            size += len(frame)
        self.conflated += len(self.frames) - len(kept)
        self.frames = kept
        self.size = size


class Hub:
    """Stream name -> local subscribers, and the per-message fan-out."""

    def __init__(self) -> None:
        self._subscribers: dict[str, dict[Outbox, None]] = {}  # dict as an ordered set
        self._kinds: dict[str, StreamKind] = {}
        self.dirty: list[Outbox] = []
        self.overflowed: list[Outbox] = []
        # Counters read by the metrics collector at scrape time (no metric calls on the hot path).
        self.deliveries: dict[StreamKind, int] = dict.fromkeys(StreamKind, 0)
        self.messages: dict[StreamKind, int] = dict.fromkeys(StreamKind, 0)

    # ---- subscriptions ----
    def add(self, stream: Stream, outbox: Outbox) -> bool:
        """Subscribe; True when this is the stream's first local subscriber."""
        subscribers = self._subscribers.get(stream.name)
        first = subscribers is None
        if subscribers is None:
            subscribers = self._subscribers[stream.name] = {}
            self._kinds[stream.name] = stream.kind
        subscribers[outbox] = None
        return first

    def remove(self, stream_name: str, outbox: Outbox) -> bool:
        """Unsubscribe; True when the stream has no local subscriber left."""
        subscribers = self._subscribers.get(stream_name)
        if subscribers is None:
            return False
        subscribers.pop(outbox, None)
        if subscribers:
            return False
        del self._subscribers[stream_name]
        del self._kinds[stream_name]
        return True

    def remove_all(self, stream_names: Iterable[str], outbox: Outbox) -> list[str]:
        """Unsubscribe from several streams; returns the ones left without local subscribers."""
        return [name for name in stream_names if self.remove(name, outbox)]

    def streams(self) -> list[str]:
        return list(self._subscribers)

    def subscriber_count(self, stream_name: str) -> int:
        subscribers = self._subscribers.get(stream_name)
        return len(subscribers) if subscribers is not None else 0

    def subscriptions_by_kind(self) -> dict[StreamKind, int]:
        counts = dict.fromkeys(StreamKind, 0)
        for name, subscribers in self._subscribers.items():
            counts[self._kinds[name]] += len(subscribers)
        return counts

    # ---- fan-out ----
    def broadcast(self, stream_name: str, payload: bytes) -> int:
        """Queue ``payload`` for every local subscriber of the stream; returns the number of subscribers."""
        subscribers = self._subscribers.get(stream_name)
        if not subscribers:
            return 0
        kind = self._kinds[stream_name]
        is_state = kind.is_state
        combined: bytes | None = None
        dirty = self.dirty
        for outbox in subscribers:
            if outbox.combined:
                if combined is None:
                    combined = combined_frame(stream_name, payload)
                queued = outbox.push(stream_name, is_state, combined)
            else:
                queued = outbox.push(stream_name, is_state, payload)
            if queued:
                if not outbox.queued:
                    outbox.queued = True
                    dirty.append(outbox)
            elif outbox.overflowed and not outbox.queued:
                # Flush it too: the I/O layer sees `overflowed` and closes the client.
                outbox.queued = True
                dirty.append(outbox)
        self.messages[kind] += 1
        self.deliveries[kind] += len(subscribers)
        return len(subscribers)

    def mark_dirty(self, outbox: Outbox) -> None:
        if not outbox.queued:
            outbox.queued = True
            self.dirty.append(outbox)

    def flush_dirty(self) -> int:
        """Call each dirty outbox's ``flush`` once; returns how many were flushed."""
        dirty, self.dirty = self.dirty, []
        for outbox in dirty:
            outbox.queued = False
            if outbox.flush is not None:
                outbox.flush(outbox)
        return len(dirty)
