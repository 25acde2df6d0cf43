"""What ingest and gateways share: settings, stream grammar, framing, broker, Redis, candles, Binance rules."""
