"""The REST API's OpenAPI document (``GET /openapi.json``) and the ``/docs`` page that renders it.

The document (OpenAPI 3.0.3, which every Swagger UI, Redoc and schemathesis read) is built once per app from the
constants :mod:`gateway.rest.params` validates with (intervals, limits, patterns, time range, ``timeZone``
values), the weights the routes charge, the indicator periods :mod:`gateway.rest.technicals` computes, and the
process's settings (authentication modes, weight budget, symbols for examples), so it cannot drift from what is
served: tests/test_openapi.py checks that every REST route is in it and the other way round, and that real
error answers match it; tests/test_schemathesis.py checks a running ``pricegate demo`` against it.

``/docs`` is a small static page (``gateway/static/docs.html``) running Swagger UI: served from this process when
the ``docs`` extra (``swagger-ui-bundle``) is installed, so no browser ever reaches a CDN; otherwise from a
pinned jsDelivr copy of ``swagger-ui-dist`` checked by Subresource Integrity hashes.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Collection, Sequence
from pathlib import Path
from string import Template
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, Response
from starlette.routing import Route

from gateway.metrics import VERSION
from gateway.rest import params
from gateway.rest.api import DEFAULT_TECHNICALS_INTERVAL, TECHNICALS_CANDLES
from gateway.rest.technicals import EMA_PERIODS, SMA_PERIODS
from shared.binance.weight import WEIGHT_TICKER_MANY, WEIGHT_TICKER_ONE, depth_weight
from shared.intervals import MAX_TIME_MS, MIN_TIME_MS
from shared.streams import KLINE_INTERVALS

OPENAPI_VERSION = "3.0.3"
# Swagger UI from the CDN when the docs extra is not installed: an exact version, each file pinned by its hash.
SWAGGER_UI_CDN = "https://cdn.jsdelivr.net/npm/swagger-ui-dist@5.35.0"
SWAGGER_UI_CDN_FILES = {
    "swagger-ui.css": "sha384-WlYgdmXYOOBWL5apwjDEZwN+U3HmXSSu5R6V5aGxEcf7z+KuRNwBhoxKVN1i3D5I",
    "swagger-ui-bundle.js": "sha384-gjRm0bEPMeTmMh5jT2cHccIwCUZSTd8YC+j0d0sXw0MdGEfScduGpSyF3ZSSLkX9",
}
DOCS_ASSETS_PATH = "/docs/assets"
_DOCS_PAGE = Template((Path(__file__).parent.parent / "static" / "docs.html").read_text(encoding="utf-8"))
_JSON = "application/json"
# Every signal the technicals trend votes with (gateway/rest/technicals.py, trend()): -1, 0 or +1 each.
TREND_SIGNALS = ("priceVsEma50", "priceVsEma200", "ema50VsEma200", "ema9VsEma21", "macdHistogram")
PUBLIC_OPERATIONS = ("ping", "time")  # answered without a credential even when authentication is on

# ---- building blocks ----


def _ref(kind: str, name: str) -> dict[str, str]:
    return {"$ref": f"#/components/{kind}/{name}"}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` or null (OpenAPI 3.0: ``nullable``; an enum lists null itself)."""
    result = {**schema, "nullable": True}
    if "enum" in schema:
        result["enum"] = [*schema["enum"], None]
    return result


def _number_or_null(description: str) -> dict[str, Any]:
    return _nullable({"type": "number", "description": description})


def _json(schema: dict[str, Any], example: Any = None) -> dict[str, Any]:
    media: dict[str, Any] = {"schema": schema}
    if example is not None:
        media["example"] = example
    return {_JSON: media}


def _weight_note(weight: int | str) -> str:
    return f"**Weight:** {weight}."


def _depth_weights() -> str:
    tiers, lower = [], 1
    for upper in (100, 500, 1000, params.DEPTH_MAX_LIMIT):
        tiers.append(f"{depth_weight(upper)} for `limit` {lower} to {upper}")
        lower = upper + 1
    return ", ".join(tiers)


