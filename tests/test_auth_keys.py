"""API-key authentication against real PostgreSQL, Redis and uvicorn gateways over real sockets: keys accepted and
refused on WebSocket handshakes and REST, one database lookup for a reconnect storm, revocation closing open
connections within the cache TTL, the per-key connection limit across replicas, and a PostgreSQL outage (a proxy
cut in front of it) that keeps validated keys working and refuses unknown ones."""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import secrets
import time
from typing import Any

import httpx
import orjson
import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from gateway.auth.key_validator import redis_key
from gateway.auth.service import Authenticator
from pricegate_cli.keys import run_keys
from shared.broker.memory import MemoryBroker
from shared.candles.memory import MemoryCandleStore
from shared.settings import Settings
from tests.auth_support import CuttableProxy, auth_settings, key_table, raw_handshake
from tests.harness import RunningGateway, running_gateway
from tests.polling import eventually

FORMAT_INVALID = {"code": -2014, "msg": "API-key format invalid."}
KEY_INVALID = {"code": -2015, "msg": "Invalid API-key, IP, or permissions for action."}


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_subject(key: str) -> str:
    return key_digest(key)[:16]


def authenticator(gw: RunningGateway) -> Authenticator:
    auth = gw.app.state.auth
    assert isinstance(auth, Authenticator)
    return auth


def db_lookups(gw: RunningGateway) -> int:
    keys = authenticator(gw).keys
    assert keys is not None
    return keys.db_lookups


async def test_websocket_handshakes_with_valid_missing_malformed_and_unknown_keys(
    postgres_dsn: str, pg_schema: str, redis_url: str, key_prefix: str
) -> None:
    async with key_table(postgres_dsn, pg_schema) as keys:
        key = await keys.create("bot")
        overrides = auth_settings(postgres_dsn, pg_schema, redis_url, key_prefix)
        async with running_gateway(MemoryBroker(), **overrides) as gw:
            accepted = await raw_handshake(gw.port, headers={"X-MBX-APIKEY": key})
            assert accepted.status == 101
            accepted.close()
            for headers, reason in [
                ({}, b"API key missing"),
                ({"X-MBX-APIKEY": "not-a-key"}, b"API key format invalid"),
                ({"X-MBX-APIKEY": key.upper()}, b"API key format invalid"),
                ({"X-MBX-APIKEY": "k" * 1000}, b"API key format invalid"),
                ({"X-MBX-APIKEY": secrets.token_hex(32)}, b"invalid API key"),
            ]:
                refused = await raw_handshake(gw.port, headers=headers)
                assert refused.status == 401, headers
                assert refused.body.startswith(reason)
                assert key.encode() not in refused.body
                refused.close()
            # Combined streams and the URL forms all go through the same admission.
            combined = await raw_handshake(gw.port, "/stream?streams=btcusdt@trade", {"X-MBX-APIKEY": key})
            assert combined.status == 101
            combined.close()
            # The refused handshakes are counted by bounded reason.
            metrics = await metrics_text(gw)
            assert 'pricegate_gateway_auth_failures_total{reason="missing"} 1.0' in metrics
            assert 'pricegate_gateway_auth_failures_total{reason="malformed"} 3.0' in metrics
            assert 'pricegate_gateway_auth_failures_total{reason="invalid"} 1.0' in metrics
            assert key not in metrics and key[:16] not in metrics


async def test_a_subscribed_client_with_a_key_gets_data(
    postgres_dsn: str, pg_schema: str, redis_url: str, key_prefix: str
) -> None:
    async with key_table(postgres_dsn, pg_schema) as keys:
        key = await keys.create("bot")
        broker = MemoryBroker()
        async with (
            running_gateway(broker, **auth_settings(postgres_dsn, pg_schema, redis_url, key_prefix)) as gw,
            connect(f"{gw.ws_base}/ws", additional_headers={"X-MBX-APIKEY": key}) as ws,
        ):
            await ws.send('{"method":"SUBSCRIBE","params":["btcusdt@trade"],"id":1}')
            assert orjson.loads(await ws.recv()) == {"result": None, "id": 1}


