"""The synthetic market: a deterministic simulation writing Binance's payloads, and its wall-clock source."""
