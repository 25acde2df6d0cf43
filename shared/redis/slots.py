"""Redis Cluster's key space, without I/O: which of the 16 384 hash slots a key or shard channel belongs to
(:func:`key_slot`, CRC16-XMODEM of the key or of its ``{hash tag}``), which primary serves each slot
(:class:`SlotMap`, read from a ``CLUSTER SLOTS`` reply), what a ``-MOVED``/``-ASK`` redirection says
(:func:`parse_redirect`), and one fence key name per slot (:func:`fence_tags`).

Why fence keys per slot: a Lua script in a cluster may touch only keys of one slot, so the publish script cannot
read the leader lease (another slot) to refuse a deposed leader. Instead every slot carries a small key holding the
highest fencing epoch any leader announced there, and the script refuses a lower one (docs/architecture.md,
"Fencing"). A key lands in a slot through its hash tag, so each slot needs a tag whose CRC hits it: found once, by
trying short names in order, the same in every process.
"""

from __future__ import annotations

import binascii
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

SLOTS = 16384

Address = tuple[str, int]


def hash_tag(key: bytes) -> bytes:
    """The part of ``key`` Redis hashes: the text of its first non-empty ``{...}``, else the whole key."""
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            return key[start + 1 : end]
    return key


def key_slot(key: bytes | str) -> int:
    """The hash slot of a key or shard channel (Redis' ``keyHashSlot``)."""
    data = key.encode() if isinstance(key, str) else key
    # binascii.crc_hqx is CRC-CCITT with the given start value: with 0 it is XMODEM, Redis' CRC16.
    return binascii.crc_hqx(hash_tag(data), 0) & (SLOTS - 1)


@dataclass(frozen=True, slots=True)
class Redirect:
    """A ``-MOVED <slot> <host>:<port>`` (the slot lives there now) or ``-ASK`` (this once, during a migration)."""

    ask: bool
    slot: int
    address: Address


def parse_redirect(message: str) -> Redirect | None:
    """The redirection in an error reply's text, or None if it is no redirection."""
    kind, _, rest = message.partition(" ")
    if kind not in ("MOVED", "ASK"):
        return None
    slot_text, _, where = rest.strip().partition(" ")
    host, _, port_text = where.rpartition(":")
    try:
        slot, port = int(slot_text), int(port_text)
    except ValueError:
        return None
    return Redirect(kind == "ASK", slot, (host.strip("[]"), port))


class SlotMap:
    """Which primary serves each slot (None: not served), and every node the reply named, primaries and replicas.
    Built from one ``CLUSTER SLOTS`` reply; a ``-MOVED`` patches one slot until the next full read."""

    __slots__ = ("_owners", "nodes", "primaries")

    def __init__(self, owners: list[Address | None], nodes: Sequence[Address], primaries: Sequence[Address]) -> None:
        self._owners = owners
        self.nodes = tuple(nodes)
        self.primaries = tuple(primaries)

    @classmethod
    def empty(cls) -> SlotMap:
        return cls([None] * SLOTS, (), ())

    @classmethod
    def from_cluster_slots(cls, reply: Any, *, fallback_host: str) -> SlotMap:
        """From ``CLUSTER SLOTS``: ``[[first, last, [host, port, id, ...], replica..., ...], ...]`` (hosts and ids as
        bytes or str). An empty host means the node answering (``fallback_host``). ``ValueError`` if the reply has
        another shape."""
        owners: list[Address | None] = [None] * SLOTS
        nodes: dict[Address, None] = {}
        primaries: dict[Address, None] = {}
        if not isinstance(reply, list):
            raise ValueError(f"CLUSTER SLOTS answered {reply!r}")
        for entry in reply:
            if not isinstance(entry, list) or len(entry) < 3:
                raise ValueError(f"CLUSTER SLOTS entry {entry!r}")
            first, last = int(entry[0]), int(entry[1])
            if not 0 <= first <= last < SLOTS:
                raise ValueError(f"CLUSTER SLOTS range {first}-{last}")
            addresses = [_address(node, fallback_host) for node in entry[2:]]
            primary = addresses[0]
            primaries[primary] = None
            for address in addresses:
                nodes[address] = None
            for slot in range(first, last + 1):
                owners[slot] = primary
        return cls(owners, list(nodes), list(primaries))

    def owner(self, slot: int) -> Address | None:
        return self._owners[slot]

    def covered(self) -> int:
        """How many slots some primary serves (16 384 in a healthy cluster)."""
        return sum(1 for owner in self._owners if owner is not None)

    def moved_to(self, slot: int, address: Address) -> None:
        """A ``-MOVED`` said where one slot lives now."""
        self._owners[slot] = address
        if address not in self.primaries:
            self.primaries = (*self.primaries, address)
        if address not in self.nodes:
            self.nodes = (*self.nodes, address)

    def slots_of(self, address: Address) -> list[int]:
        return [slot for slot, owner in enumerate(self._owners) if owner == address]


def _address(node: Any, fallback_host: str) -> Address:
    if not isinstance(node, list) or len(node) < 2:
        raise ValueError(f"CLUSTER SLOTS node {node!r}")
    host = node[0].decode() if isinstance(node[0], bytes) else str(node[0])
    return (host or fallback_host, int(node[1]))


_fence_tags: tuple[str, ...] | None = None


def fence_tags() -> tuple[str, ...]:
    """For each slot, a short hash tag (``f`` + base-36 digits) whose key lands in that slot; computed once per
    process (about 160 000 CRCs, some tens of milliseconds), identical in every process."""
    global _fence_tags
    if _fence_tags is None:
        found: list[str | None] = [None] * SLOTS
        missing = SLOTS
        counter = 0
        while missing:
            tag = "f" + _base36(counter)
            counter += 1
            slot = binascii.crc_hqx(tag.encode(), 0) & (SLOTS - 1)
            if found[slot] is None:
                found[slot] = tag
                missing -= 1
        _fence_tags = tuple(tag for tag in found if tag is not None)
    return _fence_tags


def _base36(number: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    text = ""
    while True:
        number, rest = divmod(number, 36)
        text = digits[rest] + text
        if not number:
            return text


def redis_version(info_server: str) -> tuple[int, ...]:
    """``redis_version`` from ``INFO server`` text, as a tuple of ints ((0,) if absent)."""
    for line in info_server.splitlines():
        if line.startswith("redis_version:"):
            parts = line.partition(":")[2].strip().split(".")
            try:
                return tuple(int(part) for part in parts)
            except ValueError:
                return (0,)
    return (0,)
