"""A due ping rides on the client's next data write (one syscall instead of two), or goes out alone if no data
comes in time. A real node, a recording connection, no sockets."""

from __future__ import annotations

from collections.abc import Callable

from gateway.node import GatewayNode
from gateway.symbols import SymbolDirectory
from gateway.ws.close_codes import CloseCode
from gateway.ws.hub import StreamBatch
from gateway.ws.session import Session, SessionLimits
from shared.broker.memory import MemoryBroker
from shared.settings import Settings
from shared.streams import StreamKind

PING = b"\x89\x00"


class Wire:
    """A Connection that records every write."""

    peer = ("127.0.0.1", 1)
    dropped = (0, 0)

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.write: Callable[[bytes], object] | None = self.writes.append

    def write_frames(self, payloads: list[bytes]) -> int:
        self.writes.append(b"<frames>")
        return 0

    def enqueue(self, batch: StreamBatch, combined: bool) -> None:
        raise AssertionError("direct writes only")

    def close_now(self, code: CloseCode, reason: str) -> None:
        self.writes.append(b"<close>")


def session() -> tuple[Session, Wire]:
    settings = Settings()
    broker = MemoryBroker()
    node = GatewayNode(settings, broker, SymbolDirectory(broker, settings.symbols))
    wire = Wire()
    return Session(node, wire, False, SessionLimits(max_streams=10, control_rate_per_s=5, control_burst=10)), wire


def batch(payload: bytes) -> StreamBatch:
    return StreamBatch("btcusdt@bookTicker", StreamKind.BOOK_TICKER, [payload])


def test_a_due_ping_rides_on_the_next_data_write_once() -> None:
    s, wire = session()
    s.carry_on_next_write(PING)
    s.deliver(batch(b"a"))
    s.deliver(batch(b"b"))
    assert wire.writes == [PING + batch(b"a").block(False), batch(b"b").block(False)]
    assert not s.flush_carried()  # already carried: nothing left to send alone


def test_a_ping_without_data_goes_out_alone() -> None:
    s, wire = session()
    s.carry_on_next_write(PING)
    assert s.flush_carried()
    assert wire.writes == [PING]
    s.deliver(batch(b"a"))
    assert wire.writes[-1] == batch(b"a").block(False)  # the next write carries nothing extra


def test_a_closed_session_drops_its_armed_ping() -> None:
    s, wire = session()
    s.carry_on_next_write(PING)
    s.closed(1000)
    assert not s.flush_carried()
    assert wire.writes == []
