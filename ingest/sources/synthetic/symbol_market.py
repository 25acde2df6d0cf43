"""One symbol's simulated market, the state behind every stream of that symbol. An order book whose anchor
price random-walks while level sizes churn; bursty taker orders that sweep up to three levels and print trades
and aggregate trades; klines for every interval, the rolling 24 h window (seeded from an invented prior day)
and the 5-minute average price, all fed by those trades; and the payloads of each stream, byte for byte as
Binance writes them. Mutations draw from the symbol's own ``random.Random``; emissions only read state, so
what is wanted never changes what happens. Pure: no I/O.
"""

from __future__ import annotations

import math
import random
from collections.abc import Collection
from typing import Any

import orjson

from ingest.sources.synthetic.book import BookSide, DiffAccumulator
from ingest.sources.synthetic.ohlc import Ohlc
from ingest.sources.synthetic.rolling import AveragePrice, DayWindow
from ingest.sources.synthetic.stream_names import StreamNames
from ingest.sources.synthetic.symbols import ATOMS_PER_UNIT, SymbolSpec, divide_rounded, fixed8, percent3
from shared.intervals import DAY_MS, MINUTE_MS, candle_window
from shared.streams import KLINE_INTERVALS

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

Output = list[tuple[str, bytes]]  # (canonical stream, payload) in emission order


class SymbolMarket:
    """The whole simulated state of one symbol (see the module docstring)."""

    def __init__(self, spec: SymbolSpec, *, seed: int, trade_rate_per_s: float, start_ms: int) -> None:
        self.spec = spec
        self.symbol = spec.symbol
        self.names = StreamNames.of(spec.symbol)
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

        self.bids = BookSide(is_bid=True)
        self.asks = BookSide(is_bid=False)
        self._dirty = False
        self.fast_diff = DiffAccumulator(self.update_id)
        self.slow_diff = DiffAccumulator(self.update_id)
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

        self.candles = {interval: Ohlc(*candle_window(interval, start_ms), start_ticks) for interval in KLINE_INTERVALS}

        self.day = self._synthesize_prior_day(start_ms, trade_rate_per_s)
        self.average = AveragePrice(spec.price_atoms)

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

    def _synthesize_prior_day(self, start_ms: int, trade_rate_per_s: float) -> DayWindow:
        """Fill the rolling window with 1440 invented minutes ending at the start price, so the 24 h statistics
        look like a running market from the first second. Their trade ids end right before the first simulated
        trade, keeping ticker ``F``/``L``/``n`` consistent."""
        rng = self.rng
        minute_sigma = self.anchor * PRIOR_MINUTE_VOLATILITY
        trades_per_minute = max(1.0, trade_rate_per_s * 60.0)
        first_minute = start_ms // MINUTE_MS - 1440
        close = self.anchor
        last_id = self.next_trade_id - 1
        reversed_buckets: list[Ohlc] = []
        for minute in range(first_minute + 1439, first_minute - 1, -1):
            open_ = max(self.floor, close + round(rng.gauss(0.0, minute_sigma)))
            count = max(1, round(trades_per_minute * rng.uniform(0.5, 1.5)))
            bucket = Ohlc(minute * MINUTE_MS, (minute + 1) * MINUTE_MS, open_)
            bucket.first_id = last_id - count + 1
            bucket.close = close
            bucket.high = max(open_, close) + round(abs(rng.gauss(0.0, minute_sigma / 2)))
            bucket.low = max(1, min(open_, close) - round(abs(rng.gauss(0.0, minute_sigma / 2))))
            bucket.trades = count
            bucket.last_id = last_id
            bucket.volume = max(count, round(count * self.taker_units * rng.uniform(0.8, 2.0)))
            bucket.quote = ((open_ + close) // 2 * self._tick) * (bucket.volume * self._step) // ATOMS_PER_UNIT
            reversed_buckets.append(bucket)
            last_id -= count
            close = open_
        return DayWindow(reversed(reversed_buckets), prev_close=close)

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
        self.day.add(time_ms, trade_id, price, units, quote, taker_is_buyer)
        self.average.add(time_ms, quote, units * self._step)

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
        if self.day.expire(now_ms):
            self.changed = True
        self.average.expire(now_ms)

    def kline_tick(self, now_ms: int, out: Output, wanted: Collection[str]) -> None:
        """At a whole second: close candles whose window ended (final update with ``x`` true) and push open
        candles on their cadence."""
        for interval, candle in self.candles.items():
            name = self.names.klines[interval]
            if now_ms >= candle.end_ms:
                if name in wanted:
                    out.append((name, self._kline_payload(now_ms, interval, candle, closed=True)))
                self.candles[interval] = Ohlc(*candle_window(interval, now_ms), self.last_price)
            elif (interval == "1s" or now_ms % KLINE_PUSH_MS == 0) and name in wanted:
                out.append((name, self._kline_payload(now_ms, interval, candle, closed=False)))

    def _kline_payload(self, now_ms: int, interval: str, candle: Ohlc, *, closed: bool) -> bytes:
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

    def mini_ticker(self, now_ms: int) -> dict[str, Any]:
        tick = self._tick
        high, low = self.day.high_low(self.last_price)
        open_ = self.day.buckets[0].open if self.day.buckets else self.last_price
        return {
            "e": "24hrMiniTicker",
            "E": now_ms,
            "s": self.symbol,
            "c": fixed8(self.last_price * tick),
            "o": fixed8(open_ * tick),
            "h": fixed8(high * tick),
            "l": fixed8(low * tick),
            "v": fixed8(self.day.volume * self._step),
            "q": fixed8(self.day.quote),
        }

    def ticker(self, now_ms: int) -> bytes:
        tick, step = self._tick, self._step
        high, low = self.day.high_low(self.last_price)
        open_ = self.day.buckets[0].open if self.day.buckets else self.last_price
        day = self.day
        first_id = day.buckets[0].first_id if day.buckets else self.last_trade_id + 1
        volume_atoms = day.volume * step
        weighted = divide_rounded(day.quote * ATOMS_PER_UNIT, volume_atoms) if volume_atoms else 0
        bid, bid_units, ask, ask_units = self.last_top
        change = (self.last_price - open_) * tick
        payload = {
            "e": "24hrTicker",
            "E": now_ms,
            "s": self.symbol,
            "p": fixed8(change),
            "P": percent3(change, open_ * tick),
            "w": fixed8(weighted),
            "x": fixed8(day.prev_close * tick),
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
            "q": fixed8(day.quote),
            "O": now_ms - DAY_MS,
            "C": now_ms,
            "F": first_id,
            "L": self.last_trade_id,
            "n": day.trades,
        }
        return orjson.dumps(payload)

    def avg_price(self, now_ms: int) -> bytes:
        payload = {
            "e": "avgPrice",
            "E": now_ms,
            "s": self.symbol,
            "i": "5m",
            "w": fixed8(self.average.atoms),
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
        self, now_ms: int, accumulator: DiffAccumulator, name: str, out: Output, wanted: Collection[str]
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
