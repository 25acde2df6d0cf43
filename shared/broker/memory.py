"""In-process broker: the embedded default (``pricegate demo``) and a fast double for unit tests.

Same semantics as the Redis broker (sequences, epochs, bounded history, last values, demand, duplicate events
dropped by identity), delivered synchronously to the one listener: publishing from ingest calls the gateway's
relay directly, so one process needs no network at all. There is no leader lease in one process, so a fencing
token is accepted and not checked.
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from shared.broker.contract import BrokerListener, OutgoingMessage
from shared.frames import Publication


@dataclass(slots=True)
class _ChannelState:
    seq: int = 0
    history: deque[Publication] = field(default_factory=deque)
    last: Publication | None = None
    event_id: int | None = None


class MemoryBroker:
    def __init__(self, history_maxlen: int = 1000) -> None:
        self.history_maxlen = history_maxlen
        self.epoch = random.randrange(1, 2**31)
        self._channels: dict[str, _ChannelState] = {}
        self._subscribed: set[str] = set()
        self._listener: BrokerListener | None = None
        self._demand: dict[str, float] = {}
        self._exchange_info: bytes | None = None
        self._started = False
        self.duplicates_dropped = 0

    @property
    def connected(self) -> bool:
        return self._started

    async def start(self) -> None:
        self._started = True

    async def close(self) -> None:
        self._started = False

    # ---- ingest side ----
    async def publish(
        self, messages: Sequence[OutgoingMessage], *, fencing_token: str | None = None
    ) -> list[Publication]:
        return self.publish_now(messages, int(time.time() * 1000))

    async def last_event_ids(self, streams: Iterable[str]) -> dict[str, int]:
        found: dict[str, int] = {}
        for stream in streams:
            state = self._channels.get(stream)
            if state is not None and state.event_id is not None:
                found[stream] = state.event_id
        return found

    def publish_now(self, messages: Sequence[OutgoingMessage], published_at_ms: int = 0) -> list[Publication]:
        """Synchronous publish (the in-memory broker needs no I/O)."""
        out: list[Publication] = []
        listener = self._listener
        for message in messages:
            state = self._channels.get(message.stream)
            if state is None:
                state = self._channels[message.stream] = _ChannelState(history=deque(maxlen=self.history_maxlen))
            event = message.event
            if event is not None:
                if state.event_id is not None and event.last <= state.event_id:
                    self.duplicates_dropped += 1
                    continue
                state.event_id = event.last
            state.seq += 1
            publication = Publication(self.epoch, state.seq, published_at_ms, message.payload)
            state.history.append(publication)
            if message.keep_last:
                state.last = publication
            out.append(publication)
            if listener is not None and message.stream in self._subscribed:
                listener.on_publication(message.stream, publication)
        return out

    async def publish_heartbeat(self, now_ms: int) -> None:
        if self._listener is not None:
            self._listener.on_heartbeat(now_ms)

    async def read_demand(self, now_s: float) -> set[str]:
        expired = [stream for stream, expiry in self._demand.items() if expiry <= now_s]
        for stream in expired:
            del self._demand[stream]
        return set(self._demand)

    async def put_exchange_info(self, document: bytes) -> None:
        self._exchange_info = document

    # ---- gateway side ----
    def set_listener(self, listener: BrokerListener) -> None:
        self._listener = listener

    async def subscribe(self, streams: Iterable[str]) -> None:
        self._subscribed.update(streams)

    async def unsubscribe(self, streams: Iterable[str]) -> None:
        self._subscribed.difference_update(streams)

    async def history(self, stream: str, after_seq: int) -> list[Publication]:
        state = self._channels.get(stream)
        if state is None:
            return []
        return [publication for publication in state.history if publication.seq > after_seq]

    async def last_value(self, stream: str) -> Publication | None:
        state = self._channels.get(stream)
        return state.last if state is not None else None

    async def announce_demand(self, streams: Iterable[str], expires_at_s: float) -> None:
        for stream in streams:
            self._demand[stream] = max(expires_at_s, self._demand.get(stream, 0.0))

    async def get_exchange_info(self) -> bytes | None:
        return self._exchange_info
