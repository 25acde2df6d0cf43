"""The edge against a real uvicorn gateway over raw sockets: per-IP limits, header deadline and caps, Origin and
trusted proxies. Every refusal happens before the upgrade, with the status README documents."""

from __future__ import annotations

import asyncio
import logging
import time

import httpx
import pytest
from websockets.asyncio.client import connect

from shared.broker.memory import MemoryBroker
from tests.harness import RunningGateway, running_gateway
from tests.polling import eventually
from tests.raw_sockets import closed_by_server, handshake, open_raw, read_response_head, upgrade_request


async def test_per_ip_connections_are_capped_before_the_upgrade_and_freed_on_close() -> None:
    async with running_gateway(MemoryBroker(), max_connections_per_ip=50) as gw:
        open_ = [await handshake(gw) for _ in range(50)]
        assert [status for status, *_ in open_] == [101] * 50
        status, headers, reader, _ = await handshake(gw)
        assert status == 429 and int(headers["retry-after"]) >= 1
        assert await closed_by_server(reader, 3)
        await asyncio.sleep(0.5)
        assert all(not writer.is_closing() for *_, writer in open_)  # none was closed to make room
        for *_, writer in open_[:10]:
            writer.close()
        await eventually(
            lambda: gw.node.edge is not None and gw.node.edge.ledger.connections("127.0.0.1") == 40,
            what="ten closes to be counted",
        )
        status, *_ = await handshake(gw)
        assert status == 101


async def test_connection_attempts_per_ip_are_rate_limited_with_retry_after() -> None:
    async with running_gateway(MemoryBroker(), connection_attempts_per_ip=5, connection_attempt_window_s=60) as gw:
        for _ in range(5):
            status, _, _, writer = await handshake(gw)
            assert status == 101
            writer.close()
        status, headers, _, _ = await handshake(gw)
        assert status == 429
        assert 1 <= int(headers["retry-after"]) <= 13  # one attempt comes back every 12 s


async def test_an_idle_or_dripping_socket_is_closed_at_the_header_deadline_and_counts_meanwhile() -> None:
    async with running_gateway(MemoryBroker(), handshake_timeout_s=1.0, max_connections_per_ip=2) as gw:
        idle_reader, _ = await open_raw(gw.port)
        drip_reader, drip_writer = await open_raw(gw.port)
        # Two half-open sockets hold the address's two slots: a real client is refused meanwhile.
        status, *_ = await handshake(gw)
        assert status == 429
        started = time.monotonic()

        async def drip() -> None:
            for byte in upgrade_request():
                drip_writer.write(bytes([byte]))
                await asyncio.sleep(0.2)

        dripping = asyncio.create_task(drip())
        status, _ = await read_response_head(idle_reader, 3)
        assert status == 408
        status, _ = await read_response_head(drip_reader, 3)
        assert status == 408
        assert time.monotonic() - started < 2.5
        dripping.cancel()
        await eventually(
            lambda: gw.node.edge is not None and gw.node.edge.open_connections == 0,
            what="the closed sockets to be released",
        )
        status, *_ = await handshake(gw)
        assert status == 101


@pytest.mark.parametrize(
    ("request_bytes", "expected"),
    [
        (upgrade_request("/ws/" + "a" * 9000), 414),
        (upgrade_request(headers={f"X-H{i}": "v" for i in range(150)}), 431),
        (upgrade_request(headers={"X-Big": "v" * 9000}), 431),
        (upgrade_request(headers={f"X-H{i}": "v" * 900 for i in range(30)}), 431),
    ],
    ids=["long-url", "many-headers", "long-header", "large-headers"],
)
async def test_oversized_request_lines_and_headers_are_answered_at_once(request_bytes: bytes, expected: int) -> None:
    async with running_gateway(MemoryBroker()) as gw:
        started = time.monotonic()
        status, _, reader, _ = await handshake(gw, request_bytes)
        assert status == expected
        assert await closed_by_server(reader, 3)
        assert time.monotonic() - started < 2
        async with connect(f"{gw.ws_base}/ws/btcusdt@trade"):  # the gateway serves others as before
            pass


