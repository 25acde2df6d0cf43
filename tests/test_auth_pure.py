"""The pure parts of authentication, without sockets or a loop: key format, the key cache's freshness and bounds,
the shared cache's value format, the expiry heap, REST refusals and refresh rules."""

from __future__ import annotations

import hashlib
import secrets

import orjson
from hypothesis import given, settings, strategies as st

from gateway.auth.expiry import ExpirySchedule
from gateway.auth.http import bearer_token, rest_refusal
from gateway.auth.key_cache import ABSENT, FRESH, REFUSED, STALE, KeyCache, parse_key, parse_redis_value, redis_value
from gateway.auth.principal import ANONYMOUS, AuthRefusal, Principal, refresh_problem, refused


def test_keys_are_checked_for_format_before_any_lookup() -> None:
    key = secrets.token_hex(32)
    assert parse_key(key) == hashlib.sha256(key.encode()).hexdigest()
    for bad, reason in [("", "missing"), ("abc", "malformed"), (key.upper(), "malformed"), (key + "0", "malformed"),
                        ("g" * 64, "malformed"), ("é" * 64, "malformed")]:  # fmt: skip
        refusal = parse_key(bad)
        assert isinstance(refusal, AuthRefusal) and refusal.reason == reason and refusal.code == -2014
        assert bad not in refusal.message or not bad


def test_entries_are_fresh_for_the_ttl_after_the_database_check_then_stale() -> None:
    cache = KeyCache(30.0)
    digest = "ab" * 32
    entry = cache.put_valid(digest, "bot", checked_at=1000.0)
    assert entry.principal.kind == "apikey" and entry.principal.subject == digest[:16]
    assert entry.principal.digest == digest and entry.principal.limit_key == f"apikey:{digest[:16]}"
    assert cache.get(digest, 1029.9)[0] == FRESH
    assert cache.get(digest, 1030.0)[0] == STALE
    # A copy read later (from Redis) keeps the lifetime of its database check; an older one changes nothing.
    cache.put_valid(digest, "bot", checked_at=990.0)
    assert cache.get(digest, 1029.9)[0] == FRESH
    cache.put_valid(digest, "bot", checked_at=1010.0)
    assert cache.get(digest, 1039.9)[0] == FRESH


def test_refusals_are_remembered_briefly_and_replace_a_valid_entry() -> None:
    cache = KeyCache(30.0, unknown_ttl_s=5.0)
    digest = "cd" * 32
    cache.put_valid(digest, "bot", 100.0)
    gone = refused("revoked", "API key revoked")
    cache.put_refused(digest, gone, now=101.0)
    assert cache.get(digest, 105.9) == (REFUSED, gone)
    assert cache.get(digest, 106.0) == (ABSENT, None)
    assert len(cache) == 0 and cache.refused_count == 0


def test_random_keys_cannot_evict_valid_ones_and_both_lrus_are_bounded() -> None:
    cache = KeyCache(30.0, max_keys=3, max_unknown=10)
    valid = [f"{i:064x}" for i in range(3)]
    for digest in valid:
        cache.put_valid(digest, "k", 0.0)
    for _ in range(1000):
        cache.put_refused(secrets.token_hex(32), refused("invalid", "invalid API key"), now=0.0)
    assert cache.refused_count == 10
    assert all(cache.get(digest, 1.0)[0] == FRESH for digest in valid)
    cache.get(valid[0], 1.0)  # most recently used
    cache.put_valid(f"{99:064x}", "k", 0.0)
    assert len(cache) == 3 and cache.entry(valid[1]) is None and cache.entry(valid[0]) is not None


def test_the_shared_cache_value_round_trips_and_rejects_foreign_values() -> None:
    assert parse_redis_value(redis_value("bot", 12.5)) == ("bot", "", 12.5)
    assert parse_redis_value(redis_value(None, 12.5, "revoked")) == (None, "revoked", 12.5)
    foreign = [
        b"",
        b"garbage",
        b"[]",
        b'{"valid":true}',
        b'{"valid":true,"label":1,"checked_at":1}',
        b'{"valid":false,"reason":"other","checked_at":1}',
        b'{"valid":true,"label":"x","checked_at":true}',
    ]
    for raw in foreign:
        assert parse_redis_value(raw) is None


@settings(max_examples=200)
@given(raw=st.binary(max_size=200))
def test_no_stored_value_makes_the_parser_raise(raw: bytes) -> None:
    parse_redis_value(raw)


def test_the_expiry_heap_yields_due_items_once_and_follows_refreshes() -> None:
    schedule: ExpirySchedule[str] = ExpirySchedule()
    schedule.set("a", 10.0)
    schedule.set("b", 5.0)
    schedule.set("c", 20.0)
    assert schedule.next_deadline() == 5.0
    schedule.set("b", 15.0)  # refreshed: its old deadline no longer counts
    schedule.remove("c")
    assert schedule.next_deadline() == 10.0
    assert schedule.due(9.9) == []
    assert schedule.due(12.0) == ["a"]
    assert schedule.due(100.0) == ["b"]
    assert schedule.next_deadline() is None and len(schedule) == 0


def test_the_expiry_heap_does_not_grow_with_churn() -> None:
    schedule: ExpirySchedule[int] = ExpirySchedule()
    for i in range(100_000):
        schedule.set(i, 1e9 + i)
        schedule.remove(i)
    schedule.set(-1, 1.0)
    for _ in range(10_000):
        schedule.set(-1, 2.0)
    assert len(schedule._heap) <= 2 * len(schedule) + 65


def test_rest_refusals_keep_binances_bodies_and_say_why_in_www_authenticate() -> None:
    status, body, headers = rest_refusal(refused("missing", "API key missing: send it"))
    assert (status, orjson.loads(body)) == (401, {"code": -2014, "msg": "API-key format invalid."})
    assert headers["WWW-Authenticate"].endswith('error="invalid_request", error_description="API key missing: send it"')
    status, body, headers = rest_refusal(refused("expired", 'token "x" expired'))
    assert status == 401
    assert orjson.loads(body) == {"code": -2015, "msg": "Invalid API-key, IP, or permissions for action."}
    assert "error_description=\"token 'x' expired\"" in headers["WWW-Authenticate"]
    status, body, headers = rest_refusal(refused("unavailable", "cannot be verified now"))
    assert (status, headers) == (503, {"Retry-After": "1"})
    assert orjson.loads(body) == {"code": -1001, "msg": "cannot be verified now"}


def test_bearer_tokens() -> None:
    assert bearer_token("Bearer abc.def.ghi") == "abc.def.ghi"
    assert bearer_token("bearer   abc ") == "abc"
    assert bearer_token("Basic dXNlcg==") is None
    assert bearer_token("Bearer") is None and bearer_token("") is None and bearer_token(None) is None


def test_a_refresh_keeps_the_kind_and_subject_and_covers_the_subscriptions() -> None:
    current = Principal("jwt", "s1", ("btcusdt@*",), 100.0)
    assert refresh_problem(current, Principal("jwt", "s1", None, 200.0), ["btcusdt@trade"]) is None
    assert refresh_problem(current, Principal("jwt", "s2", None, 200.0), []) == "the new token is for another subject"
    narrow = Principal("jwt", "s1", ("ethusdt@*",), 200.0)
    assert "does not allow btcusdt@trade" in (refresh_problem(current, narrow, ["btcusdt@trade"]) or "")
    assert refresh_problem(ANONYMOUS, narrow, []) == "this connection was not opened with a token"
    assert refresh_problem(Principal("apikey", "k"), narrow, []) == "this connection was not opened with a token"