async def test_rest_needs_a_key_except_ping_time_and_health(
    postgres_dsn: str, pg_schema: str, redis_url: str, key_prefix: str
) -> None:
    async with key_table(postgres_dsn, pg_schema) as keys:
        key = await keys.create("bot")
        revoked = await keys.create("old")
        await keys.revoke(revoked)
        overrides = auth_settings(postgres_dsn, pg_schema, redis_url, key_prefix)
        async with (
            running_gateway(MemoryBroker(), candles=MemoryCandleStore(), **overrides) as gw,
            httpx.AsyncClient(base_url=gw.http_base) as http,
        ):
            for path in ("/api/v3/ping", "/api/v3/time", "/livez", "/readyz", "/metrics", "/"):
                assert (await http.get(path)).status_code == 200, path
            klines = "/api/v3/klines?symbol=BTCUSDT&interval=1h&limit=5"
            for headers, body, reason in [
                ({}, FORMAT_INVALID, "API key missing"),
                ({"X-MBX-APIKEY": "short"}, FORMAT_INVALID, "format invalid"),
                ({"X-MBX-APIKEY": secrets.token_hex(32)}, KEY_INVALID, "invalid API key"),
                ({"X-MBX-APIKEY": revoked}, KEY_INVALID, "API key revoked"),
            ]:
                response = await http.get(klines, headers=headers)
                assert response.status_code == 401
                assert response.json() == body
                assert reason in response.headers["www-authenticate"]
                assert "x-mbx-used-weight-1m" in response.headers
            response = await http.get(klines, headers=[("X-MBX-APIKEY", key), ("X-MBX-APIKEY", revoked)])
            assert response.status_code == 401 and response.json() == FORMAT_INVALID
            assert "sent more than once" in response.headers["www-authenticate"]
            response = await http.get(klines, headers={"X-MBX-APIKEY": key})
            assert response.status_code == 200 and response.json() == []
            for path in ("/api/v3/exchangeInfo", "/api/v3/depth?symbol=BTCUSDT", "/api/v1/technical/BTCUSDT"):
                assert (await http.get(path)).status_code == 401, path


async def test_a_reconnect_storm_with_one_key_costs_one_database_lookup_across_replicas(
    postgres_dsn: str, pg_schema: str, redis_url: str, key_prefix: str
) -> None:
    clients = 2000
    async with key_table(postgres_dsn, pg_schema) as keys:
        key = await keys.create("bot")
        overrides = auth_settings(postgres_dsn, pg_schema, redis_url, key_prefix, max_connections_per_key=100_000)
        async with (
            running_gateway(MemoryBroker(), **overrides) as first,
            running_gateway(MemoryBroker(), **overrides) as second,
        ):
            started = time.perf_counter()
            headers = {"X-MBX-APIKEY": key}
            answers = await asyncio.gather(
                *(raw_handshake(gw.port, headers=headers) for gw in (first, second) for _ in range(clients))
            )
            elapsed = time.perf_counter() - started
            assert [answer.status for answer in answers] == [101] * (2 * clients)
            lookups = db_lookups(first) + db_lookups(second)
            print(f"{2 * clients} handshakes on two replicas in {elapsed:.2f} s: {lookups} database lookup(s)")
            assert lookups == 1
            for answer in answers:
                answer.close()


async def test_ten_thousand_concurrent_checks_of_one_key_cost_one_lookup(
    postgres_dsn: str, pg_schema: str, redis_url: str, key_prefix: str
) -> None:
    async with key_table(postgres_dsn, pg_schema) as keys:
        key = await keys.create("bot")
        settings = Settings().with_overrides(auth_settings(postgres_dsn, pg_schema, redis_url, key_prefix))
        auth = Authenticator(settings, store=keys)
        try:
            pending = [auth.authenticate(key, None) for _ in range(10_000)]
            outcomes = await asyncio.gather(*(outcome for outcome in pending if inspect.isawaitable(outcome)))
            assert len(outcomes) == 10_000  # none was answered before the lookup...
            assert {outcome.subject for outcome in outcomes} == {key_subject(key)}  # type: ignore[union-attr]
            assert auth.keys is not None and auth.keys.db_lookups == 1  # ...and all shared one
            assert auth.authenticate(key, None) == outcomes[0]  # now answered at once, from the cache
        finally:
            await auth.aclose()


async def test_random_keys_are_refused_without_growing_memory(
    postgres_dsn: str, pg_schema: str, redis_url: str, key_prefix: str
) -> None:
    async with key_table(postgres_dsn, pg_schema) as keys:
        settings = Settings().with_overrides(auth_settings(postgres_dsn, pg_schema, redis_url, key_prefix))
        auth = Authenticator(settings, store=keys)
        assert auth.keys is not None
        auth.keys.cache.max_unknown = 100
        try:
            for _ in range(5):
                batch = [auth.authenticate(secrets.token_hex(32), None) for _ in range(100)]
                outcomes = await asyncio.gather(*(o for o in batch if inspect.isawaitable(o)))
                assert {o.reason for o in outcomes} == {"invalid"}  # type: ignore[union-attr]
            assert auth.keys.cache.refused_count == 100 and len(auth.keys.cache) == 0
        finally:
            await auth.aclose()


