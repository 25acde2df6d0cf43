"""Which address a request comes from: the TCP peer, unless the peer is a proxy we trust (pure).

Per-IP limits and REST weights are charged to this address. ``X-Forwarded-For`` is believed only from peers listed
in ``PRICEGATE_FORWARDED_ALLOW_IPS`` (addresses or CIDR networks; ``*`` trusts every peer and every hop, so the
leftmost address counts: only for a gateway reachable solely through proxies that overwrite the header). From a
trusted peer the header is read right to left, skipping every hop that is itself a trusted proxy: the first
untrusted address is the client (an address a client wrote at the left of the header itself is never reached while a
trusted proxy appended the real one). By default no proxy is trusted, so a client cannot choose the address it is
charged to.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class TrustedProxies:
    def __init__(self, entries: Iterable[str]) -> None:
        self.any = False
        networks: list[_Network] = []
        for entry in entries:
            entry = entry.strip()
            if entry == "*":
                self.any = True
            elif entry:
                networks.append(ipaddress.ip_network(entry, strict=False))  # ValueError names a bad entry
        self.networks = tuple(networks)

    def __bool__(self) -> bool:
        return self.any or bool(self.networks)

    def trusts(self, address: str) -> bool:
        if self.any:
            return True
        if not self.networks:
            return False
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self.networks)


def forwarded_for(values: Sequence[str]) -> str | None:
    """X-Forwarded-For however many times it was sent: one list (RFC 9110, 5.3: a list-valued field sent twice is
    its lists joined). Taking only the first would let a client that sends its own header ahead of the proxy's
    pick the address it is charged to."""
    return ", ".join(values) or None


def client_ip(peer: str, forwarded_for: str | None, proxies: TrustedProxies) -> str:
    """The address to charge: ``peer``, or from a trusted peer the nearest untrusted hop of X-Forwarded-For."""
    if not forwarded_for or not proxies.trusts(peer):
        return peer
    hops = [hop.strip() for hop in forwarded_for.split(",")]
    if proxies.any:
        # Every hop is trusted, so the chain's origin is the leftmost address (as uvicorn's own "*" does).
        first = next((hop for hop in hops if hop), "")
        return first if _is_address(first) else peer
    for hop in reversed(hops):
        if not hop:
            continue
        if not _is_address(hop):
            return peer  # a malformed header from the proxy chain: charge the proxy, never a made-up name
        if not proxies.trusts(hop):
            return hop
    return peer


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
