"""Real Binance client libraries against a real gateway, each pointed at it only by its base-URL override.

- python-binance (``binance.AsyncClient`` + ``BinanceSocketManager``): REST start-up (``create()`` pings and
  reads the server time), raw ``/ws/<stream>`` sockets and the combined ``/stream?streams=`` socket.
- binance-connector (``SpotWebsocketStreamClient`` + ``binance.spot.Spot``): bare ``/ws`` and ``/stream``
  followed by SUBSCRIBE with a millisecond-timestamp id, and the REST start-up calls.
- Keepalive: binance-connector, a client that answers pings only with *empty* pongs, and a client that never
  answers (closed with 1011).

Payloads are the exact examples of docs binance-protocol.md §2, published through the broker; each library must
hand back exactly that JSON. binance-connector is thread-based and python-binance's REST client is aiohttp,
while the gateway runs in the test's event loop: blocking calls go through ``asyncio.to_thread``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from binance import AsyncClient, BinanceSocketManager
from binance.spot import Spot
from binance.websocket.spot.websocket_stream import SpotWebsocketStreamClient
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from shared.broker.contract import OutgoingMessage
from shared.broker.memory import MemoryBroker
from shared.streams import parse_stream
from tests.client_helpers import ThreadInbox, pings_received, pong_policy_connection
from tests.harness import RunningGateway, running_gateway
from tests.polling import eventually

# ---- Binance-shaped data (binance-protocol.md §2 and §3) -----------------------------------------------------

TRADE = (
    b'{"e":"trade","E":1767225600123,"s":"BTCUSDT","t":5612345678,"p":"94250.01000000","q":"0.00210000",'
    b'"T":1767225600122,"m":true,"M":true}'
)
BOOK_TICKER_BTC = (
    b'{"u":81234567890,"s":"BTCUSDT","b":"94250.00000000","B":"2.10456000","a":"94250.01000000","A":"0.50321000"}'
)
BOOK_TICKER_ETH = (
    b'{"u":81234567891,"s":"ETHUSDT","b":"3301.26000000","B":"12.50000000","a":"3301.27000000","A":"4.10000000"}'
)
DEPTH5 = (
    b'{"lastUpdateId":81234567890,"bids":[["94250.00000000","2.10456000"],["94249.99000000","0.00800000"]],'
    b'"asks":[["94250.01000000","0.50321000"],["94250.50000000","0.12000000"]]}'
)
KLINE_1M = (
    b'{"e":"kline","E":1767225601000,"s":"BTCUSDT","k":{"t":1767225600000,"T":1767225659999,"s":"BTCUSDT",'
    b'"i":"1m","f":5612345600,"L":5612345678,"o":"94240.00000000","c":"94250.01000000","h":"94255.10000000",'
    b'"l":"94238.50000000","v":"3.41200000","n":79,"x":false,"q":"321564.90112000","V":"1.90400000",'
    b'"Q":"179445.51230000","B":"0"}}'
)


def _symbol(symbol: str, base: str, tick: str, step: str) -> dict[str, Any]:
    return {
        "symbol": symbol,
        "status": "TRADING",
        "baseAsset": base,
        "baseAssetPrecision": 8,
        "quoteAsset": "USDT",
        "quotePrecision": 8,
        "quoteAssetPrecision": 8,
        "orderTypes": ["LIMIT", "LIMIT_MAKER", "MARKET", "STOP_LOSS_LIMIT", "TAKE_PROFIT_LIMIT"],
        "icebergAllowed": True,
        "ocoAllowed": True,
        "isSpotTradingAllowed": True,
        "isMarginTradingAllowed": True,
        "filters": [  # PRICE_FILTER first: cryptofeed reads filters[0].tickSize
            {"filterType": "PRICE_FILTER", "minPrice": tick, "maxPrice": "1000000.00000000", "tickSize": tick},
            {"filterType": "LOT_SIZE", "minQty": step, "maxQty": "9000.00000000", "stepSize": step},
        ],
        "permissions": [],
        "permissionSets": [["SPOT", "MARGIN"]],
    }


EXCHANGE_INFO_DOC: dict[str, Any] = {
    "timezone": "UTC",
    "serverTime": 1767225600000,
    "rateLimits": [
        {"rateLimitType": "REQUEST_WEIGHT", "interval": "MINUTE", "intervalNum": 1, "limit": 6000},
        {"rateLimitType": "RAW_REQUESTS", "interval": "MINUTE", "intervalNum": 5, "limit": 61000},
    ],
    "exchangeFilters": [],
    "symbols": [
        _symbol("BTCUSDT", "BTC", "0.01000000", "0.00001000"),
        _symbol("ETHUSDT", "ETH", "0.01000000", "0.00010000"),
    ],
}
EXCHANGE_INFO = orjson.dumps(EXCHANGE_INFO_DOC)

# Keepalive tests: pings every 0.2 s, a client is dropped when a pong is 0.6 s late.
# Pings 100 times as often as Binance's 20 s: pongs count against the control rate like any frame (binance-connector
# answers each ping twice), so the rate is scaled up with them.
FAST_KEEPALIVE = {"ping_interval_s": 0.2, "ping_timeout_s": 0.6, "control_rate_per_s": 500.0}


# ---- fixtures and small helpers ---------------------------------------------------------------------------------


async def _start(broker: MemoryBroker, **overrides: Any) -> AsyncIterator[tuple[RunningGateway, MemoryBroker]]:
    async with running_gateway(broker, **overrides) as running:
        await broker.put_exchange_info(EXCHANGE_INFO)
        running.node.symbols.update(EXCHANGE_INFO)
        yield running, broker


@pytest.fixture
async def gateway() -> AsyncIterator[tuple[RunningGateway, MemoryBroker]]:
    async for running in _start(MemoryBroker()):
        yield running


@pytest.fixture
async def fast_keepalive_gateway() -> AsyncIterator[tuple[RunningGateway, MemoryBroker]]:
    async for running in _start(MemoryBroker(), **FAST_KEEPALIVE):
        yield running


async def publish_when_subscribed(gw: RunningGateway, broker: MemoryBroker, stream: str, payload: bytes) -> None:
    """Publish once the gateway has subscribed ``stream`` at the broker (i.e. some client asked for it)."""
    await eventually(lambda: stream in gw.node.relay.active, what="the relay's subscription to the stream")
    await broker.publish([OutgoingMessage(stream, payload, parse_stream(stream).is_state)])


# ---- python-binance ----------------------------------------------------------------------------------------------


def python_binance_client_class(http_base: str) -> type[AsyncClient]:
    """python-binance reads its REST base from the ``API_URL`` class attribute while constructing (it formats in
    ``base_endpoint`` and ``tld``, a no-op for a URL without ``{}``), and ``create()`` pings and reads the server
    time right after construction. A subclass is therefore the one override that makes ``create()`` itself talk
    to the gateway; setting ``client.API_URL`` on an instance only affects calls made after ``create()``."""
    return type("PricegateAsyncClient", (AsyncClient,), {"API_URL": f"{http_base}/api"})


@pytest.fixture
async def python_binance(gateway: tuple[RunningGateway, MemoryBroker]) -> AsyncIterator[tuple[AsyncClient, list[str]]]:
    """``AsyncClient.create()`` against the gateway; yields the client and the URLs its HTTP session requested."""
    gw, _ = gateway
    requested: list[str] = []

    async def on_request_start(session: Any, context: Any, params: aiohttp.TraceRequestStartParams) -> None:
        requested.append(str(params.url))

    tracing = aiohttp.TraceConfig()
    tracing.on_request_start.append(on_request_start)
    client = await python_binance_client_class(gw.http_base).create(session_params={"trace_configs": [tracing]})
    try:
        yield client, requested
    finally:
        await client.close_connection()


def socket_manager(client: AsyncClient, gw: RunningGateway) -> BinanceSocketManager:
    manager = BinanceSocketManager(client)
    manager.STREAM_URL = f"{gw.ws_base}/"  # must end in "/": the library appends "ws/<stream>" or "stream?..."
    return manager


def quick_exit(socket: Any) -> Any:
    """python-binance's read loop only notices ``async with`` exit between ``recv()`` calls, each bounded by
    ``ReconnectingWebsocket.TIMEOUT`` (10 s). Against Binance messages never stop so exit is immediate; in a test
    the stream goes quiet after the last message, so shorten this one socket's poll to keep exit fast."""
    socket.TIMEOUT = 0.1
    return socket


