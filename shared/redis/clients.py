"""redis-py clients for a ``PRICEGATE_REDIS_URL``.

- :func:`command_client`: one server's client, for any single-server URL: the server itself (``redis://``,
  ``rediss://``, ``unix://``) or the master Sentinels name (``redis+sentinel://``; every new connection asks the
  Sentinels, so the client follows a failover). The broker and the lease use it; on a Redis Cluster their commands go
  through :class:`shared.redis.cluster.ClusterClient`, which knows where each slot lives.
- :func:`state_client`: a :class:`StateClient` for what gateway replicas share beside the broker (API-key cache,
  connection counts, REST response cache), on any of the three deployments, a Redis Cluster included (redis-py's
  ``RedisCluster``), with a bound on the commands it runs at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions as redis_errors
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import RedisClusterException

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


# ---- state the gateways share, on any deployment ---------------------------------------------------------------

SharedClient = aioredis.Redis | RedisCluster


def state_retry() -> Retry:
    """Two more tries, 50 ms then about 100 ms apart: a dropped connection or a node that moved is followed, a dead
    Redis costs a caller a few timeouts at most before it does without (state clients always have a way without)."""
    return Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), retries=2)


class StateClient:
    """A redis-py client of the state pricegate's replicas share (the API-key cache, per-key connection counts, the REST
    response cache), for any ``PRICEGATE_REDIS_URL``: the server itself, the master the Sentinels name (a new
    connection asks them, so a failover is followed) or a Redis Cluster through redis-py's ``RedisCluster`` (each
    command goes to the primary of its key's slot; ``MOVED``/``ASK`` are followed and the slot map is read again after
    a lost connection). On a cluster a command or script must keep its keys in one slot: callers give keys that go
    together one ``{...}`` hash tag; a non-transactional pipeline may span slots (redis-py sends it per node).

    At most ``max_connections`` commands (or pipelines) run at once; a caller waits up to ``wait_s`` for a
    :meth:`turn`, then gets ``redis.exceptions.ConnectionError``, as from a ``BlockingConnectionPool`` (which a
    cluster's per-node pools have no equivalent of: they refuse at once). Whatever fails inside a turn is a
    ``RedisError``: redis-py's cluster problems that are not (no node reachable, a slot nobody serves) are raised as
    ``ConnectionError``, so callers that do without Redis when it fails need to catch one kind."""

    def __init__(
        self, client: SharedClient, *, max_connections: int, wait_s: float, sentinel: Sentinel | None = None
    ) -> None:
        self.client = client
        self.wait_s = wait_s
        self._turns = asyncio.Semaphore(max_connections)
        self._sentinel = sentinel
        self._closed = False

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[SharedClient]:
        """The client, for one command or pipeline."""
        if self._turns.locked():
            try:
                async with asyncio.timeout(self.wait_s):
                    await self._turns.acquire()
            except TimeoutError:
                raise redis_errors.ConnectionError(f"no Redis connection free within {self.wait_s:g} s") from None
        else:
            await self._turns.acquire()
        try:
            yield self.client
        except RedisClusterException as error:
            raise redis_errors.ConnectionError(f"Redis Cluster: {error}") from error
        finally:
            self._turns.release()

    async def aclose(self) -> None:
        """Close the client and every connection it holds (a second call does nothing)."""
        if self._closed:
            return
        self._closed = True
        await self.client.aclose()
        if isinstance(self.client, aioredis.Redis):
            await self.client.connection_pool.disconnect()
        if self._sentinel is not None:
            await self._sentinel.aclose()

    # gateway/auth/service.py closes a client and then its ``connection_pool``: here both are this object.
    @property
    def connection_pool(self) -> StateClient:
        return self

    async def disconnect(self) -> None:
        await self.aclose()


def state_client(url: str, *, max_connections: int, timeout_s: float) -> StateClient:
    """A :class:`StateClient` for ``url`` with ``timeout_s`` for connecting, each reply and a turn. ``ValueError`` for a
    URL that names nothing."""
    target = parse_redis_url(url)
    options: dict[str, Any] = {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "max_connections": max_connections,
        "retry": state_retry(),
    }
    if target.kind == "standalone":
        client = aioredis.Redis.from_url(url, **options)
        return StateClient(client, max_connections=max_connections, wait_s=timeout_s)
    if target.kind == "sentinel":
        master = sentinel_master(target, **options)
        return StateClient(master.client, max_connections=max_connections, wait_s=timeout_s, sentinel=master._sentinel)
    cluster = RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
        username=target.username,
        password=target.password,
        # One shard failing over must not stop the others' keys (as with cluster-require-full-coverage no).
        require_full_coverage=False,
        **options,
    )
    return StateClient(cluster, max_connections=max_connections, wait_s=timeout_s)
