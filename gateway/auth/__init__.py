"""API keys: issued, looked up and revoked in PostgreSQL."""
