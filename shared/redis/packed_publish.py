"""The publish script's calls packed by hand and its replies read by hand (pure): the hot path of ingest's publishing
without redis-py's per-argument encoding and per-reply parsing.

A publish call is ``EVALSHA <sha> 7 <7 keys> <13 arguments>`` (the layout is :mod:`shared.redis.scripts`'
contract, written out in ``shared.broker.redis.PublishCalls.args``). Of its 23 RESP bulk strings, the first 11 (the
command, the script, the key count, the stream's 7 keys and its channel) depend only on the stream and are packed
once per stream; those that are the same for the whole batch (candidate epoch, publish time, history bounds,
fencing token and epoch) once per batch; per message only the payload, keep_last, the event identity and the
stream's floor are formatted, in one ``%`` operation. ``tests/test_packed_publish.py`` holds the bytes equal to what
redis-py packs from ``PublishCalls.args`` for the same batch, so the two layouts cannot drift apart.

A batch call (``pack(..., batch_call=True)``, one Redis server only) is one ``EVALSHA`` of the batch script carrying
every message: the lease and fence keys, 5 keys per message, the batch's 7 shared arguments, 6 per message (the
stream's keys and channel packed once per stream). The test holds it equal to the same values rearranged as the
batch script's contract says.

:func:`parse_publish_replies` reads the script's answers out of a byte buffer: ``*2 :epoch :seq`` and ``:0`` (a
duplicate) on a fast path of a few byte searches, anything else (an error, an unexpected shape) through
:func:`shared.redis.resp.parse_reply`. Like that parser it returns what is complete and the position to resume
from, so the caller reads the socket until every call of the batch is answered.

No I/O here: the broker writes the bytes and hands the bytes it reads.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TypeAlias

from shared.broker.contract import OutgoingMessage
from shared.redis.resp import ErrorReply, Reply, parse_reply
from shared.redis.scripts import BATCH_ARGS, BATCH_ARGS_PER_MESSAGE, BATCH_KEYS, BATCH_KEYS_PER_MESSAGE
from shared.streams import ChannelNamer

PUBLISH_ARGS = 23  # EVALSHA, sha, numkeys, 7 keys, 13 arguments
PublishReply: TypeAlias = tuple[int, int] | Reply
"""``(epoch, seq)`` for a publication, ``0`` for a duplicate, :class:`~shared.redis.resp.ErrorReply` for a refusal
(``NOTLEADER``, ``NOSCRIPT``, ...), or whatever else Redis answered, as :func:`~shared.redis.resp.parse_reply`
gives it."""

_Constants: TypeAlias = tuple[int, int, int, int, str, int | None]
"""What is the same for a whole batch: candidate epoch, publish time, history maxlen and TTL, token, fencing epoch."""
_EMPTY = b"$0\r\n\r\n"
_KEEP = (b"$1\r\n0\r\n", b"$1\r\n1\r\n")


def bulk(value: str | bytes | int) -> bytes:
    """One RESP bulk string, encoded as redis-py encodes arguments (str as UTF-8, int in decimal)."""
    data = value if isinstance(value, bytes) else (b"%d" % value if isinstance(value, int) else value.encode())
    return b"$%d\r\n%b\r\n" % (len(data), data)


def _identity(message: OutgoingMessage) -> bytes:
    """The script's event identity argument: the event's last id, or empty."""
    event = message.event
    if event is None:
        return _EMPTY
    digits = b"%d" % event.last
    return b"$%d\r\n%b\r\n" % (len(digits), digits)


def _floor(floor: tuple[int, int] | None) -> bytes:
    """The script's floor epoch and floor seq arguments, or two empty ones."""
    if floor is None:
        return _EMPTY + _EMPTY
    epoch_digits = b"%d" % floor[0]
    seq_digits = b"%d" % floor[1]
    return b"$%d\r\n%b\r\n$%d\r\n%b\r\n" % (len(epoch_digits), epoch_digits, len(seq_digits), seq_digits)


