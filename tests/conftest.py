"""Shared fixtures: real Redis (separate DB, unique key prefix per test), real PostgreSQL (a fresh schema per
test, dropped afterwards) and the CI=true rule for services."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from typing import NoReturn

import asyncpg
import pytest
import redis.asyncio as aioredis

from tests.raw_sockets import close_raw_sockets

REDIS_URL = os.environ.get("PRICEGATE_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")
POSTGRES_DSN = os.environ.get("PRICEGATE_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")


def service_missing(what: str, error: BaseException) -> NoReturn:
    """Fail under CI=true, otherwise skip loudly with the reason: a missing service is never silent."""
    message = (
        f"{what} is not reachable ({error!r}); start it "
        "(README, 'Two commands': ./run-tests starts Redis and PostgreSQL when it can)"
    )
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true and {message}", pytrace=False)
    pytest.skip(message)


@pytest.fixture
async def redis_url() -> AsyncIterator[str]:
    """URL of the test Redis database; fails loudly (CI) or skips with the reason when Redis is down."""
    client = aioredis.from_url(REDIS_URL)
    try:
        await client.ping()
    except Exception as error:  # any failure to reach the service means the same thing
        service_missing(f"Redis at {REDIS_URL}", error)
    finally:
        await client.aclose()
    yield REDIS_URL


@pytest.fixture
async def postgres_dsn() -> AsyncIterator[str]:
    """DSN of the test PostgreSQL database; fails loudly (CI) or skips with the reason when it is down."""
    try:
        connection = await asyncpg.connect(POSTGRES_DSN, timeout=5)
    except Exception as error:  # any failure to reach the service means the same thing
        service_missing(f"PostgreSQL at {POSTGRES_DSN}", error)
    await connection.close()
    yield POSTGRES_DSN


@pytest.fixture
async def pg_schema(postgres_dsn: str) -> AsyncIterator[str]:
    """A schema name no other test uses (created by the code under test, e.g. by migrations); dropped after."""
    schema = f"pgtest_{uuid.uuid4().hex[:12]}"
    yield schema
    connection = await asyncpg.connect(postgres_dsn, timeout=5)
    try:
        # The name is generated above (letters, digits, underscore), never outside input.
        await connection.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await connection.close()


@pytest.fixture
def key_prefix() -> str:
    """A key prefix no other test (or earlier run) uses, so tests never see each other's data."""
    return f"pgtest{uuid.uuid4().hex[:12]}"


@pytest.fixture(autouse=True)
async def _close_raw_sockets() -> AsyncIterator[None]:
    """Raw sockets a test opened through tests/raw_sockets.py are closed after it, whatever it asserted."""
    yield
    await close_raw_sockets()
