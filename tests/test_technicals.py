"""Indicator math against reference values: small series worked by hand (the arithmetic is in the comments)
and a fixed 260-candle set whose reference figures were computed with exact rational arithmetic (Python
``fractions``, independently of gateway.rest.technicals) and pasted here."""

from __future__ import annotations

import math

import orjson
import pytest

from gateway.rest.technicals import (
    Bar,
    Macd,
    analyse,
    atr,
    bollinger,
    ema,
    ema_series,
    macd,
    rsi,
    sma,
    technicals_json,
    trend,
    vwap,
)
from shared.candles.model import Candle

HOUR_MS = 3_600_000


def test_sma_is_the_mean_of_the_last_period_values() -> None:
    assert sma([1, 2, 3, 4, 5], 3) == 4.0  # (3 + 4 + 5) / 3
    assert sma([1, 2], 3) is None


def test_ema_is_seeded_with_the_sma_and_smoothed_by_2_over_n_plus_1() -> None:
    # alpha = 2 / (3 + 1) = 0.5; seed = (1 + 2 + 3) / 3 = 2; then 2 + 0.5 * (4 - 2) = 3; 3 + 0.5 * (5 - 3) = 4
    assert ema_series([1, 2, 3, 4, 5], 3) == [2.0, 3.0, 4.0]
    assert ema([1, 2, 3, 4, 5], 3) == 4.0
    assert ema([1, 2], 3) is None


def test_rsi_uses_wilder_smoothing() -> None:
    # changes +1, -0.5, +1.5, -1, +0.5; period 3
    # seed: gain = (1 + 0 + 1.5) / 3 = 5/6, loss = (0 + 0.5 + 0) / 3 = 1/6
    # -1:   gain = (5/6 * 2 + 0) / 3 = 5/9,      loss = (1/6 * 2 + 1) / 3 = 4/9
    # +0.5: gain = (5/9 * 2 + 0.5) / 3 = 29/54, loss = (4/9 * 2 + 0) / 3 = 16/54
    # RS = 29/16; RSI = 100 - 100 / (1 + 29/16) = 100 - 1600/45 = 580/9
    assert rsi([10, 11, 10.5, 12, 11, 11.5], 3) == pytest.approx(580 / 9, abs=1e-12)
    assert rsi([10, 11, 12, 13], 3) == 100.0  # no losses at all
    assert rsi([10, 10, 10, 10], 3) == 50.0  # no movement at all
    assert rsi([10, 11, 12], 3) is None  # needs period + 1 closes


def test_macd_line_signal_and_histogram() -> None:
    closes = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]
    # fast EMA(2), alpha 2/3: seed (1+2)/2 = 3/2; 4 -> 3/2 + 2/3*(5/2) = 19/6; 8 -> 19/6 + 2/3*(29/6) = 115/18;
    #                         16 -> 691/54; 32 -> 4147/162
    # slow EMA(3), alpha 1/2: seed (1+2+4)/3 = 7/3; 8 -> 31/6; 16 -> 127/12; 32 -> 511/24
    # line from the slow seed on: 19/6 - 7/3 = 5/6; 115/18 - 31/6 = 11/9; 691/54 - 127/12 = 239/108;
    #                             4147/162 - 511/24 = 2791/648
    # signal EMA(2) of the line: seed (5/6 + 11/9)/2 = 37/36; 239/108 -> 37/36 + 2/3*(128/108) = 589/324;
    #                            2791/648 -> 589/324 + 2/3*(1613/648) = 845/243
    # histogram: 2791/648 - 845/243 = 1613/1944
    result = macd(closes, fast=2, slow=3, signal=2)
    assert result is not None
    assert result.line == pytest.approx(2791 / 648, abs=1e-12)
    assert result.signal == pytest.approx(845 / 243, abs=1e-12)
    assert result.histogram == pytest.approx(1613 / 1944, abs=1e-12)
    assert macd(closes[:3], fast=2, slow=3, signal=2) is None  # one line value; the signal needs two


def test_bollinger_uses_the_population_deviation() -> None:
    # mean 3, variance (4 + 1 + 0 + 1 + 4) / 5 = 2
    bands = bollinger([1, 2, 3, 4, 5], 5, 2.0)
    assert bands is not None
    assert (bands.upper, bands.middle, bands.lower) == pytest.approx((3 + 2 * math.sqrt(2), 3, 3 - 2 * math.sqrt(2)))


def test_atr_takes_gaps_into_account() -> None:
    bars = [
        Bar(0, high=11, low=9, close=10, volume=1, quote_volume=10),
        Bar(1, high=12, low=10, close=11, volume=1, quote_volume=11),  # TR max(2, |12-10|, |10-10|) = 2
        Bar(2, high=16, low=14, close=15, volume=1, quote_volume=15),  # gap up: max(2, |16-11|, |14-11|) = 5
        Bar(3, high=15, low=12, close=13, volume=1, quote_volume=13),  # max(3, |15-15|, |12-15|) = 3
    ]
    # period 2: seed (2 + 5) / 2 = 3.5; then (3.5 * 1 + 3) / 2 = 3.25
    assert atr(bars, 2) == 3.25
    assert atr(bars[:2], 2) is None


def test_vwap_is_quote_over_base_volume_for_the_session() -> None:
    day = 86_400_000
    bars = [
        Bar(day - HOUR_MS, 1, 1, 1, volume=100, quote_volume=999),  # yesterday: not in today's session
        Bar(day, 1, 1, 1, volume=2, quote_volume=20),
        Bar(day + HOUR_MS, 1, 1, 1, volume=3, quote_volume=45),
    ]
    assert vwap(bars, "1h") == 13.0  # (20 + 45) / (2 + 3)
    assert vwap(bars, "1d") == 15.0  # the newest candle only: 45 / 3
    assert vwap([Bar(0, 1, 1, 1, 0, 0)], "1h") is None


