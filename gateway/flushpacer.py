"""When to run the next fan-out flush (pure): at once under light load, spaced out under heavy load.

A flush costs roughly one socket write per client that has something pending. With many clients each
receiving few messages per second, flushing after every broker message means one write per message per
client, and the event loop saturates on write syscalls long before the network does. Spacing flushes so that
they take at most ``busy_share`` of the loop's time lets messages accumulate between flushes: each write then
carries several messages, and throughput keeps growing with load while latency grows only by the spacing
(capped by ``max_delay_s``). Under light load a flush takes microseconds, so the spacing is negligible.
"""

from __future__ import annotations


class FlushPacer:
    __slots__ = ("earliest", "idle_factor", "max_delay_s")

    def __init__(self, busy_share: float = 0.6, max_delay_s: float = 0.2) -> None:
        if not 0 < busy_share <= 1:
            raise ValueError("busy_share must be in (0, 1]")
        # After a flush of duration d, wait d * idle_factor so that flushing is busy_share of the time.
        self.idle_factor = (1 - busy_share) / busy_share
        self.max_delay_s = max_delay_s
        self.earliest = 0.0

    def record(self, started: float, finished: float) -> None:
        """A flush ran from ``started`` to ``finished`` (loop clock, seconds)."""
        self.earliest = finished + min(self.max_delay_s, (finished - started) * self.idle_factor)

    def delay(self, now: float) -> float:
        """Seconds to wait before the next flush may run."""
        return max(0.0, self.earliest - now)
