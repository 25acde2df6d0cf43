"""The ingest-gateway broker contract, independent of Redis (docs/architecture.md, "The Redis wire contract").

Ingest calls :meth:`Broker.publish` with batches of ``(stream, payload, keep_last)``; the broker assigns each
channel's next sequence number, appends to the channel's bounded history, stores the last value for state
streams and publishes, atomically per message. Gateways register one :class:`BrokerListener`, subscribe to the
streams their clients need, and read history / last values to repair gaps. Demand (which streams gateway
clients want) and the cached exchangeInfo travel through the broker too, so ingest and gateways share nothing
else.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from shared.frames import Publication


@dataclass(frozen=True, slots=True)
class EventId:
    """Where an exchange event sits in its stream's order, as the exchange numbers it.

    ``last`` is the event's identity: the trade id ``t``, the aggregate id ``a``, the final update id ``u`` of a
    diff-depth or bookTicker event, a partial book's ``lastUpdateId``, or else the event time ``E``. Identities of
    one stream only grow, so an event whose ``last`` is not above the last one published is a duplicate (the
    overlap of two upstream connections, or of two ingest processes). ``first`` is the first id the event covers
    (``U`` of a diff-depth event; ``last`` otherwise): for streams whose ids are contiguous, ``first`` above the
    previous ``last`` + 1 is a gap. ``time_ms`` is the exchange's event time, when the payload has one."""

    first: int
    last: int
    time_ms: int | None = None


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    """One message ingest wants published: the exchange's payload bytes for one stream."""

    stream: str
    payload: bytes
    keep_last: bool  # state stream: store as last value for new subscribers and gap fallback
    # The exchange's identity of the event (live exchange sources only): the broker drops an event whose identity
    # is not above the last one published on its channel, atomically with publishing. None: always published.
    event: EventId | None = None


class BrokerListener(Protocol):
    """What a gateway's relay implements. Called on the event loop; must not block or await."""

    def on_publication(self, stream: str, publication: Publication) -> None: ...

    def on_heartbeat(self, published_at_ms: int) -> None: ...

    def on_broker_reconnect(self) -> None:
        """The subscription connection was re-established: messages may have been missed."""
        ...


class Broker(Protocol):
    """A broker backend (in-memory or Redis)."""

    @property
    def connected(self) -> bool:
        """True while the subscription side is live."""
        ...

    async def start(self) -> None:
        """Connect; raises BrokerError with a clear message if the backend is unreachable."""

    async def close(self) -> None: ...

    # ---- ingest side ----
    async def publish(
        self, messages: Sequence[OutgoingMessage], *, fencing_token: str | None = None
    ) -> list[Publication]:
        """Sequence, record and publish a batch in order; returns what was published (a message whose event
        identity is not above its channel's last one is dropped as a duplicate). With ``fencing_token`` each
        message is published only while that token holds ingest's leader lease, checked atomically with the
        publication; otherwise :class:`shared.errors.NotLeaderError` is raised."""
        ...

    async def last_event_ids(self, streams: Iterable[str]) -> dict[str, int]:
        """The identity of the last event published per stream (streams never published are absent)."""
        ...

    async def publish_heartbeat(self, now_ms: int) -> None: ...

    async def read_demand(self, now_s: float) -> set[str]:
        """Streams some gateway asked for whose interest has not expired."""
        ...

    async def put_exchange_info(self, document: bytes) -> None: ...

    # ---- gateway side ----
    def set_listener(self, listener: BrokerListener) -> None: ...

    async def subscribe(self, streams: Iterable[str]) -> None: ...

    async def unsubscribe(self, streams: Iterable[str]) -> None: ...

    async def history(self, stream: str, after_seq: int) -> list[Publication]:
        """Retained publications of ``stream`` with seq > after_seq in the current epoch, oldest first."""
        ...

    async def last_value(self, stream: str) -> Publication | None: ...

    async def announce_demand(self, streams: Iterable[str], expires_at_s: float) -> None: ...

    async def get_exchange_info(self) -> bytes | None: ...
