"""Load tests and benchmarks for pricegate (not run in CI): ``python -m loadtests.fanout`` measures fan-out
throughput, latency and memory of the gateway against two baselines; ``loadtests/locustfile.py`` drives real
WebSocket clients from locust. See BENCHMARKS.md."""
