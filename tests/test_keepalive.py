"""The keepalive schedule (pure): every connection pinged once per interval in slices, one ping outstanding at a
time, a missed pong reported once its deadline passes, pongs and removals cancel deadlines."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

from gateway.ws.keepalive import KeepaliveSchedule


class Conn:
    def __init__(self, name: str) -> None:
        self.name = name
        self.ping_deadline = 0.0

    def __repr__(self) -> str:
        return self.name


def run(schedule: KeepaliveSchedule[Conn], start: float, ticks: int) -> Iterator[tuple[float, list[Conn], list[Conn]]]:
    """Tick by tick, lazily: the caller answers pings between ticks."""
    for index in range(ticks):
        now = start + index * schedule.tick_s
        due, overdue = schedule.tick(now)
        yield now, due, overdue


def test_every_connection_is_pinged_once_per_interval_in_slices() -> None:
    schedule: KeepaliveSchedule[Conn] = KeepaliveSchedule(interval_s=20.0, timeout_s=60.0)
    assert schedule.tick_s == 0.25  # 80 slots of a 20 s interval
    conns = [Conn(f"c{i}") for i in range(400)]
    for conn in conns:
        schedule.add(conn)
    pinged: dict[str, list[float]] = {}
    for now, due, overdue in run(schedule, 0.0, 80):
        assert not overdue
        assert len(due) <= 400 // 80 + 1  # a slice, not a burst
        for conn in due:
            pinged.setdefault(conn.name, []).append(now)
            conn.ping_deadline = 0.0  # it answered
    assert sorted(pinged) == sorted(conn.name for conn in conns)  # each exactly once per interval
    assert all(len(times) == 1 for times in pinged.values())


def test_connections_arriving_together_are_spread_and_first_pinged_within_one_interval() -> None:
    schedule: KeepaliveSchedule[Conn] = KeepaliveSchedule(interval_s=1.0, timeout_s=3.0)
    schedule.tick(0.0)
    storm = [Conn(f"s{i}") for i in range(40)]  # a reconnect storm between two ticks
    for conn in storm:
        schedule.add(conn)
    first: dict[str, float] = {}
    for now, due, _ in run(schedule, 0.25, 4):
        assert len(due) == 10  # 40 over 4 slots, not one burst
        for conn in due:
            first[conn.name] = now
            conn.ping_deadline = 0.0
    assert len(first) == 40 and max(first.values()) - 0.25 <= 1.0


def test_a_missed_pong_is_reported_after_the_timeout_and_no_second_ping_is_sent_meanwhile() -> None:
    schedule: KeepaliveSchedule[Conn] = KeepaliveSchedule(interval_s=1.0, timeout_s=2.0)
    silent, polite = Conn("silent"), Conn("polite")
    schedule.add(silent)
    schedule.add(polite)
    pings = {"silent": 0, "polite": 0}
    closed_at = pinged_at = None
    for now, due, overdue in run(schedule, 0.0, 24):
        for conn in due:
            pings[conn.name] += 1
            if conn is polite:
                conn.ping_deadline = 0.0
            else:
                pinged_at = now
        if overdue:
            assert overdue == [silent] and closed_at is None
            closed_at = now
    assert pings["silent"] == 1  # one ping outstanding at a time
    assert pings["polite"] >= 5
    assert closed_at is not None and pinged_at is not None
    assert 2.0 <= closed_at - pinged_at <= 2.0 + schedule.tick_s + 1e-9
    assert len(schedule) == 1  # the overdue connection left the schedule


def test_a_pong_or_a_removal_cancels_the_deadline() -> None:
    schedule: KeepaliveSchedule[Conn] = KeepaliveSchedule(interval_s=1.0, timeout_s=1.5)
    answered, gone = Conn("answered"), Conn("gone")
    schedule.add(answered)
    schedule.add(gone)
    results = list(run(schedule, 0.0, 4))
    assert {c.name for _, due, _ in results for c in due} == {"answered", "gone"}
    answered.ping_deadline = 0.0  # its pong arrived
    schedule.remove(gone)
    for _, due, overdue in run(schedule, 1.0, 12):  # past both first deadlines
        assert not overdue
        assert gone not in due
        for conn in due:
            conn.ping_deadline = 0.0
    assert len(schedule) == 1


def test_short_intervals_tick_four_times_per_interval() -> None:
    schedule: KeepaliveSchedule[Conn] = KeepaliveSchedule(interval_s=0.2, timeout_s=0.6)
    assert abs(schedule.tick_s - 0.05) < 1e-12
    conn = Conn("c")
    schedule.add(conn)
    schedule.add(conn)  # idempotent
    assert len(schedule) == 1


def test_a_closed_connection_is_not_kept_alive_by_its_pending_deadline() -> None:
    schedule: KeepaliveSchedule[Conn] = KeepaliveSchedule(interval_s=1.0, timeout_s=60.0)
    conn = Conn("gone")
    schedule.add(conn)
    assert any(conn in due for _, due, _ in run(schedule, 0.0, 4))  # pinged: a 60 s deadline is queued
    schedule.remove(conn)
    ref = weakref.ref(conn)
    del conn
    gc.collect()
    assert ref() is None  # the queued deadline held it weakly
    assert all(not overdue for _, _, overdue in run(schedule, 61.0, 4))


def test_pings_allocate_nothing_per_connection_that_outlives_the_tick() -> None:
    """Objects kept for a whole pong timeout would be promoted to the oldest GC generation and bring back full
    collections, whose pauses grow with the number of connections: the schedule keeps one entry per tick."""
    schedule: KeepaliveSchedule[Conn] = KeepaliveSchedule(interval_s=1.0, timeout_s=60.0)
    conns = [Conn(f"c{i}") for i in range(4000)]
    for conn in conns:
        schedule.add(conn)
    gc.collect()
    gc.disable()
    try:
        before = gc.get_count()[0]
        pinged = 0
        for _, due, _ in run(schedule, 0.0, 40):  # ten intervals: every connection pinged ten times
            pinged += len(due)
            for conn in due:
                conn.ping_deadline = 0.0
        grown = gc.get_count()[0] - before  # GC-tracked objects allocated and still alive
    finally:
        gc.enable()
    assert pinged == 40_000
    assert grown < 200, grown  # about one deadline entry per tick, not one per ping
