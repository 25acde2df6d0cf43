"""``pricegate keys create --label NAME | list | revoke KEY``: API keys in the database of
``PRICEGATE_DATABASE_URL`` / ``PRICEGATE_DATABASE_SCHEMA`` (made by ``pricegate db migrate``).

``create`` prints the new key once (it is stored only as a digest and cannot be shown again); ``list`` shows each
key's subject (the first 16 hex characters of its digest: what logs, metrics and limits call it), label,
creation and revocation, never a key; ``revoke`` takes the key itself, marks it revoked and deletes the key's
entry in the gateways' shared Redis cache (when ``PRICEGATE_REDIS_URL`` is set: one server, the master Sentinels
name, or the cluster node serving the entry's slot), so new connections with it are refused and open ones closed
within ``PRICEGATE_AUTH_CACHE_TTL_S``.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

from redis.exceptions import RedisError

from gateway.auth.api_keys import ApiKeys, KeyRecord, digest, subject_of
from gateway.auth.key_cache import KEY_FORMAT
from gateway.auth.key_validator import redis_key
from shared.db import create_pool, load_migrations, schema_version
from shared.errors import ConfigError, DatabaseError, PricegateError
from shared.redaction import redact_url
from shared.redis.clients import state_client
from shared.settings import Settings, env_name

MAX_LABEL_LENGTH = 200


class KeyNotRevoked(PricegateError):
    """``revoke`` found no active key to revoke (unknown, or already revoked)."""


async def run_keys(settings: Settings, action: str, *, label: str | None = None, key: str | None = None) -> str:
    """What the command prints. ConfigError for a bad argument or an unusable database (never showing a key)."""
    if action == "create" and (not label or not label.strip() or len(label) > MAX_LABEL_LENGTH):
        raise ConfigError("--label", label, f"must be 1-{MAX_LABEL_LENGTH} characters")
    if action == "revoke" and (key is None or KEY_FORMAT.fullmatch(key) is None):
        raise ConfigError("KEY", "<not shown>", "must be the key itself: 64 lowercase hex characters")
    pool = await _open(settings)
    try:
        keys = ApiKeys(pool)
        if action == "create":
            assert label is not None
            return await keys.create(label.strip())
        if action == "list":
            return _table(await keys.list())
        assert key is not None
        return await _revoke(settings, keys, key)
    except DatabaseError as error:
        raise ConfigError(env_name("database_url"), redact_url(settings.database_url or ""), str(error)) from None
    finally:
        await pool.close()


async def _open(settings: Settings) -> Any:
    if not settings.database_url:
        raise ConfigError(env_name("database_url"), "", "required for this command (e.g. postgresql://host/db)")
    shown = redact_url(settings.database_url)
    try:
        pool = await create_pool(
            settings.database_url,
            schema=settings.database_schema,
            min_size=1,
            max_size=1,
            statement_timeout_ms=settings.db_statement_timeout_ms,
        )
    except DatabaseError as error:
        raise ConfigError(env_name("database_url"), shown, str(error)) from None
    try:
        version = await schema_version(pool)
        needed = len(await asyncio.to_thread(load_migrations))
    except DatabaseError as error:
        await pool.close()
        raise ConfigError(env_name("database_url"), shown, str(error)) from None
    if version < needed:
        await pool.close()
        raise ConfigError(
            env_name("database_schema"),
            settings.database_schema,
            f"at schema version {version}, API keys need {needed}: run `pricegate db migrate` first",
        )
    return pool


async def _revoke(settings: Settings, keys: ApiKeys, key: str) -> str:
    key_digest = digest(key)
    subject = subject_of(key_digest)
    if not await keys.revoke(key):
        record = await keys.lookup_digest(key_digest)
        state = "is already revoked" if record is not None else "is not a key of this database"
        raise KeyNotRevoked(f"key {subject} {state}")
    cache = await _forget_cached(settings, key_digest.hex())
    ttl = settings.auth_cache_ttl_s
    return f"revoked key {subject}; gateways refuse it and close its connections within {ttl:g} s{cache}"


async def _forget_cached(settings: Settings, digest_hex: str) -> str:
    """Delete the key's entry in the gateways' shared cache; a note for the output when that was not possible."""
    if not settings.redis_url:
        return ""
    client = state_client(settings.redis_url, max_connections=1, timeout_s=2)
    try:
        async with client.turn() as redis:
            await redis.delete(redis_key(settings.channel_prefix, digest_hex))
    except (RedisError, OSError) as error:
        return f" (the Redis cache could not be cleared: {type(error).__name__}; the bound still holds)"
    finally:
        await client.aclose()
    return ""


def _table(records: list[KeyRecord]) -> str:
    if not records:
        return "no API keys (create one with: pricegate keys create --label NAME)"
    rows = [("SUBJECT", "LABEL", "CREATED", "REVOKED")]
    rows += [(r.subject, r.label, _when(r.created_at), _when(r.revoked_at) if r.revoked_at else "-") for r in records]
    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    return "\n".join(
        "  ".join([*(value.ljust(width) for value, width in zip(row, widths, strict=False)), row[3]]) for row in rows
    )


def _when(moment: datetime) -> str:
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S %z")
