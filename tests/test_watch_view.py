"""pricegate watch's pure part: URLs, stream names, frames of every kind, rates, lag and the rendered view."""

from __future__ import annotations

import io

import orjson
import pytest
from rich.console import Console

from pricegate_cli.watch_view import (
    RateMeter,
    UsageError,
    WatchModel,
    combined_url,
    event_time_ms,
    format_lag,
    normalise_stream,
    parse_frame,
    shown_url,
    stream_kind,
    summarise,
    trim,
)

NOW_S = 1_767_225_600.0  # 2026-01-01T00:00:00Z
NOW_MS = int(NOW_S * 1000)


def combined(stream: str, data: object) -> bytes:
    return orjson.dumps({"stream": stream, "data": data})


@pytest.mark.parametrize(
    ("base", "url"),
    [
        ("ws://127.0.0.1:8000", "ws://127.0.0.1:8000/stream?streams=btcusdt@trade/ethusdt@ticker"),
        ("ws://127.0.0.1:8000/", "ws://127.0.0.1:8000/stream?streams=btcusdt@trade/ethusdt@ticker"),
        ("wss://stream.binance.com:9443", "wss://stream.binance.com:9443/stream?streams=btcusdt@trade/ethusdt@ticker"),
        (
            "wss://stream.binance.com:9443/ws",
            "wss://stream.binance.com:9443/stream?streams=btcusdt@trade/ethusdt@ticker",
        ),
        ("http://gw.example:8000/md/stream", "ws://gw.example:8000/md/stream?streams=btcusdt@trade/ethusdt@ticker"),
        ("HTTPS://gw.example", "wss://gw.example/stream?streams=btcusdt@trade/ethusdt@ticker"),
    ],
)
def test_the_combined_url_of_a_websocket_base(base: str, url: str) -> None:
    assert combined_url(base, ["btcusdt@trade", "ethusdt@ticker"]) == url


def test_a_token_goes_into_the_query_and_is_never_shown() -> None:
    url = combined_url("ws://h:1", ["btcusdt@trade"], token="a.b+c/d")
    assert url == "ws://h:1/stream?streams=btcusdt@trade&token=a.b%2Bc%2Fd"
    assert shown_url(url) == "ws://h:1/stream?streams=btcusdt@trade&token=***"


@pytest.mark.parametrize("base", ["ftp://h", "127.0.0.1:8000", "ws://", "ws://h:1/?x=1", ""])
def test_a_base_that_is_no_websocket_url_is_a_usage_error(base: str) -> None:
    with pytest.raises(UsageError, match="--url"):
        combined_url(base, ["btcusdt@trade"])


def test_stream_names_keep_binance_spelling() -> None:
    assert normalise_stream("BTCUSDT@trade") == "btcusdt@trade"
    assert normalise_stream(" ethusdt@kline_1M ") == "ethusdt@kline_1M"  # a month, not a minute
    assert normalise_stream("!miniTicker@arr") == "!miniTicker@arr"
    assert normalise_stream("btcusdt@depth5@100ms") == "btcusdt@depth5@100ms"
    for bad in ("btcusdt", "btc usdt@trade", "a/b@trade", "@trade", "btcusdt@"):
        with pytest.raises(UsageError, match="not a stream name"):
            normalise_stream(bad)


@pytest.mark.parametrize(
    ("stream", "kind"),
    [
        ("btcusdt@trade", "trade"),
        ("btcusdt@aggTrade", "aggTrade"),
        ("btcusdt@kline_1m", "kline"),
        ("btcusdt@miniTicker", "miniTicker"),
        ("!miniTicker@arr", "miniTickerArr"),
        ("btcusdt@ticker", "ticker"),
        ("btcusdt@bookTicker", "bookTicker"),
        ("btcusdt@depth5@100ms", "depthPartial"),
        ("btcusdt@depth@100ms", "depth"),
        ("btcusdt@avgPrice", "avgPrice"),
        ("btcusdt@ticker_1h", "ticker_1h"),  # a Binance stream this view has no layout for
    ],
)
def test_stream_kinds(stream: str, kind: str) -> None:
    assert stream_kind(stream) == kind


