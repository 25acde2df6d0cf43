"""Exception hierarchy shared by every pricegate process.

PricegateError
├── ConfigError        a PRICEGATE_* setting or CLI flag is missing or unparsable (names it)
├── ProtocolError      a client or upstream frame breaks the wire protocol (code + reason)
├── BrokerError        the broker (Redis or in-memory) cannot do what was asked
│   ├── NotLeaderError a fenced publish was refused: the caller no longer holds ingest's leader lease
│   └── PublishIncomplete a publish failed part-way: how many of the batch are known done
├── DatabaseError      PostgreSQL is unreachable, or its schema is missing or newer than this code
└── UpstreamError      the exchange connection or REST call failed
"""

from __future__ import annotations


class PricegateError(Exception):
    """Base class of every error pricegate raises on purpose."""


class ConfigError(PricegateError):
    """A setting is invalid; ``setting`` names the variable or flag, ``value`` what was given."""

    def __init__(self, setting: str, value: object, problem: str) -> None:
        self.setting = setting
        self.value = value
        self.problem = problem
        super().__init__(f"{setting}={value!r}: {problem}")


class ProtocolError(PricegateError):
    """A frame broke the protocol. ``code`` is the Binance error code (or close code), ``reason`` the text."""

    def __init__(self, code: int, reason: str) -> None:
        self.code = code
        self.reason = reason
        super().__init__(f"[{code}] {reason}")


class BrokerError(PricegateError):
    """The broker failed (connection lost, script error, unreachable at start)."""


class NotLeaderError(BrokerError):
    """A publish carrying a fencing token was refused because the token no longer holds the leader lease (it
    expired, or another ingest took it). Nothing of the refused messages was published."""


class PublishIncomplete(BrokerError):
    """A publish failed (Redis unreachable, the connection broke, a call refused) after the first ``confirmed``
    messages of the batch were known done (published, or dropped as duplicates). The rest are in doubt only if
    the connection broke while Redis was running them; otherwise they were not published."""

    def __init__(self, message: str, confirmed: int) -> None:
        super().__init__(message)
        self.confirmed = confirmed


class DatabaseError(PricegateError):
    """PostgreSQL failed at start (unreachable, schema not migrated) or a migration could not be applied."""


class UpstreamError(PricegateError):
    """The exchange failed us (connection, protocol or REST error)."""
