"""Synthetic past candles, so the demo's klines and technicals have a long history from the first second.

Advancing the synthetic market itself over days of simulated time would take minutes (it simulates every
trade and book change), so the past is drawn directly as candles: per symbol and interval, a log-normal random
walk run backwards from the live market's opening price, so the newest past candle closes exactly where the
live market opens. Volatility scales with the square root of the interval (the market's own per-minute
figure), volumes with the configured trade rate; prices sit on the symbol's tick grid and quantities on its lot
grid, so every string is exact and quote volumes are exact products. Different intervals are independent walks
(a 1d candle is not the sum of that day's 1h candles): good enough for a demo, and documented as such.
Deterministic for a seed. Pure: no I/O.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable

from ingest.sources.synthetic.symbol_market import PRIOR_MINUTE_VOLATILITY, TAKER_NOTIONAL, TRADES_PER_ORDER
from ingest.sources.synthetic.symbols import ATOMS_PER_UNIT, fixed8, symbol_spec
from shared.candles.model import Candle
from shared.intervals import MINUTE_MS, candle_window


def _interval_minutes(interval: str, open_ms: int) -> float:
    start, end = candle_window(interval, open_ms)
    return (end - start) / MINUTE_MS


def synthetic_history(
    symbols: Iterable[str],
    intervals: Iterable[str],
    *,
    count: int,
    before_ms: int,
    seed: int,
    trade_rate_per_s: float = 5.0,
) -> list[Candle]:
    """``count`` closed candles per symbol and interval, the newest ending where the candle open at
    ``before_ms`` begins; oldest first within each series."""
    candles: list[Candle] = []
    intervals = tuple(intervals)
    for symbol in symbols:
        spec = symbol_spec(symbol)
        tick, step = spec.tick_atoms, spec.step_atoms
        start_ticks = spec.price_atoms // tick
        for interval in intervals:
            rng = random.Random(f"{seed}:{spec.symbol}:{interval}:history")
            series: list[Candle] = []
            close_ticks = start_ticks
            open_ms = candle_window(interval, before_ms)[0]
            for _ in range(count):
                if open_ms <= 0:
                    break
                open_ms, end_ms = candle_window(interval, open_ms - 1)
                minutes = _interval_minutes(interval, open_ms)
                sigma = PRIOR_MINUTE_VOLATILITY * math.sqrt(minutes)
                open_ticks = max(1, round(close_ticks / math.exp(rng.gauss(0.0, sigma))))
                wick = sigma * 0.5
                high_ticks = max(open_ticks, close_ticks) + round(close_ticks * abs(rng.gauss(0.0, wick)))
                low_ticks = max(1, min(open_ticks, close_ticks) - round(close_ticks * abs(rng.gauss(0.0, wick))))
                mean_trades = trade_rate_per_s * minutes * 60
                trades = max(1, round(rng.gauss(mean_trades, mean_trades * 0.3)))
                trade_units = max(1, TAKER_NOTIONAL * ATOMS_PER_UNIT * ATOMS_PER_UNIT // (tick * close_ticks * step))
                units = max(1, round(trades * trade_units / TRADES_PER_ORDER))
                taker_units = round(units * rng.uniform(0.4, 0.6))
                # Quote volume at the candle's typical price: volume (lots) x price (ticks), exact in atoms.
                typical_ticks = (high_ticks + low_ticks + open_ticks + close_ticks) // 4
                lot_quote_atoms = typical_ticks * tick * step // ATOMS_PER_UNIT
                series.append(
                    Candle(
                        symbol=spec.symbol,
                        interval=interval,
                        open_time=open_ms,
                        close_time=end_ms - 1,
                        open=fixed8(open_ticks * tick),
                        high=fixed8(high_ticks * tick),
                        low=fixed8(low_ticks * tick),
                        close=fixed8(close_ticks * tick),
                        volume=fixed8(units * step),
                        quote_volume=fixed8(units * lot_quote_atoms),
                        trades=trades,
                        taker_buy_base_volume=fixed8(taker_units * step),
                        taker_buy_quote_volume=fixed8(taker_units * lot_quote_atoms),
                    )
                )
                close_ticks = open_ticks
            series.reverse()
            candles.extend(series)
    return candles
