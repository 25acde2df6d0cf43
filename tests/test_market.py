"""Synthetic market (pure, no event loop): Binance payload layouts, determinism, and the invariants a real
market keeps (ids contiguous, tickers agreeing with trades and the book, klines aggregating trades, diff depth
rebuilding the book). Also the exchangeInfo builder the market's symbol facts feed."""

from __future__ import annotations

import bisect
import itertools
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from ingest.sources.synthetic.market import SyntheticMarket
from ingest.sources.synthetic.ohlc import Ohlc
from ingest.sources.synthetic.rolling import DayWindow
from ingest.sources.synthetic.symbols import DEFAULT_SYMBOLS, fixed8, symbol_spec
from shared.binance.exchange_info import (
    SymbolInfo,
    build_exchange_info,
    split_symbol,
    symbols_from_exchange_info,
)
from shared.intervals import candle_window
from shared.streams import DEPTH_LEVELS, KLINE_INTERVALS, MINI_TICKER_ARR, StreamKind, parse_stream

START_MS = 1_767_225_600_000 - 123_457  # deliberately not on a 100 ms boundary
DECIMAL8 = re.compile(r"-?\d+\.\d{8}")

# Raw payload examples of binance-protocol.md §2 (Binance's web-socket-streams.md), one per stream kind.
BINANCE_EXAMPLES: dict[StreamKind, bytes] = {
    StreamKind.TRADE: b'{"e":"trade","E":1767225600123,"s":"BTCUSDT","t":5612345678,"p":"94250.01000000",'
    b'"q":"0.00210000","T":1767225600122,"m":true,"M":true}',
    StreamKind.AGG_TRADE: b'{"e":"aggTrade","E":1767225600123,"s":"BTCUSDT","a":3456789012,"p":"94250.01000000",'
    b'"q":"0.00210000","f":5612345670,"l":5612345678,"T":1767225600122,"m":true,"M":true}',
    StreamKind.KLINE: b'{"e":"kline","E":1767225601000,"s":"BTCUSDT","k":{"t":1767225600000,"T":1767225659999,'
    b'"s":"BTCUSDT","i":"1m","f":5612345600,"L":5612345678,"o":"94240.00000000","c":"94250.01000000",'
    b'"h":"94255.10000000","l":"94238.50000000","v":"3.41200000","n":79,"x":false,"q":"321564.90112000",'
    b'"V":"1.90400000","Q":"179445.51230000","B":"0"}}',
    StreamKind.MINI_TICKER: b'{"e":"24hrMiniTicker","E":1767225601012,"s":"BTCUSDT","c":"94250.01000000",'
    b'"o":"93110.55000000","h":"95020.00000000","l":"92880.12000000","v":"10532.44107000",'
    b'"q":"990312845.77291300"}',
    StreamKind.TICKER: b'{"e":"24hrTicker","E":1767225601012,"s":"BTCUSDT","p":"1139.46000000","P":"1.224",'
    b'"w":"94027.31650412","x":"93110.54000000","c":"94250.01000000","Q":"0.00210000","b":"94250.00000000",'
    b'"B":"2.10456000","a":"94250.01000000","A":"0.50321000","o":"93110.55000000","h":"95020.00000000",'
    b'"l":"92880.12000000","v":"10532.44107000","q":"990312845.77291300","O":1767139201012,"C":1767225601012,'
    b'"F":5610000000,"L":5612345678,"n":2345679}',
    StreamKind.BOOK_TICKER: b'{"u":81234567890,"s":"BTCUSDT","b":"94250.00000000","B":"2.10456000",'
    b'"a":"94250.01000000","A":"0.50321000"}',
    StreamKind.DEPTH_PARTIAL: b'{"lastUpdateId":81234567890,"bids":[["94250.00000000","2.10456000"],'
    b'["94249.99000000","0.00800000"]],"asks":[["94250.01000000","0.50321000"],["94250.50000000","0.12000000"]]}',
    StreamKind.DEPTH: b'{"e":"depthUpdate","E":1767225601100,"s":"BTCUSDT","U":81234567891,"u":81234567903,'
    b'"b":[["94250.00000000","1.90456000"],["94248.00000000","0.00000000"]],"a":[["94250.01000000","0.51321000"]]}',
    StreamKind.AVG_PRICE: b'{"e":"avgPrice","E":1767225601000,"s":"BTCUSDT","i":"5m","w":"94211.38512345",'
    b'"T":1767225600122}',
}
BINANCE_EXAMPLES[StreamKind.MINI_TICKER_ARR] = b"[" + BINANCE_EXAMPLES[StreamKind.MINI_TICKER] + b"]"


