"""PostgreSQL connections and versioned schema migrations (asyncpg).

``open_pool`` connects a pool whose sessions use the configured schema (``search_path``) and statement timeout,
then either applies pending migrations (``db_migrate_on_start``) or checks that the schema is at the version
this code needs, so a gateway never starts against a half-made schema. Migrations are the numbered ``.sql``
files in ``shared/migrations`` (shipped in the wheel); ``migrate`` applies the missing ones in one transaction
under an advisory lock, so replicas starting together cannot race, and records them in ``pricegate_migrations``.
Every failure is a ``DatabaseError`` whose message never contains a password.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

import asyncpg

from shared.errors import DatabaseError
from shared.redaction import redact_url
from shared.settings import SCHEMA_NAME, Settings

_MIGRATION_FILE = re.compile(r"(\d{4})_([a-z0-9_]+)\.sql")
CONNECT_TIMEOUT_S = 5.0

_CREATE_LEDGER = """
CREATE TABLE IF NOT EXISTS pricegate_migrations (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def load_migrations() -> list[Migration]:
    """The migrations shipped with this code, in version order (reads package files: call off the loop)."""
    found: list[Migration] = []
    for entry in resources.files("shared").joinpath("migrations").iterdir():
        match = _MIGRATION_FILE.fullmatch(entry.name)
        if match is not None:
            found.append(Migration(int(match.group(1)), match.group(2), entry.read_text(encoding="utf-8")))
    found.sort(key=lambda migration: migration.version)
    versions = [migration.version for migration in found]
    if versions != list(range(1, len(found) + 1)):
        raise DatabaseError(f"migration files must be numbered 0001, 0002, ... without gaps; found {versions}")
    return found


def check_schema_name(schema: str) -> str:
    if SCHEMA_NAME.fullmatch(schema) is None:
        raise ValueError(f"schema name must match {SCHEMA_NAME.pattern}, got {schema!r}")
    return schema


async def create_pool(
    dsn: str, *, schema: str, min_size: int, max_size: int, statement_timeout_ms: int
) -> Any:  # asyncpg ships no type information; the pool is an asyncpg.Pool
    """A connected pool whose sessions see ``schema`` first and cancel statements after the timeout."""
    check_schema_name(schema)
    try:
        return await asyncpg.create_pool(
            dsn,
            min_size=min(min_size, max_size),
            max_size=max_size,
            timeout=CONNECT_TIMEOUT_S,
            server_settings={
                "search_path": schema,
                "statement_timeout": str(statement_timeout_ms),
                "application_name": "pricegate",
            },
        )
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
        raise DatabaseError(f"PostgreSQL at {redact_url(dsn)}: {error}") from error


async def schema_version(pool: Any) -> int:
    """The highest applied migration, 0 for a schema that was never migrated."""
    try:
        async with pool.acquire() as connection:
            exists = await connection.fetchval("SELECT to_regclass('pricegate_migrations') IS NOT NULL")
            if not exists:
                return 0
            return int(await connection.fetchval("SELECT coalesce(max(version), 0) FROM pricegate_migrations"))
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
        raise DatabaseError(f"reading the schema version failed: {error}") from error


async def migrate(pool: Any, schema: str) -> list[Migration]:
    """Apply the missing migrations to ``schema`` (created if needed); returns the ones applied now."""
    check_schema_name(schema)
    migrations = await asyncio.to_thread(load_migrations)
    try:
        return await _apply(pool, schema, migrations)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
        raise DatabaseError(f"migrating schema {schema!r} failed: {error}") from error


async def _apply(pool: Any, schema: str, migrations: list[Migration]) -> list[Migration]:
    async with pool.acquire() as connection, connection.transaction():
        # Serialise concurrent migrators of the same schema (several replicas starting at once).
        await connection.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"pricegate.migrate:{schema}")
        # DDL takes no bind parameters; the name was checked against SCHEMA_NAME and is quoted.
        await connection.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        await connection.execute(_CREATE_LEDGER)
        applied = {row["version"] for row in await connection.fetch("SELECT version FROM pricegate_migrations")}
        pending = [migration for migration in migrations if migration.version not in applied]
        for migration in pending:
            await connection.execute(migration.sql)
            await connection.execute(
                "INSERT INTO pricegate_migrations (version, name) VALUES ($1, $2)", migration.version, migration.name
            )
    return pending


async def open_pool(settings: Settings) -> Any:
    """Connect to ``settings.database_url`` and make sure the schema is current (see the module docstring)."""
    if not settings.database_url:
        raise DatabaseError("no database configured (PRICEGATE_DATABASE_URL is empty)")
    pool = await create_pool(
        settings.database_url,
        schema=settings.database_schema,
        min_size=settings.db_pool_min,
        max_size=settings.db_pool_max,
        statement_timeout_ms=settings.db_statement_timeout_ms,
    )
    try:
        if settings.db_migrate_on_start:
            await migrate(pool, settings.database_schema)
        needed = len(await asyncio.to_thread(load_migrations))
        version = await schema_version(pool)
        if version < needed:
            raise DatabaseError(
                f"schema {settings.database_schema!r} is at version {version}, this pricegate needs {needed}: "
                "run `pricegate db migrate` or set PRICEGATE_DB_MIGRATE_ON_START=true"
            )
        if version > needed:
            raise DatabaseError(
                f"schema {settings.database_schema!r} is at version {version}, newer than this pricegate ({needed})"
            )
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
        await pool.close()
        raise DatabaseError(f"PostgreSQL at {redact_url(settings.database_url)}: {error}") from error
    except DatabaseError:
        await pool.close()
        raise
    return pool
