"""When a replacement upstream connection may take over from the one it replaces without a gap (pure).

Binance closes every connection at 24 h and may announce a close earlier with ``serverShutdown``; a connection
that sends malformed frames is not trusted either. ``ingest.sources.binance.source`` replaces such a connection
make-before-break: it opens the successor and subscribes it to the same streams while the old one keeps publishing, and
buffers what the successor receives. The successor may take over once it is subscribed to everything and, for
every stream with contiguous ids (trades, aggregate trades, diff depth) on which it has received something, the
old connection has delivered up to just before the successor's first event: from there on the successor's
events continue the old one's exactly. Its buffered events that the old connection already delivered are then
dropped by identity. If that does not happen within a timeout the switch happens anyway (and a trade gap, if
any, is backfilled from REST like after any unplanned drop).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

REASON_AGE = "age"  # the connection reached the rotation age (before Binance's 24 h cut-off)
REASON_SERVER_SHUTDOWN = "server_shutdown"  # Binance announced it will close the connection
REASON_MALFORMED = "malformed"  # the connection sent malformed frames


def uncovered_streams(
    delivered_last: Mapping[str, int], successor_first: Mapping[str, int], streams: Collection[str]
) -> list[str]:
    """Streams of ``streams`` the successor cannot take over yet: its first event on a contiguous stream
    (``successor_first``) is beyond what the old connection delivered (``delivered_last``) + 1, or the old
    connection has delivered nothing on it yet. Streams the successor has seen nothing of are not waited for:
    anything that arrives on them from now on reaches both connections."""
    waiting = []
    for stream, first in successor_first.items():
        if stream not in streams:
            continue
        last = delivered_last.get(stream)
        if last is None or last < first - 1:
            waiting.append(stream)
    return sorted(waiting)


def handover_ready(
    successor_synced: bool,
    delivered_last: Mapping[str, int],
    successor_first: Mapping[str, int],
    streams: Collection[str],
) -> bool:
    """True once the successor holds every subscription and overlaps the old connection on every stream."""
    return successor_synced and not uncovered_streams(delivered_last, successor_first, streams)