def all_streams(symbols: Iterable[str]) -> frozenset[str]:
    """Every stream the synthetic market can produce for these symbols."""
    names: set[str] = {MINI_TICKER_ARR}
    for symbol in symbols:
        lower = symbol.lower()
        names |= {f"{lower}@{kind}" for kind in ("trade", "aggTrade", "bookTicker", "miniTicker", "ticker")}
        names |= {f"{lower}@avgPrice", f"{lower}@depth", f"{lower}@depth@100ms"}
        names |= {f"{lower}@depth{levels}{speed}" for levels in DEPTH_LEVELS for speed in ("", "@100ms")}
        names |= {f"{lower}@kline_{interval}" for interval in KLINE_INTERVALS}
    return frozenset(names)


def atoms(text: str) -> int:
    """An 8-decimal string as an integer count of 1e-8 (exact)."""
    assert DECIMAL8.fullmatch(text), text
    return int(text.replace(".", ""))


def same_shape(ours: Any, theirs: Any, where: str = "payload") -> None:
    """Same keys in the same order and the same JSON types, recursively (lists compare their first items)."""
    assert type(ours) is type(theirs), f"{where}: {type(ours).__name__} != {type(theirs).__name__}"
    if isinstance(theirs, dict):
        assert list(ours) == list(theirs), f"{where}: keys {list(ours)} != {list(theirs)}"
        for key in theirs:
            same_shape(ours[key], theirs[key], f"{where}.{key}")
    elif isinstance(theirs, list) and theirs and ours:
        same_shape(ours[0], theirs[0], f"{where}[0]")


@dataclass
class Trade:
    time: int
    trade_id: int
    price: int
    qty: int
    buyer_is_maker: bool


class Run:
    """One market run's output, decoded and indexed per symbol and stream."""

    def __init__(self, output: list[tuple[str, bytes]]) -> None:
        self.output = output
        self.decoded = [(name, orjson.loads(payload)) for name, payload in output]
        self.streams = {name: parse_stream(name) for name, _ in output}
        self._by_stream: dict[str, list[Any]] = defaultdict(list)
        for name, data in self.decoded:
            self._by_stream[name].append(data)
        self.trades: dict[str, list[Trade]] = defaultdict(list)
        for name, data in self.decoded:
            if name.endswith("@trade"):
                self.trades[data["s"]].append(
                    Trade(data["T"], data["t"], atoms(data["p"]), atoms(data["q"]), data["m"])
                )

    def of(self, stream: str) -> list[Any]:
        return self._by_stream[stream]


def run_market(symbols: list[str], seconds: float, *, seed: int = 7, rate: float = 5.0) -> Run:
    market = SyntheticMarket(symbols, seed=seed, trade_rate_per_s=rate, start_ms=START_MS)
    return Run(market.advance(START_MS + int(seconds * 1000), all_streams(symbols)))


@pytest.fixture(scope="module")
def long_run() -> Run:
    """Ten simulated minutes of two symbols with every stream wanted."""
    return run_market(["BTCUSDT", "XRPUSDT"], 600, seed=11)


# ---- layouts ----


def test_every_stream_kind_matches_binance_layout_key_for_key(long_run: Run) -> None:
    seen: set[StreamKind] = set()
    for name, payload in long_run.output:
        kind = long_run.streams[name].kind
        same_shape(orjson.loads(payload), orjson.loads(BINANCE_EXAMPLES[kind]), name)
        seen.add(kind)
    assert seen == set(BINANCE_EXAMPLES)


def test_emitted_names_are_canonical_and_only_the_wanted_ones() -> None:
    wanted = frozenset({"btcusdt@trade", "btcusdt@depth5@100ms", "ethusdt@kline_1M", MINI_TICKER_ARR})
    market = SyntheticMarket(["BTCUSDT", "ETHUSDT"], seed=3, start_ms=START_MS)
    output = market.advance(START_MS + 10_000, wanted)
    assert {name for name, _ in output} == wanted
    for name, _ in output:
        assert parse_stream(name).name == name


def test_book_ticker_and_partial_depth_have_no_event_fields_and_trades_no_order_ids(long_run: Run) -> None:
    for name, data in long_run.decoded:
        kind = long_run.streams[name].kind
        if kind in (StreamKind.BOOK_TICKER, StreamKind.DEPTH_PARTIAL):
            assert "e" not in data and "E" not in data
        if kind is StreamKind.TRADE:
            assert "b" not in data and "a" not in data


