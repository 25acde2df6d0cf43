"""Byte-level framing: the publication envelope on the broker and the combined-stream envelope for clients.

Publication envelope (what travels on a broker channel and sits in history)::

    <epoch>:<seq>:<published_at_ms>:<payload bytes>

ASCII header fields then the exchange's payload bytes untouched, so a gateway splits it with two
``bytes.find`` calls and never decodes the payload. ``epoch`` changes whenever the channel's sequence/history
state is lost (e.g. Redis restarted empty), which tells gateways that a sequence reset is not a gap.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Publication:
    """One message of one channel as the broker carries it."""

    epoch: int
    seq: int
    published_at_ms: int
    payload: bytes


def encode_publication(epoch: int, seq: int, published_at_ms: int, payload: bytes) -> bytes:
    return b"%d:%d:%d:%b" % (epoch, seq, published_at_ms, payload)


def decode_publication(data: bytes) -> Publication:
    """Inverse of :func:`encode_publication`; raises ValueError on a malformed envelope."""
    first = data.index(b":")
    second = data.index(b":", first + 1)
    third = data.index(b":", second + 1)
    return Publication(
        epoch=int(data[:first]),
        seq=int(data[first + 1 : second]),
        published_at_ms=int(data[second + 1 : third]),
        payload=data[third + 1 :],
    )


def combined_frame(stream: str, payload: bytes) -> bytes:
    """``{"stream":"<name>","data":<payload>}`` by concatenation; stream names never need JSON escaping
    because the grammar in shared.streams admits only ``[A-Za-z0-9@_!]``."""
    return b'{"stream":"' + stream.encode("ascii") + b'","data":' + payload + b"}"


def split_combined_frame(frame: bytes) -> tuple[str, bytes] | None:
    """Slice ``(stream, payload)`` out of a combined frame laid out exactly as Binance sends it, or None
    when the layout differs (callers then fall back to a JSON parse)."""
    head = b'{"stream":"'
    if not frame.startswith(head) or not frame.endswith(b"}"):
        return None
    end = frame.find(b'","data":', len(head))
    if end < 0:
        return None
    stream = frame[len(head) : end]
    if b'"' in stream or b"\\" in stream:
        return None
    return stream.decode("ascii", "replace"), frame[end + len(b'","data":') : -1]