def _schemas() -> dict[str, Any]:
    decimal = {"type": "string", "pattern": r"^-?[0-9]+(\.[0-9]+)?$", "description": "A decimal as a string."}
    level = {
        "type": "array",
        "description": "`[price, quantity]`, both decimal strings.",
        "items": decimal,
        "minItems": 2,
        "maxItems": 2,
        "example": ["94250.38000000", "0.12000000"],
    }
    price_ticker = {
        "type": "object",
        "required": ["symbol", "price"],
        "properties": {"symbol": {"type": "string", "example": "BTCUSDT"}, "price": decimal},
    }
    return {
        "Error": {
            "type": "object",
            "description": "Binance's error body: a negative `code` (its error table) and a message.",
            "required": ["code", "msg"],
            "additionalProperties": False,
            "properties": {"code": {"type": "integer", "example": -1121}, "msg": {"type": "string"}},
            "example": {"code": -1121, "msg": "Invalid symbol."},
        },
        "Ping": {"type": "object", "maxProperties": 0, "example": {}},
        "ServerTime": {
            "type": "object",
            "required": ["serverTime"],
            "properties": {"serverTime": {"type": "integer", "format": "int64", "description": "Unix ms."}},
        },
        "ExchangeInfo": {
            "type": "object",
            "description": "Binance's layout (with the Binance source: the exchange's own document). Clients read "
            "tick and step sizes from `filters`, whose first entry is the `PRICE_FILTER`.",
            "required": ["timezone", "serverTime", "rateLimits", "exchangeFilters", "symbols"],
            "properties": {
                "timezone": {"type": "string", "example": "UTC"},
                "serverTime": {"type": "integer", "format": "int64"},
                "rateLimits": {"type": "array", "items": _ref("schemas", "RateLimit")},
                "exchangeFilters": {"type": "array", "items": {"type": "object"}},
                "symbols": {"type": "array", "items": _ref("schemas", "SymbolInfo")},
            },
        },
        "RateLimit": {
            "type": "object",
            "required": ["rateLimitType", "interval", "intervalNum", "limit"],
            "properties": {
                "rateLimitType": {"type": "string", "example": "REQUEST_WEIGHT"},
                "interval": {"type": "string", "example": "MINUTE"},
                "intervalNum": {"type": "integer"},
                "limit": {"type": "integer"},
            },
        },
        "SymbolInfo": {
            "type": "object",
            "required": ["symbol", "status", "baseAsset", "quoteAsset", "filters"],
            "properties": {
                "symbol": {"type": "string", "example": "BTCUSDT"},
                "status": {"type": "string", "example": "TRADING"},
                "baseAsset": {"type": "string", "example": "BTC"},
                "baseAssetPrecision": {"type": "integer"},
                "quoteAsset": {"type": "string", "example": "USDT"},
                "quotePrecision": {"type": "integer"},
                "quoteAssetPrecision": {"type": "integer"},
                "orderTypes": {"type": "array", "items": {"type": "string"}},
                "permissions": {"type": "array", "items": {"type": "string"}},
                "filters": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["filterType"],
                        "properties": {"filterType": {"type": "string", "example": "PRICE_FILTER"}},
                    },
                },
            },
        },
        "Kline": {
            "type": "array",
            "description": "Binance's 12-element candle: `[openTime, open, high, low, close, volume, closeTime, "
            'quoteVolume, trades, takerBuyBaseVolume, takerBuyQuoteVolume, "0"]`; times (Unix ms) and the '
            "trade count are integers, every other element a decimal string.",
            "minItems": 12,
            "maxItems": 12,
            "items": {"oneOf": [{"type": "integer", "format": "int64"}, decimal]},
            "example": [
                1767222000000,
                "94226.49000000",
                "94280.75000000",
                "94156.56000000",
                "94250.00000000",
                "1.25316000",
                1767225599999,
                "118083.32440200",
                266,
                "0.62530000",
                "58921.04978500",
                "0",
            ],
        },
        "PriceTicker": price_ticker,
        "PriceTickers": {"type": "array", "items": _ref("schemas", "PriceTicker")},
        "Depth": {
            "type": "object",
            "required": ["lastUpdateId", "bids", "asks"],
            "properties": {
                "lastUpdateId": {"type": "integer", "format": "int64"},
                "bids": {"type": "array", "items": level, "description": "Best (highest) first."},
                "asks": {"type": "array", "items": level, "description": "Best (lowest) first."},
            },
        },
        "Technicals": _technicals_schema(),
    }


