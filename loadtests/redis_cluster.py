"""A Redis Cluster of the benchmark's own: ``primaries`` redis-server processes (1, 2, 3, ...; no replicas) on free
loopback ports, started from the ``redis-server`` binary (no Docker), for ``loadtests/broker_scale.py``.

``redis-cli --cluster create`` refuses fewer than 3 primaries, so the cluster is made by hand the way that tool
makes it: each node gets an even share of the 16 384 hash slots (``CLUSTER ADDSLOTSRANGE``, Redis 7.0), the others
meet the first (``CLUSTER MEET`` with the bus port) and it is ready once every node says ``cluster_state:ok`` and
knows every other. The tests' ``tests/redis_server.py`` (3 primaries + 3 replicas, for failover) is the model;
loadtests do not import tests, so the little that is needed is here. Each node can be pinned (``taskset``), runs
without persistence in a temporary directory, and has no Pub/Sub output limit: a gateway that falls behind during an
overload step must not be cut off (the step fails on latency and the next starts clean). :meth:`LocalCluster.stop`
stops only the processes this object started.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import redis

from shared.redis.slots import SLOTS

MIN_VERSION = (7, 0)  # sharded Pub/Sub and CLUSTER ADDSLOTSRANGE


class ClusterError(RuntimeError):
    pass


def free_port_pair(taken: Sequence[int]) -> tuple[int, int]:
    """A free loopback port for a node and another for its cluster bus (neither in ``taken``)."""
    while True:
        ports = []
        for _ in range(2):
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                ports.append(int(sock.getsockname()[1]))
        port, bus = ports
        if port != bus and port not in taken and bus not in taken:
            return port, bus


def redis_server_binary() -> str:
    """``redis-server`` from PATH, version 7.0 or later; ClusterError naming what is missing otherwise."""
    server = shutil.which("redis-server")
    if server is None:
        raise ClusterError("no redis-server on PATH (Redis 7 or later is needed for sharded Pub/Sub)")
    version = subprocess.run([server, "--version"], capture_output=True, text=True, check=False).stdout
    match = re.search(r"v=(\d+)\.(\d+)", version)
    if match is None or (int(match.group(1)), int(match.group(2))) < MIN_VERSION:
        raise ClusterError(f"redis-server 7.0 or later is needed (sharded Pub/Sub); found {version.strip()!r}")
    return server


def slot_ranges(primaries: int) -> list[tuple[int, int]]:
    """The 16 384 slots in ``primaries`` contiguous, even shares (as ``redis-cli --cluster create`` splits them)."""
    bounds = [round(index * SLOTS / primaries) for index in range(primaries + 1)]
    return [(bounds[index], bounds[index + 1] - 1) for index in range(primaries)]


def _wait(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(redis.exceptions.RedisError, OSError):
            if condition():
                return
        if time.monotonic() > deadline:
            raise ClusterError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


class LocalCluster:
    """``primaries`` cluster nodes, each serving ``slot_ranges(primaries)[i]``. ``pin`` prefixes every node's
    command (``["taskset", "-c", "0"]``); ``preexec_fn`` runs in each child (the benchmark's die-with-parent)."""

    def __init__(
        self,
        primaries: int,
        *,
        pin: Sequence[str] = (),
        preexec_fn: Callable[[], Any] | None = None,
        directory: str | None = None,
    ) -> None:
        if primaries < 1:
            raise ValueError("a cluster needs at least one primary")
        self.primaries = primaries
        self.pin = list(pin)
        self.preexec_fn = preexec_fn
        self._own_directory = directory is None
        self.directory = directory or tempfile.mkdtemp(prefix="pricegate-cluster-")
        self.ports: list[int] = []
        self.ranges = slot_ranges(primaries)
        self.processes: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        """``PRICEGATE_REDIS_URL`` for this cluster: every node as a seed."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in self.ports) + "/"

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self.processes]

    def owner(self, slot: int) -> int:
        """The port of the primary serving ``slot``."""
        for port, (first, last) in zip(self.ports, self.ranges, strict=True):
            if first <= slot <= last:
                return port
        raise ValueError(f"slot {slot} out of range")

    def client(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, socket_timeout=2, socket_connect_timeout=2)

    def start(self, timeout: float = 30.0) -> LocalCluster:
        server = redis_server_binary()
        try:
            buses: list[int] = []
            for _ in range(self.primaries):
                port, bus = free_port_pair([*self.ports, *buses])
                self.ports.append(port)
                buses.append(bus)
                workdir = os.path.join(self.directory, str(port))
                os.makedirs(workdir, exist_ok=True)
                argv = [
                    *self.pin, server, "--port", str(port), "--bind", "127.0.0.1", "--dir", workdir,
                    "--save", "", "--appendonly", "no", "--logfile", os.path.join(workdir, "redis.log"),
                    "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf",
                    "--cluster-port", str(bus), "--client-output-buffer-limit", "pubsub 0 0 0",
                ]  # fmt: skip
                self.processes.append(
                    subprocess.Popen(
                        argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=self.preexec_fn
                    )
                )
            for port, process in zip(self.ports, self.processes, strict=True):
                self._wait_up(port, process, timeout)
            for port, (first, last) in zip(self.ports, self.ranges, strict=True):
                with self.client(port) as node:
                    node.execute_command("CLUSTER", "ADDSLOTSRANGE", first, last)
            with self.client(self.ports[0]) as first_node:
                for port, bus in zip(self.ports[1:], buses[1:], strict=True):
                    first_node.execute_command("CLUSTER", "MEET", "127.0.0.1", port, bus)
            _wait(self._healthy, timeout, f"a healthy cluster of {self.primaries} primaries")
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_up(self, port: int, process: subprocess.Popen[bytes], timeout: float) -> None:
        def up() -> bool:
            if process.poll() is not None:
                raise ClusterError(f"redis-server on port {port} exited at start:\n{self.log(port)[-2000:]}")
            with self.client(port) as node:
                return bool(node.ping())

        _wait(up, timeout, f"redis-server on port {port}")

    def _healthy(self) -> bool:
        for port in self.ports:
            with self.client(port) as node:
                info = node.execute_command("CLUSTER", "INFO")
                text = info.decode() if isinstance(info, bytes) else str(info)
                fields = dict(line.split(":", 1) for line in text.split() if ":" in line)
                if fields.get("cluster_state") != "ok" or int(fields.get("cluster_known_nodes", 0)) != self.primaries:
                    return False
                if len(node.execute_command("CLUSTER", "SLOTS")) != self.primaries:
                    return False
        return True

    def shard_channels(self) -> dict[int, int]:
        """Per primary port: how many shard channels have a subscriber there (``PUBSUB SHARDCHANNELS``)."""
        counts = {}
        for port in self.ports:
            with self.client(port) as node:
                counts[port] = len(node.execute_command("PUBSUB", "SHARDCHANNELS"))
        return counts

    def classic_channels(self) -> int:
        """Classic Pub/Sub channels with a subscriber, over every node (``PUBSUB CHANNELS``): none on a cluster."""
        total = 0
        for port in self.ports:
            with self.client(port) as node:
                total += len(node.execute_command("PUBSUB", "CHANNELS"))
        return total

    def log(self, port: int) -> str:
        with contextlib.suppress(OSError), open(os.path.join(self.directory, str(port), "redis.log")) as file:
            return file.read()
        return ""

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes = []
        if self._own_directory:
            shutil.rmtree(self.directory, ignore_errors=True)
