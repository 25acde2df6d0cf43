"""A deterministic synthetic spot market that speaks Binance's stream payloads byte for byte. Each symbol has
an evolving order book (a random-walking anchor price, churning level sizes), bursty taker orders that sweep
the book and print trades, aggregate trades, klines for every interval, a rolling 24 h window (seeded from a
synthesized prior day) for ticker and miniTicker, a 5-minute average price, book tickers and partial and diff
depth with contiguous update ids. ``SyntheticMarket.advance(now_ms, wanted)`` runs the simulation up to a time
and returns the payloads of the wanted streams, stamped with simulated event times. Pure: no I/O, no clock,
no event loop; all prices and quantities are integers (ticks, lot steps, 1e-8 "atoms") so every decimal string
is exact. Each symbol draws from its own ``random.Random`` seeded by (seed, symbol), so a given seed gives
the same market regardless of how ``advance`` calls are chunked, which streams are wanted, or which other
symbols are simulated alongside.
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import math
import random
from collections import deque
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from shared.binance.exchange_info import SymbolInfo, split_symbol
from shared.intervals import candle_window
from shared.streams import DEPTH_LEVELS, KLINE_INTERVALS, MINI_TICKER_ARR

ATOMS_PER_UNIT = 100_000_000  # every price and quantity string has 8 decimals
DEFAULT_SYMBOLS: tuple[str, ...] = ("BTCUSDT", "ETHUSDT", "BNBUSDT", "SOLUSDT", "XRPUSDT")

BOUNDARY_MS = 100  # the fastest periodic cadence (@100ms depth); every other cadence is a multiple of it
SECOND_MS = 1000
MINUTE_MS = 60_000
DAY_MS = 86_400_000
AVG_PRICE_WINDOW_MS = 300_000
KLINE_PUSH_MS = 2000  # Binance pushes open candles every 2 s (every 1 s for the 1s interval)

BOOK_EVENTS_PER_S = 10.0
MIN_LEVELS = 30  # above the deepest partial depth (20) even right after a sweep
MAX_LEVELS = 60
MAX_LEVELS_PER_SWEEP = 3
# Measured mean trades printed per taker order (a sweep can hit several levels and several maker orders per
# level); dividing the requested trade rate by it gives the taker-order rate.
TRADES_PER_ORDER = 1.8
BURST_PROBABILITY = 0.3  # chance that the next taker order follows closely (a burst)
BURST_GAP_FRACTION = 0.1  # mean gap inside a burst, as a fraction of the mean gap
LEVEL_NOTIONAL = 5000  # typical resting size of a level, in quote units
TAKER_NOTIONAL = 800  # typical taker order, in quote units
PRIOR_MINUTE_VOLATILITY = 0.0008  # per-minute price move of the synthesized prior day (about 3 % a day)
BOOK_EVENT_VOLATILITY = 0.00002  # per-book-event move of the anchor price


def fixed8(atoms: int) -> str:
    """An integer count of 1e-8 units as Binance's 8-decimal string (``123400000`` -> ``"1.23400000"``)."""
    sign = "-" if atoms < 0 else ""
    whole, fraction = divmod(abs(atoms), ATOMS_PER_UNIT)
    return f"{sign}{whole}.{fraction:08d}"


def _divide_rounded(numerator: int, denominator: int) -> int:
    """numerator / denominator rounded half to even, exactly (denominator > 0)."""
    quotient, remainder = divmod(abs(numerator), denominator)
    if 2 * remainder > denominator or (2 * remainder == denominator and quotient % 2 == 1):
        quotient += 1
    return -quotient if numerator < 0 else quotient


def _percent3(change_atoms: int, base_atoms: int) -> str:
    """Percentage change with 3 decimals, as in the ticker's ``P`` (``"1.224"``)."""
    thousandths = _divide_rounded(change_atoms * 100_000, base_atoms) if base_atoms else 0
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


class _BookSide:
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


class _DiffAccumulator:
    """Levels changed since the last diff-depth event of one speed (price -> newest quantity, 0 = removed)."""

    __slots__ = ("asks", "bids", "last_update_id")

    def __init__(self, last_update_id: int) -> None:
        self.last_update_id = last_update_id
        self.bids: dict[int, int] = {}
        self.asks: dict[int, int] = {}