async def test_a_never_ending_header_stream_is_cut_off_without_growing_memory() -> None:
    async with running_gateway(MemoryBroker()) as gw:
        reader, writer = await open_raw(gw.port)
        writer.write(b"GET /ws HTTP/1.1\r\nHost: x\r\n")
        try:
            for _ in range(2000):  # up to 2 MB of headers, 1 KB each
                writer.write(b"X-Pad: " + b"p" * 1000 + b"\r\n")
                await writer.drain()
        except ConnectionError:  # the gateway answered and closed: the rest could not be sent
            pass
        status, _ = await read_response_head(reader, 3)
        assert status == 431


@pytest.mark.parametrize(
    ("origin", "expected"),
    [
        (None, 101),
        ("https://app.example.com", 101),
        ("https://EU.Example.com", 101),
        ("https://evil.com", 403),
        ("https://evil.com/.example.com", 403),
        ("http://app.example.com", 403),
    ],
)
async def test_origins_outside_the_allowed_list_are_refused(origin: str | None, expected: int) -> None:
    allowed = "https://app.example.com,https://*.example.com"
    async with running_gateway(MemoryBroker(), allowed_origins=allowed) as gw:
        headers = {"Origin": origin} if origin is not None else {}
        status, *_ = await handshake(gw, upgrade_request(headers=headers))
        assert status == expected


async def test_x_forwarded_for_counts_only_from_a_trusted_proxy() -> None:
    # Untrusted: a client cannot pick the address it is charged to.
    async with running_gateway(MemoryBroker(), max_connections_per_ip=2) as gw:
        spoofed = [await handshake(gw, upgrade_request(headers={"X-Forwarded-For": f"10.0.0.{i}"})) for i in range(3)]
        assert [status for status, *_ in spoofed] == [101, 101, 429]
    # Trusted (the loopback peer is the proxy): each forwarded client has its own budget.
    async with running_gateway(MemoryBroker(), max_connections_per_ip=2, forwarded_allow_ips="127.0.0.1") as gw:
        statuses = []
        for client in ("10.0.0.1", "10.0.0.1", "10.0.0.2", "10.0.0.1"):
            status, *_ = await handshake(gw, upgrade_request(headers={"X-Forwarded-For": f"1.2.3.4, {client}"}))
            statuses.append(status)
        assert statuses == [101, 101, 101, 429]


async def test_beyond_max_connections_the_gateway_answers_503() -> None:
    async with running_gateway(MemoryBroker(), max_connections=3) as gw:
        held = [await handshake(gw) for _ in range(3)]
        assert [status for status, *_ in held] == [101] * 3
        status, headers, _, _ = await handshake(gw)
        assert status == 503 and "retry-after" in headers


async def test_subscriptions_per_ip_are_bounded_across_connections() -> None:
    async with running_gateway(MemoryBroker(), max_subscriptions_per_ip=3) as gw:
        async with connect(f"{gw.ws_base}/stream?streams=btcusdt@trade/ethusdt@trade") as first:
            async with connect(f"{gw.ws_base}/ws") as second:
                await second.send('{"method":"SUBSCRIBE","params":["bnbusdt@trade","solusdt@trade"],"id":1}')
                reply = await asyncio.wait_for(second.recv(), 3)
                assert '"code":2' in str(reply) and "too many subscriptions" in str(reply)
                await second.send('{"method":"SUBSCRIBE","params":["bnbusdt@trade"],"id":2}')
                assert await asyncio.wait_for(second.recv(), 3) == '{"result":null,"id":2}'
                await first.send('{"method":"UNSUBSCRIBE","params":["btcusdt@trade"],"id":3}')
                assert await asyncio.wait_for(first.recv(), 3) == '{"result":null,"id":3}'
                await second.send('{"method":"SUBSCRIBE","params":["solusdt@trade"],"id":4}')
                assert await asyncio.wait_for(second.recv(), 3) == '{"result":null,"id":4}'


