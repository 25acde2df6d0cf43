"""Which broker a ``PRICEGATE_REDIS_URL`` asks for: :class:`shared.broker.redis.RedisBroker` for one server
(``redis://``, ``rediss://``, ``unix://``), :class:`shared.broker.redis.SentinelBroker` for a master watched by
Sentinels (``redis+sentinel://``), :class:`shared.broker.redis_cluster.ClusterBroker` for a Redis Cluster
(``redis+cluster://``). All three are the one :class:`shared.broker.contract.Broker` and keep the same wire contract;
they also share ``take_fencing_epoch`` (the lease's epoch, announced before a new leader publishes)."""

from __future__ import annotations

from typing import Any

from shared.broker.redis import RedisBroker, SentinelBroker
from shared.broker.redis_cluster import ClusterBroker
from shared.redis.urls import parse_redis_url

# Where the master or a slot's primary can move (a failover), a lost subscription is retried at least every second,
# so gateways follow the promoted replica within a few seconds of the promotion.
HA_RECONNECT_MAX_S = 1.0


def redis_broker(url: str, **options: Any) -> RedisBroker | ClusterBroker:
    """The broker for ``url`` (``ValueError`` with the problem if it names none); ``options`` are the brokers'
    keyword arguments (prefix, venue, history bounds, timeouts)."""
    target = parse_redis_url(url)
    if target.highly_available:
        options.setdefault("reconnect_max_s", HA_RECONNECT_MAX_S)
    if target.kind == "cluster":
        return ClusterBroker(url, **options)
    if target.kind == "sentinel":
        return SentinelBroker(url, **options)
    return RedisBroker(url, **options)
