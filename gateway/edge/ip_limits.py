"""Per-IP limits of one gateway process: open connections, connection attempts, live subscriptions (pure).

Every TCP connection is counted from the moment it is accepted (before any byte of the handshake, so sockets that
never finish their request count too) until it closes. An address may hold ``max_connections`` at once and open
``attempts`` new ones per ``window_s`` (a token bucket: a reconnecting client gets its tokens back at
``attempts / window_s`` per second, so the default 300 per 5 minutes lets every client reconnect about once a
second indefinitely), and its sessions together may hold ``max_subscriptions`` streams. IPv6 addresses are
counted per /64, the block one customer usually owns. Memory is bounded: an address is forgotten once it has
no connection and a full bucket again, and at most ``max_tracked`` addresses are followed at once (beyond that,
new addresses are refused until some are forgotten). These are per-process bounds; docs/architecture.md says
which limits are shared across replicas.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class LimitHit:
    reason: str  # bounded: connections_per_ip | attempts_per_ip | tracked_ips
    retry_after_s: float


class _Entry:
    __slots__ = ("connections", "subscriptions", "tokens", "updated")

    def __init__(self, tokens: float, now: float) -> None:
        self.connections = 0
        self.subscriptions = 0
        self.tokens = tokens
        self.updated = now


def ip_key(address: str) -> str:
    """The unit counted: the address itself, or its /64 for IPv6."""
    if ":" not in address:
        return address
    try:
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    except ValueError:
        return address


class IpLedger:
    def __init__(
        self,
        *,
        max_connections: int,
        attempts: int,
        window_s: float,
        max_subscriptions: int,
        clock: Callable[[], float],
        max_tracked: int = 100_000,
    ) -> None:
        self.max_connections = max_connections
        self.attempts = attempts
        self.rate = attempts / window_s
        self.max_subscriptions = max_subscriptions
        self.max_tracked = max_tracked
        self.clock = clock
        self._entries: dict[str, _Entry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def connections(self, address: str) -> int:
        entry = self._entries.get(ip_key(address))
        return entry.connections if entry is not None else 0

    def subscriptions(self, address: str) -> int:
        entry = self._entries.get(ip_key(address))
        return entry.subscriptions if entry is not None else 0

    def open(self, address: str) -> LimitHit | None:
        """Count a new connection from ``address``, or say why it is refused (then nothing is counted)."""
        now = self.clock()
        key = ip_key(address)
        entry = self._entries.get(key)
        if entry is None:
            if len(self._entries) >= self.max_tracked:
                self.sweep()
                if len(self._entries) >= self.max_tracked:
                    return LimitHit("tracked_ips", 1.0)
            entry = self._entries[key] = _Entry(float(self.attempts), now)
        else:
            self._refill(entry, now)
        if entry.connections >= self.max_connections:
            return LimitHit("connections_per_ip", 1.0)
        if entry.tokens < 1.0:
            return LimitHit("attempts_per_ip", (1.0 - entry.tokens) / self.rate)
        entry.tokens -= 1.0
        entry.connections += 1
        return None

    def close(self, address: str) -> None:
        entry = self._entries.get(ip_key(address))
        if entry is not None and entry.connections > 0:
            entry.connections -= 1

    def add_subscriptions(self, address: str, count: int) -> bool:
        """Take ``count`` more live subscriptions for ``address``; False (nothing taken) beyond the limit."""
        entry = self._entries.get(ip_key(address))
        if entry is None:
            return False  # not a counted connection (already closed)
        if entry.subscriptions + count > self.max_subscriptions:
            return False
        entry.subscriptions += count
        return True

    def remove_subscriptions(self, address: str, count: int) -> None:
        entry = self._entries.get(ip_key(address))
        if entry is not None:
            entry.subscriptions = max(0, entry.subscriptions - count)

    def sweep(self) -> int:
        """Forget addresses with no connection and a full bucket; returns how many were forgotten."""
        now = self.clock()
        idle = []
        for key, entry in self._entries.items():
            if entry.connections == 0 and entry.subscriptions == 0:
                self._refill(entry, now)
                if entry.tokens >= self.attempts:
                    idle.append(key)
        for key in idle:
            del self._entries[key]
        return len(idle)

    def _refill(self, entry: _Entry, now: float) -> None:
        if now > entry.updated:
            entry.tokens = min(float(self.attempts), entry.tokens + (now - entry.updated) * self.rate)
            entry.updated = now
