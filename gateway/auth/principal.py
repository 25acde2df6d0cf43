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
    subject: str  # apikey: digest prefix (hex); jwt: "sub" claim or ""; anonymous: ""
    patterns: tuple[str, ...] | None = None  # allowed stream-name globs (lowercase); None: every stream
    expires_at: float | None = None  # unix seconds; None: does not expire
    _regex: re.Pattern[str] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.patterns is not None:
            joined = "|".join(f"(?:{fnmatch.translate(pattern.lower())})" for pattern in self.patterns)
            object.__setattr__(self, "_regex", re.compile(joined) if joined else re.compile(r"(?!)"))

    def allows(self, stream_name: str) -> bool:
        """May this client subscribe ``stream_name`` (a canonical name such as ``btcusdt@trade``)?"""
        regex = self._regex
        return regex is None or regex.fullmatch(stream_name.lower()) is not None


ANONYMOUS = Principal("anonymous", "")


@dataclass(frozen=True, slots=True)
class AuthRefusal:
    reason: str  # bounded metric label: missing | malformed | invalid | expired | revoked | unavailable
    message: str  # for the client: says what to fix, never echoes the credential
    code: int = API_KEY_INVALID  # Binance's REST error code
    status: int = 401  # HTTP status of the refusal