def test_prices_and_quantities_are_exact_multiples_of_tick_and_step(long_run: Run) -> None:
    specs = {symbol: symbol_spec(symbol) for symbol in ("BTCUSDT", "XRPUSDT")}
    for name, data in long_run.decoded:
        if name.endswith("@trade"):
            spec = specs[data["s"]]
            assert atoms(data["p"]) % spec.tick_atoms == 0
            assert atoms(data["q"]) % spec.step_atoms == 0
        if name.endswith("@depth20"):
            spec = specs[name.split("@")[0].upper()]
            for price, qty in data["bids"] + data["asks"]:
                assert atoms(price) % spec.tick_atoms == 0 and atoms(qty) % spec.step_atoms == 0


def test_fixed8_formats_integers_exactly() -> None:
    assert fixed8(0) == "0.00000000"
    assert fixed8(123_400_000) == "1.23400000"
    assert fixed8(-5) == "-0.00000005"
    assert fixed8(9_425_001_000_000) == "94250.01000000"


# ---- determinism ----


def test_same_seed_same_bytes_other_seed_other_market() -> None:
    wanted = all_streams(["BTCUSDT"])
    first = SyntheticMarket(["BTCUSDT"], seed=5, start_ms=START_MS).advance(START_MS + 20_000, wanted)
    again = SyntheticMarket(["BTCUSDT"], seed=5, start_ms=START_MS).advance(START_MS + 20_000, wanted)
    other = SyntheticMarket(["BTCUSDT"], seed=6, start_ms=START_MS).advance(START_MS + 20_000, wanted)
    assert first == again
    assert first != other


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(min_value=0, max_value=2**32),
    symbols=st.lists(st.sampled_from([*DEFAULT_SYMBOLS, "DOGEUSDT", "ETHBTC"]), min_size=1, max_size=3, unique=True),
    steps=st.lists(st.integers(min_value=1, max_value=1500), min_size=1, max_size=30),
    subset_seed=st.integers(min_value=0, max_value=1000),
)
def test_chunking_and_wanted_set_never_change_the_payloads(
    seed: int, symbols: list[str], steps: list[int], subset_seed: int
) -> None:
    wanted = all_streams(symbols)
    end = START_MS + sum(steps)
    whole = SyntheticMarket(symbols, seed=seed, start_ms=START_MS).advance(end, wanted)

    chunked_market = SyntheticMarket(symbols, seed=seed, start_ms=START_MS)
    chunked: list[tuple[str, bytes]] = []
    now = START_MS
    for step in steps:
        now += step
        chunked += chunked_market.advance(now, wanted)
    assert chunked == whole

    subset = frozenset(name for index, name in enumerate(sorted(wanted)) if (index + subset_seed) % 3 == 0)
    partial = SyntheticMarket(symbols, seed=seed, start_ms=START_MS).advance(end, subset)
    assert partial == [item for item in whole if item[0] in subset]


def test_a_symbol_market_does_not_depend_on_its_neighbours() -> None:
    wanted = all_streams(["ETHUSDT"])
    alone = SyntheticMarket(["ETHUSDT"], seed=9, start_ms=START_MS).advance(START_MS + 15_000, wanted)
    with_others = SyntheticMarket(["BTCUSDT", "ETHUSDT", "SOLUSDT"], seed=9, start_ms=START_MS).advance(
        START_MS + 15_000, wanted - {MINI_TICKER_ARR}
    )
    assert with_others == [item for item in alone if item[0] != MINI_TICKER_ARR]


# ---- consistency invariants ----


def check_trades(run: Run) -> None:
    for trades in run.trades.values():
        assert trades, "no trades at all"
        for previous, trade in itertools.pairwise(trades):
            assert trade.trade_id == previous.trade_id + 1
            assert trade.time >= previous.time


def check_agg_trades(run: Run, symbol: str) -> None:
    trades = {trade.trade_id: trade for trade in run.trades[symbol]}
    aggs = run.of(f"{symbol.lower()}@aggTrade")
    assert aggs[0]["f"] == run.trades[symbol][0].trade_id
    for previous, agg in itertools.pairwise(aggs):
        assert agg["a"] == previous["a"] + 1
        assert agg["f"] == previous["l"] + 1
    for agg in aggs:
        members = [trades[trade_id] for trade_id in range(agg["f"], agg["l"] + 1)]
        assert sum(trade.qty for trade in members) == atoms(agg["q"])
        assert {(t.price, t.time, t.buyer_is_maker) for t in members} == {(atoms(agg["p"]), agg["T"], agg["m"])}


