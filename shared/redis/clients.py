"""A redis-py client for any single-server ``PRICEGATE_REDIS_URL``: the server itself (``redis://``, ``rediss://``,
``unix://``) or the master Sentinels name (``redis+sentinel://``; every new connection asks the Sentinels, so the
client follows a failover). A Redis Cluster has no single client here: its commands go through
:class:`shared.redis.cluster.ClusterClient`, which knows where each slot lives."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.sentinel import Sentinel

from shared.redis.urls import RedisTarget, parse_redis_url


class CommandClient:
    """``client``, and what else must be closed with it (the Sentinels' clients)."""

    def __init__(self, client: aioredis.Redis, sentinel: Sentinel | None = None) -> None:
        self.client = client
        self._sentinel = sentinel

    async def aclose(self) -> None:
        await self.client.aclose()
        if self._sentinel is not None:
            await self._sentinel.aclose()


def command_client(url: str, **options: Any) -> CommandClient:
    """A client for ``url`` with redis-py ``options`` (timeouts, retry, ...). ``ValueError`` for a cluster URL or
    one that names nothing."""
    target = parse_redis_url(url)
    if target.kind == "standalone":
        return CommandClient(aioredis.Redis.from_url(url, **options))
    if target.kind == "sentinel":
        return sentinel_master(target, **options)
    raise ValueError("a redis+cluster:// URL has no single client (use shared.redis.cluster.ClusterClient)")


def sentinel_master(target: RedisTarget, **options: Any) -> CommandClient:
    """A client of the master ``target``'s Sentinels name."""
    timeout = options.get("socket_timeout")
    sentinel = Sentinel(  # type: ignore[no-untyped-call]  # untyped in redis-py
        list(target.nodes), sentinel_kwargs={"socket_timeout": timeout, "socket_connect_timeout": timeout}
    )
    data = dict(options, db=target.db)
    if target.password is not None:
        data["password"] = target.password
    if target.username is not None:
        data["username"] = target.username
    client: aioredis.Redis = sentinel.master_for(target.master_name, **data)
    return CommandClient(client, sentinel)