def test_trend_votes_with_the_available_signals() -> None:
    emas: dict[int, float | None] = {9: 11.0, 21: 10.0, 50: 9.0, 200: 8.0}
    bullish = trend(12.0, emas, Macd(1.0, 0.5, 0.5), 75.0)
    assert bullish.direction == "bullish" and bullish.score == 5 and bullish.momentum == "overbought"
    bearish = trend(7.0, {9: 7.5, 21: 8.0, 50: 9.0, 200: 10.0}, Macd(-1.0, 0.0, -1.0), 25.0)
    assert bearish.direction == "bearish" and bearish.score == -5 and bearish.momentum == "oversold"
    mixed = trend(9.5, {9: 9.5, 21: 9.0, 50: 9.0, 200: 10.0}, None, 50.0)
    assert mixed.signals == {"priceVsEma50": 1, "priceVsEma200": -1, "ema50VsEma200": -1, "ema9VsEma21": 1}
    assert mixed.direction == "neutral" and mixed.momentum == "neutral"
    assert trend(None, {}, None, None).direction is None


def fixed_candles() -> list[Candle]:
    """260 hourly candles: a saw-toothed rise with regime shifts every 40 candles (exact 2-decimal prices)."""
    candles = []
    for i in range(260):
        cents = 10_000 + ((i * 37) % 23 - 11) * 25 + i * 25 + (400 if (i // 40) % 2 else -400)
        close = cents / 100
        volume = 10 + i % 7
        candles.append(
            Candle(
                symbol="BTCUSDT",
                interval="1h",
                open_time=i * HOUR_MS,
                close_time=(i + 1) * HOUR_MS - 1,
                open=f"{close:.2f}",
                high=f"{close + ((i % 5) * 50 + 50) / 100:.2f}",
                low=f"{close - ((i % 3) * 50 + 50) / 100:.2f}",
                close=f"{close:.2f}",
                volume=str(volume),
                quote_volume=f"{volume * cents / 100:.2f}",
                trades=1,
                taker_buy_base_volume="0",
                taker_buy_quote_volume="0",
            )
        )
    return candles


# Exact-rational reference figures for fixed_candles() (see the module docstring).
REFERENCE = {
    "close": 161.75,
    "ema": {9: 159.64495056372948, 21: 159.30790984505842, 50: 157.57178575108952, 200: 139.77729660089264},
    "sma": {20: 158.325, 50: 159.43},
    "rsi": 53.50533545095061,
    "macd": (0.3087422792294463, 0.11176495741646866, 0.1969773218129776),
    # variance of the last 20 closes = 7341/1600, so the bands are 158.325 +- sqrt(7341)/20
    "bollinger": (158.325 + math.sqrt(7341) / 20, 158.325, 158.325 - math.sqrt(7341) / 20),
    "atr": 4.135594291310657,
    "vwap": 158.3645038167939,  # the 20 candles of the newest UTC day
}


def test_every_indicator_matches_the_reference_on_the_fixed_candle_set() -> None:
    result = analyse("BTCUSDT", "1h", fixed_candles())
    assert result.candles == 260 and result.open_time == 259 * HOUR_MS
    assert result.close == REFERENCE["close"]
    assert result.ema == pytest.approx(REFERENCE["ema"], rel=1e-12)
    assert result.sma == pytest.approx(REFERENCE["sma"], rel=1e-12)
    assert result.rsi == pytest.approx(REFERENCE["rsi"], rel=1e-12)
    assert result.macd is not None and result.bollinger is not None
    assert (result.macd.line, result.macd.signal, result.macd.histogram) == pytest.approx(REFERENCE["macd"], rel=1e-9)
    bands = result.bollinger
    assert (bands.upper, bands.middle, bands.lower) == pytest.approx(REFERENCE["bollinger"], rel=1e-12)
    assert result.atr == pytest.approx(REFERENCE["atr"], rel=1e-12)
    assert result.vwap == pytest.approx(REFERENCE["vwap"], rel=1e-12)
    # close > EMA50 > EMA200, EMA9 > EMA21, histogram > 0: every vote is bullish
    assert result.trend.direction == "bullish" and result.trend.score == 5
    assert result.trend.momentum == "neutral"


def test_too_few_candles_give_nulls_not_errors() -> None:
    document = orjson.loads(technicals_json(analyse("BTCUSDT", "1h", fixed_candles()[:30])))
    assert document["ema"]["9"] is not None and document["ema"]["50"] is None and document["ema"]["200"] is None
    last_20 = [float(candle.close) for candle in fixed_candles()[10:30]]
    assert document["sma"] == {"20": pytest.approx(sum(last_20) / 20), "50": None}
    assert document["macd"] is None  # needs 26 + 9 - 1 = 34 candles
    assert document["rsi14"] is not None and document["atr14"] is not None
    empty = orjson.loads(technicals_json(analyse("BTCUSDT", "1h", [])))
    assert empty["candles"] == 0 and empty["close"] is None and empty["trend"]["direction"] is None


def test_json_layout() -> None:
    document = orjson.loads(technicals_json(analyse("BTCUSDT", "1h", fixed_candles())))
    assert set(document) == {
        "symbol", "interval", "candles", "openTime", "close", "rsi14", "ema", "sma", "macd", "bollinger", "atr14",
        "vwap", "trend",
    }  # fmt: skip
    assert set(document["ema"]) == {"9", "21", "50", "200"} and set(document["sma"]) == {"20", "50"}
    assert set(document["macd"]) == {"macd", "signal", "histogram"}
    assert set(document["bollinger"]) == {"upper", "middle", "lower"}
    assert document["trend"]["signals"]["priceVsEma200"] == 1