def check_tickers_agree_with_trades_and_book(run: Run) -> None:
    """At every ticker: c/Q/L are the last trade's; b/B/a/A are the last book ticker's; the top of the
    partial depth emitted at the same instant is the same book."""
    last_trade: dict[str, dict[str, Any]] = {}
    last_book: dict[str, dict[str, Any]] = {}
    for name, data in run.decoded:
        kind = run.streams[name].kind
        symbol = name.split("@")[0].upper()
        if kind is StreamKind.TRADE:
            last_trade[symbol] = data
        elif kind is StreamKind.BOOK_TICKER:
            assert atoms(data["b"]) < atoms(data["a"])
            if symbol in last_book:
                assert data["u"] > last_book[symbol]["u"]
            last_book[symbol] = data
        elif kind is StreamKind.TICKER:
            if symbol in last_book:
                book = last_book[symbol]
                assert [data[key] for key in "bBaA"] == [book[key] for key in "bBaA"]
            if symbol in last_trade:
                trade = last_trade[symbol]
                assert (data["c"], data["Q"], data["L"]) == (trade["p"], trade["q"], trade["t"])
            assert data["n"] == data["L"] - data["F"] + 1
            assert data["C"] == data["E"] and data["O"] == data["E"] - 86_400_000
            assert atoms(data["l"]) <= atoms(data["c"]) <= atoms(data["h"])
            assert atoms(data["p"]) == atoms(data["c"]) - atoms(data["o"])
        elif kind is StreamKind.DEPTH_PARTIAL and symbol in last_book:
            book = last_book[symbol]
            assert data["lastUpdateId"] >= book["u"]
            assert data["bids"][0] == [book["b"], book["B"]]
            assert data["asks"][0] == [book["a"], book["A"]]


def test_long_run_trades_and_aggregates_are_contiguous(long_run: Run) -> None:
    check_trades(long_run)
    for symbol in ("BTCUSDT", "XRPUSDT"):
        check_agg_trades(long_run, symbol)


def test_long_run_tickers_book_tickers_and_depth_agree(long_run: Run) -> None:
    check_tickers_agree_with_trades_and_book(long_run)


def test_mini_tickers_and_the_array_match_the_ticker(long_run: Run) -> None:
    tickers = {(data["s"], data["E"]): data for data in long_run.of("btcusdt@ticker") + long_run.of("xrpusdt@ticker")}
    minis = long_run.of("btcusdt@miniTicker") + long_run.of("xrpusdt@miniTicker")
    assert len(minis) == len(tickers) == 2 * 600
    for mini in minis:
        ticker = tickers[(mini["s"], mini["E"])]
        assert [mini[key] for key in "cohlvq"] == [ticker[key] for key in "cohlvq"]
    by_time = {(mini["s"], mini["E"]): mini for mini in minis}
    arrays = long_run.of(MINI_TICKER_ARR)
    assert 500 < len(arrays) <= 600  # a second in which no symbol changed has no array
    for array in arrays:
        for entry in array:
            assert entry == by_time[(entry["s"], entry["E"])]