def _technicals_schema() -> dict[str, Any]:
    def periods(values: Sequence[int], what: str) -> dict[str, Any]:
        return {
            "type": "object",
            "required": [str(period) for period in values],
            "additionalProperties": False,
            "properties": {str(period): _number_or_null(f"{what}({period}) of the closes.") for period in values},
        }

    def fields(*names: str) -> dict[str, Any]:
        return {
            "type": "object",
            "required": list(names),
            "additionalProperties": False,
            "properties": {name: {"type": "number"} for name in names},
        }

    sign = {"type": "integer", "enum": [-1, 0, 1]}
    keys = [
        "symbol", "interval", "candles", "openTime", "close", "rsi14", "ema", "sma", "macd", "bollinger", "atr14",
        "vwap", "trend",
    ]  # fmt: skip
    return {
        "type": "object",
        "description": "Indicators over the newest candles (the last one may still be open); an indicator "
        "without enough candles is null.",
        "required": keys,
        "additionalProperties": False,
        "properties": {
            "symbol": {"type": "string", "example": "BTCUSDT"},
            "interval": {"type": "string", "enum": list(KLINE_INTERVALS)},
            "candles": {"type": "integer", "minimum": 0, "description": "Candles the indicators were computed from."},
            "openTime": _nullable({"type": "integer", "format": "int64", "description": "Newest candle's open."}),
            "close": _number_or_null("Newest close."),
            "rsi14": _number_or_null("RSI(14), Wilder's smoothing."),
            "ema": periods(EMA_PERIODS, "EMA"),
            "sma": periods(SMA_PERIODS, "SMA"),
            "macd": _nullable(fields("macd", "signal", "histogram")),
            "bollinger": _nullable(fields("upper", "middle", "lower")),
            "atr14": _number_or_null("ATR(14), Wilder's smoothing."),
            "vwap": _number_or_null("Σ quote volume / Σ base volume over the session."),
            "trend": {
                "type": "object",
                "required": ["direction", "score", "momentum", "signals"],
                "additionalProperties": False,
                "properties": {
                    "direction": _nullable({"type": "string", "enum": ["bullish", "bearish", "neutral"]}),
                    "score": {"type": "integer", "minimum": -len(TREND_SIGNALS), "maximum": len(TREND_SIGNALS)},
                    "momentum": _nullable({"type": "string", "enum": ["overbought", "oversold", "neutral"]}),
                    "signals": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {name: sign for name in TREND_SIGNALS},
                    },
                },
            },
        },
    }


def _headers() -> dict[str, Any]:
    return {
        "UsedWeight": {
            "description": "The client IP's request weight used in the current wall-clock minute (refused "
            "requests are not charged).",
            "required": True,
            "schema": {"type": "integer", "minimum": 0},
        },
        "UsedWeightIfCharged": {
            "description": "As on every answer of the API; absent when the edge refused the connection itself "
            "(plain-text body).",
            "schema": {"type": "integer", "minimum": 0},
        },
        "RetryAfter": {
            "description": "Seconds to wait before retrying.",
            "required": True,
            "schema": {"type": "integer", "minimum": 0},
        },
        "RetryAfterIfAPI": {
            "description": "Seconds to wait before retrying: on every 503 of the API, not on the edge's.",
            "schema": {"type": "integer", "minimum": 0},
        },
        "Cache": {
            "description": "How a cached response was served (klines, technicals, exchange fallbacks).",
            "schema": {"type": "string", "enum": ["hit", "miss", "coalesced", "stale"]},
        },
        "Age": {"description": "Seconds since the cached body was computed.", "schema": {"type": "integer"}},
        "WWWAuthenticate": {
            "description": "RFC 6750 challenge with the precise reason in `error_description` (Binance's body "
            "cannot carry it).",
            "required": True,
            "schema": {"type": "string"},
        },
    }