async def test_python_binance_create_uses_gateway_rest(
    gateway: tuple[RunningGateway, MemoryBroker], python_binance: tuple[AsyncClient, list[str]]
) -> None:
    gw, _ = gateway
    client, requested = python_binance
    # create() itself pinged and read the time from the gateway (not api.binance.com).
    assert requested == [f"{gw.http_base}/api/v3/ping", f"{gw.http_base}/api/v3/time"]
    assert abs(client.timestamp_offset) < 5_000
    assert await client.ping() == {}
    assert await client.get_exchange_info() == EXCHANGE_INFO_DOC
    info = await client.get_symbol_info("ETHUSDT")
    assert info is not None and info["filters"][0]["filterType"] == "PRICE_FILTER"
    assert all(url.startswith(gw.http_base) for url in requested)


async def test_python_binance_raw_sockets(
    gateway: tuple[RunningGateway, MemoryBroker], python_binance: tuple[AsyncClient, list[str]]
) -> None:
    gw, broker = gateway
    client, _ = python_binance
    manager = socket_manager(client, gw)
    cases = [
        (manager.trade_socket("BTCUSDT"), "btcusdt@trade", TRADE),  # /ws/btcusdt@trade
        (manager.depth_socket("BTCUSDT", depth=BinanceSocketManager.WEBSOCKET_DEPTH_5), "btcusdt@depth5", DEPTH5),
        (manager.kline_socket("BTCUSDT", AsyncClient.KLINE_INTERVAL_1MINUTE), "btcusdt@kline_1m", KLINE_1M),
    ]
    for socket, stream, payload in cases:
        async with quick_exit(socket) as connection:
            await publish_when_subscribed(gw, broker, stream, payload)
            assert await asyncio.wait_for(connection.recv(), 3) == orjson.loads(payload), stream
        await eventually(
            lambda: stream not in gw.node.relay.active,  # noqa: B023 - awaited within this iteration
            what="the relay to drop the stream",
        )
    await eventually(lambda: not gw.node.sessions, what="every session closed")


