"""JWT connection tokens: the pure verifier (HS256, RS256, ES256; every bad token a clear refusal, never an
exception, also by property), and a real gateway taking ``?token=`` on ``/ws`` and ``/stream``, the ``streams``
claim, REFRESH_TOKEN keeping a connection past its first token, 4401 when a token runs out, and REST with
``Authorization: Bearer``."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from typing import Any

import httpx
import jwt
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import HealthCheck, given, settings, strategies as st
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from gateway.auth.principal import AuthRefusal, Principal
from gateway.auth.tokens import LEEWAY_S, MAX_TOKEN_BYTES, KeyConfigError, TokenVerifier, subject_of
from shared.broker.memory import MemoryBroker
from shared.candles.memory import MemoryCandleStore
from shared.errors import ConfigError
from tests.auth_support import SECRET, auth_settings, key_table, raw_handshake, token
from tests.harness import running_gateway

NOW = 1_700_000_000.0
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())


def pem(private_key: Any) -> bytes:
    return bytes(
        private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def verifier(**kwargs: Any) -> TokenVerifier:
    return TokenVerifier(clock=lambda: NOW, **({"secret": SECRET} | kwargs))


def mint(claims: dict[str, Any], key: Any = SECRET, algorithm: str = "HS256") -> str:
    return jwt.encode({"exp": NOW + 60, **claims}, key, algorithm=algorithm)


def refusal(outcome: Principal | AuthRefusal) -> tuple[str, str, int, int]:
    assert isinstance(outcome, AuthRefusal), outcome
    return outcome.reason, outcome.message, outcome.code, outcome.status


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}.{b64(signature)}"


# ---- the verifier (pure) ------------------------------------------------------------------------------------


def test_a_valid_hs256_token_becomes_a_principal() -> None:
    outcome = verifier().verify(mint({"sub": "alice@example.com", "streams": ["*@ticker", "BTCUSDT@*"]}))
    assert isinstance(outcome, Principal)
    assert outcome.kind == "jwt" and outcome.expires_at == NOW + 60
    assert outcome.subject == subject_of("alice@example.com") and "alice" not in outcome.subject
    assert outcome.patterns == ("*@ticker", "btcusdt@*")
    assert outcome.allows("ethusdt@ticker") and outcome.allows("btcusdt@trade") and not outcome.allows("ethusdt@trade")


def test_a_token_without_streams_allows_every_stream_and_without_sub_has_no_subject() -> None:
    outcome = verifier().verify(mint({}))
    assert isinstance(outcome, Principal) and outcome.patterns is None and outcome.subject == ""
    assert outcome.limit_key is None  # nothing to count a per-credential limit under


@pytest.mark.parametrize(("private", "algorithm"), [(RSA_KEY, "RS256"), (EC_KEY, "ES256")])
def test_rs256_and_es256_verify_with_the_public_key(private: Any, algorithm: str) -> None:
    check = TokenVerifier(public_key_pem=pem(private), clock=lambda: NOW)
    assert isinstance(check.verify(mint({"sub": "u"}, private, algorithm)), Principal)
    other = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if algorithm == "RS256"
        else (ec.generate_private_key(ec.SECP256R1()))
    )
    assert refusal(check.verify(mint({}, other, algorithm)))[:2] == ("invalid", "token signature invalid")
    # Only the configured algorithm: an HS256 token is refused outright.
    assert refusal(check.verify(mint({})))[0] == "invalid"


def test_expiry_has_a_small_leeway_and_a_token_two_minutes_old_is_refused() -> None:
    assert isinstance(verifier().verify(mint({"exp": NOW - LEEWAY_S + 1})), Principal)
    assert refusal(verifier().verify(mint({"exp": NOW - 120}))) == ("expired", "token expired", -2015, 401)


@pytest.mark.parametrize(
    ("make", "reason", "message"),
    [
        (lambda: mint({}, "another-secret-of-at-least-32-bytes!!"), "invalid", "token signature invalid"),
        (lambda: unsigned({"alg": "none", "typ": "JWT"}, {"exp": NOW + 60}), "invalid", "token algorithm 'none'"),
        (lambda: unsigned({"alg": "HS512"}, {"exp": NOW + 60}), "invalid", "token algorithm 'HS512'"),
        (lambda: unsigned({"typ": "JWT"}, {"exp": NOW + 60}), "invalid", "token algorithm '?' not accepted"),
        (lambda: "x" * (MAX_TOKEN_BYTES + 1), "malformed", "token too long"),
        (lambda: "not.a.jwt", "malformed", "token malformed"),
        (lambda: "", "malformed", "token malformed"),
        (lambda: "a.b", "malformed", "token malformed"),
        (lambda: jwt.encode({"sub": "x"}, SECRET, algorithm="HS256"), "malformed", "token has no exp claim"),
        (lambda: mint({"exp": "soon"}), "malformed", "token exp claim is not a number"),
        (lambda: mint({"exp": True}), "malformed", "token exp claim is not a number"),
        (lambda: mint({"nbf": NOW + 3600}), "invalid", "token not valid yet"),
        (lambda: mint({"sub": 42}), "malformed", "token sub claim is not a string"),
        (lambda: mint({"streams": "btcusdt@trade"}), "malformed", "token streams claim must be a list"),
        (lambda: mint({"streams": [1]}), "malformed", "token streams claim must be a list"),
        (lambda: mint({"streams": ["x" * 200]}), "malformed", "token streams claim must be a list"),
        (lambda: mint({"streams": ["*"] * 300}), "malformed", "token streams claim must be a list"),
    ],
)
def test_bad_tokens_get_a_clear_refusal(make: Any, reason: str, message: str) -> None:
    got_reason, got_message, code, status = refusal(verifier().verify(make()))
    assert (got_reason, status) == (reason, 401)
    assert got_message.startswith(message)
    assert code == (-2014 if reason == "malformed" else -2015)


def test_hs256_signed_with_the_public_key_is_refused_key_confusion() -> None:
    public = pem(RSA_KEY)
    check = TokenVerifier(public_key_pem=public, clock=lambda: NOW)
    header, body = b64(b'{"alg":"HS256","typ":"JWT"}'), b64(json.dumps({"exp": NOW + 60}).encode())
    signature = hmac.new(public, f"{header}.{body}".encode(), hashlib.sha256).digest()
    assert refusal(check.verify(f"{header}.{body}.{b64(signature)}"))[0] == "invalid"


def test_configuration_errors_name_the_setting() -> None:
    with pytest.raises(KeyConfigError) as short:
        TokenVerifier(secret="short", clock=time.time)
    assert short.value.setting == "jwt_secret"
    with pytest.raises(KeyConfigError) as not_pem:
        TokenVerifier(public_key_pem=b"-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----", clock=time.time)
    assert not_pem.value.setting == "jwt_public_key"
    small_rsa = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(KeyConfigError, match="too short"):
        TokenVerifier(public_key_pem=pem(small_rsa), clock=time.time)
    with pytest.raises(KeyConfigError, match="P-256"):
        TokenVerifier(public_key_pem=pem(ec.generate_private_key(ec.SECP384R1())), clock=time.time)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    header=st.dictionaries(st.sampled_from(["alg", "typ", "kid", "crit", "b64"]), _json, max_size=4),
    claims=st.dictionaries(st.sampled_from(["exp", "nbf", "iat", "sub", "streams", "aud", "iss"]), _json, max_size=6),
    sign=st.booleans(),
)
def test_no_token_makes_the_verifier_raise(header: dict[str, Any], claims: dict[str, Any], sign: bool) -> None:
    header_part = b64(json.dumps(header).encode())
    claims_part = b64(json.dumps(claims).encode())
    signature = hmac.new(SECRET.encode(), f"{header_part}.{claims_part}".encode(), hashlib.sha256).digest()
    outcome = verifier().verify(f"{header_part}.{claims_part}.{b64(signature if sign else b'x')}")
    assert isinstance(outcome, Principal | AuthRefusal)
    if isinstance(outcome, AuthRefusal):
        assert outcome.status == 401 and outcome.reason in ("malformed", "invalid", "expired")


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=300))
def test_no_text_makes_the_verifier_raise(text: str) -> None:
    assert isinstance(verifier().verify(text), AuthRefusal)


# ---- a real gateway -----------------------------------------------------------------------------------------


def jwt_settings(**extra: Any) -> dict[str, Any]:
    return {"auth": "jwt", "jwt_secret": SECRET, "max_connections_per_ip": 1000, **extra}


async def recv_json(ws: ClientConnection, timeout: float = 5.0) -> Any:
    return orjson.loads(await asyncio.wait_for(ws.recv(), timeout))


async def test_token_in_the_query_on_ws_and_stream_paths() -> None:
    async with running_gateway(MemoryBroker(), **jwt_settings()) as gw:
        good = token(sub="alice")
        paths = (f"/ws/btcusdt@trade?token={good}", f"/ws?token={good}", f"/stream?streams=btcusdt@trade&token={good}")
        for path in paths:
            answer = await raw_handshake(gw.port, path)
            assert answer.status == 101, path
            answer.close()
        for path, reason in [
            ("/ws/btcusdt@trade", b"token missing"),
            ("/ws/btcusdt@trade?token=garbage", b"token malformed"),
            (f"/ws?token={token(exp=int(time.time()) - 120)}", b"token expired"),
            (f"/stream?streams=btcusdt@trade&token={token(key='x' * 40)}", b"token signature invalid"),
            (f"/ws?token={unsigned({'alg': 'none'}, {'exp': time.time() + 60})}", b"token algorithm 'none'"),
            (f"/ws?token={'x' * (MAX_TOKEN_BYTES + 1)}", b"token too long"),
        ]:
            answer = await raw_handshake(gw.port, path)
            assert answer.status == 401, path
            assert answer.body.startswith(reason), answer.body
            answer.close()


async def test_the_streams_claim_limits_url_streams_and_subscriptions() -> None:
    async with running_gateway(MemoryBroker(), **jwt_settings()) as gw:
        claim = token(streams=["*@ticker", "btcusdt@*"])
        async with connect(f"{gw.ws_base}/stream?streams=ethusdt@trade/ethusdt@ticker&token={claim}") as ws:
            error = await recv_json(ws)
            assert error["id"] is None and "'ethusdt@trade' is not allowed by your token" in error["error"]["msg"]
            await ws.send('{"method":"LIST_SUBSCRIPTIONS","id":1}')
            assert await recv_json(ws) == {"result": ["ethusdt@ticker"], "id": 1}
            await ws.send('{"method":"SUBSCRIBE","params":["ethusdt@depth"],"id":2}')
            refused = await recv_json(ws)
            assert refused["error"]["code"] == 2 and "not allowed by your token" in refused["error"]["msg"]
            await ws.send('{"method":"SUBSCRIBE","params":["btcusdt@depth","solusdt@ticker"],"id":3}')
            assert await recv_json(ws) == {"result": None, "id": 3}


async def test_refresh_before_expiry_keeps_the_connection_and_expiry_without_refresh_closes_4401() -> None:
    async with running_gateway(MemoryBroker(), **jwt_settings()) as gw:
        # Both tokens expired 7 s ago: inside the leeway, so they connect, and have about 3 s left.
        short = token(sub="alice", exp=int(time.time()) - 7)
        async with (
            connect(f"{gw.ws_base}/ws/btcusdt@trade?token={short}") as refreshed,
            connect(f"{gw.ws_base}/ws/btcusdt@trade?token={short}") as left,
        ):
            refresh = {"method": "REFRESH_TOKEN", "params": [token(sub="alice")], "id": 1}
            await refreshed.send(orjson.dumps(refresh).decode())
            assert await recv_json(refreshed) == {"result": None, "id": 1}
            # A refused refresh is an error; the connection stays (until its old token runs out).
            for bad, why in [
                (token(sub="bob"), "the new token is for another subject"),
                (token(sub="alice", exp=int(time.time()) - 120), "token expired"),
                ("garbage", "token malformed: not a JWT"),
            ]:
                await left.send(orjson.dumps({"method": "REFRESH_TOKEN", "params": [bad], "id": 2}).decode())
                reply = await recv_json(left)
                assert reply["id"] == 2 and reply["error"]["code"] == 2
                assert reply["error"]["msg"] == f"Invalid request: token refused: {why}"
            started = time.monotonic()
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    await asyncio.wait_for(left.recv(), 6)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401
            assert closed.value.rcvd.reason == "token expired"
            assert time.monotonic() - started < 5
            # The refreshed one is still there, past the first token's end.
            await refreshed.send('{"method":"LIST_SUBSCRIPTIONS","id":3}')
            assert await recv_json(refreshed) == {"result": ["btcusdt@trade"], "id": 3}


async def test_a_refresh_narrower_than_the_subscriptions_is_refused() -> None:
    async with running_gateway(MemoryBroker(), **jwt_settings()) as gw:
        wide = token(sub="a", streams=["btcusdt@*"])
        async with connect(f"{gw.ws_base}/ws/btcusdt@trade?token={wide}") as ws:
            narrow = token(sub="a", streams=["btcusdt@ticker"])
            await ws.send(orjson.dumps({"method": "REFRESH_TOKEN", "params": [narrow], "id": 1}).decode())
            reply = await recv_json(ws)
            assert "does not allow btcusdt@trade" in reply["error"]["msg"]
            wider = token(sub="a", streams=["*"])
            await ws.send(orjson.dumps({"method": "REFRESH_TOKEN", "params": [wider], "id": 2}).decode())
            assert await recv_json(ws) == {"result": None, "id": 2}
            await ws.send('{"method":"SUBSCRIBE","params":["ethusdt@trade"],"id":3}')
            assert await recv_json(ws) == {"result": None, "id": 3}  # the new claim applies


async def test_refresh_token_without_authentication_is_an_error() -> None:
    async with running_gateway(MemoryBroker()) as gw, connect(f"{gw.ws_base}/ws/btcusdt@trade") as ws:
        await ws.send('{"method":"REFRESH_TOKEN","params":["x.y.z"],"id":1}')
        reply = await recv_json(ws)
        assert reply["id"] == 1 and "authentication is off" in reply["error"]["msg"]


async def test_rest_takes_a_bearer_token_or_the_query_token() -> None:
    async with (
        running_gateway(MemoryBroker(), candles=MemoryCandleStore(), **jwt_settings()) as gw,
        httpx.AsyncClient(base_url=gw.http_base) as http,
    ):
        klines = "/api/v3/klines?symbol=BTCUSDT&interval=1h&limit=5"
        good = token()
        assert (await http.get(klines, headers={"Authorization": f"Bearer {good}"})).status_code == 200
        assert (await http.get(f"{klines}&token={good}")).status_code == 200
        missing = await http.get(klines)
        assert missing.status_code == 401 and missing.json() == {"code": -2014, "msg": "API-key format invalid."}
        expired = await http.get(klines, headers={"Authorization": f"Bearer {token(exp=int(time.time()) - 120)}"})
        assert expired.status_code == 401
        assert expired.json() == {"code": -2015, "msg": "Invalid API-key, IP, or permissions for action."}
        assert 'error_description="token expired"' in expired.headers["www-authenticate"]
        assert (await http.get("/api/v3/ping")).status_code == 200


async def test_a_short_secret_is_a_configuration_error_at_start() -> None:
    with pytest.raises(ConfigError) as error:
        async with running_gateway(MemoryBroker(), auth="jwt", jwt_secret="short"):
            pass
    assert error.value.setting == "PRICEGATE_JWT_SECRET" and "short" not in str(error.value.value)


async def test_a_public_key_file_verifies_rs256(tmp_path: Any) -> None:
    key_file = tmp_path / "public.pem"
    key_file.write_bytes(pem(RSA_KEY))
    async with running_gateway(MemoryBroker(), auth="jwt", jwt_public_key=str(key_file)) as gw:
        signed = jwt.encode({"exp": int(time.time()) + 60}, RSA_KEY, algorithm="RS256")
        answer = await raw_handshake(gw.port, f"/ws/btcusdt@trade?token={signed}")
        assert answer.status == 101
        answer.close()
        forged = token()  # HS256: no secret is configured, so not accepted
        answer = await raw_handshake(gw.port, f"/ws/btcusdt@trade?token={forged}")
        assert answer.status == 401 and answer.body.startswith(b"token algorithm 'HS256' not accepted")
        answer.close()


async def test_either_credential_when_both_modes_are_on(
    postgres_dsn: str, pg_schema: str, redis_url: str, key_prefix: str
) -> None:
    async with key_table(postgres_dsn, pg_schema) as keys:
        key = await keys.create("bot")
        overrides = auth_settings(postgres_dsn, pg_schema, redis_url, key_prefix, auth="apikey,jwt", jwt_secret=SECRET)
        async with running_gateway(MemoryBroker(), **overrides) as gw:
            with_key = await raw_handshake(gw.port, headers={"X-MBX-APIKEY": key})
            with_token = await raw_handshake(gw.port, f"/ws/btcusdt@trade?token={token()}")
            neither = await raw_handshake(gw.port)
            assert (with_key.status, with_token.status, neither.status) == (101, 101, 401)
            assert neither.body.startswith(b"credentials missing")
            for answer in (with_key, with_token, neither):
                answer.close()


async def test_the_asgi_fallback_authenticates_the_same_way() -> None:
    async with running_gateway(MemoryBroker(), ws_protocol="websockets-sansio", **jwt_settings()) as gw:
        missing = await raw_handshake(gw.port)
        assert missing.status == 401 and missing.body.startswith(b"token missing")
        missing.close()
        short = token(sub="a", exp=int(time.time()) - 8)
        async with connect(f"{gw.ws_base}/ws/btcusdt@trade?token={short}") as ws:
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    await asyncio.wait_for(ws.recv(), 6)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401


def test_a_verified_token_is_not_verified_again_but_its_expiry_still_counts() -> None:
    now = [time.time()]
    tokens = TokenVerifier(secret=SECRET, clock=lambda: now[0])
    token = jwt.encode({"sub": "u", "exp": int(now[0]) + 60}, SECRET, algorithm="HS256")
    first = tokens.verify(token)
    assert isinstance(first, Principal)
    assert tokens.verify(token) == first  # from the verified cache
    now[0] += 120  # past exp + leeway
    refused = tokens.verify(token)
    assert isinstance(refused, AuthRefusal) and refused.reason == "expired"
    tampered = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
    assert isinstance(tokens.verify(tampered), AuthRefusal)
