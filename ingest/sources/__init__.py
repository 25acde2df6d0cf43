"""Market sources, where ingest's events come from: live Binance, a replayed recording, the synthetic market."""