def _edge_text(example: str) -> dict[str, Any]:
    return {"text/plain": {"schema": {"type": "string"}, "example": example}}


def _responses(weight_limit_per_min: int) -> dict[str, Any]:
    error = _ref("schemas", "Error")
    used = _ref("headers", "UsedWeight")
    used_if_charged = _ref("headers", "UsedWeightIfCharged")
    retry_after = _ref("headers", "RetryAfter")
    return {
        "BadRequest": {
            "description": "Invalid input, with Binance's code: -1100 illegal characters, -1101 duplicated "
            "parameter, -1102 mandatory parameter missing, -1105 empty parameter, -1108 overflow, -1120 invalid "
            "interval, -1121 invalid symbol, -1128 both `symbol` and `symbols`, -1130 value out of range, "
            "-1151 duplicate symbols, -1023 `startTime` after `endTime`.",
            "headers": {"X-MBX-USED-WEIGHT-1M": used},
            "content": _json(error, {"code": -1121, "msg": "Invalid symbol."}),
        },
        "Unauthorized": {
            "description": "Authentication is on and the credential is missing or malformed (-2014) or not "
            "accepted (-2015: unknown, revoked or expired).",
            "headers": {"X-MBX-USED-WEIGHT-1M": used, "WWW-Authenticate": _ref("headers", "WWWAuthenticate")},
            "content": _json(error, {"code": -2014, "msg": "API-key format invalid."}),
        },
        "NotFound": {
            "description": "No endpoint at this path (for example an empty symbol): code -1020.",
            "content": _json(error, {"code": -1020, "msg": "No endpoint at GET /api/v1/technical/."}),
        },
        "TooManyRequests": {
            "description": f"The client IP's weight budget ({weight_limit_per_min} per minute on this server) is "
            "spent (-1003): back off until `Retry-After`, or use the WebSocket streams. The edge answers the same "
            "status in plain text, before any request is read, to an IP over its connection or connection-attempt "
            "limits (`PRICEGATE_MAX_CONNECTIONS_PER_IP`, `PRICEGATE_CONNECTION_ATTEMPTS_PER_IP`).",
            "headers": {"X-MBX-USED-WEIGHT-1M": used_if_charged, "Retry-After": retry_after},
            "content": {
                **_json(error, {"code": -1003, "msg": "Too much request weight used; ..."}),
                **_edge_text("Too Many Requests"),
            },
        },
        "Unavailable": {
            "description": "A backend failed with nothing cached, no data yet, or (authentication on) the key "
            "database cannot be asked: -1001; retry after `Retry-After`. The edge answers the same status in "
            "plain text (no `Retry-After`) when the process is at `PRICEGATE_MAX_CONNECTIONS`.",
            "headers": {"X-MBX-USED-WEIGHT-1M": used_if_charged, "Retry-After": _ref("headers", "RetryAfterIfAPI")},
            "content": {
                **_json(error, {"code": -1001, "msg": "Internal error; unable to process your request."}),
                **_edge_text("Service Unavailable"),
            },
        },
        "UriTooLong": {
            "description": "The edge's answer to a request target over `PRICEGATE_MAX_REQUEST_LINE_BYTES`; the "
            "connection is closed.",
            "content": _edge_text("request target too long"),
        },
        "HeadersTooLarge": {
            "description": "The edge's answer to request headers over `PRICEGATE_MAX_HEADER_BYTES` in total, a "
            "header line over 8000 bytes or more than `PRICEGATE_MAX_HEADERS` headers; the connection is closed.",
            "content": _edge_text("request headers too large"),
        },
        "ExchangeRefused": {
            "description": "With the Binance source, an error the exchange returned for a request passed on to it "
            "reaches the client unchanged.",
            "headers": {"X-MBX-USED-WEIGHT-1M": used},
            "content": _json(error),
        },
    }


