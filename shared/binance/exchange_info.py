"""Binance-layout ``GET /api/v3/exchangeInfo`` documents: build one for the symbols a source serves, and read
the trading symbols back out of one (ours or Binance's). Clients such as ccxt and cryptofeed call this endpoint
before streaming and read tick and step sizes from it (cryptofeed takes ``filters[0].tickSize``, so the
``PRICE_FILTER`` always comes first). Pure: bytes in, bytes out; no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

# Quote assets recognised when splitting a symbol into base and quote; tried longest first so that a quote
# wins over a shorter one that is its tail ("BTCBIDR" is BTC/BIDR, not BTCB/IDR).
QUOTE_ASSETS: tuple[str, ...] = tuple(
    sorted(
        (
            "USDT",
            "USDC",
            "FDUSD",
            "TUSD",
            "BUSD",
            "USDP",
            "DAI",
            "USD1",
            "BTC",
            "ETH",
            "BNB",
            "XRP",
            "TRX",
            "DOGE",
            "SOL",
            "EUR",
            "TRY",
            "BRL",
            "JPY",
            "GBP",
            "AUD",
            "ARS",
            "MXN",
            "PLN",
            "RON",
            "UAH",
            "ZAR",
            "IDR",
            "COP",
            "CZK",
            "BIDR",
        ),
        key=len,
        reverse=True,
    )
)

_ORDER_TYPES = ["LIMIT", "LIMIT_MAKER", "MARKET", "STOP_LOSS", "STOP_LOSS_LIMIT", "TAKE_PROFIT", "TAKE_PROFIT_LIMIT"]
_STP_MODES = ["EXPIRE_TAKER", "EXPIRE_MAKER", "EXPIRE_BOTH", "DECREMENT"]
_RATE_LIMITS = [
    {"rateLimitType": "REQUEST_WEIGHT", "interval": "MINUTE", "intervalNum": 1, "limit": 6000},
    {"rateLimitType": "ORDERS", "interval": "SECOND", "intervalNum": 10, "limit": 100},
    {"rateLimitType": "ORDERS", "interval": "DAY", "intervalNum": 1, "limit": 200000},
    {"rateLimitType": "RAW_REQUESTS", "interval": "MINUTE", "intervalNum": 5, "limit": 61000},
]


def split_symbol(symbol: str) -> tuple[str, str]:
    """``"BTCUSDT"`` -> ``("BTC", "USDT")``. Symbols ending in no known quote asset are split before their
    last three characters, which is right for most fiat and coin tickers and never yields an empty base."""
    upper = symbol.upper()
    for quote in QUOTE_ASSETS:
        if upper.endswith(quote) and len(upper) > len(quote):
            return upper[: -len(quote)], quote
    cut = max(1, len(upper) - 3)
    return upper[:cut], upper[cut:]


@dataclass(frozen=True, slots=True)
class SymbolInfo:
    """What exchangeInfo states about one symbol. Sizes are decimal strings with 8 decimals, as Binance
    writes them (``"0.01000000"``)."""

    symbol: str
    base_asset: str
    quote_asset: str
    tick_size: str
    step_size: str
    min_price: str
    max_price: str
    min_qty: str
    max_qty: str
    min_notional: str = "5.00000000"


def _symbol_document(info: SymbolInfo) -> dict[str, Any]:
    # Key order follows Binance's response; some clients index into it positionally (filters[0]).
    return {
        "symbol": info.symbol,
        "status": "TRADING",
        "baseAsset": info.base_asset,
        "baseAssetPrecision": 8,
        "quoteAsset": info.quote_asset,
        "quotePrecision": 8,
        "quoteAssetPrecision": 8,
        "baseCommissionPrecision": 8,
        "quoteCommissionPrecision": 8,
        "orderTypes": _ORDER_TYPES,
        "icebergAllowed": True,
        "ocoAllowed": True,
        "otoAllowed": True,
        "quoteOrderQtyMarketAllowed": True,
        "allowTrailingStop": True,
        "cancelReplaceAllowed": True,
        "amendAllowed": True,
        "isSpotTradingAllowed": True,
        "isMarginTradingAllowed": False,
        "filters": [
            {
                "filterType": "PRICE_FILTER",
                "minPrice": info.min_price,
                "maxPrice": info.max_price,
                "tickSize": info.tick_size,
            },
            {
                "filterType": "LOT_SIZE",
                "minQty": info.min_qty,
                "maxQty": info.max_qty,
                "stepSize": info.step_size,
            },
            {"filterType": "ICEBERG_PARTS", "limit": 10},
            {
                "filterType": "MARKET_LOT_SIZE",
                "minQty": "0.00000000",
                "maxQty": info.max_qty,
                "stepSize": "0.00000000",
            },
            {
                "filterType": "TRAILING_DELTA",
                "minTrailingAboveDelta": 10,
                "maxTrailingAboveDelta": 2000,
                "minTrailingBelowDelta": 10,
                "maxTrailingBelowDelta": 2000,
            },
            {
                "filterType": "PERCENT_PRICE_BY_SIDE",
                "bidMultiplierUp": "5",
                "bidMultiplierDown": "0.2",
                "askMultiplierUp": "5",
                "askMultiplierDown": "0.2",
                "avgPriceMins": 5,
            },
            {
                "filterType": "NOTIONAL",
                "minNotional": info.min_notional,
                "applyMinToMarket": True,
                "maxNotional": "9000000.00000000",
                "applyMaxToMarket": False,
                "avgPriceMins": 5,
            },
            {"filterType": "MAX_NUM_ORDERS", "maxNumOrders": 200},
            {"filterType": "MAX_NUM_ALGO_ORDERS", "maxNumAlgoOrders": 5},
        ],
        "permissions": ["SPOT"],
        "permissionSets": [["SPOT"]],
        "defaultSelfTradePreventionMode": "EXPIRE_MAKER",
        "allowedSelfTradePreventionModes": _STP_MODES,
    }


def build_exchange_info(symbols: Sequence[SymbolInfo], server_time_ms: int) -> bytes:
    """The whole exchangeInfo document, symbols in the order given."""
    document = {
        "timezone": "UTC",
        "serverTime": server_time_ms,
        "rateLimits": _RATE_LIMITS,
        "exchangeFilters": [],
        "symbols": [_symbol_document(info) for info in symbols],
    }
    return orjson.dumps(document)


def symbols_from_exchange_info(document: bytes) -> list[str]:
    """Uppercase symbols whose status is TRADING, in document order. Raises ValueError when the document is
    not JSON or not shaped like exchangeInfo (no ``symbols`` list of objects)."""
    try:
        parsed = orjson.loads(document)
    except orjson.JSONDecodeError as error:
        raise ValueError(f"exchangeInfo is not valid JSON: {error}") from error
    if not isinstance(parsed, dict) or not isinstance(parsed.get("symbols"), list):
        raise ValueError("exchangeInfo must be a JSON object with a 'symbols' list")
    result: list[str] = []
    for entry in parsed["symbols"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("symbol"), str):
            raise ValueError(f"exchangeInfo symbol entry without a string 'symbol': {entry!r:.120}")
        if entry.get("status") == "TRADING":
            result.append(entry["symbol"].upper())
    return result
