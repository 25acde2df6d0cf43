"""What a publish that went out in part reports. On one Redis the calls of a batch run in order, so "the first N were
confirmed" says it all (:class:`shared.errors.PublishIncomplete`); on a cluster a batch is split by shard, and one
shard may confirm its calls while another is failing over, so the confirmed calls are no prefix:
:class:`PartiallyPublished` names the ones that were not. Within one stream they are always the last ones (a
stream's calls go to one shard, in order, and a shard that fails one does not run the later ones), so whoever holds
them back and sends them again keeps every stream's order."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from shared.errors import PublishIncomplete

T = TypeVar("T")


class PartiallyPublished(PublishIncomplete):
    """``unconfirmed``: indices (into the batch, ascending) of the calls Redis did not confirm; every other call was
    published (or dropped as a duplicate). ``confirmed`` keeps its meaning: the calls before the first unconfirmed."""

    def __init__(self, message: str, unconfirmed: Sequence[int]) -> None:
        self.unconfirmed = tuple(sorted(unconfirmed))
        super().__init__(message, self.unconfirmed[0] if self.unconfirmed else 0)

    def split(self, batch: Sequence[T]) -> tuple[list[T], list[T]]:
        """``(published, not published)``, each in batch order."""
        missing = set(self.unconfirmed)
        done = [item for index, item in enumerate(batch) if index not in missing]
        return done, [batch[index] for index in self.unconfirmed]
