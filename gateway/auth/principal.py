"""Who a connection or request is, once authenticated, and why one was refused (pure).

:class:`Principal` is what the rest of the gateway knows of a client after authentication: how it proved
itself (``kind``), a stable non-secret ``subject`` for per-key limits and revocation (never the key or token
itself), which streams it may subscribe (glob patterns from a token's ``streams`` claim; None = every stream)
and when its credential expires. :class:`AuthRefusal` is a refusal in Binance's REST error shape with a bounded
metric reason. :data:`ANONYMOUS` is every client while ``PRICEGATE_AUTH=none``.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

# Binance's REST codes for a missing/malformed key (-2014) and an invalid one (-2015).
API_KEY_FORMAT_INVALID = -2014
API_KEY_INVALID = -2015


@dataclass(frozen=True, slots=True)
class Principal:
    kind: str  # "anonymous" | "apikey" | "jwt"
    # apikey: the first 16 hex characters of the key's SHA-256; jwt: the same of the "sub" claim ("" without one: a
    # subject may be an e-mail address, and it becomes part of Redis key names); anonymous: "".
    subject: str
    patterns: tuple[str, ...] | None = None  # allowed stream-name globs (lowercase); None: every stream
    expires_at: float | None = None  # unix seconds; None: does not expire
    # apikey: the key's whole SHA-256 (hex), to re-validate open connections; not a secret (the key cannot be
    # derived from it, and the table stores the same). Otherwise "".
    digest: str = ""
    _regex: re.Pattern[str] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.patterns is not None:
            joined = "|".join(f"(?:{fnmatch.translate(pattern.lower())})" for pattern in self.patterns)
            object.__setattr__(self, "_regex", re.compile(joined) if joined else re.compile(r"(?!)"))

    def allows(self, stream_name: str) -> bool:
        """May this client subscribe ``stream_name`` (a canonical name such as ``btcusdt@trade``)?"""
        regex = self._regex
        return regex is None or regex.fullmatch(stream_name.lower()) is not None

    @property
    def limit_key(self) -> str | None:
        """What the per-credential connection limit counts under (``kind:subject``); None: not limited."""
        return f"{self.kind}:{self.subject}" if self.subject else None


ANONYMOUS = Principal("anonymous", "")


@dataclass(frozen=True, slots=True)
class AuthRefusal:
    reason: str  # bounded metric label: missing | malformed | invalid | expired | revoked | unavailable
    message: str  # for the client: says what to fix, never echoes the credential
    code: int = API_KEY_INVALID  # Binance's REST error code
    status: int = 401  # HTTP status of the refusal


# Binance's exact REST messages for its two API-key codes (clients such as ccxt match them).
BINANCE_MESSAGES = {
    API_KEY_FORMAT_INVALID: "API-key format invalid.",
    API_KEY_INVALID: "Invalid API-key, IP, or permissions for action.",
}
UNAVAILABLE_CODE = -1001  # Binance's "internal error; unable to process your request"
_FORMAT_REASONS = frozenset({"missing", "malformed"})


def refused(reason: str, message: str) -> AuthRefusal:
    """A refusal with the Binance code and HTTP status its reason implies: a missing or malformed credential is
    -2014, a well-formed one that is not accepted -2015 (both 401); ``unavailable`` (it cannot be verified now)
    is 503 -1001."""
    if reason == "unavailable":
        return AuthRefusal(reason, message, UNAVAILABLE_CODE, 503)
    return AuthRefusal(reason, message, API_KEY_FORMAT_INVALID if reason in _FORMAT_REASONS else API_KEY_INVALID)


def refresh_problem(current: Principal, new: Principal, subscribed: list[str]) -> str | None:
    """Why ``new`` (from a REFRESH_TOKEN) may not replace ``current`` on an open connection, or None.

    Only a token connection refreshes, and only as the same subject (the per-credential connection count was
    taken under it). A new ``streams`` claim must still allow every stream the connection has: refusing is
    explicit, where dropping subscriptions silently would look like a market gone quiet.
    """
    if current.kind != "jwt":
        return "this connection was not opened with a token"
    if new.subject != current.subject:
        return "the new token is for another subject"
    for name in subscribed:
        if not new.allows(name):
            return f"the new token does not allow {name}, which this connection is subscribed to"
    return None