async def test_python_binance_multiplex_socket(
    gateway: tuple[RunningGateway, MemoryBroker], python_binance: tuple[AsyncClient, list[str]]
) -> None:
    gw, broker = gateway
    client, _ = python_binance
    manager = socket_manager(client, gw)
    # /stream?streams=btcusdt@trade/ethusdt@bookTicker
    async with quick_exit(manager.multiplex_socket(["btcusdt@trade", "ethusdt@bookTicker"])) as connection:
        await publish_when_subscribed(gw, broker, "ethusdt@bookTicker", BOOK_TICKER_ETH)
        await publish_when_subscribed(gw, broker, "btcusdt@trade", TRADE)
        received = [await asyncio.wait_for(connection.recv(), 3) for _ in range(2)]
    assert received == [
        {"stream": "ethusdt@bookTicker", "data": orjson.loads(BOOK_TICKER_ETH)},
        {"stream": "btcusdt@trade", "data": orjson.loads(TRADE)},
    ]


# ---- binance-connector -------------------------------------------------------------------------------------------


class ConnectorClient:
    """A ``SpotWebsocketStreamClient`` driven from async code.

    Its constructor connects with a blocking websocket-client handshake (the gateway shares our loop, so it must
    run in a thread) and starts the reader thread, which calls ``on_message(manager, text)`` for every text frame
    and ``on_ping(manager, payload)`` for every server ping.
    """

    def __init__(self) -> None:
        self.messages = ThreadInbox()
        self.pings = 0
        self.closed = False
        self.client: SpotWebsocketStreamClient | None = None

    def _on_ping(self, _manager: Any, _payload: bytes) -> None:
        self.pings += 1

    def _on_close(self, _manager: Any) -> None:
        self.closed = True

    async def start(self, ws_base: str, *, is_combined: bool = False) -> SpotWebsocketStreamClient:
        self.client = await asyncio.to_thread(
            SpotWebsocketStreamClient,
            stream_url=ws_base,  # the library appends "/ws", or "/stream" with is_combined=True
            on_message=lambda _manager, text: self.messages.put(text),
            on_ping=self._on_ping,
            on_close=self._on_close,
            is_combined=is_combined,
        )
        return self.client

    @property
    def alive(self) -> bool:
        assert self.client is not None
        manager = self.client.socket_manager
        return bool(manager.is_alive() and manager.ws.connected and not self.closed)

    async def stop(self) -> None:
        if self.client is None:
            return
        manager = self.client.socket_manager
        if manager.is_alive():
            # stop() sends a close frame and joins the reader thread, which ends on the server's close frame.
            await asyncio.to_thread(self.client.stop)
        # The library never closes its socket after the closing handshake (ResourceWarning at GC): close it.
        manager.ws.shutdown()
        self.client = None