def _security_schemes(auth_modes: Collection[str]) -> dict[str, Any]:
    def enforced(mode: str) -> str:
        state = "on" if mode in auth_modes else "off"
        return (
            f"Checked only when the server runs with `PRICEGATE_AUTH` including `{mode}` (on this server: {state}); "
            "ping and time never need it."
        )

    return {
        "apiKey": {
            "type": "apiKey",
            "in": "header",
            "name": "X-MBX-APIKEY",
            "description": "An API key made with `pricegate keys create` (64 lowercase hex), sent the Binance way. "
            + enforced("apikey"),
        },
        "bearerJwt": {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "JWT",
            "description": "A connection token (JWT with `exp`) minted by your backend. " + enforced("jwt"),
        },
        "tokenQuery": {
            "type": "apiKey",
            "in": "query",
            "name": "token",
            "description": "The same JWT as `?token=`, for clients that cannot set headers. " + enforced("jwt"),
        },
    }


def _parameters(symbols: Sequence[str]) -> dict[str, Any]:
    example = symbols[0] if symbols else "BTCUSDT"
    pair = list(symbols[:2]) if len(symbols) >= 2 else [example]
    exclusive = "Mutually exclusive with `{other}`: sending both is 400 -1128."
    limits = f"between {MIN_TIME_MS} and {MAX_TIME_MS} (9999-11-30T23:59:59.999Z)"
    return {
        "symbol": {
            "name": "symbol",
            "in": "query",
            "required": True,
            "description": "A symbol of exchangeInfo, upper case.",
            "schema": {"type": "string", "pattern": params.SYMBOL_PATTERN},
            "example": example,
        },
        "symbolOne": {
            "name": "symbol",
            "in": "query",
            "description": "One symbol of exchangeInfo, upper case. " + exclusive.format(other="symbols"),
            "schema": {"type": "string", "pattern": params.SYMBOL_PATTERN},
            "example": example,
        },
        "symbolsMany": {
            "name": "symbols",
            "in": "query",
            "description": f"A JSON array of up to {params.MAX_SYMBOLS} distinct symbols, e.g. "
            '`["BTCUSDT","ETHUSDT"]`. ' + exclusive.format(other="symbol") + " Neither: every symbol.",
            "schema": {
                "type": "string",
                "pattern": params.SYMBOLS_PATTERN,
                "maxLength": params.MAX_SYMBOLS * 24 + 2,
            },
            "example": orjson.dumps(pair).decode(),
        },
        "interval": {
            "name": "interval",
            "in": "query",
            "required": True,
            "schema": {"type": "string", "enum": list(KLINE_INTERVALS)},
            "example": "1h",
        },
        "startTime": {
            "name": "startTime",
            "in": "query",
            "description": f"Unix ms, {limits}. Candles with `openTime >= startTime`; `limit` counts forward from it.",
            "schema": {"type": "integer", "format": "int64", "minimum": MIN_TIME_MS, "maximum": MAX_TIME_MS},
        },
        "endTime": {
            "name": "endTime",
            "in": "query",
            "description": f"Unix ms, {limits}, not before `startTime`. Candles with `openTime <= endTime`.",
            "schema": {"type": "integer", "format": "int64", "minimum": MIN_TIME_MS, "maximum": MAX_TIME_MS},
        },
        "klinesLimit": {
            "name": "limit",
            "in": "query",
            "schema": {
                "type": "integer",
                "minimum": 1,
                "maximum": params.KLINES_MAX_LIMIT,
                "default": params.KLINES_DEFAULT_LIMIT,
            },
        },
        "timeZone": {
            "name": "timeZone",
            "in": "query",
            "description": "Only UTC is served; any other time zone is 400 -1130.",
            # params accepts exactly these spellings of UTC (private there: it is validation, not API).
            "schema": {"type": "string", "enum": sorted(params._UTC_TIME_ZONES)},
        },
        "depthLimit": {
            "name": "limit",
            "in": "query",
            "description": f"Levels per side. Larger values are accepted and cut to {params.DEPTH_MAX_LIMIT}, as "
            f"Binance does. Weight: {_depth_weights()}.",
            "schema": {
                "type": "integer",
                "minimum": 1,
                "maximum": params.DEPTH_MAX_LIMIT,
                "default": params.DEPTH_DEFAULT_LIMIT,
            },
        },
    }


