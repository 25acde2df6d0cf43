"""Local fan-out: which subscribers want which stream, and the per-flush batch each of them receives.

Pure: no I/O and no event loop. The relay calls :meth:`Hub.broadcast` once per broker message, which only
appends the payload to that stream's pending list — O(1), whatever the number of subscribers. The node then
calls :meth:`Hub.flush`: for each stream with pending messages it makes one :class:`StreamBatch`, whose frame
variants (raw payloads, combined envelopes) and WebSocket-encoded byte blocks are built at most once and shared
by every subscriber, then hands it to each subscriber. A direct-mode subscriber writes the block with one
socket write; one subscribed to several streams collects its blocks and writes them together in
:meth:`Subscriber.finish`. So the cost per message is constant and the cost per client is one call and one
write per flush, not per message.

Streams are served oldest-pending first, and a flush may stop after a budget of subscribers, leaving the rest
queued: the node flushes in chunks and lets the event loop read the broker between them, so messages that
arrive meanwhile join their stream's batch before its turn instead of waiting for a whole pass over every
client (under load a pass takes N x one socket write; round-robin halves the worst wait, measured in
BENCHMARKS.md).

Slow clients are the subscriber's business (see gateway.ws.session): it sees its socket's buffered bytes and
either skips a state-stream batch (to resend the newest value from :meth:`Hub.latest_frame` once it drains)
or closes on an event stream.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Protocol

from gateway.ws.frames import encode_text_frames
from shared.frames import combined_frame
from shared.streams import Stream, StreamKind


class StreamBatch:
    """The messages of one stream since the last flush, with each representation built on first use."""

    __slots__ = ("_blocks", "_combined_frames", "is_state", "kind", "payloads", "stream")

    def __init__(self, stream: str, kind: StreamKind, payloads: list[bytes]) -> None:
        self.stream = stream
        self.kind = kind
        self.is_state = kind.is_state
        self.payloads = payloads
        self._combined_frames: list[bytes] | None = None
        self._blocks: list[bytes | None] = [None, None]  # [raw, combined]

    def frames(self, combined: bool) -> list[bytes]:
        """Text frame payloads: the exchange's bytes, or wrapped in the combined envelope."""
        if not combined:
            return self.payloads
        if self._combined_frames is None:
            stream = self.stream
            self._combined_frames = [combined_frame(stream, payload) for payload in self.payloads]
        return self._combined_frames

    def block(self, combined: bool) -> bytes:
        """All frames WebSocket-encoded in one block, ready for a socket write."""
        block = self._blocks[combined]
        if block is None:
            block = self._blocks[combined] = encode_text_frames(self.frames(combined))
        return block


class Subscriber(Protocol):
    combined: bool

    def deliver(self, batch: StreamBatch) -> bool:
        """Take this flush's batch of one stream. Return True to be called back with :meth:`finish` once the
        flush has handed out every stream (to write several streams' blocks together)."""
        ...

    def finish(self) -> None: ...


class Hub:
    """Stream name -> local subscribers, pending messages, and the flush that fans them out."""

    def __init__(self) -> None:
        self._subscribers: dict[str, dict[Subscriber, None]] = {}  # dict as an ordered set
        self._kinds: dict[str, StreamKind] = {}
        self._pending: dict[str, list[bytes]] = {}
        # Streams with pending messages, oldest first (a deque: a dict cannot pop its first key in O(1)). A name
        # may be left here after its stream lost its last subscriber; flush skips names without pending messages.
        self._queue: deque[str] = deque()
        self._latest: dict[str, bytes] = {}  # newest payload of each state stream, for slow-client resync
        # Counters read by the metrics collector at scrape time (no metric calls on the hot path).
        self.deliveries: dict[StreamKind, int] = dict.fromkeys(StreamKind, 0)
        self.messages: dict[StreamKind, int] = dict.fromkeys(StreamKind, 0)
        self.flushes = 0
        # Batches handed to subscribers: one socket write each for a client on one stream, so deliveries per batch
        # is how many frames the average write carries.
        self.batches = 0

    # ---- subscriptions ----
    def add(self, stream: Stream, subscriber: Subscriber) -> bool:
        """Subscribe; True when this is the stream's first local subscriber."""
        subscribers = self._subscribers.get(stream.name)
        first = subscribers is None
        if subscribers is None:
            subscribers = self._subscribers[stream.name] = {}
            self._kinds[stream.name] = stream.kind
        subscribers[subscriber] = None
        return first

    def remove(self, stream_name: str, subscriber: Subscriber) -> bool:
        """Unsubscribe; True when the stream has no local subscriber left."""
        subscribers = self._subscribers.get(stream_name)
        if subscribers is None:
            return False
        subscribers.pop(subscriber, None)
        if subscribers:
            return False
        del self._subscribers[stream_name]
        del self._kinds[stream_name]
        self._pending.pop(stream_name, None)
        self._latest.pop(stream_name, None)
        return True

    def remove_all(self, stream_names: Iterable[str], subscriber: Subscriber) -> list[str]:
        """Unsubscribe from several streams; returns the ones left without local subscribers."""
        return [name for name in stream_names if self.remove(name, subscriber)]

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
    def broadcast(self, stream_name: str, payload: bytes) -> bool:
        """Queue one message of a stream for the next flush; False when nobody here subscribes to it."""
        pending = self._pending.get(stream_name)
        if pending is None:
            kind = self._kinds.get(stream_name)
            if kind is None:
                return False
            self._pending[stream_name] = [payload]
            self._queue.append(stream_name)
        else:
            pending.append(payload)
            kind = self._kinds[stream_name]
        if kind.is_state:
            self._latest[stream_name] = payload
        self.messages[kind] += 1
        return True

    @property
    def has_pending(self) -> bool:
        return bool(self._pending)

    def is_pending(self, stream_name: str) -> bool:
        """Messages of this stream wait for their turn in a flush (the newest of them among them)."""
        return stream_name in self._pending

    def flush(self, budget: int = 0) -> int:
        """Hand pending batches to their subscribers, the stream waiting longest first, until ``budget``
        subscribers have been served (0: every pending stream); returns the number of frames delivered. A stream
        is never split: the budget is checked between streams."""
        pending = self._pending
        queue = self._queue
        finishing: list[Subscriber] = []
        delivered = 0
        served = 0
        try:
            while queue:
                stream_name = queue.popleft()
                payloads = pending.pop(stream_name, None)
                if payloads is None:
                    continue
                subscribers = self._subscribers.get(stream_name)
                if not subscribers:
                    continue
                kind = self._kinds[stream_name]
                batch = StreamBatch(stream_name, kind, payloads)
                for subscriber in list(subscribers):  # a subscriber may close (and unsubscribe) while we deliver
                    if subscriber.deliver(batch):
                        finishing.append(subscriber)
                count = len(payloads) * len(subscribers)
                self.deliveries[kind] += count
                delivered += count
                served += len(subscribers)
                if budget and served >= budget:
                    break
        finally:
            # Even when a delivery raised: a subscriber on several streams that collected parts this flush must get
            # its finish(), or it keeps them and is never written to again (silently starved).
            for subscriber in finishing:
                subscriber.finish()
            self.flushes += 1
            self.batches += served
        return delivered

    def latest_frame(self, stream_name: str, combined: bool) -> bytes | None:
        """The newest message of a state stream as one text-frame payload (None for event streams)."""
        payload = self._latest.get(stream_name)
        if payload is None:
            return None
        return combined_frame(stream_name, payload) if combined else payload