class _Candle:
    """One kline: open/high/low/close in ticks, volumes in lot steps, quote volumes in atoms."""

    __slots__ = (
        "close",
        "end_ms",
        "first_id",
        "high",
        "last_id",
        "low",
        "open",
        "open_ms",
        "quote",
        "taker_quote",
        "taker_volume",
        "trades",
        "volume",
    )

    def __init__(self, interval: str, time_ms: int, last_price: int) -> None:
        self.open_ms, self.end_ms = candle_window(interval, time_ms)
        # A candle without trades shows the previous close everywhere, as Binance's do.
        self.open = self.high = self.low = self.close = last_price
        self.volume = self.quote = self.taker_volume = self.taker_quote = self.trades = 0
        self.first_id = self.last_id = -1

    def add(self, trade_id: int, price: int, units: int, quote: int, taker_is_buyer: bool) -> None:
        if self.trades == 0:
            self.open = self.high = self.low = price
            self.first_id = trade_id
        elif price > self.high:
            self.high = price
        elif price < self.low:
            self.low = price
        self.close = price
        self.volume += units
        self.quote += quote
        if taker_is_buyer:
            self.taker_volume += units
            self.taker_quote += quote
        self.trades += 1
        self.last_id = trade_id


class _MinuteBucket:
    """Trades of one minute, the grain of the rolling 24 h window."""

    __slots__ = ("close", "count", "first_id", "high", "last_id", "low", "minute", "open", "quote", "volume")

    def __init__(self, minute: int, price: int, first_id: int) -> None:
        self.minute = minute
        self.open = self.high = self.low = self.close = price
        self.volume = self.quote = self.count = 0
        self.first_id = first_id
        self.last_id = first_id - 1


@dataclass(frozen=True, slots=True)
class _StreamNames:
    """Canonical stream names of one symbol (as ``shared.streams.parse_stream(...).name`` spells them)."""

    trade: str
    agg_trade: str
    book_ticker: str
    mini_ticker: str
    ticker: str
    avg_price: str
    depth: str
    depth_fast: str
    partial: dict[int, str]
    partial_fast: dict[int, str]
    klines: dict[str, str]

    @classmethod
    def of(cls, symbol: str) -> _StreamNames:
        lower = symbol.lower()
        return cls(
            trade=f"{lower}@trade",
            agg_trade=f"{lower}@aggTrade",
            book_ticker=f"{lower}@bookTicker",
            mini_ticker=f"{lower}@miniTicker",
            ticker=f"{lower}@ticker",
            avg_price=f"{lower}@avgPrice",
            depth=f"{lower}@depth",
            depth_fast=f"{lower}@depth@100ms",
            partial={levels: f"{lower}@depth{levels}" for levels in DEPTH_LEVELS},
            partial_fast={levels: f"{lower}@depth{levels}@100ms" for levels in DEPTH_LEVELS},
            klines={interval: f"{lower}@kline_{interval}" for interval in KLINE_INTERVALS},
        )


Output = list[tuple[str, bytes]]