async def test_revocation_refuses_new_handshakes_and_closes_open_connections_within_the_ttl(
    postgres_dsn: str, pg_schema: str, redis_url: str, key_prefix: str
) -> None:
    ttl = 2.0
    async with key_table(postgres_dsn, pg_schema) as keys:
        key, other = await keys.create("bot"), await keys.create("other")
        overrides = auth_settings(postgres_dsn, pg_schema, redis_url, key_prefix, auth_cache_ttl_s=ttl)
        async with (
            running_gateway(MemoryBroker(), **overrides) as gw,
            connect(f"{gw.ws_base}/ws/btcusdt@trade", additional_headers={"X-MBX-APIKEY": key}) as ws,
            connect(f"{gw.ws_base}/ws/btcusdt@trade", additional_headers={"X-MBX-APIKEY": other}) as unaffected,
        ):
            redis = aioredis.from_url(redis_url)
            assert await redis.exists(redis_key(key_prefix, key_digest(key))) == 1  # the shared entry
            settings = Settings().with_overrides(overrides)
            output = await run_keys(settings, "revoke", key=key)
            revoked_at = time.monotonic()
            assert output.startswith(f"revoked key {key_subject(key)}")
            assert await redis.exists(redis_key(key_prefix, key_digest(key))) == 0  # revoke cleared it
            await redis.aclose()
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), ttl + 3)
            took = time.monotonic() - revoked_at
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4403
            print(f"open connection closed {took:.2f} s after revocation (TTL {ttl} s)")
            assert took <= ttl + 3
            refused = await raw_handshake(gw.port, headers={"X-MBX-APIKEY": key})
            assert refused.status == 401 and refused.body == b"API key revoked"
            refused.close()
            await asyncio.sleep(0.5)
            assert unaffected.close_code is None  # another key's connection stays


async def test_a_revoked_key_is_refused_on_a_replica_that_cached_it_within_the_ttl(
    postgres_dsn: str, pg_schema: str, redis_url: str, key_prefix: str
) -> None:
    ttl = 1.0
    async with key_table(postgres_dsn, pg_schema) as keys:
        key = await keys.create("bot")
        overrides = auth_settings(postgres_dsn, pg_schema, redis_url, key_prefix, auth_cache_ttl_s=ttl)
        async with running_gateway(MemoryBroker(), **overrides) as gw:
            first = await raw_handshake(gw.port, headers={"X-MBX-APIKEY": key})
            assert first.status == 101
            first.close()
            await keys.revoke(key)  # straight in the table: not even the Redis entry is cleared
            revoked_at = time.monotonic()

            async def refused() -> bool:
                answer = await raw_handshake(gw.port, headers={"X-MBX-APIKEY": key})
                answer.close()
                return answer.status == 401

            await eventually(refused, what="the revoked key to be refused", timeout=ttl + 3, interval=0.1)
            assert time.monotonic() - revoked_at <= ttl + 3


async def test_connections_per_key_are_limited_across_replicas(
    postgres_dsn: str, pg_schema: str, redis_url: str, key_prefix: str
) -> None:
    async with key_table(postgres_dsn, pg_schema) as keys:
        key = await keys.create("bot")
        overrides = auth_settings(postgres_dsn, pg_schema, redis_url, key_prefix, max_connections_per_key=5)
        headers = {"X-MBX-APIKEY": key}
        async with (
            running_gateway(MemoryBroker(), **overrides) as first,
            running_gateway(MemoryBroker(), **overrides) as second,
        ):
            held = [await raw_handshake(first.port, headers=headers) for _ in range(3)]
            held.append(await raw_handshake(second.port, headers=headers))
            assert [answer.status for answer in held] == [101] * 4
            # The second replica learns of the first's three at once (a key new to it makes it sync).
            await eventually(
                lambda: authenticator(second).counts.total(f"apikey:{key_subject(key)}") == 4,
                what="the other replica's count to arrive",
                timeout=5,  # one sync period (1 s) on an idle machine; CI shares two cores with everything
            )
            held.append(await raw_handshake(second.port, headers=headers))
            assert held[-1].status == 101
            over = await raw_handshake(second.port, headers=headers)
            assert over.status == 429
            over.close()
            await eventually(
                lambda: authenticator(first).counts.total(f"apikey:{key_subject(key)}") == 5,
                what="the first replica to see all five",
                timeout=5,
            )
            over = await raw_handshake(first.port, headers=headers)
            assert over.status == 429
            over.close()
            held.pop().close()  # one of the second replica's closes: room for one more, anywhere
            await eventually(
                lambda: authenticator(first).counts.total(f"apikey:{key_subject(key)}") == 4,
                what="the close to be published",
                timeout=5,
            )
            again = await raw_handshake(first.port, headers=headers)
            assert again.status == 101
            for answer in [*held, again]:
                answer.close()


