"""Per-stream ordering of broker publications: deliver, drop a duplicate, or hold back and repair a gap (pure).

Every publication carries ``(epoch, seq)`` (docs/architecture.md, "The Redis wire contract"). A
:class:`StreamCursor` remembers the last delivered pair of one stream and judges the next publication: seq + 1 is
delivered at once; an older seq is a duplicate (a history replay overlapping live delivery); a jump forward is a
gap. While a gap is being repaired, newer publications are held in the cursor, in arrival order; the relay reads
the missed ones from the broker's history and hands them to :meth:`StreamCursor.finish_repair`, which merges
history and held publications into the payloads to deliver, in order and without duplicates, and counts what
history could not supply. A new epoch (the broker lost the stream's state) restarts the sequence at 1; new-epoch
publications missed before the first one seen are repaired from the new epoch's history like any other gap.
No I/O and no event loop: the relay (gateway/relay.py) does the reading and the delivering.
"""

from __future__ import annotations

from enum import Enum

from shared.frames import Publication


class Verdict(Enum):
    DELIVER = "deliver"  # the next publication: deliver it now
    DUPLICATE = "duplicate"  # already delivered: drop it
    HELD = "held"  # a repair is under way: kept until it finishes
    REPAIR = "repair"  # a gap opened: held, and the caller starts a repair (read history after :attr:`seq`)


class RepairResult:
    __slots__ = ("lost", "payloads", "repaired")

    def __init__(self, payloads: list[bytes], lost: int, repaired: bool) -> None:
        self.payloads = payloads  # to deliver, in order
        self.lost = lost  # sequence numbers neither history nor the held publications covered
        self.repaired = repaired  # history supplied something and nothing was lost


class StreamCursor:
    """The delivery position of one stream, and the publications held while a gap is repaired."""

    __slots__ = ("epoch", "held", "seq")

    def __init__(self) -> None:
        self.epoch: int | None = None  # None until the first publication
        self.seq = 0
        self.held: list[Publication] | None = None  # not None while a repair is under way

    @property
    def repairing(self) -> bool:
        return self.held is not None

    def judge(self, publication: Publication) -> Verdict:
        held = self.held
        if held is not None:
            held.append(publication)
            return Verdict.HELD
        if self.epoch is None:
            self.epoch, self.seq = publication.epoch, publication.seq
            return Verdict.DELIVER
        if publication.epoch != self.epoch:
            # The broker lost the stream's state and restarted its sequence at 1 in a new epoch. Accepting any seq
            # here would silently drop the new epoch's first messages when they missed pub/sub: repair them from the
            # new epoch's history (which holds nothing older) like any other gap.
            self.epoch, self.seq = publication.epoch, 0
            if publication.seq != 1:
                self.held = [publication]
                return Verdict.REPAIR
            self.seq = 1
            return Verdict.DELIVER
        if publication.seq == self.seq + 1:
            self.seq = publication.seq
            return Verdict.DELIVER
        if publication.seq <= self.seq:
            return Verdict.DUPLICATE
        self.held = [publication]
        return Verdict.REPAIR

    def begin_repair(self) -> bool:
        """Hold new publications until a repair finishes (after a broker reconnect: anything may have been
        missed). False when a repair is already under way (it covers this too)."""
        if self.held is not None:
            return False
        self.held = []
        return True

    def history_needs_full_read(self, history: list[Publication]) -> bool:
        """A history read after :attr:`seq` met another epoch: the broker lost the stream's state while we were
        away, its history now holds only the new epoch from seq 1, and the read skipped that up to our old seq."""
        epoch = self.epoch
        return any(publication.epoch != epoch for publication in history) or any(
            publication.epoch != epoch for publication in self.held or ()
        )

    def finish_repair(self, history: list[Publication]) -> RepairResult:
        """Merge what history supplied with the publications held meanwhile: every payload after :attr:`seq`, in
        order, once; the cursor ends on the last one."""
        held, self.held = self.held or [], None
        expected = self.seq + 1
        lost = 0
        payloads: list[bytes] = []
        for publication in [*history, *held]:
            if publication.epoch != self.epoch:
                # The sequence restarts in the new epoch: its seq 1 is the next message (what history could not
                # supply from there is counted as lost below, like any gap).
                self.epoch, self.seq = publication.epoch, 0
                expected = 1
            if publication.seq < expected:
                continue
            lost += publication.seq - expected
            self.seq = publication.seq
            expected = publication.seq + 1
            payloads.append(publication.payload)
        return RepairResult(payloads, lost, repaired=bool(history) and not lost)
