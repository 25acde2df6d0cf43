"""pricegate's tests: pure modules without a loop; real Redis, PostgreSQL, uvicorn, sockets and processes."""
