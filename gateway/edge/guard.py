"""The edge's bookkeeping for one gateway process: every open TCP connection, by transport, from accept to close.

:class:`EdgeGuard` is what the HTTP protocol (:mod:`gateway.edge.http_protocol`) asks when a socket is accepted
and what both protocols tell when it closes; the WebSocket admission asks it again once the handshake names the
real client (a trusted proxy's X-Forwarded-For). It owns the per-IP ledger, the process's connection count
(unfinished handshakes included, so sockets that never send a request still count toward ``max_connections``)
and the client address of each connection. Pure: transports are only used as keys.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from gateway.edge.client_ip import TrustedProxies, client_ip
from gateway.edge.ip_limits import IpLedger, LimitHit
from gateway.edge.origins import OriginPolicy
from gateway.turn_gate import TurnGate


@dataclass(frozen=True, slots=True)
class EdgeLimits:
    max_connections: int
    max_connections_per_ip: int
    attempts_per_ip: int
    attempt_window_s: float
    max_subscriptions_per_ip: int
    handshake_timeout_s: float
    handshakes_per_turn: int
    max_request_line_bytes: int
    max_header_bytes: int
    max_headers: int


class EdgeGuard:
    def __init__(
        self,
        limits: EdgeLimits,
        *,
        proxies: TrustedProxies,
        origins: OriginPolicy,
        clock: Callable[[], float],
        on_refused: Callable[[str], None] = lambda reason: None,
    ) -> None:
        self.limits = limits
        self.proxies = proxies
        self.origins = origins
        self.ledger = IpLedger(
            max_connections=limits.max_connections_per_ip,
            attempts=limits.attempts_per_ip,
            window_s=limits.attempt_window_s,
            max_subscriptions=limits.max_subscriptions_per_ip,
            clock=clock,
        )
        self.on_refused = on_refused  # counts a refusal by a bounded reason
        self.gate = TurnGate(limits.handshakes_per_turn, "resuming a queued request")
        self._charged: dict[int, str | None] = {}  # id(transport) -> address counted in the ledger (None: none)

    @property
    def open_connections(self) -> int:
        return len(self._charged)

    def accept(self, transport: object, peer: str | None) -> LimitHit | None:
        """A TCP connection was accepted. A peer we trust as a proxy is not charged yet (the handshake names the
        client); any other peer is charged now."""
        if len(self._charged) >= self.limits.max_connections:
            return self._refuse(LimitHit("max_connections", 1.0))
        charged: str | None = None
        if peer is not None and not self.proxies.trusts(peer):
            hit = self.ledger.open(peer)
            if hit is not None:
                return self._refuse(hit)
            charged = peer
        self._charged[id(transport)] = charged
        return None

    def identify(self, transport: object, peer: str | None, forwarded_for: str | None) -> str | LimitHit:
        """The client address of a connection whose request headers arrived; a connection through a trusted
        proxy is charged to that client now."""
        if peer is None:
            return ""
        address = client_ip(peer, forwarded_for, self.proxies)
        key = id(transport)
        if key in self._charged and self._charged[key] is None and address != peer:
            hit = self.ledger.open(address)
            if hit is not None:
                return self._refuse(hit)
            self._charged[key] = address
        return address

    def release(self, transport: object) -> None:
        """The connection closed (idempotent)."""
        charged = self._charged.pop(id(transport), None)
        if charged is not None:
            self.ledger.close(charged)

    def _refuse(self, hit: LimitHit) -> LimitHit:
        self.on_refused(hit.reason)
        return hit
