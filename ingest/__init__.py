"""The ingest process: a market source feeds the publisher, which publishes to the broker while it leads."""
