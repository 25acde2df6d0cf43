"""Candles (klines): the value type and store protocol, the in-memory store and the PostgreSQL store."""