def test_decimals_lose_their_trailing_zeros_only() -> None:
    assert [trim(v) for v in ("94250.38000000", "0.00000000", "100", "-1.50", "12.3.4", None)] == [
        "94250.38",
        "0",
        "100",
        "-1.5",
        "12.3.4",
        "None",
    ]


TRADE = {"e": "trade", "E": NOW_MS - 40, "s": "BTCUSDT", "t": 1, "p": "94250.38000000", "q": "0.01200000", "m": True}
KLINE = {
    "e": "kline",
    "E": NOW_MS - 5,
    "s": "BTCUSDT",
    "k": {"i": "1m", "o": "1.10", "h": "1.30", "l": "1.00", "c": "1.20", "v": "10.0", "x": True},
}
TICKER = {"e": "24hrTicker", "E": NOW_MS, "s": "BTCUSDT", "c": "2.50", "P": "-1.250", "h": "3", "l": "2", "v": "9.0"}
MINI = {
    "e": "24hrMiniTicker",
    "E": NOW_MS,
    "s": "ETHUSDT",
    "c": "3300.10",
    "o": "3200",
    "h": "3400",
    "l": "3100",
    "v": "1",
}
BOOK = {"u": 5, "s": "BTCUSDT", "b": "94248.05000000", "B": "0.027", "a": "94250.89000000", "A": "0.1"}
PARTIAL = {"lastUpdateId": 77, "bids": [["10.5", "1"], ["10.4", "2"]], "asks": [["10.6", "3"]]}
DIFF = {"e": "depthUpdate", "E": NOW_MS, "s": "BTCUSDT", "U": 1, "u": 9, "b": [["1", "1"]], "a": []}
AVG = {"e": "avgPrice", "E": NOW_MS, "s": "BTCUSDT", "i": "5m", "w": "94255.53417688"}


@pytest.mark.parametrize(
    ("kind", "data", "last", "details"),
    [
        ("trade", TRADE, "94250.38", "sell 0.012"),
        ("aggTrade", {**TRADE, "e": "aggTrade", "m": False}, "94250.38", "buy 0.012"),
        ("kline", KLINE, "1.2", "1m o 1.1 h 1.3 l 1 v 10 closed"),
        ("ticker", TICKER, "2.5", "-1.25% h 3 l 2 vol 9"),
        ("miniTicker", MINI, "3300.1", "o 3200 h 3400 l 3100 vol 1"),
        ("bookTicker", BOOK, "94248.05 / 94250.89", "qty 0.027 / 0.1"),
        ("depthPartial", PARTIAL, "10.5 / 10.6", "2x1 levels, id 77"),
        ("depth", DIFF, "-", "1 bids, 0 asks changed, u 9"),
        ("avgPrice", AVG, "94255.53417688", "average over 5m"),
        ("miniTickerArr", [MINI, {**MINI, "s": "BTCUSDT", "c": "1"}], "2 symbols", "ETHUSDT 3300.1, BTCUSDT 1"),
        ("ticker_1h", {"x": 1}, "-", '{"x":1}'),
    ],
)
def test_each_kind_shows_its_telling_fields(kind: str, data: object, last: str, details: str) -> None:
    assert summarise(kind, data) == (last, details)


def test_event_time_is_e_or_the_newest_of_an_array() -> None:
    assert event_time_ms(TRADE) == NOW_MS - 40
    assert event_time_ms([MINI, {**MINI, "E": NOW_MS + 7}]) == NOW_MS + 7
    assert event_time_ms(BOOK) is None and event_time_ms(PARTIAL) is None and event_time_ms([]) is None


def test_frames_are_data_errors_replies_or_other() -> None:
    data = parse_frame(combined("btcusdt@trade", TRADE))
    assert (data.kind, data.stream, data.payload) == ("data", "btcusdt@trade", TRADE)
    error = parse_frame(b'{"error":{"code":2,"msg":"Invalid request: unknown symbol FOOUSDT"},"id":null}')
    assert (error.kind, error.message) == ("error", "Invalid request: unknown symbol FOOUSDT (code 2)")
    assert parse_frame('{"result":null,"id":1}').kind == "reply"
    assert parse_frame(b"[1,2]").kind == "other"
    assert parse_frame(b"not json").message.startswith("not JSON")


