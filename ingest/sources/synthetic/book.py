"""The synthetic order book's data structures: ``BookSide``, one side's price levels kept sorted best first,
and ``DiffAccumulator``, the levels changed since the last diff-depth event of one speed. Prices are integer
ticks and quantities integer lot steps; how the book moves (quotes drifting, takers sweeping) is the symbol
market's business, not this module's. Pure: no I/O.
"""

from __future__ import annotations

import bisect


class BookSide:
    """One side of an order book: price (ticks) -> quantity (lot steps). Keys are stored negated for bids so
    that index 0 is the best level on both sides."""

    __slots__ = ("_keys", "_sign", "quantities")

    def __init__(self, *, is_bid: bool) -> None:
        self._sign = -1 if is_bid else 1
        self._keys: list[int] = []
        self.quantities: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._keys)

    def price_at(self, index: int) -> int:
        return self._keys[index] * self._sign

    def best(self) -> int:
        return self._keys[0] * self._sign

    def worst(self) -> int:
        return self._keys[-1] * self._sign

    def set(self, price: int, quantity: int) -> None:
        if price not in self.quantities:
            bisect.insort(self._keys, price * self._sign)
        self.quantities[price] = quantity

    def remove(self, price: int) -> None:
        del self.quantities[price]
        key = price * self._sign
        del self._keys[bisect.bisect_left(self._keys, key)]

    def top(self, count: int) -> list[tuple[int, int]]:
        return [(key * self._sign, self.quantities[key * self._sign]) for key in self._keys[:count]]


class DiffAccumulator:
    """Levels changed since the last diff-depth event of one speed (price -> newest quantity, 0 = removed)."""

    __slots__ = ("asks", "bids", "last_update_id")

    def __init__(self, last_update_id: int) -> None:
        self.last_update_id = last_update_id
        self.bids: dict[int, int] = {}
        self.asks: dict[int, int] = {}
