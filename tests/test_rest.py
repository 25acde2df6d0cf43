"""The Binance-compatible REST API over a real gateway (real uvicorn, real HTTP client) on the embedded backends:
in-memory broker, candle store and cache. Shapes, parameter semantics, Binance's error bodies for every kind
of bad input (never a 500), weight headers and 429, prices and books from last values, technicals."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import httpx
import orjson
import pytest

from gateway.rest.technicals import analyse, technicals_json
from shared.broker.contract import OutgoingMessage
from shared.broker.memory import MemoryBroker
from shared.candles.memory import MemoryCandleStore
from shared.candles.model import Candle, kline_stream
from shared.intervals import candle_window
from tests.harness import RunningGateway, message, running_gateway
from tests.polling import eventually

SYMBOLS = ("BTCUSDT", "ETHUSDT", "BNBUSDT")
HOUR = 3_600_000


def candle(symbol: str, interval: str, open_time: int, close: float) -> Candle:
    start, end = candle_window(interval, open_time)
    return Candle(
        symbol, interval, start, end - 1, f"{close - 1:.8f}", f"{close + 2:.8f}", f"{close - 3:.8f}", f"{close:.8f}",
        "10.00000000", f"{10 * close:.8f}", 5, "4.00000000", f"{4 * close:.8f}",
    )  # fmt: skip


def past_hours(count: int, symbol: str = "BTCUSDT") -> list[Candle]:
    """``count`` closed hourly candles ending where the current hour opens."""
    current = candle_window("1h", int(time.time() * 1000))[0]
    return [candle(symbol, "1h", current - (count - i) * HOUR, 100.0 + (i * 7) % 13 + i / 10) for i in range(count)]


def kline_event(item: Candle, *, closed: bool) -> OutgoingMessage:
    payload = {
        "e": "kline", "E": item.open_time + 1, "s": item.symbol,
        "k": {
            "t": item.open_time, "T": item.close_time, "s": item.symbol, "i": item.interval, "f": 1, "L": 2,
            "o": item.open, "c": item.close, "h": item.high, "l": item.low, "v": item.volume, "n": item.trades,
            "x": closed, "q": item.quote_volume, "V": item.taker_buy_base_volume, "Q": item.taker_buy_quote_volume,
            "B": "0",
        },
    }  # fmt: skip
    return OutgoingMessage(kline_stream(item.symbol, item.interval), orjson.dumps(payload), True)


@pytest.fixture
async def store() -> MemoryCandleStore:
    memory = MemoryCandleStore()
    await memory.upsert(past_hours(300))
    return memory


@pytest.fixture
async def gateway(store: MemoryCandleStore) -> AsyncIterator[RunningGateway]:
    broker = MemoryBroker()
    async with running_gateway(
        broker, candles=store, symbols=",".join(SYMBOLS), rest_last_value_wait_s="0.3"
    ) as running:
        yield running


@pytest.fixture
async def client(gateway: RunningGateway) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=gateway.http_base) as http:
        yield http


async def test_ping_time_and_weight_header(client: httpx.AsyncClient) -> None:
    ping = await client.get("/api/v3/ping")
    assert ping.status_code == 200 and ping.json() == {}
    assert ping.headers["x-mbx-used-weight-1m"] == "1"
    now = await client.get("/api/v3/time")
    assert abs(now.json()["serverTime"] - time.time() * 1000) < 5000
    assert now.headers["x-mbx-used-weight-1m"] == "2"


async def test_exchange_info_filters_by_symbol_and_symbols(gateway: RunningGateway, client: httpx.AsyncClient) -> None:
    await gateway.node.broker.put_exchange_info(orjson.dumps(_exchange_info(SYMBOLS)))
    whole = await client.get("/api/v3/exchangeInfo")
    assert [entry["symbol"] for entry in whole.json()["symbols"]] == list(SYMBOLS)
    assert whole.headers["x-mbx-used-weight-1m"] == "20"
    one = (await client.get("/api/v3/exchangeInfo", params={"symbol": "ETHUSDT"})).json()
    assert [entry["symbol"] for entry in one["symbols"]] == ["ETHUSDT"] and one["timezone"] == "UTC"
    two = (await client.get("/api/v3/exchangeInfo", params={"symbols": '["BNBUSDT","BTCUSDT"]'})).json()
    assert [entry["symbol"] for entry in two["symbols"]] == ["BNBUSDT", "BTCUSDT"]
    unknown = await client.get("/api/v3/exchangeInfo", params={"symbol": "DOGEUSDT"})
    assert unknown.status_code == 400 and unknown.json() == {"code": -1121, "msg": "Invalid symbol."}


async def test_klines_are_binance_arrays_with_start_end_and_limit_semantics(
    client: httpx.AsyncClient, store: MemoryCandleStore
) -> None:
    stored = await store.range("BTCUSDT", "1h", 0, 2**62)
    newest = await client.get("/api/v3/klines", params={"symbol": "BTCUSDT", "interval": "1h", "limit": 5})
    assert newest.status_code == 200 and newest.headers["x-mbx-used-weight-1m"] == "2"
    rows = newest.json()
    # The newest five windows include the current hour, which has no candle here (nothing streams it).
    assert rows == [c.kline_row() for c in stored[-4:]]
    assert all(len(row) == 12 and isinstance(row[0], int) and isinstance(row[1], str) for row in rows)
    first = stored[10].open_time
    ranged = await client.get(
        "/api/v3/klines",
        params={"symbol": "BTCUSDT", "interval": "1h", "startTime": first + 1, "endTime": first + 3 * HOUR},
    )
    # startTime one ms after an open time: that candle is excluded; endTime equal to an open time: included
    assert [row[0] for row in ranged.json()] == [first + HOUR, first + 2 * HOUR, first + 3 * HOUR]
    forward = await client.get(
        "/api/v3/klines", params={"symbol": "BTCUSDT", "interval": "1h", "startTime": first, "limit": 2}
    )
    assert [row[0] for row in forward.json()] == [first, first + HOUR]
    backward = await client.get(
        "/api/v3/klines", params={"symbol": "BTCUSDT", "interval": "1h", "endTime": first, "limit": 2}
    )
    assert [row[0] for row in backward.json()] == [first - HOUR, first]
    default = await client.get("/api/v3/klines", params={"symbol": "BTCUSDT", "interval": "1h"})
    assert len(default.json()) == 300  # limit 500 by default; 300 are stored
    future = await client.get(
        "/api/v3/klines", params={"symbol": "BTCUSDT", "interval": "1h", "startTime": int(time.time() * 1000) + HOUR}
    )
    assert future.json() == []


async def test_the_open_candle_comes_from_the_kline_streams_last_value(
    gateway: RunningGateway, client: httpx.AsyncClient, store: MemoryCandleStore
) -> None:
    broker = gateway.node.broker
    assert isinstance(broker, MemoryBroker)
    current = candle("BTCUSDT", "1h", int(time.time() * 1000), 123.0)
    broker.publish_now([kline_event(current, closed=False)], int(time.time() * 1000))
    rows = (await client.get("/api/v3/klines", params={"symbol": "BTCUSDT", "interval": "1h", "limit": 3})).json()
    stored = await store.range("BTCUSDT", "1h", 0, 2**62)
    assert rows == [stored[-2].kline_row(), stored[-1].kline_row(), current.kline_row()]
    # An open candle of an earlier window (its stream stopped) is never served as if it were complete.
    stale_open = candle("ETHUSDT", "1h", stored[-1].open_time, 50.0)
    broker.publish_now([kline_event(stale_open, closed=False)], int(time.time() * 1000))
    assert (await client.get("/api/v3/klines", params={"symbol": "ETHUSDT", "interval": "1h"})).json() == []


async def test_repeated_requests_are_served_from_the_cache(client: httpx.AsyncClient) -> None:
    query: dict[str, str | int] = {"symbol": "BTCUSDT", "interval": "1h", "limit": 50}
    first = await client.get("/api/v3/klines", params=query)
    second = await client.get("/api/v3/klines", params=query)
    assert first.headers["x-pricegate-cache"] == "miss" and second.headers["x-pricegate-cache"] == "hit"
    assert first.content == second.content


async def test_technicals_are_computed_from_the_served_candles(
    client: httpx.AsyncClient, store: MemoryCandleStore
) -> None:
    response = await client.get("/api/v1/technical/BTCUSDT", params={"interval": "1h"})
    assert response.status_code == 200 and response.headers["x-mbx-used-weight-1m"] == "5"
    expected = technicals_json(analyse("BTCUSDT", "1h", await store.range("BTCUSDT", "1h", 0, 2**62)))
    assert response.content == expected
    document = response.json()
    assert document["candles"] == 300 and document["ema"]["200"] is not None
    default_interval = await client.get("/api/v1/technical/btcusdt")  # ours: case-insensitive, 1h by default
    assert default_interval.json() == document
    assert default_interval.headers["x-pricegate-cache"] == "hit"


async def test_ticker_price_from_the_freshest_last_value(gateway: RunningGateway, client: httpx.AsyncClient) -> None:
    broker = gateway.node.broker
    assert isinstance(broker, MemoryBroker)
    now = int(time.time() * 1000)
    broker.publish_now(
        [message("btcusdt@miniTicker", {"e": "24hrMiniTicker", "s": "BTCUSDT", "c": "1.00000000"})], now - 500
    )
    broker.publish_now([message("btcusdt@ticker", {"e": "24hrTicker", "s": "BTCUSDT", "c": "2.00000000"})], now)
    broker.publish_now([message("ethusdt@miniTicker", {"e": "24hrMiniTicker", "s": "ETHUSDT", "c": "3.00000000"})], now)
    # A value published long ago is not a price any more.
    broker.publish_now(
        [message("bnbusdt@ticker", {"e": "24hrTicker", "s": "BNBUSDT", "c": "9.00000000"})], now - 60_000
    )
    one = await client.get("/api/v3/ticker/price", params={"symbol": "BTCUSDT"})
    assert one.json() == {"symbol": "BTCUSDT", "price": "2.00000000"}
    assert one.headers["x-mbx-used-weight-1m"] == "2"
    several = await client.get("/api/v3/ticker/price", params={"symbols": '["ETHUSDT","BTCUSDT"]'})
    assert several.json() == [
        {"symbol": "ETHUSDT", "price": "3.00000000"},
        {"symbol": "BTCUSDT", "price": "2.00000000"},
    ]
    assert several.headers["x-mbx-used-weight-1m"] == "6"
    everything = await client.get("/api/v3/ticker/price")  # symbols without a fresh price are left out
    assert everything.json() == [
        {"symbol": "BTCUSDT", "price": "2.00000000"},
        {"symbol": "ETHUSDT", "price": "3.00000000"},
    ]
    # Asked for explicitly, a symbol without a price makes ingest start its stream, then (no data) a 503.
    missing = await client.get("/api/v3/ticker/price", params={"symbol": "BNBUSDT"})
    assert missing.status_code == 503 and missing.json()["code"] == -1001 and missing.headers["retry-after"] == "1"
    assert "bnbusdt@miniTicker" in await broker.read_demand(time.time())


async def test_a_price_that_arrives_while_waiting_is_served(gateway: RunningGateway, client: httpx.AsyncClient) -> None:
    broker = gateway.node.broker
    assert isinstance(broker, MemoryBroker)

    async def demanded() -> bool:
        return "bnbusdt@miniTicker" in await broker.read_demand(time.time())

    async def ingest_reacts() -> None:
        await eventually(demanded, what="the gateway's demand for bnbusdt@miniTicker")
        await broker.publish([message("bnbusdt@miniTicker", {"e": "24hrMiniTicker", "s": "BNBUSDT", "c": "7.5"})])

    reaction = asyncio.create_task(ingest_reacts())
    response = await client.get("/api/v3/ticker/price", params={"symbol": "BNBUSDT"})
    await reaction
    assert response.json() == {"symbol": "BNBUSDT", "price": "7.5"}


async def test_depth_from_the_deepest_fresh_partial_book(gateway: RunningGateway, client: httpx.AsyncClient) -> None:
    broker = gateway.node.broker
    assert isinstance(broker, MemoryBroker)
    levels = [[f"{100 - i}.00000000", "1.00000000"] for i in range(20)]
    asks = [[f"{101 + i}.00000000", "2.00000000"] for i in range(20)]
    broker.publish_now(
        [message("btcusdt@depth5", {"lastUpdateId": 7, "bids": levels[:5], "asks": asks[:5]})], int(time.time() * 1000)
    )
    broker.publish_now(
        [message("btcusdt@depth20@100ms", {"lastUpdateId": 9, "bids": levels, "asks": asks})], int(time.time() * 1000)
    )
    cut = await client.get("/api/v3/depth", params={"symbol": "BTCUSDT", "limit": 3})
    assert cut.json() == {"lastUpdateId": 9, "bids": levels[:3], "asks": asks[:3]}
    assert cut.headers["x-mbx-used-weight-1m"] == "5"
    whole = await client.get("/api/v3/depth", params={"symbol": "BTCUSDT", "limit": 500})
    assert whole.json() == {"lastUpdateId": 9, "bids": levels, "asks": asks}  # all it has (no exchange here)
    assert whole.headers["x-mbx-used-weight-1m"] == str(5 + 25)
    absent = await client.get("/api/v3/depth", params={"symbol": "ETHUSDT"})
    assert absent.status_code == 503 and absent.json()["code"] == -1001
    assert "ethusdt@depth20@100ms" in await broker.read_demand(time.time())


BAD_REQUESTS: list[tuple[str, dict[str, Any], int, int]] = [
    ("/api/v3/klines", {"interval": "1h"}, 400, -1102),
    ("/api/v3/klines", {"symbol": "BTCUSDT"}, 400, -1102),
    ("/api/v3/klines", {"symbol": "DOGEUSDT", "interval": "1h"}, 400, -1121),
    ("/api/v3/klines", {"symbol": "btcusdt", "interval": "1h"}, 400, -1100),
    ("/api/v3/klines", {"symbol": "BTCUSDT'; DROP TABLE candles; --", "interval": "1h"}, 400, -1100),
    ("/api/v3/klines", {"symbol": "BTCUSDT", "interval": "2m"}, 400, -1120),
    ("/api/v3/klines", {"symbol": "BTCUSDT", "interval": "1H"}, 400, -1120),
    ("/api/v3/klines", {"symbol": "BTCUSDT", "interval": "1h' OR '1'='1"}, 400, -1120),
    ("/api/v3/klines", {"symbol": "BTCUSDT", "interval": "1h", "limit": 0}, 400, -1130),
    ("/api/v3/klines", {"symbol": "BTCUSDT", "interval": "1h", "limit": 1001}, 400, -1130),
    ("/api/v3/klines", {"symbol": "BTCUSDT", "interval": "1h", "limit": "ten"}, 400, -1100),
    ("/api/v3/klines", {"symbol": "BTCUSDT", "interval": "1h", "limit": "-5"}, 400, -1100),
    ("/api/v3/klines", {"symbol": "BTCUSDT", "interval": "1h", "startTime": 2000, "endTime": 1000}, 400, -1023),
    ("/api/v3/klines", {"symbol": "BTCUSDT", "interval": "1h", "startTime": "-1"}, 400, -1100),
    ("/api/v3/klines", {"symbol": "BTCUSDT", "interval": "1h", "endTime": "1.5"}, 400, -1100),
    ("/api/v3/klines", {"symbol": "BTCUSDT", "interval": "1h", "startTime": str(2**63)}, 400, -1108),
    ("/api/v3/klines", {"symbol": "BTCUSDT", "interval": "1h", "startTime": "9" * 21}, 400, -1100),
    ("/api/v3/klines", {"symbol": "BTCUSDT", "interval": "1h", "timeZone": "+08:00"}, 400, -1130),
    ("/api/v3/klines", {"symbol": ["BTCUSDT", "ETHUSDT"], "interval": "1h"}, 400, -1101),
    ("/api/v3/klines", {"symbol": "", "interval": "1h"}, 400, -1105),
    ("/api/v3/ticker/price", {"symbol": "NOPE"}, 400, -1121),
    ("/api/v3/ticker/price", {"symbol": "BTCUSDT", "symbols": '["BTCUSDT"]'}, 400, -1128),
    ("/api/v3/ticker/price", {"symbols": "BTCUSDT"}, 400, -1100),
    ("/api/v3/ticker/price", {"symbols": '["BTCUSDT",1]'}, 400, -1100),
    ("/api/v3/ticker/price", {"symbols": "[]"}, 400, -1102),
    ("/api/v3/ticker/price", {"symbols": '["BTCUSDT","BTCUSDT"]'}, 400, -1151),
    ("/api/v3/ticker/price", {"symbols": '["BTCUSDT","NOPE"]'}, 400, -1121),
    ("/api/v3/ticker/price", {"symbols": orjson.dumps([f"S{i}USDT" for i in range(101)]).decode()}, 400, -1130),
    ("/api/v3/ticker/price", {"symbols": "[" + ",".join(['"BTCUSDT"'] * 300) + "]"}, 400, -1130),
    ("/api/v3/ticker/price", {"symbols": '["BTCUSDT\\"); SELECT 1; --"]'}, 400, -1100),
    ("/api/v3/depth", {"symbol": "BTCUSDT", "limit": 0}, 400, -1130),
    ("/api/v3/depth", {}, 400, -1102),
    ("/api/v3/exchangeInfo", {"symbols": '["BTCUSDT",'}, 400, -1100),
    ("/api/v1/technical/NOPE", {}, 400, -1121),
    ("/api/v1/technical/BTC%20USDT", {}, 400, -1100),
    ("/api/v1/technical/BTCUSDT", {"interval": "7h"}, 400, -1120),
]


@pytest.mark.parametrize(("path", "query", "status", "code"), BAD_REQUESTS)
async def test_bad_input_gets_binances_error_body(
    gateway: RunningGateway, client: httpx.AsyncClient, path: str, query: dict[str, Any], status: int, code: int
) -> None:
    await gateway.node.broker.put_exchange_info(orjson.dumps(_exchange_info(SYMBOLS)))
    response = await client.get(path, params=query)
    assert (response.status_code, response.json()["code"]) == (status, code), response.text
    assert set(response.json()) == {"code", "msg"} and response.json()["msg"]
    assert "x-mbx-used-weight-1m" in response.headers


async def test_random_queries_never_cause_a_server_error(store: MemoryCandleStore) -> None:
    async with (
        running_gateway(
            MemoryBroker(), candles=store, rest_last_value_wait_s="0", rest_weight_limit_per_min="1000000"
        ) as running,
        httpx.AsyncClient(base_url=running.http_base) as client,
    ):
        await _fuzz(client, random.Random(4), cases=300)


async def _fuzz(client: httpx.AsyncClient, rng: random.Random, cases: int) -> None:
    alphabet = "BTCUSDTbtc1hmM0123456789-_.'\";%[]{},:=&?/\\ \x7f\u00e9\u2603"
    names = ["symbol", "symbols", "interval", "startTime", "endTime", "limit", "timeZone", "x"]
    paths = ["/api/v3/klines", "/api/v3/ticker/price", "/api/v3/depth", "/api/v3/exchangeInfo", "/api/v1/technical/"]
    for _ in range(cases):
        query = "&".join(
            f"{rng.choice(names)}={quote(''.join(rng.choice(alphabet) for _ in range(rng.randrange(0, 12))))}"
            for _ in range(rng.randrange(0, 5))
        )
        path = rng.choice(paths)
        if path.endswith("/"):
            path += quote("".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 10))), safe="")
        response = await client.get(f"{path}?{query}")
        # 307: Starlette's redirect for a path that decoded to a trailing slash
        assert response.status_code in (200, 307, 400, 404, 503), (path, query, response.status_code, response.text)
        if response.status_code == 400:
            assert set(response.json()) == {"code", "msg"}


async def test_weight_budget_is_enforced_with_429_and_retry_after(store: MemoryCandleStore) -> None:
    async with (
        running_gateway(MemoryBroker(), candles=store, rest_weight_limit_per_min="10") as running,
        httpx.AsyncClient(base_url=running.http_base) as client,
    ):
        used = [(await client.get("/api/v3/klines", params={"symbol": "BTCUSDT", "interval": "1h"})) for _ in range(5)]
        assert [r.headers["x-mbx-used-weight-1m"] for r in used] == ["2", "4", "6", "8", "10"]
        refused = await client.get("/api/v3/ping")
        assert refused.status_code == 429
        assert refused.json()["code"] == -1003 and "10 request weight per 1 MINUTE" in refused.json()["msg"]
        assert 1 <= int(refused.headers["retry-after"]) <= 60
        assert refused.headers["x-mbx-used-weight-1m"] == "10"
        metrics = (await client.get("/metrics")).text
        assert "pricegate_gateway_rest_rate_limited_total 1.0" in metrics
        assert 'pricegate_gateway_rest_requests_total{endpoint="ping",status="429"} 1.0' in metrics


def _exchange_info(symbols: tuple[str, ...]) -> dict[str, Any]:
    return {
        "timezone": "UTC",
        "serverTime": 0,
        "rateLimits": [],
        "exchangeFilters": [],
        "symbols": [{"symbol": symbol, "status": "TRADING", "filters": []} for symbol in symbols],
    }
