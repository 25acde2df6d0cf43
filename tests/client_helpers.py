"""Helpers for running real Binance client libraries against a gateway that lives in the test's event loop.

The gateway runs in the test's loop, so nothing here may block that loop: thread-based libraries
(binance-connector, websocket-client, requests) are driven through ``asyncio.to_thread`` and report back
through :class:`ThreadInbox`, which the test polls without blocking the loop (``tests.polling``).
"""

from __future__ import annotations

import queue
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode

from tests.polling import eventually


class ThreadInbox:
    """A thread-safe mailbox: library threads ``put``, the test ``await``s items without blocking the loop."""

    def __init__(self) -> None:
        self._items: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def put(self, item: Any) -> None:
        self._items.put(item)

    async def get(self, timeout: float = 3.0) -> Any:
        await eventually(lambda: not self._items.empty(), timeout=timeout, what="a message from the library's thread")
        return self._items.get_nowait()

    def drain(self) -> list[Any]:
        items: list[Any] = []
        while True:
            try:
                items.append(self._items.get_nowait())
            except queue.Empty:
                return items


# ---- a websockets client with a chosen answer to server pings ----------------------------------------------
#
# websockets answers every ping with an echo pong inside its Sans-I/O protocol (Protocol.recv_frame), whatever
# ``ping_interval`` says: that setting only controls the client's *own* pings. The supported escape hatch is
# ``connect(..., create_connection=<ClientConnection subclass>)``; the connection receives the Sans-I/O
# ``ClientProtocol`` instance and we give it a subclass whose ping handling follows a fixed policy.


class _PongPolicyProtocol(ClientProtocol):
    pong_payload: bytes | None = None  # None: never answer a ping
    pings_received: int = 0

    def recv_frame(self, frame: Frame) -> None:
        if frame.opcode is Opcode.PING:
            self.pings_received += 1
            if self.pong_payload is not None:
                self.send_frame(Frame(Opcode.PONG, self.pong_payload))
            return
        super().recv_frame(frame)


def pong_policy_connection(pong_payload: bytes | None) -> type[ClientConnection]:
    """A ``create_connection`` class for websockets' ``connect``.

    ``pong_payload=b""`` answers every server ping with an empty-payload pong (what binance-connector does);
    ``None`` never answers a ping (a dead or frozen client).
    """

    class PongPolicyConnection(ClientConnection):
        def __init__(self, protocol: ClientProtocol, **kwargs: Any) -> None:
            # Same object, same state; only the ping handling differs (see _PongPolicyProtocol).
            protocol.__class__ = _PongPolicyProtocol
            assert isinstance(protocol, _PongPolicyProtocol)
            protocol.pong_payload = pong_payload
            super().__init__(protocol, **kwargs)

    return PongPolicyConnection


def pings_received(ws: ClientConnection) -> int:
    """Server pings received by a client connected with a :func:`pong_policy_connection` class."""
    protocol = ws.protocol
    assert isinstance(protocol, _PongPolicyProtocol)
    return protocol.pings_received