class _SymbolMarket:
    """The whole simulated state of one symbol. Mutations (book events, taker orders) draw from the symbol's
    own random generator; emissions only read state, so what is wanted never changes what happens."""

    def __init__(self, spec: SymbolSpec, *, seed: int, trade_rate_per_s: float, start_ms: int) -> None:
        self.spec = spec
        self.symbol = spec.symbol
        self.names = _StreamNames.of(spec.symbol)
        self.rng = random.Random(f"{seed}:{spec.symbol}")
        rng = self.rng
        self._tick = spec.tick_atoms
        self._step = spec.step_atoms
        start_ticks = spec.price_atoms // spec.tick_atoms

        # Price dynamics, scaled to the price so every symbol moves by similar percentages.
        self.sigma = max(0.6, start_ticks * BOOK_EVENT_VOLATILITY)
        self.gap_max = max(1, round(self.sigma))
        self.floor = max(start_ticks // 10, (MAX_LEVELS + 1) * self.gap_max + 1)
        self.anchor = start_ticks  # bids stay at or below it, asks strictly above
        self.level_units = max(1, LEVEL_NOTIONAL * ATOMS_PER_UNIT * ATOMS_PER_UNIT // (spec.price_atoms * self._step))
        self.taker_units = max(1, TAKER_NOTIONAL * ATOMS_PER_UNIT * ATOMS_PER_UNIT // (spec.price_atoms * self._step))

        # Large, distinct-looking id ranges like a venue that has been running for years.
        self.update_id = 10_000_000_000 + rng.randrange(10_000_000_000)
        self.next_trade_id = 1_000_000_000 + rng.randrange(4_000_000_000)
        self.next_agg_id = 500_000_000 + rng.randrange(2_000_000_000)

        self.bids = _BookSide(is_bid=True)
        self.asks = _BookSide(is_bid=False)
        self._dirty = False
        self.fast_diff = _DiffAccumulator(self.update_id)
        self.slow_diff = _DiffAccumulator(self.update_id)
        self._refill_depth()
        # The opening book is the snapshot state, not a change: nothing is pending and no id was consumed.
        self._dirty = False
        self.fast_diff.bids.clear()
        self.fast_diff.asks.clear()
        self.slow_diff.bids.clear()
        self.slow_diff.asks.clear()
        self.last_top = self._top()

        self.last_price = start_ticks
        self.last_qty = self.taker_units
        self.last_trade_id = self.next_trade_id - 1
        self.last_trade_time = start_ms - 1
        self.changed = True  # the first !miniTicker@arr lists every symbol

        self.candles = {interval: _Candle(interval, start_ms, start_ticks) for interval in KLINE_INTERVALS}

        self.buckets: deque[_MinuteBucket] = deque()
        self.window_volume = self.window_quote = self.window_count = 0
        self.prev_close = start_ticks
        self._closed_high_low: tuple[int, int] | None = None
        self._synthesize_prior_day(start_ms, trade_rate_per_s)

        self.avg_trades: deque[tuple[int, int, int]] = deque()  # (time, quote atoms, volume atoms)
        self.avg_quote = self.avg_volume = 0
        self.avg_atoms = spec.price_atoms

        self.order_gap_ms = 1000.0 * TRADES_PER_ORDER / trade_rate_per_s if trade_rate_per_s > 0 else math.inf
        self.next_order_at = start_ms + self._order_gap()
        self.next_book_at = start_ms + rng.expovariate(BOOK_EVENTS_PER_S / 1000.0)

    # ---- schedule ----

    def _order_gap(self) -> float:
        if math.isinf(self.order_gap_ms):
            return math.inf
        rng = self.rng
        burst_mean = self.order_gap_ms * BURST_GAP_FRACTION
        if rng.random() < BURST_PROBABILITY:
            return rng.expovariate(1.0 / burst_mean)
        # Calm gaps are stretched so the overall mean gap stays order_gap_ms.
        calm_mean = (self.order_gap_ms - BURST_PROBABILITY * burst_mean) / (1.0 - BURST_PROBABILITY)
        return rng.expovariate(1.0 / calm_mean)

    def schedule_order(self) -> int | None:
        self.next_order_at += self._order_gap()
        return None if math.isinf(self.next_order_at) else int(self.next_order_at)

    def schedule_book(self) -> int:
        self.next_book_at += self.rng.expovariate(BOOK_EVENTS_PER_S / 1000.0)
        return int(self.next_book_at)

    # ---- opening state ----

    def _synthesize_prior_day(self, start_ms: int, trade_rate_per_s: float) -> None:
        """Fill the rolling window with 1440 invented minutes ending at the start price, so the 24 h statistics
        look like a running market from the first second. Their trade ids end right before the first simulated
        trade, keeping ticker ``F``/``L``/``n`` consistent."""
        rng = self.rng
        minute_sigma = self.anchor * PRIOR_MINUTE_VOLATILITY
        trades_per_minute = max(1.0, trade_rate_per_s * 60.0)
        first_minute = start_ms // MINUTE_MS - 1440
        close = self.anchor
        last_id = self.next_trade_id - 1
        reversed_buckets: list[_MinuteBucket] = []
        for minute in range(first_minute + 1439, first_minute - 1, -1):
            open_ = max(self.floor, close + round(rng.gauss(0.0, minute_sigma)))
            count = max(1, round(trades_per_minute * rng.uniform(0.5, 1.5)))
            bucket = _MinuteBucket(minute, open_, last_id - count + 1)
            bucket.close = close
            bucket.high = max(open_, close) + round(abs(rng.gauss(0.0, minute_sigma / 2)))
            bucket.low = max(1, min(open_, close) - round(abs(rng.gauss(0.0, minute_sigma / 2))))
            bucket.count = count
            bucket.last_id = last_id
            bucket.volume = max(count, round(count * self.taker_units * rng.uniform(0.8, 2.0)))
            bucket.quote = ((open_ + close) // 2 * self._tick) * (bucket.volume * self._step) // ATOMS_PER_UNIT
            reversed_buckets.append(bucket)
            last_id -= count
            close = open_
        self.prev_close = close
        for bucket in reversed(reversed_buckets):
            self.buckets.append(bucket)
            self.window_volume += bucket.volume
            self.window_quote += bucket.quote
            self.window_count += bucket.count

    # ---- book mutations ----

    def _set_level(self, is_bid: bool, price: int, units: int) -> None:
        side = self.bids if is_bid else self.asks
        if units > 0:
            side.set(price, units)
        elif price in side.quantities:
            side.remove(price)
        else:
            return
        self._dirty = True
        if is_bid:
            self.fast_diff.bids[price] = units
            self.slow_diff.bids[price] = units
        else:
            self.fast_diff.asks[price] = units
            self.slow_diff.asks[price] = units

    def _level_units(self) -> int:
        return max(1, round(self.level_units * self.rng.lognormvariate(0.0, 0.8)))

    def _refill_depth(self) -> None:
        """Keep between MIN_LEVELS and MAX_LEVELS levels per side by adding or dropping the far end."""
        rng = self.rng
        while len(self.bids) < MIN_LEVELS:
            start = self.bids.worst() if self.bids else self.anchor + 1
            self._set_level(True, start - rng.randint(1, self.gap_max), self._level_units())
        while len(self.asks) < MIN_LEVELS:
            start = self.asks.worst() if self.asks else self.anchor
            self._set_level(False, start + rng.randint(1, self.gap_max), self._level_units())
        while len(self.bids) > MAX_LEVELS:
            self._set_level(True, self.bids.worst(), 0)
        while len(self.asks) > MAX_LEVELS:
            self._set_level(False, self.asks.worst(), 0)

    def _top(self) -> tuple[int, int, int, int]:
        bid, ask = self.bids.best(), self.asks.best()
        return bid, self.bids.quantities[bid], ask, self.asks.quantities[ask]

    def book_event(self, time_ms: int, out: Output, wanted: Collection[str]) -> None:
        """Quotes move with the anchor price; a few levels near the top change size, vanish or appear."""
        rng = self.rng
        self.anchor = max(self.floor, self.anchor + round(rng.gauss(0.0, self.sigma)))
        anchor = self.anchor
        while self.bids and self.bids.best() > anchor:
            self._set_level(True, self.bids.best(), 0)
        while self.asks and self.asks.best() <= anchor:
            self._set_level(False, self.asks.best(), 0)
        # Makers step in at the anchor when the touch has drifted away, keeping the spread tight.
        if not self.bids or self.bids.best() < anchor - self.gap_max:
            offset = 0 if rng.random() < 0.7 else rng.randint(1, self.gap_max)
            self._set_level(True, anchor - offset, self._level_units())
        if not self.asks or self.asks.best() > anchor + 1 + self.gap_max:
            offset = 0 if rng.random() < 0.7 else rng.randint(1, self.gap_max)
            self._set_level(False, anchor + 1 + offset, self._level_units())
        for _ in range(rng.randint(1, 3)):
            is_bid = rng.random() < 0.5
            side = self.bids if is_bid else self.asks
            if not side:
                continue
            index = min(int(rng.expovariate(0.25)), len(side) - 1)
            price = side.price_at(index)
            roll = rng.random()
            if roll < 0.6:
                self._set_level(is_bid, price, self._level_units())
            elif roll < 0.8:
                self._set_level(is_bid, price, 0)
            elif index + 1 < len(side):
                gap = abs(side.price_at(index + 1) - price)
                if gap > 1:
                    inside = rng.randint(1, gap - 1)
                    self._set_level(is_bid, price - inside if is_bid else price + inside, self._level_units())
        self._refill_depth()
        self._finish_mutation(out, wanted)

    def taker_order(self, time_ms: int, out: Output, wanted: Collection[str]) -> None:
        """A marketable order sweeps up to MAX_LEVELS_PER_SWEEP levels of the opposite side; each level fill
        is one aggregate trade made of one to three trades (one per resting maker order)."""
        rng = self.rng
        taker_is_buyer = rng.random() < 0.5
        side = self.asks if taker_is_buyer else self.bids
        remaining = max(1, round(self.taker_units * rng.lognormvariate(0.0, 1.0)))
        levels = 0
        while remaining > 0 and levels < MAX_LEVELS_PER_SWEEP and side:
            price = side.best()
            available = side.quantities[price]
            take = min(remaining, available)
            self._fill(time_ms, price, take, taker_is_buyer, out, wanted)
            self._set_level(not taker_is_buyer, price, available - take)
            remaining -= take
            levels += 1
        # Whatever is left of the order is cancelled (immediate-or-cancel), so one order never empties a side.
        self._refill_depth()
        self._finish_mutation(out, wanted)

    def _maker_parts(self, units: int) -> list[int]:
        rng = self.rng
        if units < 2 or rng.random() < 0.6:
            return [units]
        count = rng.randint(2, min(3, units))
        cuts = sorted(rng.sample(range(1, units), count - 1))
        bounds = [0, *cuts, units]
        return [bounds[i + 1] - bounds[i] for i in range(count)]

    def _fill(
        self, time_ms: int, price: int, units: int, taker_is_buyer: bool, out: Output, wanted: Collection[str]
    ) -> None:
        names = self.names
        buyer_is_maker = not taker_is_buyer
        first_id = self.next_trade_id
        want_trades = names.trade in wanted
        price_text = fixed8(price * self._tick) if want_trades or names.agg_trade in wanted else ""
        for part in self._maker_parts(units):
            trade_id = self.next_trade_id
            self.next_trade_id += 1
            self._record_trade(time_ms, trade_id, price, part, taker_is_buyer)
            if want_trades:
                payload = {
                    "e": "trade",
                    "E": time_ms,
                    "s": self.symbol,
                    "t": trade_id,
                    "p": price_text,
                    "q": fixed8(part * self._step),
                    "T": time_ms,
                    "m": buyer_is_maker,
                    "M": True,
                }
                out.append((names.trade, orjson.dumps(payload)))
        agg_id = self.next_agg_id
        self.next_agg_id += 1
        if names.agg_trade in wanted:
            payload = {
                "e": "aggTrade",
                "E": time_ms,
                "s": self.symbol,
                "a": agg_id,
                "p": price_text,
                "q": fixed8(units * self._step),
                "f": first_id,
                "l": self.next_trade_id - 1,
                "T": time_ms,
                "m": buyer_is_maker,
                "M": True,
            }
            out.append((names.agg_trade, orjson.dumps(payload)))

    def _record_trade(self, time_ms: int, trade_id: int, price: int, units: int, taker_is_buyer: bool) -> None:
        quote = price * self._tick * units * self._step // ATOMS_PER_UNIT
        self.last_price = price
        self.last_qty = units
        self.last_trade_id = trade_id
        self.last_trade_time = time_ms
        self.changed = True
        for candle in self.candles.values():
            candle.add(trade_id, price, units, quote, taker_is_buyer)
        minute = time_ms // MINUTE_MS
        if not self.buckets or self.buckets[-1].minute != minute:
            self.buckets.append(_MinuteBucket(minute, price, trade_id))
            self._closed_high_low = None
        bucket = self.buckets[-1]
        if price > bucket.high:
            bucket.high = price
        elif price < bucket.low:
            bucket.low = price
        bucket.close = price
        bucket.volume += units
        bucket.quote += quote
        bucket.count += 1
        bucket.last_id = trade_id
        self.window_volume += units
        self.window_quote += quote
        self.window_count += 1
        self.avg_trades.append((time_ms, quote, units * self._step))
        self.avg_quote += quote
        self.avg_volume += units * self._step

    def _finish_mutation(self, out: Output, wanted: Collection[str]) -> None:
        """One update id per mutation that changed the book; a book ticker whenever the top changed."""
        if not self._dirty:
            return
        self._dirty = False
        self.update_id += 1
        top = self._top()
        if top == self.last_top:
            return
        self.last_top = top
        if self.names.book_ticker in wanted:
            bid, bid_units, ask, ask_units = top
            payload = {
                "u": self.update_id,
                "s": self.symbol,
                "b": fixed8(bid * self._tick),
                "B": fixed8(bid_units * self._step),
                "a": fixed8(ask * self._tick),
                "A": fixed8(ask_units * self._step),
            }
            out.append((self.names.book_ticker, orjson.dumps(payload)))

    # ---- periodic emissions ----

    def expire_windows(self, now_ms: int) -> None:
        """Drop minutes that left the 24 h window and trades that left the 5-minute average."""
        cutoff = now_ms - DAY_MS
        while self.buckets and (self.buckets[0].minute + 1) * MINUTE_MS <= cutoff:
            bucket = self.buckets.popleft()
            self.window_volume -= bucket.volume
            self.window_quote -= bucket.quote
            self.window_count -= bucket.count
            self.prev_close = bucket.close
            self._closed_high_low = None
            self.changed = True
        avg_cutoff = now_ms - AVG_PRICE_WINDOW_MS
        while self.avg_trades and self.avg_trades[0][0] <= avg_cutoff:
            _, quote, volume = self.avg_trades.popleft()
            self.avg_quote -= quote
            self.avg_volume -= volume
        if self.avg_volume:
            # With no trade in the last 5 minutes the previous average stands.
            self.avg_atoms = _divide_rounded(self.avg_quote * ATOMS_PER_UNIT, self.avg_volume)

    def kline_tick(self, now_ms: int, out: Output, wanted: Collection[str]) -> None:
        """At a whole second: close candles whose window ended (final update with ``x`` true) and push open
        candles on their cadence."""
        for interval, candle in self.candles.items():
            name = self.names.klines[interval]
            if now_ms >= candle.end_ms:
                if name in wanted:
                    out.append((name, self._kline_payload(now_ms, interval, candle, closed=True)))
                self.candles[interval] = _Candle(interval, now_ms, self.last_price)
            elif (interval == "1s" or now_ms % KLINE_PUSH_MS == 0) and name in wanted:
                out.append((name, self._kline_payload(now_ms, interval, candle, closed=False)))

    def _kline_payload(self, now_ms: int, interval: str, candle: _Candle, *, closed: bool) -> bytes:
        tick, step = self._tick, self._step
        payload = {
            "e": "kline",
            "E": now_ms,
            "s": self.symbol,
            "k": {
                "t": candle.open_ms,
                "T": candle.end_ms - 1,
                "s": self.symbol,
                "i": interval,
                "f": candle.first_id,
                "L": candle.last_id,
                "o": fixed8(candle.open * tick),
                "c": fixed8(candle.close * tick),
                "h": fixed8(candle.high * tick),
                "l": fixed8(candle.low * tick),
                "v": fixed8(candle.volume * step),
                "n": candle.trades,
                "x": closed,
                "q": fixed8(candle.quote),
                "V": fixed8(candle.taker_volume * step),
                "Q": fixed8(candle.taker_quote),
                "B": "0",
            },
        }
        return orjson.dumps(payload)

    def _high_low(self) -> tuple[int, int]:
        buckets = self.buckets
        if not buckets:
            return self.last_price, self.last_price
        if self._closed_high_low is None:
            # Every bucket but the newest is final: cache their extremes until a bucket comes or goes.
            if len(buckets) > 1:
                closed = [buckets[i] for i in range(len(buckets) - 1)]
                self._closed_high_low = (max(b.high for b in closed), min(b.low for b in closed))
            else:
                self._closed_high_low = (buckets[0].high, buckets[0].low)
        high, low = self._closed_high_low
        newest = buckets[-1]
        return max(high, newest.high), min(low, newest.low)

    def mini_ticker(self, now_ms: int) -> dict[str, Any]:
        tick = self._tick
        high, low = self._high_low()
        open_ = self.buckets[0].open if self.buckets else self.last_price
        return {
            "e": "24hrMiniTicker",
            "E": now_ms,
            "s": self.symbol,
            "c": fixed8(self.last_price * tick),
            "o": fixed8(open_ * tick),
            "h": fixed8(high * tick),
            "l": fixed8(low * tick),
            "v": fixed8(self.window_volume * self._step),
            "q": fixed8(self.window_quote),
        }

    def ticker(self, now_ms: int) -> bytes:
        tick, step = self._tick, self._step
        high, low = self._high_low()
        open_ = self.buckets[0].open if self.buckets else self.last_price
        first_id = self.buckets[0].first_id if self.buckets else self.last_trade_id + 1
        volume_atoms = self.window_volume * step
        weighted = _divide_rounded(self.window_quote * ATOMS_PER_UNIT, volume_atoms) if volume_atoms else 0
        bid, bid_units, ask, ask_units = self.last_top
        change = (self.last_price - open_) * tick
        payload = {
            "e": "24hrTicker",
            "E": now_ms,
            "s": self.symbol,
            "p": fixed8(change),
            "P": _percent3(change, open_ * tick),
            "w": fixed8(weighted),
            "x": fixed8(self.prev_close * tick),
            "c": fixed8(self.last_price * tick),
            "Q": fixed8(self.last_qty * step),
            "b": fixed8(bid * tick),
            "B": fixed8(bid_units * step),
            "a": fixed8(ask * tick),
            "A": fixed8(ask_units * step),
            "o": fixed8(open_ * tick),
            "h": fixed8(high * tick),
            "l": fixed8(low * tick),
            "v": fixed8(volume_atoms),
            "q": fixed8(self.window_quote),
            "O": now_ms - DAY_MS,
            "C": now_ms,
            "F": first_id,
            "L": self.last_trade_id,
            "n": self.window_count,
        }
        return orjson.dumps(payload)

    def avg_price(self, now_ms: int) -> bytes:
        payload = {
            "e": "avgPrice",
            "E": now_ms,
            "s": self.symbol,
            "i": "5m",
            "w": fixed8(self.avg_atoms),
            "T": self.last_trade_time,
        }
        return orjson.dumps(payload)

    def book_levels(self, count: int) -> dict[str, Any]:
        """``{"lastUpdateId", "bids", "asks"}`` with up to ``count`` levels per side (partial depth layout)."""
        tick, step = self._tick, self._step
        return {
            "lastUpdateId": self.update_id,
            "bids": [[fixed8(p * tick), fixed8(u * step)] for p, u in self.bids.top(count)],
            "asks": [[fixed8(p * tick), fixed8(u * step)] for p, u in self.asks.top(count)],
        }

    def diff_depth(
        self, now_ms: int, accumulator: _DiffAccumulator, name: str, out: Output, wanted: Collection[str]
    ) -> None:
        """Emit (if wanted and anything changed) and reset one speed's accumulator; its ``U`` is always the
        previous event's ``u`` + 1 because update ids only advance on book changes."""
        if accumulator.last_update_id == self.update_id:
            return
        if name in wanted:
            tick, step = self._tick, self._step
            payload = {
                "e": "depthUpdate",
                "E": now_ms,
                "s": self.symbol,
                "U": accumulator.last_update_id + 1,
                "u": self.update_id,
                "b": [[fixed8(p * tick), fixed8(u * step)] for p, u in sorted(accumulator.bids.items(), reverse=True)],
                "a": [[fixed8(p * tick), fixed8(u * step)] for p, u in sorted(accumulator.asks.items())],
            }
            out.append((name, orjson.dumps(payload)))
        accumulator.last_update_id = self.update_id
        accumulator.bids.clear()
        accumulator.asks.clear()


_ORDER_EVENT = 0
_BOOK_EVENT = 1


class SyntheticMarket:
    """Several symbols' simulated markets on one clock (see the module docstring)."""

    def __init__(
        self,
        symbols: Sequence[str],
        *,
        seed: int,
        trade_rate_per_s: float = 5.0,
        start_ms: int,
    ) -> None:
        if not symbols:
            raise ValueError("SyntheticMarket needs at least one symbol")
        if not trade_rate_per_s >= 0 or math.isinf(trade_rate_per_s):
            raise ValueError(f"trade_rate_per_s must be a finite number >= 0, got {trade_rate_per_s!r}")
        unique = list(dict.fromkeys(symbol.upper() for symbol in symbols))
        self._markets = [
            _SymbolMarket(symbol_spec(symbol), seed=seed, trade_rate_per_s=trade_rate_per_s, start_ms=start_ms)
            for symbol in unique
        ]
        self._by_symbol = {market.symbol: market for market in self._markets}
        self._now_ms = start_ms
        self._next_boundary = (start_ms // BOUNDARY_MS + 1) * BOUNDARY_MS
        # (time, kind, symbol index): one pending book event and at most one pending taker order per symbol.
        self._events: list[tuple[int, int, int]] = []
        for index, market in enumerate(self._markets):
            self._events.append((int(market.next_book_at), _BOOK_EVENT, index))
            if not math.isinf(market.next_order_at):
                self._events.append((int(market.next_order_at), _ORDER_EVENT, index))
        heapq.heapify(self._events)

    @property
    def symbols(self) -> list[str]:
        """Simulated symbols, uppercase, in the order given."""
        return [market.symbol for market in self._markets]

    @property
    def now_ms(self) -> int:
        """Simulated time reached so far."""
        return self._now_ms

    def symbols_info(self) -> list[SymbolInfo]:
        """What exchangeInfo says about the simulated symbols."""
        return [market.spec.info() for market in self._markets]

    def depth_snapshot(self, symbol: str, limit: int = 100) -> bytes:
        """The current book like ``GET /api/v3/depth`` (up to ``limit`` levels per side) for a local book
        built from diff depth; raises KeyError for a symbol that is not simulated."""
        return orjson.dumps(self._by_symbol[symbol.upper()].book_levels(limit))

    def advance(self, now_ms: int, wanted: Collection[str]) -> list[tuple[str, bytes]]:
        """Run the market up to ``now_ms`` inclusive and return ``(canonical stream, payload)`` for the wanted
        streams, in event-time order. Periodic emissions at a time come before that same millisecond's trades
        and book changes, so a snapshot taken at ``t`` reflects everything strictly before ``t``. A ``now_ms``
        not after the time already reached returns nothing."""
        out: Output = []
        if now_ms <= self._now_ms:
            return out
        events = self._events
        while True:
            boundary = self._next_boundary
            if events and events[0][0] < boundary:
                if events[0][0] > now_ms:
                    break
                time_ms, kind, index = heapq.heappop(events)
                market = self._markets[index]
                if kind == _BOOK_EVENT:
                    market.book_event(time_ms, out, wanted)
                    heapq.heappush(events, (market.schedule_book(), _BOOK_EVENT, index))
                else:
                    market.taker_order(time_ms, out, wanted)
                    next_order = market.schedule_order()
                    if next_order is not None:
                        heapq.heappush(events, (next_order, _ORDER_EVENT, index))
            else:
                if boundary > now_ms:
                    break
                self._emit_periodic(boundary, out, wanted)
                self._next_boundary = boundary + BOUNDARY_MS
        self._now_ms = now_ms
        return out

    def _emit_periodic(self, now_ms: int, out: Output, wanted: Collection[str]) -> None:
        whole_second = now_ms % SECOND_MS == 0
        want_array = MINI_TICKER_ARR in wanted
        array: list[dict[str, Any]] = []
        for market in self._markets:
            names = market.names
            if whole_second:
                market.expire_windows(now_ms)
                market.kline_tick(now_ms, out, wanted)
                want_mini = names.mini_ticker in wanted
                if want_mini or (want_array and market.changed):
                    mini = market.mini_ticker(now_ms)
                    if want_mini:
                        out.append((names.mini_ticker, orjson.dumps(mini)))
                    if want_array and market.changed:
                        array.append(mini)
                market.changed = False
                if names.ticker in wanted:
                    out.append((names.ticker, market.ticker(now_ms)))
                if names.avg_price in wanted:
                    out.append((names.avg_price, market.avg_price(now_ms)))
            # Diffs first: a consumer of both sees the change before the snapshot that includes it.
            market.diff_depth(now_ms, market.fast_diff, names.depth_fast, out, wanted)
            if whole_second:
                market.diff_depth(now_ms, market.slow_diff, names.depth, out, wanted)
            for levels in DEPTH_LEVELS:
                fast_name = names.partial_fast[levels]
                if fast_name in wanted:
                    out.append((fast_name, orjson.dumps(market.book_levels(levels))))
                if whole_second and names.partial[levels] in wanted:
                    out.append((names.partial[levels], orjson.dumps(market.book_levels(levels))))
        if array:
            out.append((MINI_TICKER_ARR, orjson.dumps(array)))
