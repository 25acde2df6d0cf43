"""Trust at the edge: who a client is (its IP behind trusted proxies), where it may connect from (Origin), and
how much of a replica it may take (per-IP limits, handshake deadlines, header caps)."""
