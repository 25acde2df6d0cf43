"""Loop-lag and GC-pause histograms see what stalls the loop."""

from __future__ import annotations

import asyncio
import gc
import time

from prometheus_client import CollectorRegistry

from shared.runtime_metrics import GcPauseMonitor, LoopLagMonitor


def sample(registry: CollectorRegistry, name: str, labels: dict[str, str] | None = None) -> float:
    value = registry.get_sample_value(name, labels or {})
    return value if value is not None else 0.0


async def test_a_blocked_loop_shows_as_lag() -> None:
    registry = CollectorRegistry()
    monitor = LoopLagMonitor(registry, "test", interval_s=0.02)
    monitor.start()
    try:
        await asyncio.sleep(0.05)
        time.sleep(0.15)  # noqa: ASYNC251 - the stall being measured
        await asyncio.sleep(0.05)
    finally:
        monitor.stop()
    assert monitor.worst_s >= 0.1
    assert sample(registry, "pricegate_test_event_loop_lag_seconds_count") >= 2
    assert sample(registry, "pricegate_test_event_loop_lag_seconds_bucket", {"le": "0.05"}) < sample(
        registry, "pricegate_test_event_loop_lag_seconds_count"
    )


def test_every_collection_is_recorded_by_generation() -> None:
    registry = CollectorRegistry()
    monitor = GcPauseMonitor(registry, "test")
    monitor.start()
    try:
        gc.collect()
        gc.collect(0)
    finally:
        monitor.stop()
    assert sample(registry, "pricegate_test_gc_pause_seconds_count", {"generation": "2"}) >= 1
    assert sample(registry, "pricegate_test_gc_pause_seconds_count", {"generation": "0"}) >= 1
    assert monitor._callback not in gc.callbacks
