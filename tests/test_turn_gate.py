"""The turn gate (gateway/turn_gate.py): at most ``per_turn`` callables per event-loop turn, the rest in arrival
order on later turns, on a real event loop."""

from __future__ import annotations

import asyncio

import pytest

from gateway.turn_gate import TurnGate


async def _turns_until(turns: int = 50) -> None:
    for _ in range(turns):
        await asyncio.sleep(0)


async def test_at_most_per_turn_run_in_one_turn_the_rest_in_order_on_later_turns() -> None:
    gate = TurnGate(3, "test work")
    ran: list[tuple[int, int]] = []  # (turn, item)
    turn = 0

    async def count_turns() -> None:
        nonlocal turn
        while True:
            await asyncio.sleep(0)
            turn += 1

    counter = asyncio.create_task(count_turns())
    await asyncio.sleep(0)
    for item in range(10):
        gate.run_soon(lambda item=item: ran.append((turn, item)))  # type: ignore[misc]
    assert [item for _, item in ran] == [0, 1, 2], "the first three of the turn run at once"
    assert gate.waiting == 7
    await _turns_until()
    counter.cancel()
    assert [item for _, item in ran] == list(range(10)), "everything ran, in arrival order"
    per_turn: dict[int, int] = {}
    for at, _ in ran:
        per_turn[at] = per_turn.get(at, 0) + 1
    assert max(per_turn.values()) <= 3, per_turn
    assert len(per_turn) >= 4, f"ten items at three a turn take four turns: {per_turn}"
    assert gate.waiting == 0


async def test_a_new_turn_has_room_again_and_the_queue_keeps_its_order() -> None:
    gate = TurnGate(2, "test work")
    ran: list[str] = []
    for name in "abcd":
        gate.run_soon(lambda name=name: ran.append(name))  # type: ignore[misc]
    assert ran == ["a", "b"]
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    # Arriving while others wait: queued behind them even if this turn had room.
    gate.run_soon(lambda: ran.append("e"))
    await _turns_until()
    assert ran == ["a", "b", "c", "d", "e"]
    # Once the queue is empty, work runs at once again.
    gate.run_soon(lambda: ran.append("f"))
    assert ran[-1] == "f"


async def test_zero_per_turn_is_no_gate() -> None:
    gate = TurnGate(0, "test work")
    ran: list[int] = []
    for item in range(100):
        gate.run_soon(lambda item=item: ran.append(item))  # type: ignore[misc]
    assert ran == list(range(100))
    assert gate.waiting == 0


async def test_enter_says_whether_to_go_ahead_and_calls_back_later_otherwise() -> None:
    gate = TurnGate(1, "test work")
    resumed: list[str] = []
    assert gate.enter(lambda: resumed.append("first")) is True
    assert gate.enter(lambda: resumed.append("second")) is False
    assert resumed == []
    await _turns_until()
    assert resumed == ["second"]


async def test_one_failing_callable_is_reported_and_the_queue_goes_on() -> None:
    loop = asyncio.get_running_loop()
    reports: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, context: reports.append(context))
    try:
        gate = TurnGate(1, "closing a connection")
        ran: list[int] = []

        def broken() -> None:
            raise RuntimeError("socket gone wrong")

        gate.run_soon(lambda: ran.append(0))
        gate.run_soon(broken)
        gate.run_soon(lambda: ran.append(2))
        await _turns_until()
    finally:
        loop.set_exception_handler(None)
    assert ran == [0, 2]
    assert len(reports) == 1
    assert reports[0]["message"] == "closing a connection from the gate's queue failed"
    assert isinstance(reports[0]["exception"], RuntimeError)


async def test_a_broken_callable_run_at_once_raises_to_its_caller() -> None:
    def broken() -> None:
        raise RuntimeError("now")

    with pytest.raises(RuntimeError):
        TurnGate(1, "test work").run_soon(broken)
