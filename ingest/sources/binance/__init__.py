"""The live Binance source: upstream connections, the pure wire protocol, make-before-break rotation."""
