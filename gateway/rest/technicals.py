"""Technical indicators computed from a candle series (pure: numbers in, numbers out).

Definitions follow the common (TA-Lib) conventions, so figures match what traders see elsewhere:
- SMA(n): mean of the last n closes.
- EMA(n): smoothing 2/(n+1), seeded with the SMA of the first n closes.
- RSI(14): Wilder's smoothing of gains and losses, seeded with their simple means over the first 14 changes;
  100 when there were no losses, 50 when the price did not move at all.
- MACD(12,26,9): EMA12 - EMA26 from the first candle where EMA26 exists; signal = EMA9 of that line;
  histogram = line - signal.
- Bollinger(20,2): SMA20 +- 2 population standard deviations of the last 20 closes.
- ATR(14): true range from the second candle on (it needs the previous close), Wilder-smoothed, seeded with the
  mean of the first 14 true ranges.
- VWAP: sum of quote volume / sum of base volume (exact: Binance candles carry both) over the session, which is
  the UTC day of the newest candle for intraday intervals and the newest candle itself for 1d and longer.
An indicator without enough candles is ``None``. The trend summary votes with the available signals (price vs
EMA50 and EMA200, EMA50 vs EMA200, EMA9 vs EMA21, MACD histogram): a score of +2 or more is bullish, -2 or
less bearish, anything between neutral; RSI >= 70 reads overbought and <= 30 oversold.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from shared.candles.model import Candle
from shared.intervals import DAY_MS, is_intraday

EMA_PERIODS = (9, 21, 50, 200)
SMA_PERIODS = (20, 50)
RSI_PERIOD = 14
ATR_PERIOD = 14
MACD_FAST, MACD_SLOW, MACD_SIGNAL = 12, 26, 9
BOLLINGER_PERIOD, BOLLINGER_WIDTH = 20, 2.0
OVERBOUGHT, OVERSOLD = 70.0, 30.0


@dataclass(frozen=True, slots=True)
class Bar:
    open_time: int
    high: float
    low: float
    close: float
    volume: float
    quote_volume: float


@dataclass(frozen=True, slots=True)
class Macd:
    line: float
    signal: float
    histogram: float


@dataclass(frozen=True, slots=True)
class Bands:
    upper: float
    middle: float
    lower: float


@dataclass(frozen=True, slots=True)
class Trend:
    direction: str | None  # "bullish", "bearish", "neutral"; None without any signal
    score: int
    momentum: str | None  # "overbought", "oversold", "neutral"; None without an RSI
    signals: dict[str, int]


@dataclass(frozen=True, slots=True)
class Technicals:
    symbol: str
    interval: str
    candles: int
    open_time: int | None
    close: float | None
    rsi: float | None
    ema: dict[int, float | None]
    sma: dict[int, float | None]
    macd: Macd | None
    bollinger: Bands | None
    atr: float | None
    vwap: float | None
    trend: Trend


def bars_from_candles(candles: Sequence[Candle]) -> list[Bar]:
    return [
        Bar(c.open_time, float(c.high), float(c.low), float(c.close), float(c.volume), float(c.quote_volume))
        for c in candles
    ]


def sma(values: Sequence[float], period: int) -> float | None:
    if len(values) < period:
        return None
    return math.fsum(values[-period:]) / period


def ema_series(values: Sequence[float], period: int) -> list[float]:
    """EMA at every index from ``period - 1`` on (empty when there are fewer values than ``period``)."""
    if len(values) < period:
        return []
    alpha = 2.0 / (period + 1)
    current = math.fsum(values[:period]) / period
    series = [current]
    for value in values[period:]:
        current += alpha * (value - current)
        series.append(current)
    return series


def ema(values: Sequence[float], period: int) -> float | None:
    series = ema_series(values, period)
    return series[-1] if series else None


def rsi(closes: Sequence[float], period: int = RSI_PERIOD) -> float | None:
    if len(closes) <= period:
        return None
    changes = [closes[i] - closes[i - 1] for i in range(1, len(closes))]
    gain = math.fsum(max(change, 0.0) for change in changes[:period]) / period
    loss = math.fsum(max(-change, 0.0) for change in changes[:period]) / period
    for change in changes[period:]:
        gain = (gain * (period - 1) + max(change, 0.0)) / period
        loss = (loss * (period - 1) + max(-change, 0.0)) / period
    if loss == 0:
        return 100.0 if gain > 0 else 50.0
    return 100.0 - 100.0 / (1.0 + gain / loss)


def macd(
    closes: Sequence[float], fast: int = MACD_FAST, slow: int = MACD_SLOW, signal: int = MACD_SIGNAL
) -> Macd | None:
    fast_series = ema_series(closes, fast)
    slow_series = ema_series(closes, slow)
    offset = slow - fast  # fast_series[offset + i] and slow_series[i] belong to the same candle
    line = [fast_series[offset + i] - slow_value for i, slow_value in enumerate(slow_series)]
    signal_series = ema_series(line, signal)
    if not signal_series:
        return None
    return Macd(line[-1], signal_series[-1], line[-1] - signal_series[-1])


def bollinger(closes: Sequence[float], period: int = BOLLINGER_PERIOD, width: float = BOLLINGER_WIDTH) -> Bands | None:
    middle = sma(closes, period)
    if middle is None:
        return None
    deviation = math.sqrt(math.fsum((value - middle) ** 2 for value in closes[-period:]) / period)
    return Bands(middle + width * deviation, middle, middle - width * deviation)


def atr(bars: Sequence[Bar], period: int = ATR_PERIOD) -> float | None:
    if len(bars) <= period:
        return None
    ranges = [
        max(bar.high - bar.low, abs(bar.high - previous.close), abs(bar.low - previous.close))
        for previous, bar in itertools.pairwise(bars)
    ]
    current = math.fsum(ranges[:period]) / period
    for true_range in ranges[period:]:
        current = (current * (period - 1) + true_range) / period
    return current


def vwap(bars: Sequence[Bar], interval: str) -> float | None:
    if not bars:
        return None
    if is_intraday(interval):
        day_start = bars[-1].open_time // DAY_MS * DAY_MS
        session = [bar for bar in bars if bar.open_time >= day_start]
    else:
        session = [bars[-1]]
    volume = math.fsum(bar.volume for bar in session)
    if volume <= 0:
        return None
    return math.fsum(bar.quote_volume for bar in session) / volume


def _sign(value: float) -> int:
    return (value > 0) - (value < 0)


def trend(
    close: float | None, ema_values: dict[int, float | None], macd_value: Macd | None, rsi_value: float | None
) -> Trend:
    signals: dict[str, int] = {}
    ema9, ema21, ema50, ema200 = (ema_values.get(period) for period in EMA_PERIODS)
    if close is not None and ema50 is not None:
        signals["priceVsEma50"] = _sign(close - ema50)
    if close is not None and ema200 is not None:
        signals["priceVsEma200"] = _sign(close - ema200)
    if ema50 is not None and ema200 is not None:
        signals["ema50VsEma200"] = _sign(ema50 - ema200)
    if ema9 is not None and ema21 is not None:
        signals["ema9VsEma21"] = _sign(ema9 - ema21)
    if macd_value is not None:
        signals["macdHistogram"] = _sign(macd_value.histogram)
    score = sum(signals.values())
    direction = None
    if signals:
        direction = "bullish" if score >= 2 else "bearish" if score <= -2 else "neutral"
    momentum = None
    if rsi_value is not None:
        momentum = "overbought" if rsi_value >= OVERBOUGHT else "oversold" if rsi_value <= OVERSOLD else "neutral"
    return Trend(direction, score, momentum, signals)


def analyse(symbol: str, interval: str, candles: Sequence[Candle]) -> Technicals:
    """Every indicator for ``candles`` (oldest first; the newest may still be open)."""
    bars = bars_from_candles(candles)
    closes = [bar.close for bar in bars]
    close = closes[-1] if closes else None
    ema_values = {period: ema(closes, period) for period in EMA_PERIODS}
    macd_value = macd(closes)
    rsi_value = rsi(closes)
    return Technicals(
        symbol=symbol,
        interval=interval,
        candles=len(bars),
        open_time=bars[-1].open_time if bars else None,
        close=close,
        rsi=rsi_value,
        ema=ema_values,
        sma={period: sma(closes, period) for period in SMA_PERIODS},
        macd=macd_value,
        bollinger=bollinger(closes),
        atr=atr(bars),
        vwap=vwap(bars, interval),
        trend=trend(close, ema_values, macd_value, rsi_value),
    )


def technicals_json(result: Technicals) -> bytes:
    """The body of ``GET /api/v1/technical/{symbol}``."""
    document: dict[str, Any] = {
        "symbol": result.symbol,
        "interval": result.interval,
        "candles": result.candles,
        "openTime": result.open_time,
        "close": result.close,
        "rsi14": result.rsi,
        "ema": {str(period): value for period, value in result.ema.items()},
        "sma": {str(period): value for period, value in result.sma.items()},
        "macd": None
        if result.macd is None
        else {"macd": result.macd.line, "signal": result.macd.signal, "histogram": result.macd.histogram},
        "bollinger": None
        if result.bollinger is None
        else {"upper": result.bollinger.upper, "middle": result.bollinger.middle, "lower": result.bollinger.lower},
        "atr14": result.atr,
        "vwap": result.vwap,
        "trend": {
            "direction": result.trend.direction,
            "score": result.trend.score,
            "momentum": result.trend.momentum,
            "signals": result.trend.signals,
        },
    }
    return orjson.dumps(document)
