"""Redis servers of a test's own, started from the ``redis-server`` binary (no Docker) and torn down by whoever started
them, without disturbing anyone else using the shared test server:

- :class:`PrivateRedis`: one server, which the test may kill and start again (empty, as after a crash without
  persistence);
- :class:`LocalCluster`: a Redis Cluster of 3 primaries and 3 replicas (``redis-cli --cluster create``);
- :class:`LocalSentinel`: a master, its replica and three Sentinels.

Each makes its own ports (and the cluster's bus ports) and temporary directories, waits until it is healthy, and
stops only the processes it started. Under ``CI=true`` a missing ``redis-server`` (for the cluster and Sentinel:
``redis-server`` and ``redis-cli`` 7 or later) is a failure (``service_missing``)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable

import redis
import redis.asyncio as aioredis
import redis.exceptions as redis_errors

from tests.conftest import service_missing
from tests.processes import free_port


class PrivateRedis:
    """On a unix socket (``PrivateRedis(path)``: no port to race for), or on a TCP port of loopback
    (:meth:`on_tcp`: a free port, kept across restarts, as a real deployment's Redis is)."""

    def __init__(self, socket_path: str | None = None, *, port: int | None = None) -> None:
        if (socket_path is None) == (port is None):
            raise ValueError("give a unix socket path or a TCP port")
        self.socket_path = socket_path
        self.port = port
        self.url = f"unix://{socket_path}?db=0" if socket_path is not None else f"redis://127.0.0.1:{port}/0"
        self._process: asyncio.subprocess.Process | None = None

    @classmethod
    def on_tcp(cls) -> PrivateRedis:
        return cls(port=free_port())

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.returncode is None

    async def start(self) -> None:
        executable = shutil.which("redis-server")
        if executable is None:
            service_missing("redis-server (to run a private server)", FileNotFoundError("redis-server"))
        if self.socket_path is not None:
            listen = ["--port", "0", "--unixsocket", self.socket_path, "--unixsocketperm", "700"]
        else:
            listen = ["--port", str(self.port), "--bind", "127.0.0.1"]
        # Not the checkout as its directory: a server started there would load (or leave) a dump.rdb in it.
        self._process = await asyncio.create_subprocess_exec(
            executable, *listen, "--save", "", "--appendonly", "no", "--dir", tempfile.gettempdir(),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        client = aioredis.from_url(self.url)
        try:
            deadline = time.monotonic() + 5
            while True:
                try:
                    await client.ping()
                    return
                except redis_errors.ConnectionError:
                    if time.monotonic() > deadline or self._process.returncode is not None:
                        raise
                    await asyncio.sleep(0.01)
        finally:
            await client.aclose()

    async def kill(self) -> None:
        """SIGKILL: nothing is saved, every connection drops at once."""
        process, self._process = self._process, None
        if process is not None and process.returncode is None:
            process.kill()
            await process.wait()


# ---- a Redis Cluster and a Sentinel-watched master of the test's own ---------------------------------------------

CLUSTER_NODE_TIMEOUT_MS = 1000  # how long a silent primary takes to be judged failed (its replica then takes over)
SENTINEL_DOWN_AFTER_MS = 1000  # how long a silent master takes to be judged down by the Sentinels
MASTER_NAME = "pgmaster"


def redis_binaries() -> tuple[str, str]:
    """``(redis-server, redis-cli)``, both of Redis 7 or later (sharded Pub/Sub); otherwise skipped, or failed under
    CI=true (``service_missing``)."""
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if server is None or cli is None:
        missing = "redis-server" if server is None else "redis-cli"
        service_missing("redis-server and redis-cli (for a local cluster)", FileNotFoundError(missing))
    version = subprocess.run([server, "--version"], capture_output=True, text=True, check=False).stdout
    match = re.search(r"v=(\d+)\.(\d+)", version)
    if match is None or int(match.group(1)) < 7:
        service_missing("redis-server >= 7 (sharded Pub/Sub)", RuntimeError(f"found {version.strip()!r}"))
    return server, cli


def _wait(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except (redis.exceptions.RedisError, OSError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def _ping(port: int) -> bool:
    with redis.Redis(port=port, socket_timeout=0.5, socket_connect_timeout=0.5) as client:
        return bool(client.ping())


class _Processes:
    """redis-server processes this fixture started (and only those), each in a temporary directory of its own."""

    def __init__(self) -> None:
        self.server, self.cli = redis_binaries()
        self.directory = tempfile.mkdtemp(prefix="pricegate-redis-")
        self.processes: dict[int, subprocess.Popen[bytes]] = {}
        self.args: dict[int, list[str]] = {}

    def start(self, port: int, *args: str) -> None:
        workdir = os.path.join(self.directory, str(port))
        os.makedirs(workdir, exist_ok=True)
        argv = [self.server, *args] if args and args[0].endswith(".conf") else [self.server]
        rest = list(args[1:]) if args and args[0].endswith(".conf") else list(args)
        argv += ["--port", str(port), "--bind", "127.0.0.1", "--dir", workdir, "--save", "", "--appendonly", "no",
                 "--logfile", os.path.join(workdir, "redis.log"), *rest]  # fmt: skip
        self.args[port] = argv
        self.processes[port] = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._wait_up(port)

    def _wait_up(self, port: int) -> None:
        process = self.processes[port]

        def up() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"redis-server on port {port} exited at start:\n{self.log(port)[-2000:]}")
            return _ping(port)

        _wait(up, 10, f"redis-server on port {port}")

    def start_sentinel(
        self, port: int, name: str, master_port: int, *, quorum: int, down_after_ms: int = SENTINEL_DOWN_AFTER_MS
    ) -> None:
        """A Sentinel on ``port`` watching the master ``name`` at ``master_port`` (its config file is its own: a
        Sentinel rewrites it)."""
        config = os.path.join(self.directory, f"sentinel-{port}.conf")
        with open(config, "w") as file:
            file.write(
                f"sentinel monitor {name} 127.0.0.1 {master_port} {quorum}\n"
                f"sentinel down-after-milliseconds {name} {down_after_ms}\n"
                f"sentinel failover-timeout {name} 10000\n"
                f"sentinel parallel-syncs {name} 1\n"
            )
        self.start(port, config, "--sentinel")

    def restart(self, port: int) -> None:
        """Start a killed node again with the same arguments (its data, if any was written, is gone)."""
        self.processes[port] = subprocess.Popen(self.args[port], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._wait_up(port)

    def kill(self, port: int) -> None:
        process = self.processes.get(port)
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()

    def stop_all(self) -> None:
        for port in list(self.processes):
            self.kill(port)
        shutil.rmtree(self.directory, ignore_errors=True)

    def log(self, port: int) -> str:
        with contextlib.suppress(OSError), open(os.path.join(self.directory, str(port), "redis.log")) as file:
            return file.read()
        return ""


class LocalCluster:
    """A Redis Cluster of 3 primaries and 3 replicas on free loopback ports (and bus ports), made with ``redis-cli
    --cluster create``. A failed primary's replica takes over after about ``CLUSTER_NODE_TIMEOUT_MS``; with
    ``cluster-require-full-coverage no`` the other shards keep serving meanwhile."""

    def __init__(self, primaries: int = 3, replicas_per_primary: int = 1) -> None:
        self.count = primaries * (1 + replicas_per_primary)
        self.replicas_per_primary = replicas_per_primary
        self.ports: list[int] = []
        self._nodes = _Processes()

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in self.ports[:3]) + "/"

    def start(self) -> LocalCluster:
        try:
            for _ in range(self.count):
                port, bus = _free_port_pair(self.ports)
                self.ports.append(port)
                self._nodes.start(
                    port, "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf",
                    "--cluster-port", str(bus), "--cluster-node-timeout", str(CLUSTER_NODE_TIMEOUT_MS),
                    "--cluster-require-full-coverage", "no", "--cluster-replica-validity-factor", "0",
                    "--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0", "--repl-ping-replica-period", "1",
                )  # fmt: skip
            created = subprocess.run(
                [self._nodes.cli, "--cluster", "create", *(f"127.0.0.1:{port}" for port in self.ports),
                 "--cluster-replicas", str(self.replicas_per_primary), "--cluster-yes"],
                capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip
            if created.returncode != 0:
                raise AssertionError(f"redis-cli --cluster create failed:\n{created.stdout}\n{created.stderr}")
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_healthy(self, timeout: float = 30) -> None:
        """cluster_state:ok on every running node, every slot served, every replica in sync with its primary."""

        def healthy() -> bool:
            for port in self.running():
                with self.client(port) as client:
                    if client.cluster("INFO").get("cluster_state") != "ok":
                        return False
            replicas = 0
            for port in self.primaries():
                with self.client(port) as client:
                    info = client.info("replication")
                    replicas += sum(
                        1 for key, value in info.items() if key.startswith("slave") and value.get("state") == "online"
                    )
            expected = len(self.running()) - len(self.primaries())
            # ... and every running node's map names them (gossip takes a moment to spread).
            return replicas == expected and all(
                sum(len(replicas) for *_, replicas in self.slots_seen_by(port)) == expected for port in self.running()
            )

        _wait(healthy, timeout, "a healthy cluster")

    def client(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, socket_timeout=2, socket_connect_timeout=2)

    def running(self) -> list[int]:
        return [port for port, process in self._nodes.processes.items() if process.poll() is None]

    def slots(self) -> list[tuple[int, int, int, list[int]]]:
        """``(first, last, primary port, replica ports)`` as a running node sees it."""
        for port in self.running():
            with contextlib.suppress(redis.exceptions.RedisError):
                return self.slots_seen_by(port)
        raise AssertionError("no cluster node answers")

    def slots_seen_by(self, port: int) -> list[tuple[int, int, int, list[int]]]:
        with self.client(port) as client:
            reply = client.execute_command("CLUSTER", "SLOTS")
        return [(int(r[0]), int(r[1]), int(r[2][1]), [int(n[1]) for n in r[3:]]) for r in reply]

    def primaries(self) -> list[int]:
        return sorted({primary for _, _, primary, _ in self.slots()})

    def owner(self, slot: int) -> int:
        return next(primary for first, last, primary, _ in self.slots() if first <= slot <= last)

    def replicas_of(self, primary: int) -> list[int]:
        return next(replicas for _, _, port, replicas in self.slots() if port == primary)

    def node_id(self, port: int) -> str:
        with self.client(port) as client:
            return str(client.execute_command("CLUSTER", "MYID").decode())

    def kill(self, port: int) -> None:
        self._nodes.kill(port)

    def restart(self, port: int) -> None:
        self._nodes.restart(port)

    def cli(self, *args: str, timeout: float = 60) -> str:
        done = subprocess.run([self._nodes.cli, *args], capture_output=True, text=True, timeout=timeout, check=False)
        if done.returncode != 0:
            raise AssertionError(f"redis-cli {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
        return done.stdout

    def move_slot(self, slot: int, to_port: int) -> None:
        """Migrate one slot, keys and all, with ``redis-cli --cluster reshard`` (what an operator runs)."""
        source = self.owner(slot)
        if source == to_port:
            return
        # reshard moves N slots from a source; with one slot it would pick any, so the slot is emptied of its
        # neighbours by naming it exactly through the lower-level steps redis-cli itself takes.
        target_id, source_id = self.node_id(to_port), self.node_id(source)
        with self.client(to_port) as target, self.client(source) as origin:
            target.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
            origin.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
            while keys := origin.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
                origin.execute_command("MIGRATE", "127.0.0.1", to_port, "", 0, 5000, "KEYS", *keys)
            target.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
            origin.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        for port in self.running():
            if port not in (source, to_port):
                with contextlib.suppress(redis.exceptions.RedisError), self.client(port) as client:
                    client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)

    def stop(self) -> None:
        self._nodes.stop_all()


class LocalSentinel:
    """One master, one replica and three Sentinels (quorum 2) on free loopback ports; the Sentinels judge a silent
    master down after ``SENTINEL_DOWN_AFTER_MS`` and promote the replica."""

    def __init__(self) -> None:
        self._nodes = _Processes()
        self.master_port = 0
        self.replica_port = 0
        self.sentinel_ports: list[int] = []

    @property
    def url(self) -> str:
        return "redis+sentinel://" + ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports) + f"/{MASTER_NAME}"

    def start(self) -> LocalSentinel:
        try:
            self.master_port = free_port()
            self._nodes.start(self.master_port)
            self.replica_port = free_port()
            self._nodes.start(self.replica_port, "--replicaof", "127.0.0.1", str(self.master_port))
            for _ in range(3):
                port = free_port()
                self.sentinel_ports.append(port)
                self._nodes.start_sentinel(port, MASTER_NAME, self.master_port, quorum=2)
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_healthy(self, timeout: float = 30) -> None:
        """Every Sentinel sees the master, its replica and both other Sentinels (quorum is possible)."""

        def healthy() -> bool:
            for port in self.sentinel_ports:
                with redis.Redis(port=port, socket_timeout=1, decode_responses=True) as sentinel:
                    state = sentinel.sentinel_master(MASTER_NAME)
                    if int(state["num-other-sentinels"]) < 2 or int(state["num-slaves"]) < 1:
                        return False
            return True

        _wait(healthy, timeout, "Sentinels that see the master, its replica and each other")

    def master(self) -> int:
        with redis.Redis(port=self.sentinel_ports[0], socket_timeout=1, decode_responses=True) as sentinel:
            _, port = sentinel.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME)
        return int(port)

    def kill(self, port: int) -> None:
        self._nodes.kill(port)

    def stop(self) -> None:
        self._nodes.stop_all()


def _free_port_pair(taken: list[int]) -> tuple[int, int]:
    """A free port for a node and another for its cluster bus."""
    while True:
        port, bus = free_port(), free_port()
        if port != bus and port not in taken and bus not in taken:
            return port, bus
