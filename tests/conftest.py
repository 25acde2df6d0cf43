"""Shared fixtures: real Redis (separate DB, unique key prefix per test) and the CI=true rule for services."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

REDIS_URL = os.environ.get("PRICEGATE_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")


def _service_missing(what: str, error: BaseException) -> None:
    message = f"{what} is not reachable ({error!r}); start it (see README 'Running the tests')"
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
        _service_missing(f"Redis at {REDIS_URL}", error)
    finally:
        await client.aclose()
    yield REDIS_URL


@pytest.fixture
def key_prefix() -> str:
    """A key prefix no other test (or earlier run) uses, so tests never see each other's data."""
    return f"pgtest{uuid.uuid4().hex[:12]}"
