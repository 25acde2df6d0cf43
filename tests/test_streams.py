"""Stream grammar, channel naming and byte framing (pure; no sockets, no loop)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from shared.errors import ProtocolError
from shared.frames import (
    Publication,
    combined_frame,
    decode_publication,
    encode_publication,
    split_combined_frame,
)
from shared.streams import KLINE_INTERVALS, ChannelNamer, StreamKind, parse_stream


@pytest.mark.parametrize(
    ("raw", "canonical", "kind"),
    [
        ("btcusdt@trade", "btcusdt@trade", StreamKind.TRADE),
        ("BTCUSDT@aggTrade", "btcusdt@aggTrade", StreamKind.AGG_TRADE),
        ("btcusdt@aggtrade", "btcusdt@aggTrade", StreamKind.AGG_TRADE),
        ("btcusdt@kline_1M", "btcusdt@kline_1M", StreamKind.KLINE),
        ("btcusdt@kline_1m", "btcusdt@kline_1m", StreamKind.KLINE),
        ("btcusdt@miniTicker", "btcusdt@miniTicker", StreamKind.MINI_TICKER),
        ("!miniTicker@arr", "!miniTicker@arr", StreamKind.MINI_TICKER_ARR),
        ("!miniTicker@arr@1000ms", "!miniTicker@arr", StreamKind.MINI_TICKER_ARR),
        ("btcusdt@ticker", "btcusdt@ticker", StreamKind.TICKER),
        ("btcusdt@bookTicker", "btcusdt@bookTicker", StreamKind.BOOK_TICKER),
        ("btcusdt@depth5", "btcusdt@depth5", StreamKind.DEPTH_PARTIAL),
        ("btcusdt@depth5@1000ms", "btcusdt@depth5", StreamKind.DEPTH_PARTIAL),
        ("btcusdt@depth20@100ms", "btcusdt@depth20@100ms", StreamKind.DEPTH_PARTIAL),
        ("btcusdt@depth", "btcusdt@depth", StreamKind.DEPTH),
        ("btcusdt@depth@1000ms", "btcusdt@depth", StreamKind.DEPTH),
        ("btcusdt@depth@100ms", "btcusdt@depth@100ms", StreamKind.DEPTH),
        ("btcusdt@avgPrice", "btcusdt@avgPrice", StreamKind.AVG_PRICE),
    ],
)
def test_valid_names_normalise(raw: str, canonical: str, kind: StreamKind) -> None:
    stream = parse_stream(raw)
    assert (stream.name, stream.kind) == (canonical, kind)


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "btcusdt",
        "btcusdt@",
        "btcusdt@trades",
        "btcusdt@kline_2m",
        "btcusdt@depth7",
        "btcusdt@depth5@10ms",
        "btcusdt@trade@1000ms",
        "b@trade",
        "btc-usdt@trade",
        "!ticker@arr",
        "!bookTicker",
        "!miniTicker@arrgarbage",
        "btcusdt@depth²",
        "x" * 100,
    ],
)
def test_invalid_names_are_code_2(raw: str) -> None:
    with pytest.raises(ProtocolError) as error:
        parse_stream(raw)
    assert error.value.code == 2
    assert error.value.reason.startswith("Invalid request: invalid stream")


def test_state_and_event_kinds() -> None:
    assert parse_stream("btcusdt@bookTicker").is_state
    assert parse_stream("btcusdt@kline_1m").is_state
    assert parse_stream("btcusdt@depth10").is_state
    assert not parse_stream("btcusdt@trade").is_state
    assert not parse_stream("btcusdt@depth").is_state
    assert not parse_stream("!miniTicker@arr").is_state


def test_every_kline_interval_parses() -> None:
    for interval in KLINE_INTERVALS:
        assert parse_stream(f"ethusdt@kline_{interval}").interval == interval


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=80))
def test_parser_only_ever_raises_protocol_error_and_canonical_names_are_fixed_points(raw: str) -> None:
    try:
        stream = parse_stream(raw)
    except ProtocolError as error:
        assert error.code == 2
        return
    assert parse_stream(stream.name) == stream


def test_channel_names_share_one_hash_tag_and_round_trip() -> None:
    namer = ChannelNamer("pg:md", "binance")
    keys = namer.keys("btcusdt@trade")
    assert keys.channel == "pg:md:binance:{btcusdt@trade}"
    for key in (keys.seq, keys.epoch, keys.history, keys.last):
        assert key.startswith(keys.channel)
    assert namer.stream_of(keys.channel) == "btcusdt@trade"


@given(st.integers(1, 2**31), st.integers(1, 2**62), st.integers(0, 2**45), st.binary(max_size=200))
def test_publication_envelope_round_trips(epoch: int, seq: int, published_at: int, payload: bytes) -> None:
    data = encode_publication(epoch, seq, published_at, payload)
    assert decode_publication(data) == Publication(epoch, seq, published_at, payload)


def test_combined_frame_is_binance_layout_and_splits_back() -> None:
    frame = combined_frame("btcusdt@trade", b'{"e":"trade"}')
    assert frame == b'{"stream":"btcusdt@trade","data":{"e":"trade"}}'
    assert split_combined_frame(frame) == ("btcusdt@trade", b'{"e":"trade"}')
    assert split_combined_frame(b'{"data":{},"stream":"x"}') is None
