"""API keys in PostgreSQL (the ``api_keys`` table): issue, look up, revoke.

Keys are 64 hex characters, like Binance's; only their SHA-256 digests are stored, so the table alone does not
give anyone a usable key, and a lookup is one primary-key probe on the digest. Revoked keys stay in the table
(``revoked_at``) for the audit trail and no longer look up.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from shared.errors import DatabaseError

MAX_KEY_LENGTH = 128  # longer strings are not keys; refuse them before hashing

_DRIVER_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)


@dataclass(frozen=True, slots=True)
class ApiKey:
    label: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """One row of the table, as ``pricegate keys list`` shows it (never the key: it is not stored)."""

    subject: str  # the first 16 hex characters of the digest: what logs, limits and this listing call the key
    label: str
    created_at: datetime
    revoked_at: datetime | None


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def subject_of(key_digest: bytes) -> str:
    """A key's non-secret name: the first 16 hex characters of its SHA-256."""
    return key_digest.hex()[:16]


class ApiKeys:
    """``pool`` is an asyncpg pool on a migrated schema (see ``shared.db.open_pool``)."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool

    async def create(self, label: str) -> str:
        """A new key for ``label``; the caller shows it once, it cannot be read back."""
        key = secrets.token_hex(32)
        try:
            await self.pool.execute("INSERT INTO api_keys (key_sha256, label) VALUES ($1, $2)", digest(key), label)
        except _DRIVER_ERRORS as error:
            raise DatabaseError(f"creating an API key failed: {error!r}") from error
        return key

    async def lookup(self, key: str) -> ApiKey | None:
        """The key's record while it is valid, None for an unknown or revoked key."""
        if not key or len(key) > MAX_KEY_LENGTH:
            return None
        try:
            row = await self.pool.fetchrow(
                "SELECT label, created_at FROM api_keys WHERE key_sha256 = $1 AND revoked_at IS NULL", digest(key)
            )
        except _DRIVER_ERRORS as error:
            raise DatabaseError(f"looking up an API key failed: {error!r}") from error
        return None if row is None else ApiKey(row["label"], row["created_at"])

    async def lookup_digest(self, key_digest: bytes) -> KeyRecord | None:
        """The row of a key by its digest, revoked or not; None when no such key was ever issued."""
        try:
            row = await self.pool.fetchrow(
                "SELECT label, created_at, revoked_at FROM api_keys WHERE key_sha256 = $1", key_digest
            )
        except _DRIVER_ERRORS as error:
            raise DatabaseError(f"looking up an API key failed: {error!r}") from error
        if row is None:
            return None
        return KeyRecord(subject_of(key_digest), row["label"], row["created_at"], row["revoked_at"])

    async def list(self) -> list[KeyRecord]:
        """Every key ever issued, oldest first."""
        try:
            rows = await self.pool.fetch(
                "SELECT key_sha256, label, created_at, revoked_at FROM api_keys ORDER BY created_at, key_sha256"
            )
        except _DRIVER_ERRORS as error:
            raise DatabaseError(f"listing API keys failed: {error!r}") from error
        return [
            KeyRecord(subject_of(bytes(row["key_sha256"])), row["label"], row["created_at"], row["revoked_at"])
            for row in rows
        ]

    async def revoke(self, key: str) -> bool:
        """Revoke ``key``; False when it was unknown or already revoked."""
        try:
            status = await self.pool.execute(
                "UPDATE api_keys SET revoked_at = now() WHERE key_sha256 = $1 AND revoked_at IS NULL", digest(key)
            )
        except _DRIVER_ERRORS as error:
            raise DatabaseError(f"revoking an API key failed: {error!r}") from error
        return bool(status == "UPDATE 1")