def test_the_rate_is_over_the_last_window_or_since_the_first_message() -> None:
    meter = RateMeter(window=5.0)
    assert meter.rate(NOW_S) == 0.0
    for i in range(10):
        meter.record(NOW_S + i * 0.1)  # 10 messages within one second
    assert meter.rate(NOW_S + 0.9) == pytest.approx(10.0)  # a young stream: over max(elapsed, 1 s)
    for i in range(50):
        meter.record(NOW_S + 5 + i * 0.1)  # 10/s for five more seconds
    assert meter.rate(NOW_S + 9.95) == pytest.approx(10.0, rel=0.05)
    assert meter.rate(NOW_S + 100) == 0.0  # silent for longer than the window


def test_lag_reads_in_milliseconds_then_seconds() -> None:
    assert [format_lag(v) for v in (None, 4.4, -3.0, 9_999, 12_345)] == ["-", "4 ms", "-3 ms", "9999 ms", "12.3 s"]


def test_the_model_keeps_one_row_per_stream_in_order_and_logs_events() -> None:
    model = WatchModel(["btcusdt@trade", "btcusdt@bookTicker", "ethusdt@miniTicker"], log_lines=2)
    assert [row[0] for row in model.rows(NOW_S)] == ["btcusdt@trade", "btcusdt@bookTicker", "ethusdt@miniTicker"]
    assert model.rows(NOW_S)[0][1:] == ("-", "waiting for the first message", "0.0", "-")
    for t in range(3):
        model.on_frame(combined("btcusdt@trade", {**TRADE, "t": t}), NOW_S)
    model.on_frame(combined("btcusdt@bookTicker", BOOK), NOW_S)
    rows = {row[0]: row for row in model.rows(NOW_S)}
    assert rows["btcusdt@trade"] == ("btcusdt@trade", "94250.38", "sell 0.012", "3.0", "40 ms")
    assert rows["btcusdt@bookTicker"][1] == "94248.05 / 94250.89" and rows["btcusdt@bookTicker"][4] == "-"
    assert len(model.log) == 2 and all("btcusdt@trade  94250.38  sell 0.012" in line for line in model.log)
    # A stream the server names that was not asked for (it renamed one) is shown too.
    model.on_frame(combined("btcusdt@depth5", PARTIAL), NOW_S)
    assert model.rows(NOW_S)[-1][0] == "btcusdt@depth5"


def test_every_stream_refused_is_told_apart_from_some() -> None:
    refusal = b'{"error":{"code":2,"msg":"Invalid request: unknown symbol"},"id":null}'
    model = WatchModel(["foousdt@trade", "btcusdt@trade"])
    model.connected("ws://h:1/stream?streams=foousdt@trade/btcusdt@trade&token=secret")
    assert model.status == "live: ws://h:1/stream?streams=foousdt@trade/btcusdt@trade&token=***"
    model.on_frame(refusal, NOW_S)
    assert not model.all_refused() and model.status.startswith("server error: Invalid request")
    model.on_frame(refusal, NOW_S)
    assert model.all_refused()
    model.connected("ws://h:1/")  # a new connection starts counting again
    assert not model.all_refused()
    model.on_frame(combined("btcusdt@trade", TRADE), NOW_S)
    model.on_frame(refusal, NOW_S)
    model.on_frame(refusal, NOW_S)
    assert not model.all_refused()  # data flows


def test_the_view_renders_the_table_the_log_and_the_status() -> None:
    model = WatchModel(["btcusdt@trade", "ethusdt@miniTicker"])
    model.on_frame(combined("btcusdt@trade", TRADE), NOW_S)
    model.on_frame(combined("ethusdt@miniTicker", MINI), NOW_S)
    model.disconnected("cannot connect: refused; retrying in 0.4 s")
    console = Console(file=io.StringIO(), width=120, color_system=None)
    console.print(model.render(NOW_S))
    text = console.file.getvalue()  # type: ignore[attr-defined]
    for expected in ("stream", "msg/s", "lag", "btcusdt@trade", "94250.38", "40 ms", "ethusdt@miniTicker", "3300.1"):
        assert expected in text
    assert "events" in text and "cannot connect: refused; retrying in 0.4 s" in text.splitlines()[-1]
