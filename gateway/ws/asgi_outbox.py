"""The ASGI fallback's per-client queue: frames waiting for a writer task, bounded in bytes, conflating (pure).

Only sessions without direct socket writes (:mod:`gateway.ws.asgi_fallback`, under an ASGI server other than
ours) queue here; native sessions write straight to the socket and let its buffer apply backpressure.
"""

from __future__ import annotations

from collections import deque


class Outbox:
    """Frames waiting to be written to one client that cannot write directly, bounded in bytes.

    When a frame does not fit, frames of *state* streams are conflated to the newest per stream; if it still
    does not fit and belongs to an *event* stream the outbox is marked ``overflowed`` (the client is closed with
    close code 4000); a state frame that still does not fit is dropped (the next one supersedes it).
    """

    __slots__ = ("conflated", "dropped", "frames", "limit", "overflowed", "size")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        # (stream name, is_state, frame bytes); the stream name lets conflation find superseded frames.
        self.frames: deque[tuple[str, bool, bytes]] = deque()
        self.size = 0
        self.overflowed = False
        self.conflated = 0  # frames removed by conflation
        self.dropped = 0  # state frames dropped because even conflated they did not fit

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

    def take(self) -> list[bytes]:
        """Remove and return every pending frame, oldest first."""
        frames = [frame for _, _, frame in self.frames]
        self.frames.clear()
        self.size = 0
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
