"""Per-IP request-weight budget per wall-clock minute, as Binance counts ``X-MBX-USED-WEIGHT-1M`` (pure).

Each request costs its endpoint's weight; an IP that would exceed ``limit`` within the current minute is refused
(the caller answers 429 with ``Retry-After`` = seconds until the minute rolls over) and the refused request is
not charged, so a client that backs off as told gets its full budget back at the next minute. Counters are
kept only for the current minute, so memory is bounded by the number of IPs seen in one minute. The budget is
per gateway replica: behind a load balancer an IP's effective limit is the per-replica limit times the
replicas it reaches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

WINDOW_S = 60.0


@dataclass(frozen=True, slots=True)
class Charge:
    allowed: bool
    used: int  # the IP's weight used in this minute, including this request when allowed
    retry_after_s: int  # when refused: seconds until the next minute


class WeightLimiter:
    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit!r}")
        self.limit = limit
        self._window = -1
        self._used: dict[str, int] = {}

    def charge(self, ip: str, weight: int, now_s: float) -> Charge:
        window = int(now_s // WINDOW_S)
        if window != self._window:
            self._window = window
            self._used.clear()
        used = self._used.get(ip, 0)
        if used + weight > self.limit:
            return Charge(False, used, max(1, math.ceil((window + 1) * WINDOW_S - now_s)))
        self._used[ip] = used + weight
        return Charge(True, used + weight, 0)
