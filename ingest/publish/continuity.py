"""Per-stream continuity of what ingest published: duplicates, gaps and the backfill plan for a gap (pure).

:class:`Continuity` remembers the identity of the last event published on each stream (see
:mod:`shared.binance.identity`) and judges the next one: a duplicate (not above the last: the overlap of two
connections or two processes), the next event, or — for streams with contiguous ids — a gap of known ids.
:func:`plan_backfill` bounds what is fetched for one gap. No I/O here; ``ingest.publish.publisher`` acts on the
verdicts.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from enum import Enum

from shared.broker.contract import EventId


class Verdict(Enum):
    NEW = "new"  # publish it (the next event, or a stream with nothing to compare against)
    DUPLICATE = "duplicate"  # already published: drop it
    GAP = "gap"  # ids are missing before it (only for contiguous streams)


@dataclass(frozen=True, slots=True)
class IdRange:
    """Ids ``first``..``last`` inclusive (never empty)."""

    first: int
    last: int

    def __post_init__(self) -> None:
        if self.last < self.first:
            raise ValueError(f"empty id range {self.first}..{self.last}")

    @property
    def count(self) -> int:
        return self.last - self.first + 1

    def __str__(self) -> str:
        return f"{self.first}..{self.last}"


@dataclass(frozen=True, slots=True)
class Judgement:
    verdict: Verdict
    missing: IdRange | None = None  # set for GAP


NEW = Judgement(Verdict.NEW)  # judgements are immutable: the two without a range are shared (one per event is hot)
DUPLICATE = Judgement(Verdict.DUPLICATE)


class Continuity:
    """Last published identity per stream. ``judge`` does not record; ``advance`` does, once published."""

    def __init__(self) -> None:
        self._last: dict[str, int] = {}

    def last(self, stream: str) -> int | None:
        return self._last.get(stream)

    def judge(self, stream: str, event: EventId, *, contiguous: bool) -> Judgement:
        last = self._last.get(stream)
        if last is None:
            return NEW
        if event.last <= last:
            return DUPLICATE
        if contiguous and event.first > last + 1:
            return Judgement(Verdict.GAP, IdRange(last + 1, event.first - 1))
        return NEW

    def advance(self, stream: str, last_id: int) -> None:
        """Record ``last_id`` as published on ``stream`` (never moves backwards)."""
        current = self._last.get(stream)
        if current is None or last_id > current:
            self._last[stream] = last_id

    def prime(self, last_ids: Mapping[str, int]) -> None:
        """Start from what was published before (another process's last identities, read from the broker)."""
        for stream, last_id in last_ids.items():
            self.advance(stream, last_id)

    def forget(self, streams: Iterable[str]) -> None:
        """Streams no longer carried: when one comes back, its first event is not measured against this one, so
        the time nobody wanted it is not taken for a gap."""
        for stream in streams:
            self._last.pop(stream, None)

    def clear(self) -> None:
        self._last.clear()

    @property
    def streams(self) -> frozenset[str]:
        return frozenset(self._last)


@dataclass(frozen=True, slots=True)
class BackfillPlan:
    fetch: IdRange | None  # what to ask the exchange for
    give_up: IdRange | None  # what is declared lost without asking (beyond the per-gap cap)


def plan_backfill(missing: IdRange, max_ids: int) -> BackfillPlan:
    """Fetch at most ``max_ids`` of a gap: the newest ones, so what is published stays contiguous with the live
    events that follow and the one hole (if any) sits at the start of the gap, where it is logged."""
    if max_ids <= 0:
        return BackfillPlan(None, missing)
    if missing.count <= max_ids:
        return BackfillPlan(missing, None)
    first_fetched = missing.last - max_ids + 1
    return BackfillPlan(IdRange(first_fetched, missing.last), IdRange(missing.first, first_fetched - 1))


def missing_ranges(wanted: IdRange, got: Collection[int]) -> list[IdRange]:
    """The ids of ``wanted`` that are not in ``got``, as ranges (for counting and logging what stayed lost)."""
    ranges: list[IdRange] = []
    start: int | None = None
    present = set(got)
    for event_id in range(wanted.first, wanted.last + 1):
        if event_id in present:
            if start is not None:
                ranges.append(IdRange(start, event_id - 1))
                start = None
        elif start is None:
            start = event_id
    if start is not None:
        ranges.append(IdRange(start, wanted.last))
    return ranges
