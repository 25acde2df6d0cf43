"""Whether a WebSocket handshake is accepted: the parsed stream URL, or why it is refused (HTTP status + text).

Both connection kinds (the native uvicorn protocol and the ASGI fallback) ask :class:`Admission` before the
upgrade, so a refused client never costs a session. Refusals are counted by a bounded reason.
"""

from __future__ import annotations

from collections.abc import Callable

from gateway.ws.control import ConnectRequest, parse_connect_path
from shared.errors import ProtocolError


class Rejection:
    """A handshake the gateway refuses, with the HTTP status and text to answer."""

    __slots__ = ("headers", "reason", "status")

    def __init__(self, status: int, reason: str, headers: dict[str, str] | None = None) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers or {}


class Admission:
    """Decides on handshakes for one gateway process."""

    def __init__(
        self,
        *,
        max_streams: int,
        is_known_symbol: Callable[[str], bool],
        unavailable: Callable[[], str | None],
        rejected: Callable[[str], None],
    ) -> None:
        self.max_streams = max_streams
        self.is_known_symbol = is_known_symbol
        self.unavailable = unavailable  # why no new connection is taken now (draining, full), or None
        self.rejected = rejected  # counts a refusal by reason

    def admit(self, path: str, query_string: str) -> ConnectRequest | Rejection:
        reason = self.unavailable()
        if reason is not None:
            self.rejected(reason)
            return Rejection(503, f"gateway unavailable: {reason}", {"Retry-After": "1"})
        try:
            return parse_connect_path(
                path, query_string, max_streams=self.max_streams, is_known_symbol=self.is_known_symbol
            )
        except ProtocolError as error:
            self.rejected("not_found")
            return Rejection(404, error.reason)
