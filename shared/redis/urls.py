"""What ``PRICEGATE_REDIS_URL`` names: one standalone Redis (``redis://``, ``rediss://``, ``unix://``), a Redis Cluster
by its seed nodes (``redis+cluster://h1:p1,h2:p2,h3:p3/``) or a master watched by Sentinels
(``redis+sentinel://h1:p1,h2:p2,h3:p3/<master-name>[/db]``). :func:`parse_redis_url` turns the text into a
:class:`RedisTarget` or raises ``ValueError`` with one sentence saying what is wrong, which settings validation turns
into a ``ConfigError`` naming the setting. Pure: no I/O, the connecting happens in :mod:`shared.redis.clients`.

Credentials may sit in the userinfo of every form (``redis+cluster://:secret@h1:p1,.../``); they are used for the
data nodes (every cluster node, the Sentinel-managed master and replicas), not for the Sentinels themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import unquote

STANDALONE_SCHEMES = ("redis://", "rediss://", "unix://")
CLUSTER_SCHEME = "redis+cluster://"
SENTINEL_SCHEME = "redis+sentinel://"
DEFAULT_REDIS_PORT = 6379
DEFAULT_SENTINEL_PORT = 26379
CLUSTER_EXAMPLE = "redis+cluster://h1:7000,h2:7000,h3:7000/"
SENTINEL_EXAMPLE = "redis+sentinel://h1:26379,h2:26379,h3:26379/mymaster"

Kind = Literal["standalone", "cluster", "sentinel"]


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """A parsed ``PRICEGATE_REDIS_URL``. ``url`` is the text as given (a standalone URL is handed to redis-py as is);
    ``nodes`` are the cluster seeds or the Sentinels, in the given order."""

    kind: Kind
    url: str
    nodes: tuple[tuple[str, int], ...] = ()
    master_name: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @property
    def highly_available(self) -> bool:
        """Cluster or Sentinel: the server a name resolves to may change while pricegate runs."""
        return self.kind != "standalone"


def parse_redis_url(url: str) -> RedisTarget:
    """The target ``url`` names; ``ValueError`` with the problem in one sentence otherwise."""
    if url.startswith(STANDALONE_SCHEMES):
        return RedisTarget("standalone", url)
    for scheme, kind in ((CLUSTER_SCHEME, "cluster"), (SENTINEL_SCHEME, "sentinel")):
        if url.startswith(scheme):
            return _parse_multi_host(url, url[len(scheme) :], kind)  # type: ignore[arg-type]  # a Kind literal
    raise ValueError(
        "must start with redis://, rediss://, unix:// (one server), redis+cluster:// (a Redis Cluster) or "
        "redis+sentinel:// (a master watched by Sentinels)"
    )


def _parse_multi_host(url: str, rest: str, kind: Kind) -> RedisTarget:
    if "?" in rest or "#" in rest:
        raise ValueError(f"{kind} URLs take no query or fragment")
    authority, slash, path = rest.partition("/")
    username = password = None
    # The userinfo runs to the LAST "@" of the authority: a password may hold an unencoded "@".
    if "@" in authority:
        userinfo, _, authority = authority.rpartition("@")
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    default_port = DEFAULT_REDIS_PORT if kind == "cluster" else DEFAULT_SENTINEL_PORT
    nodes = tuple(_host_port(entry, default_port) for entry in authority.split(",") if entry.strip())
    example = CLUSTER_EXAMPLE if kind == "cluster" else SENTINEL_EXAMPLE
    if not nodes:
        what = "seed node" if kind == "cluster" else "Sentinel"
        raise ValueError(f"names no {what} (host:port, comma-separated), e.g. {example}")
    if len(set(nodes)) != len(nodes):
        raise ValueError("names a host:port twice")
    if kind == "cluster":
        if path.strip("/"):
            raise ValueError(f"a Redis Cluster has only database 0: end the URL after the seed nodes with /, {example}")
        return RedisTarget("cluster", url, nodes, username=username, password=password)
    name, _, db_text = path.partition("/")
    name = unquote(name)
    if not slash or not name:
        raise ValueError(f"names no master: put the name Sentinel monitors after the Sentinels, e.g. {example}")
    db = 0
    db_text = db_text.strip("/")
    if db_text:
        if not (db_text.isascii() and db_text.isdigit()):
            raise ValueError(f"the database after the master name must be a number, got {db_text!r}")
        db = int(db_text)
    return RedisTarget("sentinel", url, nodes, master_name=name, db=db, username=username, password=password)


def _host_port(entry: str, default_port: int) -> tuple[str, int]:
    entry = entry.strip()
    if entry.startswith("["):  # [IPv6]:port
        host, _, tail = entry[1:].partition("]")
        port_text = tail.removeprefix(":")
    elif entry.count(":") == 1:
        host, _, port_text = entry.partition(":")
    elif ":" in entry:
        raise ValueError(f"{entry!r}: write an IPv6 address in brackets, [::1]:7000")
    else:
        host, port_text = entry, ""
    if not host:
        raise ValueError(f"{entry!r} names no host")
    if not port_text:
        return host, default_port
    if not (port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text) < 65536:
        raise ValueError(f"{entry!r}: the port must be a number from 1 to 65535")
    return host, int(port_text)