@pytest.fixture
async def connector() -> AsyncIterator[ConnectorClient]:
    client = ConnectorClient()
    try:
        yield client
    finally:
        await client.stop()


async def subscribe_and_check_reply(connector: ConnectorClient, call: Any, **kwargs: Any) -> None:
    """Call a connector subscription method (its id defaults to the current time in ms) and expect our reply."""
    before = int(time.time() * 1000)
    await asyncio.to_thread(call, **kwargs)
    after = int(time.time() * 1000)
    reply = orjson.loads(await connector.messages.get())
    assert reply["result"] is None and set(reply) == {"result", "id"}, reply
    assert isinstance(reply["id"], int) and before <= reply["id"] <= after, (reply, before, after)


async def test_binance_connector_raw_ws_subscribe(
    gateway: tuple[RunningGateway, MemoryBroker], connector: ConnectorClient
) -> None:
    gw, broker = gateway
    client = await connector.start(gw.ws_base)  # bare /ws, then SUBSCRIBE
    await subscribe_and_check_reply(connector, client.trade, symbol="btcusdt")
    await publish_when_subscribed(gw, broker, "btcusdt@trade", TRADE)
    assert (await connector.messages.get()).encode() == TRADE

    await subscribe_and_check_reply(connector, client.book_ticker, symbol="btcusdt")
    await publish_when_subscribed(gw, broker, "btcusdt@bookTicker", BOOK_TICKER_BTC)
    assert (await connector.messages.get()).encode() == BOOK_TICKER_BTC

    # The connector always appends the speed: it subscribes "btcusdt@depth5@1000ms" (the default speed).
    await subscribe_and_check_reply(connector, client.partial_book_depth, symbol="btcusdt", level=5, speed=1000)
    await publish_when_subscribed(gw, broker, "btcusdt@depth5", DEPTH5)
    assert (await connector.messages.get()).encode() == DEPTH5

    await subscribe_and_check_reply(connector, client.kline, symbol="btcusdt", interval="1m")
    await publish_when_subscribed(gw, broker, "btcusdt@kline_1m", KLINE_1M)
    assert (await connector.messages.get()).encode() == KLINE_1M

    await connector.stop()
    await eventually(lambda: not gw.node.sessions, what="every session closed")
    assert connector.closed  # the library saw the server's close frame
    assert connector.messages.drain() == []


