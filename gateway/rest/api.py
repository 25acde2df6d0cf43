"""The gateway's REST API: Binance-compatible market data plus our technicals endpoint.

``GET /api/v3/ping | time | exchangeInfo | klines | ticker/price | depth`` answer like ``api.binance.com`` (same
shapes, same error bodies and codes, ``X-MBX-USED-WEIGHT-1M`` on every response, 429 + ``Retry-After`` beyond an
IP's weight budget); ``GET /api/v1/technical/{symbol}?interval=1h`` is ours. Responses that cost a database
or exchange call (klines, technicals, the exchange fallbacks of depth and ticker/price) go through the
single-flight cache; prices and books come from the streams' last values. Every response says how it was
served in ``X-Pricegate-Cache`` (``hit``, ``miss``, ``coalesced``, ``stale``) with ``Age`` in seconds. A
backend failure with nothing cached is ``503`` with Binance's ``-1001`` body, never a 500.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from gateway.auth.http import bearer_token, rest_refusal
from gateway.auth.principal import AuthRefusal, Principal, refused
from gateway.edge.client_ip import TrustedProxies, client_ip, forwarded_for
from gateway.rest import params
from gateway.rest.cache import ResponseCache, Served, SingleFlight, response_cache
from gateway.rest.klines import KlineSource
from gateway.rest.market_data import LiveMarket
from gateway.rest.params import Query, RestError
from gateway.rest.technicals import analyse, technicals_json
from gateway.rest.weights import WeightLimiter
from gateway.symbols import SymbolDirectory
from gateway.ws.admission import Authenticate
from shared.binance.rest import BinanceRest, RestRefused
from shared.broker.contract import Broker
from shared.candles.model import CandleStore, klines_json
from shared.errors import PricegateError
from shared.settings import Settings
from shared.streams import KLINE_INTERVALS

logger = logging.getLogger("pricegate.gateway.rest")

TECHNICALS_CANDLES = 1000  # candles the indicators are computed from (EMA200 needs a long run-in)
DEFAULT_TECHNICALS_INTERVAL = "1h"
# What a backend (database, exchange, broker) fails with; answered 503 -1001 when nothing stale is cached.
BACKEND_ERRORS = (PricegateError, OSError, TimeoutError)
_JSON = "application/json"


class RestMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.requests = Counter(
            "pricegate_gateway_rest_requests",
            "REST requests by endpoint and HTTP status",
            ["endpoint", "status"],
            registry=r,
        )
        self.duration = Histogram(
            "pricegate_gateway_rest_request_duration_seconds", "REST request handling time", ["endpoint"], registry=r
        )
        self.cache = Counter(
            "pricegate_gateway_rest_cache_results",
            "Cached REST lookups by result: hit, miss, coalesced, stale",
            ["endpoint", "result"],
            registry=r,
        )
        self.exchange = Counter(
            "pricegate_gateway_exchange_requests",
            "Exchange REST calls by result: ok, error, backoff",
            ["endpoint", "result"],
            registry=r,
        )
        self.candles = Counter(
            "pricegate_gateway_klines_candles_served", "Candles served by source: store, stream, exchange", ["source"],
            registry=r,
        )  # fmt: skip
        self.rate_limited = Counter(
            "pricegate_gateway_rest_rate_limited", "REST requests refused with 429 (weight budget spent)", registry=r
        )


@dataclass(frozen=True, slots=True)
class Reply:
    body: bytes
    served: Served | None = None


Handler = Callable[[Request, Query], Awaitable[Reply]]
Weigher = Callable[[Query], int]


class RestApi:
    def __init__(
        self,
        settings: Settings,
        broker: Broker,
        symbols: SymbolDirectory,
        registry: CollectorRegistry,
        *,
        candles: CandleStore | None,
        cache: ResponseCache | None = None,
        exchange: BinanceRest | None = None,
        clock: Callable[[], float] = time.time,
        authenticate: Authenticate | None = None,
        proxies: TrustedProxies | None = None,
    ) -> None:
        """Without ``cache``: Redis when ``redis_url`` is set, else in memory. Without ``exchange``: the
        exchange's REST API when the market source is Binance, else none (serve what the store has). With
        ``authenticate`` (authentication on), every endpoint but ping and time needs a credential."""
        self.settings = settings
        self.proxies = proxies if proxies is not None else TrustedProxies(settings.forwarded_allow_ips)
        self.symbols = symbols
        self.metrics = RestMetrics(registry)
        self._clock = clock
        self.authenticate = authenticate
        if cache is None:
            cache = response_cache(settings)
        self.cache = cache
        if exchange is None and settings.source == "binance":
            results = self.metrics.exchange
            exchange = BinanceRest(
                settings.binance_rest_url,
                # Its own share of the IP's budget (ingest has another), counted with the exchange's figure for the
                # IP, so a REST flood on the gateway cannot spend the weight ingest needs for backfills; after a
                # 429/418 it holds back every call until Retry-After.
                weight_limit_per_min=settings.exchange_weight_limit_per_min,
                timeout_s=settings.exchange_timeout_s,
                connect_timeout_s=settings.exchange_timeout_s,
                max_wait_s=0.0,  # never keep a client waiting for budget: the cache serves stale meanwhile
                max_connections=settings.exchange_max_connections,
                on_result=lambda endpoint, result: results.labels(endpoint=endpoint, result=result).inc(),
            )
        self.exchange = exchange
        self.flights = SingleFlight(
            cache,
            stale_s=settings.cache_stale_s,
            # Long enough for the slowest backend call, so a second replica rarely repeats it.
            lock_ttl_ms=int((settings.exchange_timeout_s + 1.0) * 1000),
            results=self.metrics.cache,
            passthrough=(RestError, RestRefused),
            clock=clock,
        )
        self.klines = KlineSource(candles, exchange, broker, served=self.metrics.candles)
        self.market = LiveMarket(
            broker, kline_intervals=settings.candle_intervals, demand_ttl_s=settings.demand_ttl_s, clock=clock
        )
        self.limiter = WeightLimiter(settings.rest_weight_limit_per_min)
        self._info_source: bytes | None = None
        self._info: dict[str, Any] = {}

    def routes(self) -> list[Route]:
        def fixed(weight: int) -> Weigher:
            return lambda query: weight

        return [
            Route("/api/v3/ping", self._endpoint("ping", fixed(params.WEIGHT_PING), self.ping, public=True)),
            Route("/api/v3/time", self._endpoint("time", fixed(params.WEIGHT_TIME), self.server_time, public=True)),
            Route(
                "/api/v3/exchangeInfo",
                self._endpoint("exchangeInfo", fixed(params.WEIGHT_EXCHANGE_INFO), self.exchange_info),
            ),
            Route("/api/v3/klines", self._endpoint("klines", fixed(params.WEIGHT_KLINES), self.klines_endpoint)),
            Route("/api/v3/ticker/price", self._endpoint("ticker_price", params.ticker_weight, self.ticker_price)),
            Route("/api/v3/depth", self._endpoint("depth", params.depth_weight, self.depth)),
            Route(
                "/api/v1/technical/{symbol}",
                self._endpoint("technical", fixed(params.WEIGHT_TECHNICALS), self.technical),
            ),
        ]

    async def aclose(self) -> None:
        await self.cache.aclose()
        if self.exchange is not None:
            await self.exchange.aclose()

    # ---- the common request path: weight, errors, headers, metrics ----

    def _endpoint(
        self, name: str, weigh: Weigher, handler: Handler, *, public: bool = False
    ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            started = time.perf_counter()
            query = params.query_from_pairs(request.query_params.multi_items())
            # Weights are charged to the client, which a trusted proxy names in X-Forwarded-For (gateway.edge).
            peer = request.client.host if request.client is not None else "unknown"
            ip = client_ip(peer, forwarded_for(request.headers.getlist("x-forwarded-for")), self.proxies)
            charge = self.limiter.charge(ip, weigh(query), self._clock())
            headers = {"X-MBX-USED-WEIGHT-1M": str(charge.used)}
            if not charge.allowed:
                self.metrics.rate_limited.inc()
                headers["Retry-After"] = str(charge.retry_after_s)
                limit = self.limiter.limit
                response = _error(
                    429,
                    -1003,
                    f"Too much request weight used; current limit is {limit} request weight per 1 MINUTE. "
                    "Please use WebSocket Streams for live updates to avoid polling the API.",
                    headers,
                )
            elif (refusal := None if public else await self._refusal(request, query)) is not None:
                # Weight is charged first: probing credentials costs budget like any request.
                status, body, extra = rest_refusal(refusal)
                response = Response(body, status, {**headers, **extra}, _JSON)
            else:
                response = await self._answer(name, handler, request, query, headers)
            self.metrics.requests.labels(endpoint=name, status=str(response.status_code)).inc()
            self.metrics.duration.labels(endpoint=name).observe(time.perf_counter() - started)
            return response

        return endpoint

    async def _refusal(self, request: Request, query: Query) -> AuthRefusal | None:
        """Why the request's credential is refused, or None (also when authentication is off): an
        ``X-MBX-APIKEY`` key, or a token as ``Authorization: Bearer`` or ``?token=``."""
        if self.authenticate is None:
            return None
        token = bearer_token(request.headers.get("authorization"))
        if token is None:
            tokens = query.get("token")
            token = tokens[0] if tokens else None
        keys = request.headers.getlist("x-mbx-apikey")
        if len(keys) > 1:  # which one counts would be a guess (the handshake answers 400 for the same)
            return refused("malformed", "the X-MBX-APIKEY header is sent more than once")
        outcome = self.authenticate(keys[0] if keys else None, token)
        if not isinstance(outcome, Principal | AuthRefusal):
            outcome = await outcome
        return outcome if isinstance(outcome, AuthRefusal) else None

    async def _answer(
        self, name: str, handler: Handler, request: Request, query: Query, headers: dict[str, str]
    ) -> Response:
        try:
            reply = await handler(request, query)
        except RestError as error:
            if error.status == 503:
                headers["Retry-After"] = "1"
            return Response(error.body(), error.status, headers, _JSON)
        except RestRefused as error:
            return _error(error.status, error.code, error.msg, headers)
        except BACKEND_ERRORS as error:
            logger.warning("%s failed and nothing is cached: %r", name, error)
            headers["Retry-After"] = "1"
            return _error(503, -1001, "Internal error; unable to process your request. Please try again.", headers)
        if reply.served is not None:
            headers["X-Pricegate-Cache"] = reply.served.result
            headers["Age"] = str(int(reply.served.age_s))
        return Response(reply.body, 200, headers, _JSON)

    # ---- endpoints ----

    async def ping(self, request: Request, query: Query) -> Reply:
        return Reply(b"{}")

    async def server_time(self, request: Request, query: Query) -> Reply:
        return Reply(orjson.dumps({"serverTime": int(self._clock() * 1000)}))

    async def exchange_info(self, request: Request, query: Query) -> Reply:
        document = self.symbols.exchange_info or await self.symbols.load()
        if document is None:
            raise RestError(-1001, "exchangeInfo not available yet; retry shortly.", 503)
        wanted = params.one_or_many_symbols(query, self.symbols.known)
        if wanted is None:
            return Reply(document)
        if document is not self._info_source:
            self._info_source, self._info = document, orjson.loads(document)
        by_symbol = {entry["symbol"]: entry for entry in self._info.get("symbols", [])}
        return Reply(orjson.dumps({**self._info, "symbols": [by_symbol[symbol] for symbol in wanted]}))

    async def klines_endpoint(self, request: Request, query: Query) -> Reply:
        wanted = params.klines_request(query, self.symbols.known)
        window = self.klines.window(
            wanted.symbol, wanted.interval, start_ms=wanted.start_ms, end_ms=wanted.end_ms, limit=wanted.limit
        )
        if not window.opens:
            return Reply(b"[]")  # no candle can exist there (the future): no backend call, no cache entry

        async def compute() -> bytes:
            return klines_json(await self.klines.candles(window))

        # Keyed by the candles covered, not the timestamps sent: times inside the same windows share one entry.
        served = await self.flights.get("klines", window.cache_key, self.settings.cache_ttl_klines_s, compute)
        return Reply(served.body, served)

    async def technical(self, request: Request, query: Query) -> Reply:
        symbol = params.check_symbol(str(request.path_params["symbol"]).upper(), self.symbols.known)
        interval = params.optional(query, "interval") or DEFAULT_TECHNICALS_INTERVAL
        if interval not in KLINE_INTERVALS:
            raise RestError(-1120, "Invalid interval.")

        async def compute() -> bytes:
            candles = await self.klines.klines(symbol, interval, start_ms=None, end_ms=None, limit=TECHNICALS_CANDLES)
            # A few ms of pure-Python arithmetic per miss: in a worker thread, so the fan-out loop keeps its turns.
            return await asyncio.to_thread(lambda: technicals_json(analyse(symbol, interval, candles)))

        key = f"technicals:{symbol}:{interval}"
        served = await self.flights.get("technical", key, self.settings.cache_ttl_technicals_s, compute)
        return Reply(served.body, served)

    async def ticker_price(self, request: Request, query: Query) -> Reply:
        wanted = params.one_or_many_symbols(query, self.symbols.known)
        if wanted is None and self.exchange is not None:
            return await self._all_exchange_prices(self.exchange)
        symbols = wanted if wanted is not None else sorted(self.symbols.known)
        prices = dict(zip(symbols, await asyncio.gather(*(self.market.price(s) for s in symbols)), strict=True))
        missing = [symbol for symbol, price in prices.items() if price is None]
        served: Served | None = None
        if missing:
            await self.market.request([f"{symbol.lower()}@miniTicker" for symbol in missing])
            if self.exchange is not None:
                served, fetched = await self._exchange_prices(self.exchange, missing)
                prices.update(fetched)
            else:
                waited = await asyncio.gather(*(self._wait_for_price(symbol) for symbol in missing))
                prices.update(zip(missing, waited, strict=True))
        if wanted is not None and any(prices[symbol] is None for symbol in wanted):
            absent = ", ".join(symbol for symbol in wanted if prices[symbol] is None)
            raise RestError(-1001, f"No price for {absent} yet; retry shortly.", 503)
        entries = [{"symbol": symbol, "price": price} for symbol, price in prices.items() if price is not None]
        if "symbol" in query:
            return Reply(orjson.dumps(entries[0]), served)
        return Reply(orjson.dumps(entries), served)

    async def _all_exchange_prices(self, exchange: BinanceRest) -> Reply:
        """Every symbol's price: only the exchange has them all."""
        ttl_s = self.settings.cache_ttl_live_s
        served = await self.flights.get("ticker_price", "ticker_price:all", ttl_s, exchange.ticker_prices)
        return Reply(served.body, served)

    async def _wait_for_price(self, symbol: str) -> str | None:
        return await self.market.wait_for(lambda: self.market.price(symbol), self.settings.rest_last_value_wait_s)

    async def _exchange_prices(self, exchange: BinanceRest, symbols: list[str]) -> tuple[Served, dict[str, str]]:
        key = "ticker_price:" + ",".join(symbols)
        served = await self.flights.get(
            "ticker_price", key, self.settings.cache_ttl_live_s, lambda: exchange.ticker_prices(symbols)
        )
        try:
            document = orjson.loads(served.body)
            fetched = {str(entry["symbol"]): str(entry["price"]) for entry in document}
        except (orjson.JSONDecodeError, KeyError, TypeError) as error:
            raise RestError(-1001, "The exchange sent prices in an unexpected shape.", 503) from error
        return served, fetched

    async def depth(self, request: Request, query: Query) -> Reply:
        symbol = params.symbol(query, self.symbols.known)
        limit = params.limit(query, default=params.DEPTH_DEFAULT_LIMIT, maximum=params.DEPTH_MAX_LIMIT, clamp=True)
        book = await self.market.book(symbol, limit)
        if book is not None and (book.levels >= limit or self.exchange is None):
            return Reply(book.payload)
        if book is None:
            await self.market.request([f"{symbol.lower()}@depth20@100ms"])
        if self.exchange is not None:
            exchange = self.exchange
            try:
                served = await self.flights.get(
                    "depth",
                    f"depth:{symbol}:{limit}",
                    self.settings.cache_ttl_live_s,
                    lambda: exchange.depth(symbol, limit),
                )
            except BACKEND_ERRORS:
                if book is None:
                    raise
                return Reply(book.payload)  # the exchange failed: the streamed book, if shallower, beats an error
            return Reply(served.body, served)
        waited = await self.market.wait_for(
            lambda: self.market.book(symbol, limit), self.settings.rest_last_value_wait_s
        )
        if waited is None:
            raise RestError(-1001, f"The order book of {symbol} is not available yet; retry shortly.", 503)
        return Reply(waited.payload)


def _error(status: int, code: int, msg: str, headers: dict[str, str]) -> Response:
    return Response(orjson.dumps({"code": code, "msg": msg}), status, headers, _JSON)


async def not_served(request: Request, exc: Exception) -> Response:
    """Starlette's 404 and 405: under ``/api/`` in Binance's error shape (code -1020, "unsupported operation";
    Binance documents no body for them), as the OpenAPI document says; elsewhere Starlette's plain text."""
    if not isinstance(exc, HTTPException):
        raise exc
    status, headers = exc.status_code, dict(exc.headers or {})
    if not request.url.path.startswith("/api/"):
        return PlainTextResponse(exc.detail, status, headers)
    return _error(status, -1020, f"No endpoint at {request.method} {request.url.path}.", headers)
