"""Load tests and benchmarks for pricegate (not run in CI; figures and commands in BENCHMARKS.md), e.g.
``python -m loadtests.fanout`` (fan-out throughput, latency and memory of the gateway against a naive Starlette
loop and picows) and ``loadtests/locustfile.py`` (real WebSocket clients from locust)."""