async def test_binance_connector_combined_stream_subscribe(
    gateway: tuple[RunningGateway, MemoryBroker], connector: ConnectorClient
) -> None:
    gw, broker = gateway
    client = await connector.start(gw.ws_base, is_combined=True)  # bare /stream, then SUBSCRIBE
    await subscribe_and_check_reply(connector, client.trade, symbol="btcusdt")
    await subscribe_and_check_reply(connector, client.book_ticker, symbol="ethusdt")
    await publish_when_subscribed(gw, broker, "btcusdt@trade", TRADE)
    await publish_when_subscribed(gw, broker, "ethusdt@bookTicker", BOOK_TICKER_ETH)
    assert (await connector.messages.get()).encode() == b'{"stream":"btcusdt@trade","data":' + TRADE + b"}"
    assert (await connector.messages.get()).encode() == (
        b'{"stream":"ethusdt@bookTicker","data":' + BOOK_TICKER_ETH + b"}"
    )


async def test_binance_connector_rest_spot(gateway: tuple[RunningGateway, MemoryBroker]) -> None:
    gw, _ = gateway
    spot = Spot(base_url=gw.http_base)
    try:
        assert await asyncio.to_thread(spot.ping) == {}
        server_time = (await asyncio.to_thread(spot.time))["serverTime"]
        assert abs(server_time - time.time() * 1000) < 5_000
        assert await asyncio.to_thread(spot.exchange_info) == EXCHANGE_INFO_DOC
        btc = await asyncio.to_thread(spot.exchange_info, symbol="BTCUSDT")
        assert btc["symbols"][0]["symbol"] == "BTCUSDT"  # query parameters are tolerated
    finally:
        spot.session.close()


# ---- keepalive ---------------------------------------------------------------------------------------------------


async def test_binance_connector_survives_server_keepalive(
    fast_keepalive_gateway: tuple[RunningGateway, MemoryBroker], connector: ConnectorClient
) -> None:
    """With pings every 0.2 s and a 0.6 s pong deadline, a connector client stays up for 2 s (about ten pings)
    and keeps receiving. (websocket-client 1.9 itself answers each ping with an echo pong inside
    ``recv_data_frame``, then binance-connector sends a second, empty-payload pong: the gateway must accept both;
    the empty-only case is proven separately below.)"""
    gw, broker = fast_keepalive_gateway
    client = await connector.start(gw.ws_base)
    await subscribe_and_check_reply(connector, client.trade, symbol="btcusdt")
    await asyncio.sleep(2.0)
    assert connector.pings >= 5, connector.pings
    assert connector.alive and len(gw.node.sessions) == 1
    await publish_when_subscribed(gw, broker, "btcusdt@trade", TRADE)
    assert (await connector.messages.get()).encode() == TRADE


async def test_empty_payload_pongs_keep_a_client_alive(
    fast_keepalive_gateway: tuple[RunningGateway, MemoryBroker],
) -> None:
    """A client answering every ping with an *empty* pong (not an echo) is not dropped (binance-protocol.md §1.5)."""
    gw, broker = fast_keepalive_gateway
    async with connect(
        f"{gw.ws_base}/ws/btcusdt@trade", ping_interval=None, create_connection=pong_policy_connection(b"")
    ) as ws:
        await asyncio.sleep(2.0)
        assert ws.close_code is None, f"gateway closed the client: {ws.close_code} {ws.close_reason}"
        assert pings_received(ws) >= 5, pings_received(ws)
        await publish_when_subscribed(gw, broker, "btcusdt@trade", TRADE)
        assert await asyncio.wait_for(ws.recv(decode=False), 3) == TRADE


async def test_client_that_never_pongs_is_closed_1011(
    fast_keepalive_gateway: tuple[RunningGateway, MemoryBroker],
) -> None:
    gw, _ = fast_keepalive_gateway
    started = time.monotonic()
    async with connect(
        f"{gw.ws_base}/ws/btcusdt@trade", ping_interval=None, create_connection=pong_policy_connection(None)
    ) as ws:
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 5)
    elapsed = time.monotonic() - started
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011
    assert pings_received(ws) == 1
    assert 0.6 <= elapsed < 3.0, elapsed  # first ping after 0.2 s, deadline 0.6 s later
    await eventually(lambda: not gw.node.sessions, what="every session closed")
