"""Ingest's publish path: leader lease, standby buffer, continuity, trade backfill and the candle writer."""
