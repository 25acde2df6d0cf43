"""RESP, the Redis wire protocol, as pure functions: :func:`parse_reply` reads one RESP2 reply (or RESP3 push
frame) out of a byte buffer and :func:`pack_command` writes a command. The parser works on whatever a socket read
delivered so far: it returns None while a reply is incomplete (the caller keeps the bytes and reads more) and
raises :class:`ProtocolDesync` for bytes that cannot be RESP, after which the connection's state is unknown and
only a new connection helps. No I/O and no event loop here, so the codec is tested byte by byte and by property.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

# Redis nests pub/sub replies two deep at most; a deeper input is not from Redis, and refusing it bounds the
# recursion (hostile bytes must end in ProtocolDesync, never in a RecursionError).
MAX_DEPTH = 32
_AGGREGATE_TYPES = (b"*", b">")


class ProtocolDesync(ConnectionError):
    """The connection sent bytes that are not RESP: its state is unknown, so reconnect. A ConnectionError, so
    every reconnect policy that retries a lost connection retries this too."""


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """A ``-ERR ...`` reply: the server's answer to one command, not a failure of the connection."""

    message: bytes


# Simple and bulk strings are bytes, integers int, arrays and pushes lists, a null bulk string or array None.
Reply: TypeAlias = bytes | int | list["Reply"] | ErrorReply | None


def parse_reply(buf: bytes, pos: int) -> tuple[Reply, int] | None:
    """One reply starting at ``pos``: ``(value, next_pos)``, or None if ``buf`` ends before the reply does.
    Raises :class:`ProtocolDesync` if the bytes at ``pos`` are not RESP."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        return None
    kind = buf[pos]
    try:
        if kind == 0x24:  # $ bulk string
            length = int(buf[pos + 1 : end])
            if length < 0:
                return None, end + 2
            start = end + 2
            stop = start + length
            if len(buf) < stop + 2:
                return None
            return buf[start:stop], stop + 2
        if kind == 0x2A or kind == 0x3E:  # * array, > push
            return _parse_aggregate(buf, pos, end, 1)
        if kind == 0x3A:  # : integer
            return int(buf[pos + 1 : end]), end + 2
        if kind == 0x2B:  # + simple string
            return buf[pos + 1 : end], end + 2
        if kind == 0x2D:  # - error
            return ErrorReply(buf[pos + 1 : end]), end + 2
    except ValueError as error:
        raise _malformed(buf, pos, end) from error
    raise ProtocolDesync(f"unexpected RESP type byte {buf[pos : pos + 1]!r}")


def _parse_aggregate(buf: bytes, pos: int, end: int, depth: int) -> tuple[Reply, int] | None:
    """The array or push whose header line is ``buf[pos:end]``, nested in ``depth - 1`` others. The depth travels
    here rather than through :func:`parse_reply`, whose bulk strings are the hot path and take no extra argument."""
    try:
        count = int(buf[pos + 1 : end])
    except ValueError as error:
        raise _malformed(buf, pos, end) from error
    if count < 0:
        return None, end + 2  # the RESP2 null array
    if depth > MAX_DEPTH:
        raise ProtocolDesync(f"RESP arrays nested deeper than {MAX_DEPTH} at byte {pos}")
    items: list[Reply] = []
    cursor = end + 2
    for _ in range(count):
        if buf.startswith(_AGGREGATE_TYPES, cursor):
            item_end = buf.find(b"\r\n", cursor)
            if item_end < 0:
                return None
            parsed = _parse_aggregate(buf, cursor, item_end, depth + 1)
        else:
            parsed = parse_reply(buf, cursor)
        if parsed is None:
            return None
        items.append(parsed[0])
        cursor = parsed[1]
    return items, cursor


def _malformed(buf: bytes, pos: int, end: int) -> ProtocolDesync:
    return ProtocolDesync(f"malformed RESP length at byte {pos}: {buf[pos:end][:40]!r}")


def pack_command(*args: bytes) -> bytes:
    """A command as RESP (what redis-py's pack_command produces), for connections written to directly."""
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%b\r\n" % (len(arg), arg) for arg in args)
