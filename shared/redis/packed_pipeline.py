"""A pipeline of hand-packed commands on a redis-py asyncio connection, replies read raw: the I/O half of
:mod:`shared.redis.packed_publish`.

redis-py reads a pipeline's replies one by one, each through its parser and under a timeout context of its own,
which costs ingest more than the publish script costs Redis. :func:`run_packed` writes the packed calls with the
connection's ``send_packed_command`` (connect, AUTH, SELECT, TLS and Sentinel stay redis-py's) and reads the
replies from the connection's stream in large chunks, parsed by
:func:`~shared.redis.packed_publish.parse_publish_replies`.
Replies are appended to the caller's list as they are parsed, so when the connection breaks mid-batch the caller
knows exactly how many calls Redis answered (the broker's ``PublishIncomplete.confirmed``). Error replies become
redis-py's exceptions (``NoScriptError`` for ``NOSCRIPT``, else ``ResponseError``), as its pipeline gives them.

The raw read needs the connection's ``asyncio.StreamReader`` (redis-py keeps it as ``_reader``) and a parser with
nothing buffered; a connection without them is read the slow way, reply by reply through redis-py.
"""

from __future__ import annotations

import asyncio
from typing import Any

import redis.exceptions as redis_errors
from redis.asyncio.connection import AbstractConnection

from shared.redis.packed_publish import parse_publish_replies
from shared.redis.resp import ErrorReply, ProtocolDesync

READ_CHUNK = 1 << 18


def _error(reply: ErrorReply) -> redis_errors.ResponseError:
    message = reply.message.decode(errors="replace")
    if message.startswith("NOSCRIPT"):
        return redis_errors.NoScriptError(message)
    return redis_errors.ResponseError(message)


def _raw_reader(connection: AbstractConnection) -> asyncio.StreamReader | None:
    reader = getattr(connection, "_reader", None)
    parser = getattr(connection, "_parser", None)
    if not isinstance(reader, asyncio.StreamReader) or getattr(parser, "_buffer", None):
        return None
    return reader


async def run_packed(
    connection: AbstractConnection, data: bytes, count: int, into: list[Any], *, timeout_s: float | None
) -> None:
    """Send ``count`` packed commands (``data``) and append their replies to ``into`` in order: ``(epoch, seq)``,
    ``0``, an exception value for an error reply, or what else Redis answered. Raises redis-py's
    ``ConnectionError``/``TimeoutError`` (or ``OSError``) when the connection fails; the replies read before that
    are in ``into``. The caller disconnects the connection on any exception (its state is then unknown)."""
    await connection.send_packed_command(data)
    reader = _raw_reader(connection)
    if reader is None:
        for _ in range(count):
            try:
                into.append(await connection.read_response())
            except redis_errors.ResponseError as error:  # read in full: the connection stays in step
                into.append(error)
        return
    buf = b""
    pos = 0
    wanted = count
    while wanted:
        try:
            async with asyncio.timeout(timeout_s):
                chunk = await reader.read(READ_CHUNK)
        except TimeoutError:
            raise redis_errors.TimeoutError("Timeout reading from socket") from None
        if not chunk:
            raise redis_errors.ConnectionError("Connection closed by server.")
        buf = buf[pos:] + chunk if pos < len(buf) else chunk
        try:
            replies, pos = parse_publish_replies(buf, 0, wanted)
        except ProtocolDesync as error:
            raise redis_errors.ConnectionError(f"Protocol error: {error}") from error
        for reply in replies:
            into.append(_error(reply) if isinstance(reply, ErrorReply) else reply)
        wanted -= len(replies)
    if pos < len(buf):
        # More bytes than replies: the connection is out of step with its commands.
        raise redis_errors.ConnectionError(f"{len(buf) - pos} unexpected bytes after the replies")


def split_batch_reply(reply: Any, count: int) -> list[Any]:
    """One batch script call's answer (:data:`shared.redis.scripts.PUBLISH_BATCH_SCRIPT`) as ``count`` per-message
    results, like :func:`run_packed` gives one-message calls': ``(epoch, seq)``, ``0`` for a duplicate, an exception
    value for an error. An error of the whole call (``NOTLEADER``, ``NOSCRIPT``) is every message's; a message that
    failed ends the array, and the messages after it were not run: they get the same error, so a caller counting
    what was published counts exactly what was."""
    if isinstance(reply, BaseException):
        return [reply] * count
    values: list[Any] = list(reply) if isinstance(reply, (list, tuple)) else [reply]
    results: list[Any] = []
    for index in range(0, len(values) - 1, 2):
        epoch, seq = values[index], values[index + 1]
        if not (isinstance(epoch, int) and isinstance(seq, int)):
            break
        results.append((epoch, seq) if epoch else 0)
    if len(results) < count:
        rest = values[2 * len(results)] if 2 * len(results) < len(values) else None
        if isinstance(rest, ErrorReply):
            error: BaseException = _error(rest)
        elif isinstance(rest, BaseException):  # read the slow way, by redis-py, which makes exceptions of errors
            error = rest
        else:
            error = redis_errors.ResponseError(f"unexpected answer of the batch publish script: {reply!r:.200}")
        results.extend([error] * (count - len(results)))
    return results[:count]


async def run_packed_batches(
    connection: AbstractConnection, data: bytes, sizes: list[int], into: list[Any], *, timeout_s: float | None
) -> None:
    """:func:`run_packed` for batch script calls of ``sizes`` messages each: appends one result per message, and
    when the connection fails, those of the calls answered before it (the caller's count of what is confirmed)."""
    replies: list[Any] = []
    try:
        await run_packed(connection, data, len(sizes), replies, timeout_s=timeout_s)
    finally:
        for reply, size in zip(replies, sizes, strict=False):
            into.extend(split_batch_reply(reply, size))


__all__ = ["run_packed", "run_packed_batches", "split_batch_reply"]
