"""The gateway's REST API: Binance-compatible market data and technicals, parameters, cache and weights."""