def test_mini_ticker_array_lists_only_symbols_that_changed() -> None:
    symbols = ["BTCUSDT", "ETHUSDT", "XRPUSDT"]
    market = SyntheticMarket(symbols, seed=2, trade_rate_per_s=0.3, start_ms=START_MS)
    wanted = {MINI_TICKER_ARR} | {f"{symbol.lower()}@trade" for symbol in symbols}
    run = Run(market.advance(START_MS + 180_000, wanted))
    traded = {(symbol, (t.time // 1000 + 1) * 1000) for symbol, trades in run.trades.items() for t in trades}
    first_second = (START_MS // 1000 + 1) * 1000
    listed: set[tuple[str, int]] = set()
    for array in run.of(MINI_TICKER_ARR):
        for entry in array:
            key = (entry["s"], entry["E"])
            listed.add(key)
            # A symbol is listed when it traded in the last second, or when minutes left its 24 h window (at
            # whole minutes), or in the very first array.
            assert key in traded or entry["E"] % 60_000 == 0 or entry["E"] == first_second
    assert traded <= listed
    assert len(listed) < 3 * 180 / 2, "quiet symbols must be left out"


def test_ticker_window_slides_and_ids_stay_consistent(long_run: Run) -> None:
    tickers = long_run.of("btcusdt@ticker")
    firsts = [ticker["F"] for ticker in tickers]
    assert firsts == sorted(firsts)
    assert firsts[-1] > firsts[0], "minutes older than 24 h should leave the window"


def test_periodic_cadences(long_run: Run) -> None:
    def times(stream: str, *, closed: bool | None = None) -> list[int]:
        return [data["E"] for data in long_run.of(stream) if closed is None or data["k"]["x"] is closed]

    for stream in ("btcusdt@ticker", "btcusdt@miniTicker", "btcusdt@avgPrice"):
        seconds = times(stream)
        assert all(b - a == 1000 for a, b in itertools.pairwise(seconds))
    open_updates = times("btcusdt@kline_1m", closed=False)
    assert open_updates and all(t % 2000 == 0 for t in open_updates)
    assert all(t % 60_000 == 0 for t in times("btcusdt@kline_1m", closed=True))
    assert len(times("btcusdt@kline_1m", closed=True)) == 10
    assert len(long_run.of("btcusdt@depth5@100ms")) == 6000
    assert len(long_run.of("btcusdt@depth5")) == 600


def test_partial_depth_has_exactly_n_sorted_levels(long_run: Run) -> None:
    for name, data in long_run.decoded:
        stream = long_run.streams[name]
        if stream.kind is StreamKind.DEPTH_PARTIAL:
            bids = [atoms(price) for price, _ in data["bids"]]
            asks = [atoms(price) for price, _ in data["asks"]]
            assert len(bids) == len(asks) == stream.levels
            assert bids == sorted(bids, reverse=True) and asks == sorted(asks)
            assert bids[0] < asks[0]
            assert all(atoms(qty) > 0 for _, qty in data["bids"] + data["asks"])


def check_klines(run: Run, symbol: str) -> None:
    """Every kline update equals the aggregation of the trades in its window before its event time (sums via
    prefix sums so long candles stay cheap to check)."""
    trades = run.trades[symbol]
    times = [trade.time for trade in trades]
    prices = [trade.price for trade in trades]
    sums: dict[str, list[int]] = {key: [0] for key in ("v", "q", "V", "Q")}
    for trade in trades:
        quote = trade.price * trade.qty // 10**8
        taker_is_buyer = not trade.buyer_is_maker
        for key, value in (
            ("v", trade.qty),
            ("q", quote),
            ("V", trade.qty * taker_is_buyer),
            ("Q", quote * taker_is_buyer),
        ):
            sums[key].append(sums[key][-1] + value)
    for interval in KLINE_INTERVALS:
        for data in run.of(f"{symbol.lower()}@kline_{interval}"):
            candle = data["k"]
            assert (candle["t"], candle["T"] + 1) == candle_window(interval, candle["t"])
            assert candle["x"] is (data["E"] == candle["T"] + 1)
            start = bisect.bisect_left(times, candle["t"])
            end = bisect.bisect_left(times, min(candle["T"] + 1, data["E"]))
            assert candle["n"] == end - start
            if start == end:
                assert candle["f"] == candle["L"] == -1 and atoms(candle["v"]) == 0
                assert candle["o"] == candle["h"] == candle["l"] == candle["c"]
                if start > 0:
                    assert atoms(candle["c"]) == trades[start - 1].price
                continue
            assert (candle["f"], candle["L"]) == (trades[start].trade_id, trades[end - 1].trade_id)
            assert (atoms(candle["o"]), atoms(candle["c"])) == (prices[start], prices[end - 1])
            assert atoms(candle["h"]) == max(prices[start:end])
            assert atoms(candle["l"]) == min(prices[start:end])
            for key, column in sums.items():
                assert atoms(candle[key]) == column[end] - column[start], key


def test_klines_aggregate_the_trades_of_their_window(long_run: Run) -> None:
    for symbol in ("BTCUSDT", "XRPUSDT"):
        check_klines(long_run, symbol)


def test_avg_price_is_the_five_minute_vwap(long_run: Run) -> None:
    trades = long_run.trades["BTCUSDT"]
    for data in long_run.of("btcusdt@avgPrice")[::37]:
        window = [t for t in trades if data["E"] - 300_000 < t.time < data["E"]]
        if not window:
            continue
        volume = sum(t.qty for t in window)
        quote = sum(t.price * t.qty for t in window)
        assert abs(atoms(data["w"]) - quote / volume) <= 0.5 + 1e-6
        assert data["T"] == window[-1].time


def check_diff_depth_rebuilds_the_book(market_symbols: list[str], seed: int, seconds: int) -> None:
    """Start from a full snapshot and apply every diff in order: after each diff the local book's top 20 equals
    the partial depth emitted at the same instant, and whenever nothing happened since, the whole book equals
    a fresh snapshot. For both diff speeds."""
    for diff_suffix, partial_suffix in (("@depth@100ms", "@depth20@100ms"), ("@depth", "@depth20")):
        market = SyntheticMarket(market_symbols, seed=seed, start_ms=START_MS)
        symbol = market_symbols[0]
        snapshot = orjson.loads(market.depth_snapshot(symbol, limit=1000))
        diff_name = symbol.lower() + diff_suffix
        partial_name = symbol.lower() + partial_suffix
        bids = {atoms(p): atoms(q) for p, q in snapshot["bids"]}
        asks = {atoms(p): atoms(q) for p, q in snapshot["asks"]}
        last_id = snapshot["lastUpdateId"]
        diffs = full_checks = 0
        step = 100 if diff_suffix.endswith("100ms") else 1000
        first_boundary = (START_MS // step + 1) * step
        for boundary in range(first_boundary, START_MS + seconds * 1000, step):
            for name, payload in market.advance(boundary, {diff_name, partial_name}):
                data = orjson.loads(payload)
                if name == diff_name:
                    assert data["U"] == last_id + 1, "diff depth must be contiguous"
                    assert data["u"] >= data["U"]
                    last_id = data["u"]
                    for side, changes in ((bids, data["b"]), (asks, data["a"])):
                        for price, qty in changes:
                            if atoms(qty) == 0:
                                side.pop(atoms(price), None)
                            else:
                                side[atoms(price)] = atoms(qty)
                    diffs += 1
                else:
                    assert data["lastUpdateId"] == last_id
                    top_bids = sorted(bids.items(), reverse=True)[:20]
                    top_asks = sorted(asks.items())[:20]
                    assert [[atoms(p), atoms(q)] for p, q in data["bids"]] == [list(level) for level in top_bids]
                    assert [[atoms(p), atoms(q)] for p, q in data["asks"]] == [list(level) for level in top_asks]
            current = orjson.loads(market.depth_snapshot(symbol, limit=1000))
            if current["lastUpdateId"] == last_id:  # no book change at this very millisecond after the diff
                assert {atoms(p): atoms(q) for p, q in current["bids"]} == bids
                assert {atoms(p): atoms(q) for p, q in current["asks"]} == asks
                full_checks += 1
        assert diffs > 0 and full_checks > diffs // 2


def test_diff_depth_applied_to_a_snapshot_reproduces_the_book() -> None:
    check_diff_depth_rebuilds_the_book(["BTCUSDT", "ETHUSDT"], seed=4, seconds=120)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(min_value=0, max_value=2**32),
    symbols=st.lists(
        st.sampled_from([*DEFAULT_SYMBOLS, "DOGEUSDT", "PEPEFDUSD", "ETHBTC"]), min_size=1, max_size=3, unique=True
    ),
    rate=st.sampled_from([2.0, 5.0, 40.0]),
)
def test_invariants_hold_for_any_seed_symbols_and_rate(seed: int, symbols: list[str], rate: float) -> None:
    run = run_market(symbols, 20, seed=seed, rate=rate)
    check_trades(run)
    check_tickers_agree_with_trades_and_book(run)
    for symbol in symbols:
        check_agg_trades(run, symbol)
        check_klines(run, symbol)
    check_diff_depth_rebuilds_the_book(symbols, seed, 10)


def test_trade_rate_is_roughly_what_was_asked_and_bursty(long_run: Run) -> None:
    for trades in long_run.trades.values():
        rate = len(trades) / 600
        assert 3.0 <= rate <= 8.0
        per_second: dict[int, int] = defaultdict(int)
        for trade in trades:
            per_second[trade.time // 1000] += 1
        counts = [per_second.get(second, 0) for second in range(START_MS // 1000, START_MS // 1000 + 600)]
        mean = sum(counts) / len(counts)
        variance = sum((count - mean) ** 2 for count in counts) / len(counts)
        assert variance > 1.5 * mean, "arrivals should be burstier than a Poisson process"


def test_zero_trade_rate_still_moves_the_book() -> None:
    market = SyntheticMarket(["BTCUSDT"], seed=1, trade_rate_per_s=0, start_ms=START_MS)
    output = market.advance(START_MS + 5000, all_streams(["BTCUSDT"]))
    names = {name for name, _ in output}
    assert "btcusdt@trade" not in names and "btcusdt@bookTicker" in names


# ---- API edges ----


def test_invalid_arguments_and_time_going_backwards() -> None:
    with pytest.raises(ValueError, match="at least one symbol"):
        SyntheticMarket([], seed=1, start_ms=START_MS)
    with pytest.raises(ValueError, match="trade_rate_per_s"):
        SyntheticMarket(["BTCUSDT"], seed=1, trade_rate_per_s=-1, start_ms=START_MS)
    market = SyntheticMarket(["btcusdt", "BTCUSDT"], seed=1, start_ms=START_MS)
    assert market.symbols == ["BTCUSDT"]
    assert market.advance(START_MS + 2000, {"btcusdt@ticker"})
    assert market.advance(START_MS + 1000, {"btcusdt@ticker"}) == []
    assert market.now_ms == START_MS + 2000
    with pytest.raises(KeyError):
        market.depth_snapshot("ETHUSDT")


def test_symbol_specs_known_and_made_up() -> None:
    btc = symbol_spec("btcusdt")
    assert (btc.base_asset, btc.quote_asset, btc.tick_atoms, btc.step_atoms) == ("BTC", "USDT", 10**6, 10**3)
    made_up = symbol_spec("FOOBARUSDC")
    assert made_up == symbol_spec("FOOBARUSDC")
    assert (made_up.base_asset, made_up.quote_asset) == ("FOOBAR", "USDC")
    for spec in (*(symbol_spec(symbol) for symbol in DEFAULT_SYMBOLS), made_up):
        assert spec.price_atoms % spec.tick_atoms == 0
        assert (spec.tick_atoms * spec.step_atoms) % 10**8 == 0, "quote volumes must be exact at 8 decimals"


@pytest.mark.parametrize(
    ("interval", "time_ms", "expected"),
    [
        ("1m", 1_767_225_659_999, (1_767_225_600_000, 1_767_225_660_000)),
        ("1s", 1_767_225_600_999, (1_767_225_600_000, 1_767_225_601_000)),
        ("1d", 1_767_225_600_000, (1_767_225_600_000, 1_767_312_000_000)),
        # 2026-01-01 is a Thursday; its week opened on Monday 2025-12-29.
        ("1w", 1_767_225_600_000, (1_766_966_400_000, 1_767_571_200_000)),
        # December 2025, then February 2028 (a leap year).
        ("1M", 1_767_225_599_999, (1_764_547_200_000, 1_767_225_600_000)),
        ("1M", 1_833_000_000_000, (1_832_976_000_000, 1_835_481_600_000)),
    ],
)
def test_candle_windows(interval: str, time_ms: int, expected: tuple[int, int]) -> None:
    assert candle_window(interval, time_ms) == expected


# ---- exchangeInfo ----


def test_exchange_info_layout_and_round_trip() -> None:
    market = SyntheticMarket(["BTCUSDT", "XRPUSDT", "FOOETH"], seed=1, start_ms=START_MS)
    document = build_exchange_info(market.symbols_info(), 1_767_225_600_000)
    parsed = orjson.loads(document)
    assert list(parsed) == ["timezone", "serverTime", "rateLimits", "exchangeFilters", "symbols"]
    assert parsed["timezone"] == "UTC" and parsed["serverTime"] == 1_767_225_600_000
    assert parsed["rateLimits"][0] == {
        "rateLimitType": "REQUEST_WEIGHT",
        "interval": "MINUTE",
        "intervalNum": 1,
        "limit": 6000,
    }
    assert {limit["rateLimitType"] for limit in parsed["rateLimits"]} == {"REQUEST_WEIGHT", "ORDERS", "RAW_REQUESTS"}
    btc = parsed["symbols"][0]
    assert list(btc)[:7] == [
        "symbol",
        "status",
        "baseAsset",
        "baseAssetPrecision",
        "quoteAsset",
        "quotePrecision",
        "quoteAssetPrecision",
    ]
    assert (btc["symbol"], btc["status"], btc["baseAsset"], btc["quoteAsset"]) == ("BTCUSDT", "TRADING", "BTC", "USDT")
    assert btc["filters"][0] == {
        "filterType": "PRICE_FILTER",
        "minPrice": "0.01000000",
        "maxPrice": "94250000.00000000",
        "tickSize": "0.01000000",
    }
    assert btc["filters"][1]["filterType"] == "LOT_SIZE" and btc["filters"][1]["stepSize"] == "0.00001000"
    assert btc["permissions"] == ["SPOT"] and btc["permissionSets"] == [["SPOT"]]
    assert btc["isSpotTradingAllowed"] is True
    assert btc["defaultSelfTradePreventionMode"] in btc["allowedSelfTradePreventionModes"]
    assert parsed["symbols"][2]["baseAsset"] == "FOO" and parsed["symbols"][2]["quoteAsset"] == "ETH"
    assert symbols_from_exchange_info(document) == ["BTCUSDT", "XRPUSDT", "FOOETH"]


def test_symbols_from_exchange_info_keeps_trading_symbols_and_rejects_garbage() -> None:
    document = orjson.dumps(
        {"symbols": [{"symbol": "btcusdt", "status": "TRADING"}, {"symbol": "OLDBTC", "status": "BREAK"}]}
    )
    assert symbols_from_exchange_info(document) == ["BTCUSDT"]
    for bad in (b"not json", b"[]", b'{"symbols": 3}', b'{"symbols": [{"status": "TRADING"}]}'):
        with pytest.raises(ValueError):
            symbols_from_exchange_info(bad)


@pytest.mark.parametrize(
    ("symbol", "expected"),
    [
        ("BTCUSDT", ("BTC", "USDT")),
        ("ETHBTC", ("ETH", "BTC")),
        ("USDCUSDT", ("USDC", "USDT")),
        ("BTCFDUSD", ("BTC", "FDUSD")),
        ("BNBETH", ("BNB", "ETH")),
        ("btctry", ("BTC", "TRY")),
        ("EURUSDT", ("EUR", "USDT")),
        ("ABCXYZ", ("ABC", "XYZ")),
        ("AB", ("A", "B")),
    ],
)
def test_split_symbol(symbol: str, expected: tuple[str, str]) -> None:
    assert split_symbol(symbol) == expected


def test_symbol_info_is_what_build_exchange_info_needs() -> None:
    info = SymbolInfo(
        "XUSDT", "X", "USDT", "0.00100000", "0.01000000", "0.00100000", "1000.00000000", "0.01000000", "90000.00000000"
    )
    parsed = orjson.loads(build_exchange_info([info], 1))
    assert parsed["symbols"][0]["filters"][1] == {
        "filterType": "LOT_SIZE",
        "minQty": "0.01000000",
        "maxQty": "90000.00000000",
        "stepSize": "0.01000000",
    }


def test_a_bar_without_trades_shows_its_opening_price_and_the_first_trade_replaces_it() -> None:
    bar = Ohlc(60_000, 120_000, 500)
    assert (bar.open, bar.high, bar.low, bar.close) == (500, 500, 500, 500)
    assert (bar.trades, bar.first_id, bar.last_id) == (0, -1, -1)
    bar.add(7, 510, 3, 1530, True)
    bar.add(8, 490, 2, 980, False)
    bar.add(9, 505, 1, 505, True)
    assert (bar.open, bar.high, bar.low, bar.close) == (510, 510, 490, 505)
    assert (bar.volume, bar.quote, bar.taker_volume, bar.taker_quote) == (6, 3015, 4, 2035)
    assert (bar.trades, bar.first_id, bar.last_id) == (3, 7, 9)


def test_the_day_window_keeps_one_bucket_per_minute_and_drops_minutes_a_day_old() -> None:
    day = DayWindow([], prev_close=100)
    day.add(60_000, 1, 101, 1, 101, True)
    day.add(119_999, 2, 99, 2, 198, False)
    day.add(120_000, 3, 103, 1, 103, True)
    assert [(bucket.open_ms, bucket.trades) for bucket in day.buckets] == [(60_000, 2), (120_000, 1)]
    assert (day.volume, day.quote, day.trades) == (4, 402, 3)
    assert day.high_low(last_price=0) == (103, 99)
    assert not day.expire(86_400_000 + 119_999)
    assert day.expire(86_400_000 + 120_000)
    assert (day.prev_close, day.volume, day.quote, day.trades) == (99, 1, 103, 1)
    assert day.high_low(last_price=0) == (103, 103)