def _operation(
    operation_id: str,
    summary: str,
    description: str,
    success: dict[str, Any],
    *,
    parameters: Sequence[dict[str, Any]] = (),
    errors: Sequence[str] = ("400", "429", "503"),
    cached: bool = False,
    auth_modes: Collection[str] = (),
) -> dict[str, Any]:
    success_headers: dict[str, Any] = {"X-MBX-USED-WEIGHT-1M": _ref("headers", "UsedWeight")}
    if cached:
        success_headers |= {"X-Pricegate-Cache": _ref("headers", "Cache"), "Age": _ref("headers", "Age")}
    responses: dict[str, Any] = {"200": {"description": "OK", "headers": success_headers, "content": success}}
    names = {
        "400": "BadRequest",
        "401": "Unauthorized",
        "404": "NotFound",
        "414": "UriTooLong",
        "429": "TooManyRequests",
        "431": "HeadersTooLarge",
        "503": "Unavailable",
        "4XX": "ExchangeRefused",
    }
    public = operation_id in PUBLIC_OPERATIONS
    # Every request passes the edge first (414, 431, and 429/503 for connection limits: gateway/edge/).
    statuses = [*errors, "414", "429", "431", "503", *(["401"] if auth_modes and not public else [])]
    for status in sorted(set(statuses)):
        responses[status] = _ref("responses", names[status])
    operation: dict[str, Any] = {
        "operationId": operation_id,
        "summary": summary,
        "description": description,
        "tags": ["market data" if operation_id != "technical" else "technicals"],
        "parameters": list(parameters),
        "responses": responses,
    }
    if auth_modes:
        requirements: list[dict[str, list[str]]] = []
        if "apikey" in auth_modes:
            requirements.append({"apiKey": []})
        if "jwt" in auth_modes:
            requirements += [{"bearerJwt": []}, {"tokenQuery": []}]
        operation["security"] = [] if public else requirements
    return operation