class PublishPacker:
    """Packs batches of publish-script calls for one broker. ``fence_key`` is one key, or a function of the stream
    (a cluster's per-slot fence); ``lease_key`` likewise. The per-stream parts are cached, so a packer serves one
    namer and one script: :meth:`set_script` after the script was loaded again with another digest."""

    __slots__ = (
        "_batch_parts", "_batch_sha", "_fence_key", "_heads", "_lease_key", "_namer", "_publish_command", "_sha"
    )  # fmt: skip

    def __init__(
        self,
        namer: ChannelNamer,
        *,
        lease_key: str | Callable[[str], str],
        fence_key: str | Callable[[str], str],
        sharded: bool = False,
    ) -> None:
        self._namer = namer
        self._lease_key = lease_key
        self._fence_key = fence_key
        self._publish_command = bulk("SPUBLISH" if sharded else "PUBLISH")
        self._sha = b""
        self._heads: dict[str, bytes] = {}
        self._batch_sha = b""
        self._batch_parts: dict[str, tuple[bytes, bytes]] = {}

    def set_script(self, sha: str | bytes) -> None:
        sha_bytes = sha if isinstance(sha, bytes) else sha.encode()
        if sha_bytes != self._sha:
            self._sha = sha_bytes
            self._heads.clear()

    def set_batch_script(self, sha: str | bytes) -> None:
        """The digest of the batch script (:data:`shared.redis.scripts.PUBLISH_BATCH_SCRIPT`), for batch calls."""
        self._batch_sha = sha if isinstance(sha, bytes) else sha.encode()

    def _head(self, stream: str) -> bytes:
        """``*23``, EVALSHA, the digest, 7, the stream's keys (epoch, seq, history, last, event id, lease, fence)
        and its channel."""
        keys = self._namer.keys(stream)
        lease = self._lease_key if isinstance(self._lease_key, str) else self._lease_key(stream)
        fence = self._fence_key if isinstance(self._fence_key, str) else self._fence_key(stream)
        head = b"*%d\r\n" % PUBLISH_ARGS + b"".join(
            bulk(part)
            for part in (
                b"EVALSHA", self._sha, 7, keys.epoch, keys.seq, keys.history, keys.last, keys.event_id, lease, fence,
                keys.channel,
            )
        )  # fmt: skip
        self._heads[stream] = head
        return head

    def pack(
        self,
        messages: Sequence[OutgoingMessage],
        *,
        candidate_epoch: int,
        published_at_ms: int,
        history_maxlen: int,
        ttl_ms: int,
        token: str,
        fencing_epoch: int | None,
        floors: Mapping[str, tuple[int, int]],
        batch_call: bool = False,
    ) -> bytes:
        """Every message's call of the one-message script, in order, as one buffer to write; with ``batch_call``,
        one call of the batch script carrying every message (one Redis server only: a sharded packer, whose keys
        depend on the stream, has no batch form). The arguments mean what ``PublishCalls.args`` says (the floor of
        each stream is looked up in ``floors``); the layouts are :mod:`shared.redis.scripts`'."""
        constants = (candidate_epoch, published_at_ms, history_maxlen, ttl_ms, token, fencing_epoch)
        if batch_call:
            return self._pack_batch(messages, constants, floors)
        return self._pack_calls(messages, constants, floors)

    def _pack_calls(
        self, messages: Sequence[OutgoingMessage], constants: _Constants, floors: Mapping[str, tuple[int, int]]
    ) -> bytes:
        candidate_epoch, published_at_ms, history_maxlen, ttl_ms, token, fencing_epoch = constants
        if not self._sha:
            raise ValueError("PublishPacker.pack before set_script")
        times = bulk(candidate_epoch) + bulk(published_at_ms)
        bounds = bulk(history_maxlen) + bulk(ttl_ms) + bulk(token)
        fence = _EMPTY if fencing_epoch is None else bulk(fencing_epoch)
        tail = self._publish_command
        heads = self._heads
        keep = _KEEP
        parts: list[bytes] = []
        append = parts.append
        for message in messages:
            stream = message.stream
            head = heads.get(stream)
            if head is None:
                head = self._head(stream)
            payload = message.payload
            identity = _identity(message)
            floor_part = _floor(floors.get(stream))
            append(
                b"%b%b$%d\r\n%b\r\n%b%b%b%b%b%b"
                % (head, times, len(payload), payload, keep[message.keep_last], bounds, identity, fence, floor_part,
                   tail)
            )  # fmt: skip
        return b"".join(parts)

    def _batch_part(self, stream: str) -> tuple[bytes, bytes]:
        """The stream's 5 keys and its channel, packed, for the batch layout."""
        keys = self._namer.keys(stream)
        part = (
            b"".join(bulk(key) for key in (keys.epoch, keys.seq, keys.history, keys.last, keys.event_id)),
            bulk(keys.channel),
        )
        self._batch_parts[stream] = part
        return part

    def _pack_batch(
        self, messages: Sequence[OutgoingMessage], constants: _Constants, floors: Mapping[str, tuple[int, int]]
    ) -> bytes:
        candidate_epoch, published_at_ms, history_maxlen, ttl_ms, token, fencing_epoch = constants
        if not self._batch_sha:
            raise ValueError("PublishPacker.pack(batch_call=True) before set_batch_script")
        if isinstance(self._lease_key, str) and isinstance(self._fence_key, str):
            lease, fence_key = self._lease_key, self._fence_key
        else:
            raise ValueError("the batch script is for one Redis server (one lease key, one fence key)")
        count = len(messages)
        numkeys = BATCH_KEYS + BATCH_KEYS_PER_MESSAGE * count
        parts = self._batch_parts
        keys: list[bytes] = [
            b"*%d\r\n" % (3 + numkeys + BATCH_ARGS + BATCH_ARGS_PER_MESSAGE * count),
            bulk(b"EVALSHA"),
            bulk(self._batch_sha),
            bulk(numkeys),
            bulk(lease),
            bulk(fence_key),
        ]
        args: list[bytes] = [
            bulk(candidate_epoch),
            bulk(published_at_ms),
            bulk(history_maxlen),
            bulk(ttl_ms),
            bulk(token),
            _EMPTY if fencing_epoch is None else bulk(fencing_epoch),
            self._publish_command,
        ]
        add_key = keys.append
        add_arg = args.append
        keep = _KEEP
        for message in messages:
            stream = message.stream
            part = parts.get(stream)
            if part is None:
                part = self._batch_part(stream)
            add_key(part[0])
            payload = message.payload
            identity = _identity(message)
            floor_part = _floor(floors.get(stream))
            add_arg(
                b"%b$%d\r\n%b\r\n%b%b%b"
                % (part[1], len(payload), payload, keep[message.keep_last], identity, floor_part)
            )
        return b"".join(keys) + b"".join(args)