async def test_rest_weights_are_charged_to_the_forwarded_client_only_behind_a_trusted_proxy() -> None:
    async def used_weights(gw: RunningGateway, clients: list[str]) -> list[int]:
        async with httpx.AsyncClient(base_url=gw.http_base) as http:
            answers = [await http.get("/api/v3/ping", headers={"X-Forwarded-For": client}) for client in clients]
        return [int(answer.headers["X-MBX-USED-WEIGHT-1M"]) for answer in answers]

    async with running_gateway(MemoryBroker()) as gw:  # untrusted: every request is the peer's
        assert await used_weights(gw, ["10.0.0.1", "10.0.0.2", "10.0.0.3"]) == [1, 2, 3]
    async with running_gateway(MemoryBroker(), forwarded_allow_ips="127.0.0.1") as gw:
        assert await used_weights(gw, ["10.0.0.1", "10.0.0.2", "10.0.0.1"]) == [1, 1, 2]


def with_repeated_header(name: str, first: str, second: str) -> bytes:
    """An upgrade request carrying ``name`` twice (a dict of headers cannot)."""
    return upgrade_request(headers={name: first}).replace(b"\r\n\r\n", f"\r\n{name}: {second}\r\n\r\n".encode())


async def test_a_single_valued_header_sent_twice_is_refused_clearly(caplog: pytest.LogCaptureFixture) -> None:
    """Which API key would count is a guess: 400 with the reason, the replica unbothered (before: the protocol
    raised, an ERROR was logged per attempt and the client got no answer)."""
    async with running_gateway(MemoryBroker()) as gw:
        status, _, reader, _ = await handshake(gw, with_repeated_header("X-MBX-APIKEY", "a" * 64, "b" * 64))
        assert status == 400
        body = await asyncio.wait_for(reader.read(), 5)
        assert b"the x-mbx-apikey header is sent more than once" in body.lower()
        status, *_ = await handshake(gw)  # and the next client is served
        assert status == 101
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]


async def test_x_forwarded_for_sent_twice_is_one_list() -> None:
    """RFC 9110: a list-valued header sent twice is the two lists joined; from a trusted proxy the nearest
    untrusted hop of the joined list is the client."""
    async with running_gateway(MemoryBroker(), max_connections_per_ip=1, forwarded_allow_ips="127.0.0.1") as gw:
        first, *_ = await handshake(gw, with_repeated_header("X-Forwarded-For", "1.2.3.4", "10.0.0.1"))
        again, *_ = await handshake(gw, upgrade_request(headers={"X-Forwarded-For": "10.0.0.1"}))
        other, *_ = await handshake(gw, upgrade_request(headers={"X-Forwarded-For": "1.2.3.4"}))
        assert (first, again, other) == (101, 429, 101), "charged to 10.0.0.1, the last hop of the joined list"


async def test_the_asgi_fallback_refuses_a_repeated_api_key_the_same_way() -> None:
    async with running_gateway(MemoryBroker(), ws_protocol="websockets-sansio") as gw:
        status, _, reader, _ = await handshake(gw, with_repeated_header("X-MBX-APIKEY", "a" * 64, "b" * 64))
        assert status == 400
        assert b"the x-mbx-apikey header is sent more than once" in (await asyncio.wait_for(reader.read(), 5)).lower()


async def test_rest_weights_follow_x_forwarded_for_sent_twice_as_one_list() -> None:
    """Behind a trusted proxy a client's own X-Forwarded-For ahead of the proxy's must not choose whom its weight
    is charged to: the joined list's nearest untrusted hop pays."""
    async with running_gateway(MemoryBroker(), forwarded_allow_ips="127.0.0.1") as gw:
        async with httpx.AsyncClient(base_url=gw.http_base) as http:
            spoofing = await http.get(
                "/api/v3/ping", headers=[("X-Forwarded-For", "9.9.9.9"), ("X-Forwarded-For", "10.0.0.1")]
            )
            real = await http.get("/api/v3/ping", headers={"X-Forwarded-For": "10.0.0.1"})
            named = await http.get("/api/v3/ping", headers={"X-Forwarded-For": "9.9.9.9"})
        used = [int(answer.headers["X-MBX-USED-WEIGHT-1M"]) for answer in (spoofing, real, named)]
        assert used == [1, 2, 1], "charged to 10.0.0.1, the last hop of the joined list"