def openapi_document(
    *,
    auth_modes: Collection[str] = (),
    weight_limit_per_min: int = 6000,
    symbols: Sequence[str] = ("BTCUSDT", "ETHUSDT"),
) -> dict[str, Any]:
    """The document for a gateway with these settings: ``auth_modes`` (``apikey``, ``jwt``; empty when
    authentication is off) decides which operations carry security requirements and 401s."""
    p = {name: _ref("parameters", name) for name in _parameters(symbols)}
    info_many = "`symbol` for one symbol, `symbols` for a list, neither for every symbol (never both)."
    auth_state = (
        f"**Authentication is on** on this server ({', '.join(sorted(auth_modes))}): every endpoint but ping and "
        "time needs a credential (security schemes below); a refused one is 401 with Binance's -2014/-2015."
        if auth_modes
        else "**Authentication is off** on this server (`PRICEGATE_AUTH=none`): the security schemes below apply "
        "only to gateways started with `PRICEGATE_AUTH=apikey`, `jwt` or `apikey,jwt`."
    )
    paths = {
        "/api/v3/ping": {
            "get": _operation(
                "ping",
                "Test connectivity",
                _weight_note(params.WEIGHT_PING),
                _json(_ref("schemas", "Ping")),
                errors=("429",),
                auth_modes=auth_modes,
            )
        },
        "/api/v3/time": {
            "get": _operation(
                "time",
                "Server time",
                _weight_note(params.WEIGHT_TIME),
                _json(_ref("schemas", "ServerTime")),
                errors=("429",),
                auth_modes=auth_modes,
            )
        },
        "/api/v3/exchangeInfo": {
            "get": _operation(
                "exchangeInfo",
                "Symbols, filters and rate limits",
                f"The exchangeInfo ingest caches in the broker. {info_many} "
                + _weight_note(params.WEIGHT_EXCHANGE_INFO),
                _json(_ref("schemas", "ExchangeInfo")),
                parameters=[p["symbolOne"], p["symbolsMany"]],
                auth_modes=auth_modes,
            )
        },
        "/api/v3/klines": {
            "get": _operation(
                "klines",
                "Candles",
                "Oldest first. Without `startTime`, the newest candles back from `endTime` (or now; the last one "
                "may still be open). Served from the candle store, the live kline stream and (Binance source) "
                f"the exchange, cached. {_weight_note(params.WEIGHT_KLINES)}",
                _json({"type": "array", "items": _ref("schemas", "Kline")}),
                parameters=[p["symbol"], p["interval"], p["startTime"], p["endTime"], p["klinesLimit"], p["timeZone"]],
                errors=("400", "429", "503", "4XX"),
                cached=True,
                auth_modes=auth_modes,
            )
        },
        "/api/v3/ticker/price": {
            "get": _operation(
                "tickerPrice",
                "Latest price",
                f"From the streams' last values. With `symbol`: one object; otherwise an array. {info_many} "
                + _weight_note(f"{WEIGHT_TICKER_ONE} for one symbol, else {WEIGHT_TICKER_MANY}"),
                _json({"oneOf": [_ref("schemas", "PriceTicker"), _ref("schemas", "PriceTickers")]}),
                parameters=[p["symbolOne"], p["symbolsMany"]],
                errors=("400", "429", "503", "4XX"),
                cached=True,
                auth_modes=auth_modes,
            )
        },
        "/api/v3/depth": {
            "get": _operation(
                "depth",
                "Order book",
                "The latest partial book stream, cut to `limit` (at most 20 levels unless the Binance source "
                f"answers deeper). Weight: {_depth_weights()}.",
                _json(_ref("schemas", "Depth")),
                parameters=[p["symbol"], p["depthLimit"]],
                errors=("400", "429", "503", "4XX"),
                cached=True,
                auth_modes=auth_modes,
            )
        },
        "/api/v1/technical/{symbol}": {
            "get": _operation(
                "technical",
                "Technical indicators",
                f"pricegate's own endpoint: RSI, EMAs, SMAs, MACD, Bollinger bands, ATR, VWAP and a trend vote over "
                f"the newest {TECHNICALS_CANDLES} candles of `interval`, cached. "
                + _weight_note(params.WEIGHT_TECHNICALS),
                _json(_ref("schemas", "Technicals")),
                parameters=[
                    {
                        "name": "symbol",
                        "in": "path",
                        "required": True,
                        "description": "A symbol of exchangeInfo, any case.",
                        "schema": {"type": "string", "pattern": params.SYMBOL_PATTERN.replace("A-Z", "A-Za-z")},
                        "example": symbols[0] if symbols else "BTCUSDT",
                    },
                    {
                        "name": "interval",
                        "in": "query",
                        "schema": {
                            "type": "string",
                            "enum": list(KLINE_INTERVALS),
                            "default": DEFAULT_TECHNICALS_INTERVAL,
                        },
                    },
                ],
                errors=("400", "404", "429", "503", "4XX"),
                cached=True,
                auth_modes=auth_modes,
            )
        },
    }
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "pricegate REST API",
            "version": VERSION,  # the package's, as /metrics' build info says
            "description": "Binance's market-data endpoints (`/api/v3/*`) with api.binance.com's paths, "
            "parameters, response shapes and error bodies — a Binance client changes only its base URL — plus "
            "pricegate's technicals. Every answer from these endpoints carries `X-MBX-USED-WEIGHT-1M`; beyond the "
            f"IP's budget ({weight_limit_per_min} per minute here) it is 429 with `Retry-After`. Errors are "
            'Binance\'s `{"code": <negative int>, "msg": "..."}`; bad input is never a 5xx. Live data: the '
            "WebSocket streams at `/ws` and `/stream` (Binance's stream protocol; not described here).\n\n"
            + auth_state,
            "license": {"name": "MIT"},
        },
        "servers": [{"url": "/"}],
        "tags": [
            {"name": "market data", "description": "Binance-compatible (`/api/v3`)."},
            {"name": "technicals", "description": "pricegate's own (`/api/v1/technical`)."},
        ],
        "paths": paths,
        "components": {
            "schemas": _schemas(),
            "parameters": _parameters(symbols),
            "headers": _headers(),
            "responses": _responses(weight_limit_per_min),
            "securitySchemes": _security_schemes(auth_modes),
        },
    }


