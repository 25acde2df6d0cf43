"""The per-stream sequencer (pure): deliver in order, drop duplicates, hold and repair gaps, follow new epochs."""

from __future__ import annotations

from hypothesis import given, strategies as st

from gateway.sequencer import StreamCursor, Verdict
from shared.frames import Publication


def pub(seq: int, epoch: int = 7) -> Publication:
    return Publication(epoch=epoch, seq=seq, published_at_ms=0, payload=b"%d:%d" % (epoch, seq))


def test_the_first_publication_and_its_successors_are_delivered() -> None:
    cursor = StreamCursor()
    assert [cursor.judge(pub(seq)) for seq in (5, 6, 7)] == [Verdict.DELIVER] * 3
    assert cursor.seq == 7


def test_an_old_or_repeated_seq_is_a_duplicate() -> None:
    cursor = StreamCursor()
    cursor.judge(pub(5))
    assert cursor.judge(pub(5)) is Verdict.DUPLICATE
    assert cursor.judge(pub(3)) is Verdict.DUPLICATE


def test_a_gap_holds_newer_publications_until_history_fills_it() -> None:
    cursor = StreamCursor()
    cursor.judge(pub(1))
    assert cursor.judge(pub(4)) is Verdict.REPAIR
    assert cursor.judge(pub(5)) is Verdict.HELD
    assert cursor.repairing and cursor.seq == 1  # history is read after seq 1
    result = cursor.finish_repair([pub(2), pub(3), pub(4)])
    assert result.payloads == [b"7:2", b"7:3", b"7:4", b"7:5"]
    assert (result.lost, result.repaired, cursor.seq, cursor.repairing) == (0, True, 5, False)


def test_what_history_cannot_supply_is_counted_lost() -> None:
    cursor = StreamCursor()
    cursor.judge(pub(1))
    cursor.judge(pub(6))
    result = cursor.finish_repair([pub(4), pub(5)])  # 2 and 3 were trimmed away
    assert result.payloads == [b"7:4", b"7:5", b"7:6"]
    assert (result.lost, result.repaired) == (2, False)


def test_a_new_epoch_starting_at_one_is_delivered_at_once() -> None:
    cursor = StreamCursor()
    cursor.judge(pub(40))
    assert cursor.judge(pub(1, epoch=8)) is Verdict.DELIVER
    assert (cursor.epoch, cursor.seq) == (8, 1)


def test_a_new_epoch_seen_late_is_repaired_from_its_history() -> None:
    cursor = StreamCursor()
    cursor.judge(pub(40))
    assert cursor.judge(pub(3, epoch=8)) is Verdict.REPAIR
    # The cursor moved to the new epoch at seq 0, so reading its history after 0 already covers everything.
    assert (cursor.epoch, cursor.seq) == (8, 0) and not cursor.history_needs_full_read([])
    result = cursor.finish_repair([pub(1, epoch=8), pub(2, epoch=8), pub(3, epoch=8)])
    assert result.payloads == [b"8:1", b"8:2", b"8:3"]
    assert result.lost == 0


def test_after_a_reconnect_history_read_past_an_epoch_change_asks_for_a_full_read() -> None:
    cursor = StreamCursor()
    cursor.judge(pub(10))
    assert cursor.begin_repair() and not cursor.begin_repair()  # one repair at a time
    assert cursor.judge(pub(2, epoch=9)) is Verdict.HELD
    assert cursor.history_needs_full_read([pub(11, epoch=9)])
    result = cursor.finish_repair([pub(1, epoch=9), pub(2, epoch=9)])
    assert result.payloads == [b"9:1", b"9:2"]


@given(
    total=st.integers(min_value=1, max_value=60),
    missed=st.sets(st.integers(min_value=2, max_value=60)),
    duplicated=st.sets(st.integers(min_value=1, max_value=60)),
)
def test_with_full_history_every_message_is_delivered_once_in_order(
    total: int, missed: set[int], duplicated: set[int]
) -> None:
    """Live delivery loses some publications and repeats others; repairs read from complete history."""
    cursor = StreamCursor()
    delivered: list[bytes] = []
    history = [pub(seq) for seq in range(1, total + 1)]
    for seq in range(1, total + 1):
        if seq in missed:
            continue
        for _ in range(2 if seq in duplicated else 1):
            verdict = cursor.judge(pub(seq))
            if verdict is Verdict.DELIVER:
                delivered.append(pub(seq).payload)
            elif verdict is Verdict.REPAIR:
                # The repair finishes before the next live message here (the relay may finish it later: held).
                after = cursor.seq
                delivered += cursor.finish_repair([p for p in history if p.seq > after and p.seq < seq]).payloads
    # Trailing losses stay invisible until a later message arrives (as on a live stream): check up to cursor.seq.
    expected = [pub(seq).payload for seq in range(1, cursor.seq + 1)]
    assert delivered == expected
