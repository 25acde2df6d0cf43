"""Server-side WebSocket text frames (RFC 6455 §5.2), built by hand because they are trivial and hot.

Server frames are unmasked: one byte FIN+opcode, the payload length in 1, 3 or 9 bytes, then the payload.
Building them here lets the hub encode a stream's pending messages into one byte block *once per flush* and
hand the same block to every subscriber (websockets' sans-I/O protocol would encode them per connection).
Only valid without a negotiated extension (permessage-deflate is off).
"""

from __future__ import annotations

from collections.abc import Iterable

_SMALL_HEADERS = [bytes((0x81, length)) for length in range(126)]


def text_frame_header(length: int) -> bytes:
    if length < 126:
        return _SMALL_HEADERS[length]
    if length < 65536:
        return b"\x81\x7e" + length.to_bytes(2, "big")
    return b"\x81\x7f" + length.to_bytes(8, "big")


def encode_text_frames(payloads: Iterable[bytes]) -> bytes:
    """One block of consecutive text frames, one per payload, in order."""
    parts: list[bytes] = []
    append = parts.append
    for payload in payloads:
        append(text_frame_header(len(payload)))
        append(payload)
    return b"".join(parts)
