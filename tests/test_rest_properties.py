"""Every REST parameter path, property-tested against a real gateway (uvicorn on a socket, real HTTP requests):
whatever query string a client sends to any endpoint (valid-ish and hostile values: huge and negative integers,
floats, unicode, invalid UTF-8, repeated and empty parameters, broken escapes), the answer is 200 with JSON or a
4xx with Binance's ``{"code": int, "msg": str}``; never a 5xx. A 503 (Binance's -1001, with Retry-After) is
accepted only from a gateway whose backends the test took down.

Hypothesis drives synchronous requests, so each gateway runs on its own event loop in a thread for the module;
its backends are real (in-memory broker and candle store with fresh prices and books republished every second;
for the "down" gateway, PostgreSQL through a closed pool and no ingest at all)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from typing import Any
from urllib.parse import quote

import asyncpg
import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from shared.broker.memory import MemoryBroker
from shared.candles.memory import MemoryCandleStore
from shared.candles.postgres import PostgresCandleStore
from shared.intervals import MAX_TIME_MS
from shared.streams import KLINE_INTERVALS
from tests.conftest import POSTGRES_DSN, service_missing
from tests.harness import message, running_gateway
from tests.test_rest import past_hours

KNOWN = ("BTCUSDT", "ETHUSDT", "BNBUSDT")
# The per-IP weight budget raised so the test's thousands of requests never turn into 429s.
OPEN: dict[str, Any] = {
    "rest_weight_limit_per_min": "1000000000",
    "rest_last_value_wait_s": "0",
    "symbols": ",".join(KNOWN),
}
EXAMPLES = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)

# ---- a gateway on its own loop, for synchronous hypothesis tests ----


@contextlib.contextmanager
def gateway_thread(start: Callable[[], AbstractAsyncContextManager[str]]) -> Iterator[str]:
    """Run ``start()`` (yielding the gateway's base URL) on a new event loop in a thread; yields the URL."""
    ready = threading.Event()
    state: dict[str, Any] = {}

    async def main() -> None:
        stop = asyncio.Event()
        state["loop"], state["stop"] = asyncio.get_running_loop(), stop
        async with start() as base:
            state["base"] = base
            ready.set()
            await stop.wait()

    def run() -> None:
        try:
            asyncio.run(main())
        except BaseException as error:  # reported to the test thread
            state["error"] = error
        finally:
            ready.set()

    thread = threading.Thread(target=run, name="gateway", daemon=True)
    thread.start()
    assert ready.wait(30), "the gateway did not start within 30 s"
    if "error" in state:
        raise state["error"]
    try:
        yield str(state["base"])
    finally:
        state["loop"].call_soon_threadsafe(state["stop"].set)
        thread.join(30)
        if "error" in state:
            raise state["error"]


def exchange_info() -> bytes:
    entries = [{"symbol": symbol, "status": "TRADING", "filters": []} for symbol in KNOWN]
    return orjson.dumps({"timezone": "UTC", "serverTime": 0, "rateLimits": [], "symbols": entries})


def fresh_market(broker: MemoryBroker) -> None:
    """Prices and books for every symbol, published now (REST serves values younger than 10 s)."""
    levels = [[f"{100 - i}.00000000", "1.00000000"] for i in range(20)]
    messages = []
    for symbol in KNOWN:
        lower = symbol.lower()
        messages.append(message(f"{lower}@miniTicker", {"e": "24hrMiniTicker", "s": symbol, "c": "1.50000000"}))
        messages.append(message(f"{lower}@depth20@100ms", {"lastUpdateId": 1, "bids": levels, "asks": levels}))
    broker.publish_now(messages, int(time.time() * 1000))


@contextlib.asynccontextmanager
async def healthy_gateway() -> AsyncIterator[str]:
    store = MemoryCandleStore()
    for symbol in KNOWN:
        await store.upsert(past_hours(1000, symbol))
    broker = MemoryBroker()
    async with running_gateway(broker, candles=store, **OPEN) as gateway:
        await broker.put_exchange_info(exchange_info())

        async def keep_fresh() -> None:
            while True:
                fresh_market(broker)
                await asyncio.sleep(1.0)

        refresher = asyncio.create_task(keep_fresh())
        try:
            yield gateway.http_base
        finally:
            refresher.cancel()


@pytest.fixture(scope="module")
def healthy() -> Iterator[httpx.Client]:
    with gateway_thread(healthy_gateway) as base, httpx.Client(base_url=base, timeout=30) as client:
        yield client


# ---- what clients may send ----

FULLWIDTH_BTCUSDT = "\uff22\uff34\uff23\uff35\uff33\uff24\uff34"
SYMBOLISH = st.sampled_from(
    [*KNOWN, "btcusdt", "DOGEUSDT", "BTC USDT", "BTCUSDT\x00", FULLWIDTH_BTCUSDT, "A" * 21, "-_.", "ß", "BTCUSDT'--"]
)
INTERVALISH = st.sampled_from([*KLINE_INTERVALS, "1H", "2m", "0m", "1mo", "1m\x00", " 1m", "ﬁ"])
NUMBERS = st.integers(-(2**70), 2**70) | st.sampled_from(
    [0, 1, 499, 500, 1000, 1001, 5000, 5001, MAX_TIME_MS, MAX_TIME_MS + 1, 253_399_622_400_000, 2**63 - 1, 2**63]
)
NUMBERISH = (
    NUMBERS.map(str)
    | st.floats(allow_nan=True, allow_infinity=True).map(repr)
    | st.sampled_from(["1e3", "0x10", "+5", " 5", "5 ", "٣", "\uff11", "0" * 25, "9" * 20, "-0", "00001", "1_000"])
)
SYMBOL_LISTS = st.lists(SYMBOLISH, max_size=6).map(
    lambda items: json.dumps(items, ensure_ascii=False)
) | st.sampled_from(
    ["[", "[]", '["BTCUSDT",]', '{"a":1}', "null", '"BTCUSDT"', "[1]", '[["BTCUSDT"]]', json.dumps(["BTCUSDT"] * 101)]
)
TIME_ZONES = st.sampled_from(["0", "+0", "00:00", "-0:00", "+08:00", "-1", "14:00", "UTC", "+99:99"])
BY_NAME: dict[str, st.SearchStrategy[str]] = {
    "symbol": SYMBOLISH,
    "symbols": SYMBOL_LISTS,
    "interval": INTERVALISH,
    "startTime": NUMBERISH,
    "endTime": NUMBERISH,
    "limit": NUMBERISH,
    "timeZone": TIME_ZONES,
}
ANYTHING = st.text(max_size=24) | st.binary(max_size=24).map(lambda raw: raw.decode("latin-1")) | st.just("")


def values_for(name: str) -> st.SearchStrategy[str]:
    return st.one_of(BY_NAME.get(name, ANYTHING), ANYTHING, NUMBERISH, SYMBOLISH)


def encode(text: str, raw: bool) -> str:
    """Percent-encoded as UTF-8 (any text), or sent as typed where a URL allows it (so '&', '=', '+', ';' and
    stray '%' reach the parser unescaped)."""
    if raw and all(33 <= ord(char) < 127 and char not in "#" for char in text):
        return text
    return quote(text, safe="")


TIMES = (
    st.integers(0, MAX_TIME_MS)
    | st.integers(MAX_TIME_MS + 1, 2**64)
    | st.sampled_from(
        [0, 1, 4 * 86_400_000 - 1, MAX_TIME_MS - 1, MAX_TIME_MS, MAX_TIME_MS + 1, 253_399_622_400_000, 2**63 - 1, 2**63]
    )
)
# What a well-behaved client sends: reaching the deep paths (windows, limits, the caches) needs the rest valid.
VALID: dict[str, st.SearchStrategy[str]] = {
    "symbol": st.sampled_from(KNOWN),
    "symbols": st.lists(st.sampled_from(KNOWN), min_size=1, unique=True).map(json.dumps),
    "interval": st.sampled_from(KLINE_INTERVALS) | st.sampled_from(["1w", "1M"]),  # the calendar-aligned ones
    "startTime": TIMES.map(str),
    "endTime": TIMES.map(str),
    "limit": (st.integers(1, 1000) | st.sampled_from([1000, 1001, 5000, 5001, 2**63 - 1])).map(str),
    "timeZone": st.sampled_from(["0", "+00:00"]),
}


@st.composite
def query_strings(draw: st.DrawFn, names: tuple[str, ...]) -> str:
    """Each of the endpoint's parameters omitted, valid (most often) or hostile, plus up to two extra parameters
    (repeats of the endpoint's own or unknown names), in any order, escaped or raw, with stray separators."""
    pairs: list[tuple[str, str]] = []
    for name in names:
        choice = draw(st.sampled_from(["omit", "valid", "valid", "valid", "hostile"]))
        if choice != "omit":
            pairs.append((name, draw(VALID.get(name, ANYTHING) if choice == "valid" else values_for(name))))
    extra = st.sampled_from(names) | st.text(max_size=8)
    pairs += draw(st.lists(extra.flatmap(lambda n: st.tuples(st.just(n), values_for(n))), max_size=2))
    parts = []
    for key, value in draw(st.permutations(pairs)):
        raw = draw(st.booleans())
        shape = draw(st.sampled_from(["pair"] * 6 + ["bare", "equals"]))
        if shape == "pair":
            parts.append(f"{encode(key, raw)}={encode(value, raw)}")
        elif shape == "bare":
            parts.append(encode(key, raw))  # "symbol" without "=": an empty value
        else:
            parts.append(f"{encode(key, raw)}==")
    junk = draw(
        st.lists(st.sampled_from(["", "&", "=", "%", "%zz", "%FF%FE", "%00", "a=%C0%AF", ";", "+"]), max_size=2)
    )
    return "&".join(parts + junk)


ENDPOINTS: dict[str, tuple[str, ...]] = {
    "/api/v3/ping": ("symbol", "limit"),  # no parameters: anything sent is ignored
    "/api/v3/time": ("symbol", "limit"),
    "/api/v3/exchangeInfo": ("symbol", "symbols"),
    "/api/v3/klines": ("symbol", "interval", "startTime", "endTime", "limit", "timeZone"),
    "/api/v3/ticker/price": ("symbol", "symbols"),
    "/api/v3/depth": ("symbol", "limit"),
    "/api/v1/technical/{symbol}": ("interval",),
}
# The technicals path segment: any text that stays one segment once decoded (no "/", not "." or "..").
SEGMENTS = (SYMBOLISH | st.text(min_size=1, max_size=24)).filter(lambda s: "/" not in s and s.strip(".") != "")


def url(path: str, segment: str, query: str) -> str:
    return path.replace("{symbol}", quote(segment, safe="")) + (f"?{query}" if query else "")


def check(response: httpx.Response, *, backend_down: bool = False) -> None:
    """200 with JSON, or a 4xx (or, backend down, a 503) with exactly Binance's error body."""
    where = f"GET {response.request.url} -> {response.status_code} {response.text[:300]!r}"
    status = response.status_code
    assert status == 200 or 400 <= status < 500 or (backend_down and status == 503), where
    body = orjson.loads(response.content)
    if status == 200:
        return
    assert isinstance(body, dict) and set(body) == {"code", "msg"}, where
    assert type(body["code"]) is int and body["code"] < 0 and isinstance(body["msg"], str) and body["msg"], where
    assert response.headers["content-type"] == "application/json", where
    if status == 503:
        assert body["code"] == -1001 and response.headers["retry-after"], where


@pytest.mark.parametrize("path", list(ENDPOINTS))
@EXAMPLES
@given(data=st.data())
def test_any_query_is_answered_200_or_with_a_binance_4xx(healthy: httpx.Client, path: str, data: st.DataObject) -> None:
    query = data.draw(query_strings(ENDPOINTS[path]), label="query")
    segment = data.draw(SEGMENTS, label="segment") if "{symbol}" in path else ""
    check(healthy.get(url(path, segment, query)))


@pytest.mark.parametrize(
    "target",
    [
        "/api/v3/klines?symbol=ETHUSDT&interval=1M&startTime=253399622400000",  # issue 10's 500
        "/api/v3/klines?symbol=ETHUSDT&interval=1M&endTime=253399622400000",
        "/api/v3/klines?symbol=ETHUSDT&interval=1M&startTime=253399622399999",
        "/api/v3/klines?symbol=ETHUSDT&interval=1M&endTime=253399622399999&limit=1000",
        "/api/v3/klines?symbol=ETHUSDT&interval=1w&startTime=0&endTime=0",
        "/api/v3/klines?symbol=ETHUSDT&interval=1M&startTime=9223372036854775807",
        "/api/v3/klines?symbol=ETHUSDT&interval=1M&endTime=9223372036854775808",
        "/api/v3/klines?symbol=ETHUSDT&interval=1s&startTime=0&limit=1000",
        "/api/v3/klines?symbol=ETHUSDT&interval=1h&startTime=5&endTime=4",
        "/api/v3/depth?symbol=ETHUSDT&limit=99999999999999999999",
        "/api/v3/depth?symbol=ETHUSDT&limit=9223372036854775807",
    ],
)
def test_window_and_limit_extremes(healthy: httpx.Client, target: str) -> None:
    check(healthy.get(target))


def test_out_of_range_windows_are_a_binance_400_and_klines_weigh_2_at_any_limit(healthy: httpx.Client) -> None:
    refused = healthy.get("/api/v3/klines?symbol=ETHUSDT&interval=1M&startTime=253399622400000")
    assert refused.status_code == 400 and refused.json()["code"] == -1130 and "startTime" in refused.json()["msg"]
    before = int(healthy.get("/api/v3/ping").headers["x-mbx-used-weight-1m"])
    full = healthy.get("/api/v3/klines", params={"symbol": "ETHUSDT", "interval": "1h", "limit": 1000})
    assert full.status_code == 200 and len(full.json()) == 999  # the open hour has no candle here
    used = int(full.headers["x-mbx-used-weight-1m"])
    assert used == before + 2 or used == 2  # (2 alone: a new minute started in between)


# ---- backends down: a 503 with Binance's body is the one 5xx allowed ----


@pytest.fixture(scope="module")
def backend_down() -> Iterator[httpx.Client]:
    """No ingest (no exchangeInfo, no prices, no books) and PostgreSQL unreachable (its pool closed)."""

    @contextlib.asynccontextmanager
    async def down_gateway() -> AsyncIterator[str]:
        try:
            pool = await asyncpg.create_pool(POSTGRES_DSN, min_size=0, timeout=5)
        except Exception as error:  # any failure to reach the service means the same thing
            service_missing(f"PostgreSQL at {POSTGRES_DSN}", error)
        store = PostgresCandleStore(pool)
        await store.close()
        async with running_gateway(MemoryBroker(), candles=store, **OPEN) as gateway:
            yield gateway.http_base

    with gateway_thread(down_gateway) as base, httpx.Client(base_url=base, timeout=30) as client:
        yield client


@pytest.mark.integration
@pytest.mark.parametrize("path", [p for p in ENDPOINTS if p not in ("/api/v3/ping", "/api/v3/time")])
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_with_backends_down_the_only_5xx_is_binances_503(
    backend_down: httpx.Client, path: str, data: st.DataObject
) -> None:
    query = data.draw(query_strings(ENDPOINTS[path]), label="query")
    segment = data.draw(SEGMENTS, label="segment") if "{symbol}" in path else ""
    check(backend_down.get(url(path, segment, query)), backend_down=True)


@pytest.mark.integration
def test_a_valid_request_to_a_down_backend_is_a_503(backend_down: httpx.Client) -> None:
    for target in ("/api/v3/klines?symbol=BTCUSDT&interval=1h", "/api/v1/technical/BTCUSDT", "/api/v3/exchangeInfo",
                   "/api/v3/ticker/price?symbol=BTCUSDT", "/api/v3/depth?symbol=BTCUSDT"):  # fmt: skip
        response = backend_down.get(target)
        check(response, backend_down=True)
        assert response.status_code == 503, target
