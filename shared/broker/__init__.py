"""The broker between ingest and gateways: the contract, the in-memory backend and the Redis backend."""
