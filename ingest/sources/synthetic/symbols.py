"""What the synthetic market knows about a symbol before it simulates anything, and the fixed-point arithmetic
its payloads are written in. ``symbol_spec`` gives a symbol's starting price, tick and lot step (close to the
real markets' figures for the well-known symbols, deterministic made-up ones for any other), ``SymbolSpec.info``
what exchangeInfo says about it. Every price and quantity is an integer count of 1e-8 "atoms", so ``fixed8``
prints Binance's 8-decimal strings exactly and no float ever reaches a payload. Pure: no I/O.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from shared.binance.exchange_info import SymbolInfo, split_symbol
from shared.settings import DEFAULT_SYMBOLS as DEFAULT_SYMBOLS  # the market's symbols unless configured

ATOMS_PER_UNIT = 100_000_000  # every price and quantity string has 8 decimals


def fixed8(atoms: int) -> str:
    """An integer count of 1e-8 units as Binance's 8-decimal string (``123400000`` -> ``"1.23400000"``)."""
    sign = "-" if atoms < 0 else ""
    whole, fraction = divmod(abs(atoms), ATOMS_PER_UNIT)
    return f"{sign}{whole}.{fraction:08d}"


def divide_rounded(numerator: int, denominator: int) -> int:
    """numerator / denominator rounded half to even, exactly (denominator > 0)."""
    quotient, remainder = divmod(abs(numerator), denominator)
    if 2 * remainder > denominator or (2 * remainder == denominator and quotient % 2 == 1):
        quotient += 1
    return -quotient if numerator < 0 else quotient


def percent3(change_atoms: int, base_atoms: int) -> str:
    """Percentage change with 3 decimals, as in the ticker's ``P`` (``"1.224"``)."""
    thousandths = divide_rounded(change_atoms * 100_000, base_atoms) if base_atoms else 0
    sign = "-" if thousandths < 0 else ""
    whole, fraction = divmod(abs(thousandths), 1000)
    return f"{sign}{whole}.{fraction:03d}"


@dataclass(frozen=True, slots=True)
class SymbolSpec:
    """Static facts about a simulated symbol, in 1e-8 atoms. ``tick_atoms * step_atoms`` is a multiple of
    1e8, so the quote value of any trade (price x quantity) is exact at 8 decimals."""

    symbol: str
    base_asset: str
    quote_asset: str
    price_atoms: int  # starting price
    tick_atoms: int
    step_atoms: int

    def info(self) -> SymbolInfo:
        max_qty_atoms = (900_000_000 * ATOMS_PER_UNIT * ATOMS_PER_UNIT // self.price_atoms) // self.step_atoms
        return SymbolInfo(
            symbol=self.symbol,
            base_asset=self.base_asset,
            quote_asset=self.quote_asset,
            tick_size=fixed8(self.tick_atoms),
            step_size=fixed8(self.step_atoms),
            min_price=fixed8(self.tick_atoms),
            max_price=fixed8(self.price_atoms * 1000),
            min_qty=fixed8(self.step_atoms),
            max_qty=fixed8(max_qty_atoms * self.step_atoms),
        )


# symbol -> (starting price, tick size, step size), all in atoms; close to the real markets' figures.
_KNOWN_SPECS: dict[str, tuple[int, int, int]] = {
    "BTCUSDT": (94_250 * ATOMS_PER_UNIT, 1_000_000, 1_000),
    "ETHUSDT": (3_300 * ATOMS_PER_UNIT, 1_000_000, 10_000),
    "BNBUSDT": (690 * ATOMS_PER_UNIT, 1_000_000, 100_000),
    "SOLUSDT": (190 * ATOMS_PER_UNIT, 1_000_000, 100_000),
    "XRPUSDT": (220_000_000, 10_000, 10_000_000),
}
_MADE_UP_TICK_ATOMS = 100_000  # 0.001
_MADE_UP_STEP_ATOMS = 1_000_000  # 0.01


def symbol_spec(symbol: str) -> SymbolSpec:
    """The spec of a known symbol, or a deterministic made-up one (price 1.000-900.999) for any other."""
    upper = symbol.upper()
    base, quote = split_symbol(upper)
    known = _KNOWN_SPECS.get(upper)
    if known is not None:
        price, tick, step = known
        return SymbolSpec(upper, base, quote, price, tick, step)
    digest = int.from_bytes(hashlib.sha256(upper.encode()).digest()[:8], "big")
    price_ticks = 1000 + digest % 900_000
    return SymbolSpec(upper, base, quote, price_ticks * _MADE_UP_TICK_ATOMS, _MADE_UP_TICK_ATOMS, _MADE_UP_STEP_ATOMS)