def parse_publish_replies(buf: bytes, pos: int, limit: int) -> tuple[list[PublishReply], int]:
    """Up to ``limit`` complete replies from ``buf`` at ``pos``, and the position after the last one. Raises
    :class:`~shared.redis.resp.ProtocolDesync` for bytes that are not RESP."""
    replies: list[PublishReply] = []
    append = replies.append
    end = len(buf)
    while len(replies) < limit and pos < end:
        if buf.startswith(b"*2\r\n:", pos):
            first = buf.find(b"\r\n", pos + 5)
            if first >= 0 and buf.startswith(b":", first + 2):
                second = buf.find(b"\r\n", first + 3)
                if second < 0:
                    break
                try:
                    append((int(buf[pos + 5 : first]), int(buf[first + 3 : second])))
                except ValueError:
                    pass  # not two integers after all: the general parser decides (and raises)
                else:
                    pos = second + 2
                    continue
            elif first < 0 or first + 2 >= end:
                break
        elif buf.startswith(b":0\r\n", pos):
            append(0)
            pos += 4
            continue
        parsed = parse_reply(buf, pos)
        if parsed is None:
            break
        reply, pos = parsed
        if isinstance(reply, list) and len(reply) == 2 and all(isinstance(part, int) for part in reply):
            epoch, seq = reply
            assert isinstance(epoch, int) and isinstance(seq, int)
            append((epoch, seq))
        else:
            append(reply)
    return replies, pos


__all__ = ["PUBLISH_ARGS", "ErrorReply", "PublishPacker", "PublishReply", "bulk", "parse_publish_replies"]
