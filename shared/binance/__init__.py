"""Binance's rules for ingest and gateway alike: REST client and weights, exchangeInfo, event identities."""
