"""Baseline WebSocket fan-out servers the benchmark compares pricegate with (same Redis input, same frames)."""
