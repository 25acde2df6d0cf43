"""The edge's pure rules: whose address a request is charged to, which origins pass, per-IP bookkeeping."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from gateway.edge.client_ip import TrustedProxies, client_ip
from gateway.edge.ip_limits import IpLedger, ip_key
from gateway.edge.origins import OriginPolicy


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def ledger(clock: Clock, **limits: int | float) -> IpLedger:
    values: dict[str, int | float] = {"max_connections": 3, "attempts": 5, "window_s": 10.0, "max_subscriptions": 4}
    values.update(limits)
    return IpLedger(
        max_connections=int(values["max_connections"]),
        attempts=int(values["attempts"]),
        window_s=float(values["window_s"]),
        max_subscriptions=int(values["max_subscriptions"]),
        clock=clock,
        max_tracked=int(values.get("max_tracked", 100)),
    )


# ---- client address ----


def test_forwarded_for_is_ignored_from_an_untrusted_peer() -> None:
    assert client_ip("203.0.113.9", "1.2.3.4", TrustedProxies(())) == "203.0.113.9"


def test_from_a_trusted_proxy_the_nearest_untrusted_hop_is_the_client() -> None:
    proxies = TrustedProxies(["10.0.0.0/8"])
    # A client-written left part never wins over the address the trusted proxy appended.
    assert client_ip("10.1.2.3", "6.6.6.6, 198.51.100.7", proxies) == "198.51.100.7"
    assert client_ip("10.1.2.3", "198.51.100.7, 10.9.9.9", proxies) == "198.51.100.7"  # two proxy hops
    assert client_ip("10.1.2.3", "10.2.2.2", proxies) == "10.1.2.3"  # only proxies: charge the peer
    assert client_ip("10.1.2.3", "not-an-ip", proxies) == "10.1.2.3"  # malformed: never a made-up name
    assert client_ip("10.1.2.3", "", proxies) == "10.1.2.3"


def test_a_star_trusts_every_peer() -> None:
    assert client_ip("192.0.2.1", "198.51.100.7", TrustedProxies(["*"])) == "198.51.100.7"


def test_a_bad_proxy_entry_is_refused() -> None:
    with pytest.raises(ValueError):
        TrustedProxies(["10.0.0.0/33"])


@given(peer=st.ip_addresses().map(str), header=st.text(max_size=200))
def test_the_charged_address_is_the_peer_or_a_real_address_from_the_header(peer: str, header: str) -> None:
    address = client_ip(peer, header, TrustedProxies(["*"]))
    assert address == peer or address in [hop.strip() for hop in header.split(",")]


# ---- origins ----


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        (None, True),
        ("https://app.example.com", True),
        ("HTTPS://APP.EXAMPLE.COM", True),
        ("https://eu.example.com", True),
        ("https://example.com", False),
        ("https://eu.example.com.evil.net", False),
        ("https://evil.net/.example.com", False),
        ("http://eu.example.com", False),
    ],
)
def test_origins_match_exactly_or_by_wildcard(origin: str | None, allowed: bool) -> None:
    policy = OriginPolicy(["https://app.example.com", "https://*.example.com"])
    assert policy.allows(origin) is allowed


def test_an_empty_origin_list_allows_everything() -> None:
    assert OriginPolicy(()).allows("https://anything.test")


# ---- per-IP ledger ----


def test_connections_per_ip_are_capped_and_freed() -> None:
    clock = Clock()
    book = ledger(clock, attempts=100)
    assert [book.open("192.0.2.1") for _ in range(3)] == [None, None, None]
    hit = book.open("192.0.2.1")
    assert hit is not None and hit.reason == "connections_per_ip"
    assert book.open("192.0.2.2") is None  # another address is not affected
    book.close("192.0.2.1")
    assert book.open("192.0.2.1") is None


def test_attempts_refill_at_the_window_rate_with_a_retry_after() -> None:
    clock = Clock()
    book = ledger(clock, max_connections=100, attempts=5, window_s=10.0)
    for _ in range(5):
        assert book.open("192.0.2.1") is None
        book.close("192.0.2.1")
    hit = book.open("192.0.2.1")
    assert hit is not None and hit.reason == "attempts_per_ip" and hit.retry_after_s == pytest.approx(2.0)
    clock.now += 2.0  # one attempt back every window / attempts = 2 s
    assert book.open("192.0.2.1") is None


def test_ipv6_addresses_are_counted_per_64() -> None:
    assert ip_key("2001:db8:1:2:aaaa::1") == ip_key("2001:db8:1:2:bbbb::2") == "2001:db8:1:2::/64"
    book = ledger(Clock(), max_connections=2, attempts=100)
    assert book.open("2001:db8:1:2::1") is None and book.open("2001:db8:1:2::2") is None
    assert book.open("2001:db8:1:2::3") is not None


def test_idle_addresses_are_forgotten_and_tracking_is_bounded() -> None:
    clock = Clock()
    book = ledger(clock, max_tracked=3, attempts=2, window_s=10.0)
    for address in ("192.0.2.1", "192.0.2.2", "192.0.2.3"):
        assert book.open(address) is None
        book.close(address)
    hit = book.open("192.0.2.4")  # three addresses still refilling their buckets
    assert hit is not None and hit.reason == "tracked_ips"
    clock.now += 10.0  # buckets full again: nothing left to remember about them
    assert book.open("192.0.2.4") is None
    assert len(book) == 1


def test_subscriptions_are_shared_by_the_connections_of_one_address() -> None:
    book = ledger(Clock(), max_subscriptions=4)
    book.open("192.0.2.1")
    book.open("192.0.2.1")
    assert book.add_subscriptions("192.0.2.1", 3)
    assert not book.add_subscriptions("192.0.2.1", 2)
    book.remove_subscriptions("192.0.2.1", 1)
    assert book.add_subscriptions("192.0.2.1", 2)
    assert not book.add_subscriptions("192.0.2.9", 1)  # an address without a counted connection