async def metrics_text(gw: RunningGateway) -> str:
    async with httpx.AsyncClient() as http:
        return (await http.get(f"{gw.http_base}/metrics")).text


async def readyz(gw: RunningGateway) -> tuple[int, dict[str, Any]]:
    async with httpx.AsyncClient() as http:
        response = await http.get(f"{gw.http_base}/readyz")
    return response.status_code, response.json()


async def test_postgres_down_keeps_validated_keys_working_and_refuses_unknown_ones(
    postgres_dsn: str, pg_schema: str, redis_url: str, key_prefix: str
) -> None:
    ttl = 1.0
    async with key_table(postgres_dsn, pg_schema) as keys, CuttableProxy(5432) as proxy:
        known, unknown = await keys.create("known"), await keys.create("never seen by the gateway")
        proxied = postgres_dsn.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
        assert proxied != postgres_dsn
        overrides = auth_settings(proxied, pg_schema, redis_url, key_prefix, auth_cache_ttl_s=ttl)
        async with running_gateway(MemoryBroker(), **overrides) as gw:
            status, body = await readyz(gw)
            assert status == 200 and body["auth"]["modes"] == ["apikey"]
            async with connect(f"{gw.ws_base}/ws/btcusdt@trade", additional_headers={"X-MBX-APIKEY": known}) as ws:
                assert (await readyz(gw))[1]["auth"]["key_database"] == "ok"
                proxy.cut()
                await asyncio.sleep(ttl * 2 + 0.5)  # well past the TTL: the cached entry is stale, re-checks fail
                # The open connection stays, and the known key still connects (served stale).
                assert ws.close_code is None
                again = await raw_handshake(gw.port, headers={"X-MBX-APIKEY": known})
                assert again.status == 101
                again.close()
                # An unknown key is refused, fail closed, with a reason and Retry-After.
                refused = await raw_handshake(gw.port, headers={"X-MBX-APIKEY": unknown})
                assert refused.status == 503 and refused.headers["retry-after"] == "1"
                assert b"API keys cannot be verified right now" in refused.body
                refused.close()
                async with httpx.AsyncClient(base_url=gw.http_base) as http:
                    rest = await http.get("/api/v3/time", headers={"X-MBX-APIKEY": unknown})
                    assert rest.status_code == 200  # open endpoint
                    rest = await http.get("/api/v3/exchangeInfo", headers={"X-MBX-APIKEY": unknown})
                    assert rest.status_code == 503 and rest.json()["code"] == -1001
                    assert "cannot be verified" in rest.json()["msg"]
                # /readyz says why, and stays ready: known keys still work.
                status, body = await readyz(gw)
                assert status == 200 and body["ready"] is True
                assert body["auth"]["key_database"] == "unavailable"
                assert "unknown keys are refused with 503" in body["auth"]["detail"]
                metrics = await metrics_text(gw)
                assert 'pricegate_gateway_auth_cache_results_total{result="stale"}' in metrics
                assert 'pricegate_gateway_auth_failures_total{reason="unavailable"}' in metrics
                # The database comes back: the unknown key is verified.
                proxy.restore()

                async def accepted() -> bool:
                    answer = await raw_handshake(gw.port, headers={"X-MBX-APIKEY": unknown})
                    answer.close()
                    return answer.status == 101

                await eventually(accepted, what="the key to be verified once PostgreSQL is back", timeout=5)
                assert (await readyz(gw))[1]["auth"]["key_database"] == "ok"
                assert ws.close_code is None


async def test_invalid_stored_values_in_redis_are_ignored(
    postgres_dsn: str, pg_schema: str, redis_url: str, key_prefix: str
) -> None:
    async with key_table(postgres_dsn, pg_schema) as keys:
        key = await keys.create("bot")
        redis = aioredis.from_url(redis_url)
        await redis.set(redis_key(key_prefix, key_digest(key)), b"garbage", ex=30)
        await redis.aclose()
        overrides = auth_settings(postgres_dsn, pg_schema, redis_url, key_prefix)
        async with running_gateway(MemoryBroker(), **overrides) as gw:
            answer = await raw_handshake(gw.port, headers={"X-MBX-APIKEY": key})
            assert answer.status == 101 and db_lookups(gw) == 1
            answer.close()


async def test_a_key_refused_by_a_websocket_client_library_sees_401(
    postgres_dsn: str, pg_schema: str, redis_url: str, key_prefix: str
) -> None:
    async with key_table(postgres_dsn, pg_schema):
        overrides = auth_settings(postgres_dsn, pg_schema, redis_url, key_prefix)
        async with running_gateway(MemoryBroker(), **overrides) as gw:
            with pytest.raises(InvalidStatus) as refused:
                async with connect(f"{gw.ws_base}/ws/btcusdt@trade"):
                    pass
            assert refused.value.response.status_code == 401
