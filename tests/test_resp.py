"""shared.redis.resp, byte by byte and by property: every valid reply parses to its value however a socket splits
it (and to None until it is complete), hostile bytes end in ProtocolDesync and nothing else, and a packed command
is what Redis expects. The encoder here is written out by hand so the model does not reuse the parser under test."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from shared.redis.resp import MAX_DEPTH, ErrorReply, ProtocolDesync, Reply, pack_command, parse_reply

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# A reply as (wire bytes, the value parse_reply must return).
Encoded = tuple[bytes, Reply]

line_text = st.binary(max_size=20).map(lambda raw: raw.replace(b"\r", b"").replace(b"\n", b""))
scalars: st.SearchStrategy[Encoded] = st.one_of(
    st.binary(max_size=40).map(lambda data: (b"$%d\r\n%b\r\n" % (len(data), data), data)),
    st.just((b"$-1\r\n", None)),
    st.just((b"*-1\r\n", None)),
    st.integers(min_value=-(2**63), max_value=2**63 - 1).map(lambda number: (b":%d\r\n" % number, number)),
    line_text.map(lambda text: (b"+%b\r\n" % text, text)),
    line_text.map(lambda text: (b"-%b\r\n" % text, ErrorReply(text))),
)


def aggregate(kind: bytes, items: list[Encoded]) -> Encoded:
    return kind + b"%d\r\n" % len(items) + b"".join(wire for wire, _ in items), [value for _, value in items]


replies: st.SearchStrategy[Encoded] = st.recursive(
    scalars,
    lambda children: st.builds(aggregate, st.sampled_from([b"*", b">"]), st.lists(children, max_size=4)),
    max_leaves=12,
)
resp_like = st.lists(
    st.sampled_from([b"*", b">", b"$", b":", b"+", b"-", b"\r\n", b"\r", b"\n", b"0", b"1", b"3", b"-1", b"a", b" "]),
    max_size=40,
).map(b"".join)


@st.composite
def damaged(draw: st.DrawFn) -> bytes:
    """A valid reply with one byte changed, inserted or removed."""
    wire = bytearray(draw(replies)[0])
    at = draw(st.integers(min_value=0, max_value=len(wire)))
    byte = draw(st.integers(min_value=0, max_value=255))
    action = draw(st.sampled_from(["change", "insert", "remove"]))
    if action == "insert" or at == len(wire):
        wire.insert(at, byte)
    elif action == "change":
        wire[at] = byte
    else:
        del wire[at]
    return bytes(wire)


@SETTINGS
@given(replies, st.binary(max_size=8))
def test_a_valid_reply_parses_to_its_value_once_complete_and_to_none_before(reply: Encoded, before: bytes) -> None:
    wire, value = reply
    buf = before + wire
    assert parse_reply(buf, len(before)) == (value, len(buf))
    for end in range(len(before), len(buf)):
        assert parse_reply(buf[:end], len(before)) is None, end


@SETTINGS
@given(st.lists(replies, min_size=1, max_size=5), st.lists(st.integers(min_value=0, max_value=2000), max_size=6))
def test_replies_split_anywhere_parse_like_a_reader_sees_them(batch: list[Encoded], cuts: list[int]) -> None:
    stream = b"".join(wire for wire, _ in batch)
    values: list[Reply] = []
    buffer = b""
    previous = 0
    for cut in [*sorted(min(cut, len(stream)) for cut in cuts), len(stream)]:
        buffer += stream[previous:cut]
        previous = cut
        pos = 0
        while (parsed := parse_reply(buffer, pos)) is not None:
            value, pos = parsed
            values.append(value)
        buffer = buffer[pos:]
    assert buffer == b""
    assert values == [value for _, value in batch]


@SETTINGS
@given(st.one_of(st.binary(max_size=60), resp_like, damaged()), st.data())
def test_any_bytes_parse_or_wait_or_desync(buf: bytes, data: st.DataObject) -> None:
    pos = data.draw(st.integers(min_value=0, max_value=len(buf)))
    try:
        parsed = parse_reply(buf, pos)
    except ProtocolDesync:
        return
    if parsed is not None:
        assert pos < parsed[1] <= len(buf)


@SETTINGS
@given(st.lists(st.binary(max_size=30), min_size=1, max_size=6))
def test_a_packed_command_parses_back_to_its_arguments(args: list[bytes]) -> None:
    packed = pack_command(*args)
    assert parse_reply(packed, 0) == (args, len(packed))


def test_a_packed_command_is_a_resp_array_of_bulk_strings() -> None:
    assert pack_command(b"SUBSCRIBE", b"a:b") == b"*2\r\n$9\r\nSUBSCRIBE\r\n$3\r\na:b\r\n"
    assert pack_command(b"PING") == b"*1\r\n$4\r\nPING\r\n"


def test_the_reply_parser_reads_resp_types() -> None:
    assert parse_reply(b":42\r\n", 0) == (42, 5)
    assert parse_reply(b"$-1\r\n", 0) == (None, 5)
    assert parse_reply(b"+OK\r\n", 0) == (b"OK", 5)
    assert parse_reply(b"-ERR no\r\n", 0) == (ErrorReply(b"ERR no"), 9)
    assert parse_reply(b"*2\r\n$1\r\na\r\n:1\r\n", 0) == ([b"a", 1], 15)
    assert parse_reply(b">1\r\n+x\r\n", 0) == ([b"x"], 8)
    assert parse_reply(b"*2\r\n$1\r\na\r\n", 0) is None
    assert parse_reply(b"$5\r\nab", 0) is None


@pytest.mark.parametrize("buf", [b"?what\r\n", b"$x\r\n", b"*x\r\n", b"*1\r\n*y\r\n", b"\r\n"])
def test_bytes_that_are_not_resp_are_a_desync(buf: bytes) -> None:
    with pytest.raises(ProtocolDesync):
        parse_reply(buf, 0)


def test_a_desync_is_retried_like_a_lost_connection() -> None:
    assert issubclass(ProtocolDesync, ConnectionError)


def test_nesting_is_bounded() -> None:
    nested = b"".join(b"*1\r\n" if depth % 2 else b">1\r\n" for depth in range(MAX_DEPTH)) + b":7\r\n"
    value: Reply = 7
    for _ in range(MAX_DEPTH):
        value = [value]
    assert parse_reply(nested, 0) == (value, len(nested))
    # Deeper than Redis ever nests: refused before the recursion could exhaust the stack.
    with pytest.raises(ProtocolDesync, match="nested deeper"):
        parse_reply(b"*1\r\n" * 100_000, 0)
