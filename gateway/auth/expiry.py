"""When credentials run out: one heap of (deadline, item) for the whole process (pure: times are passed in).

Expiry must cost nothing per message, and nothing per connection beyond one heap entry: the authenticator keeps
one timer armed for :meth:`ExpirySchedule.next_deadline` and calls :meth:`ExpirySchedule.due` when it fires. A
refreshed credential simply gets a new deadline; the old heap entry is skipped when it surfaces (lazy deletion),
and the heap is rebuilt when such dead entries outnumber the live ones, so connection churn cannot grow it.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Generic, TypeVar

T = TypeVar("T")  # hashable: items are dictionary keys


class ExpirySchedule(Generic[T]):
    def __init__(self) -> None:
        self._deadlines: dict[T, float] = {}  # the live deadline of each item
        self._heap: list[tuple[float, int, T]] = []
        self._order = itertools.count()  # ties never compare the items themselves

    def __len__(self) -> int:
        return len(self._deadlines)

    def set(self, item: T, deadline: float) -> None:
        """``item`` expires at ``deadline`` (replacing any earlier deadline it had)."""
        self._deadlines[item] = deadline
        heapq.heappush(self._heap, (deadline, next(self._order), item))
        self._compact()

    def remove(self, item: T) -> None:
        if self._deadlines.pop(item, None) is not None:
            self._compact()

    def deadline(self, item: T) -> float | None:
        return self._deadlines.get(item)

    def next_deadline(self) -> float | None:
        """The earliest live deadline, or None when nothing is scheduled."""
        heap = self._heap
        while heap and self._deadlines.get(heap[0][2]) != heap[0][0]:
            heapq.heappop(heap)  # a removed item, or one whose deadline moved
        return heap[0][0] if heap else None

    def due(self, now: float) -> list[T]:
        """The items whose deadline is at or before ``now``, removed from the schedule."""
        expired: list[T] = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            deadline, _, item = heapq.heappop(heap)
            if self._deadlines.get(item) == deadline:
                del self._deadlines[item]
                expired.append(item)
        return expired

    def _compact(self) -> None:
        if len(self._heap) > 2 * len(self._deadlines) + 64:
            self._heap = [(deadline, next(self._order), item) for item, deadline in self._deadlines.items()]
            heapq.heapify(self._heap)
