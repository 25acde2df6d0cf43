"""Client authentication: API keys (PostgreSQL, cached), JWT connection tokens, and who a client is once known."""
