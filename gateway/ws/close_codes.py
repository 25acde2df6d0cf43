"""The WebSocket close codes the gateway sends or reports, with their reasons (README "Close codes").

One enum instead of literals spread over the connection, session and hub: what a client can be told is listed
here and nowhere else. ``ABNORMAL`` (1006) is never sent; it records a connection lost without a close frame.
:func:`metric_label` keeps the disconnect metric's ``code`` label bounded: a client may close with any code it
likes, so codes that are not ours are counted together as ``other``.
"""

from __future__ import annotations

from enum import IntEnum


class CloseCode(IntEnum):
    NORMAL = 1000
    GOING_AWAY = 1001  # the gateway is shutting down: reconnect to another replica
    ABNORMAL = 1006  # the connection was lost without a close frame (never sent)
    INVALID_PAYLOAD = 1007  # a text frame that is not UTF-8
    POLICY_VIOLATION = 1008  # control-message rate exceeded
    MESSAGE_TOO_BIG = 1009  # an inbound message over max_frame_bytes
    INTERNAL_ERROR = 1011  # keepalive timeout: no pong in time
    SLOW_CONSUMER = 4000  # the client's buffer overflowed on an event stream
    TOKEN_EXPIRED = 4401  # the connection's token expired and was not refreshed (REFRESH_TOKEN) in time
    CREDENTIAL_REVOKED = 4403  # the connection's API key was revoked (or no longer exists)


REASONS: dict[CloseCode, str] = {
    CloseCode.GOING_AWAY: "server shutting down",
    CloseCode.INVALID_PAYLOAD: "invalid UTF-8 in a text frame",
    CloseCode.POLICY_VIOLATION: "too many control messages",
    CloseCode.INTERNAL_ERROR: "keepalive ping timeout",
    CloseCode.SLOW_CONSUMER: "slow consumer: send buffer overflow",
    CloseCode.TOKEN_EXPIRED: "token expired",
    CloseCode.CREDENTIAL_REVOKED: "API key revoked",
}

_LABELS = {int(code): str(int(code)) for code in CloseCode}


def metric_label(code: int) -> str:
    """The ``code`` label of the disconnect metric: one of ours, or ``other`` (bounded by construction)."""
    return _LABELS.get(code, "other")