# ---- serving: /openapi.json, /docs and (with the docs extra) Swagger UI's files ----


def swagger_ui_directory() -> Path | None:
    """Swagger UI's files from the ``swagger-ui-bundle`` package (the ``docs`` extra), or None without it."""
    spec = importlib.util.find_spec("swagger_ui_bundle")
    if spec is None or spec.origin is None:
        return None
    candidates = sorted((Path(spec.origin).parent / "vendor").glob("swagger-ui-*"))
    found = [path for path in candidates if all((path / name).is_file() for name in SWAGGER_UI_CDN_FILES)]
    return found[-1] if found else None


def docs_page(assets: Path | None) -> str:
    """The /docs HTML: Swagger UI from this server (``assets``), else from the pinned CDN copy."""
    if assets is not None:
        stylesheet = f'<link rel="stylesheet" href="{DOCS_ASSETS_PATH}/swagger-ui.css">'
        script = f'<script src="{DOCS_ASSETS_PATH}/swagger-ui-bundle.js"></script>'
        source = f"served by this gateway ({assets.name})"
    else:
        css, js = (SWAGGER_UI_CDN_FILES[name] for name in ("swagger-ui.css", "swagger-ui-bundle.js"))
        stylesheet = (
            f'<link rel="stylesheet" href="{SWAGGER_UI_CDN}/swagger-ui.css" integrity="{css}" crossorigin="anonymous">'
        )
        script = (
            f'<script src="{SWAGGER_UI_CDN}/swagger-ui-bundle.js" integrity="{js}" crossorigin="anonymous"></script>'
        )
        source = "from the jsDelivr CDN (install pricegate[docs] to serve it from this gateway)"
    return _DOCS_PAGE.substitute(stylesheet=stylesheet, script=script, source=source)


def openapi_routes(document: dict[str, Any], *, assets: Path | None = None) -> list[Route]:
    """``GET /openapi.json``, ``GET /docs`` and, with ``assets`` (a Swagger UI directory), its two files."""
    body = orjson.dumps(document)
    page = docs_page(assets)

    async def openapi_json(request: Request) -> Response:
        return Response(body, media_type=_JSON)

    async def docs(request: Request) -> Response:
        return HTMLResponse(page)

    routes = [Route("/openapi.json", openapi_json), Route("/docs", docs)]
    if assets is not None:
        directory = assets
        media_types = {"swagger-ui.css": "text/css", "swagger-ui-bundle.js": "text/javascript"}

        async def asset(request: Request) -> Response:
            name = str(request.path_params["name"])
            if name not in media_types:  # only the two files the page loads: never a path from the client
                return Response("Not Found", 404, media_type="text/plain")
            return FileResponse(
                directory / name, media_type=media_types[name], headers={"Cache-Control": "public, max-age=86400"}
            )

        routes.append(Route(DOCS_ASSETS_PATH + "/{name}", asset))
    return routes
