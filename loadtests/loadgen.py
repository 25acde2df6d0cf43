"""Build and drive ``loadgen.c``, the epoll WebSocket load generator (see the C file for what it measures).

:func:`build` compiles it with the system C compiler (``$CC``, else ``cc``, ``gcc`` or ``clang``) into a cache
directory keyed by the source's hash (``$PRICEGATE_LOADGEN_CACHE``, else ``$XDG_CACHE_HOME/pricegate-loadgen``
or ``~/.cache/pricegate-loadgen``), so a run pays the compile once. :class:`LoadGen` runs it and speaks its
line protocol: commands on stdin, one JSON object per line on stdout.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import shutil
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SOURCE = Path(__file__).with_name("loadgen.c")


class LoadGenError(RuntimeError):
    pass


def cache_dir() -> Path:
    explicit = os.environ.get("PRICEGATE_LOADGEN_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pricegate-loadgen"


def find_compiler() -> str:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    raise LoadGenError("no C compiler found (set CC, or install gcc): the load generator is built at run time")


def build() -> Path:
    """Path of the compiled load generator, compiling it first if this source version was never built."""
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source).hexdigest()[:16]
    target = cache_dir() / f"loadgen-{digest}"
    if target.is_file() and os.access(target, os.X_OK):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    command = [find_compiler(), "-O2", "-std=gnu11", "-Wall", "-o", str(temporary), str(SOURCE)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise LoadGenError(f"compiling the load generator failed ({' '.join(command)}):\n{result.stderr}")
    temporary.replace(target)  # atomic: concurrent runs never see a half-written binary
    return target


class LineProcess:
    """A child process whose stdout is read line by line on a thread (so waits can time out)."""

    def __init__(self, argv: Sequence[str], *, name: str, env: dict[str, str] | None = None, **popen: Any) -> None:
        self.name = name
        self.process = subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
            env=env,
            **popen,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name=f"{name}-stdout", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put(None)

    @property
    def pid(self) -> int:
        return self.process.pid

    def send(self, line: str) -> None:
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(line + "\n")
            self.process.stdin.flush()
        except (BrokenPipeError, ValueError) as error:
            raise LoadGenError(f"{self.name} exited (code {self.process.poll()})") from error

    def expect(self, event: str, timeout: float) -> dict[str, Any]:
        """The next JSON line whose ``event`` is ``event`` (other lines are skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LoadGenError(f"{self.name}: no {event!r} within {timeout:.0f}s")
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                raise LoadGenError(f"{self.name} exited (code {self.process.wait()}) while waiting for {event!r}")
            line = line.strip()
            if not line.startswith("{"):
                continue
            message = json.loads(line)
            if message.get("event") == event:
                return dict(message)

    def stop(self, timeout: float = 5.0) -> None:
        try:
            if self.process.stdin is not None:
                self.process.stdin.close()  # its end of input: the child exits
        except OSError:
            pass
        if self.process.poll() is None:
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        # The reader sees EOF once the process is gone; then its pipe can be closed (no ResourceWarning).
        self._reader.join(timeout)
        if not self._reader.is_alive() and self.process.stdout is not None:
            self.process.stdout.close()


class LoadGen(LineProcess):
    """The running load generator: ``stats()``, ``reset()``, ``reconnect()``."""

    def __init__(self, argv_prefix: Sequence[str], binary: Path, **options: Any) -> None:
        argv = [*argv_prefix, str(binary)]
        for key, value in options.items():
            if value is not None:
                argv += ["--" + key.replace("_", "-"), str(value)]
        super().__init__(argv, name="loadgen", start_new_session=True)

    def connected(self, timeout: float) -> dict[str, Any]:
        return self.expect("connected", timeout)

    def stats(self) -> dict[str, Any]:
        self.send("stats")
        return self.expect("stats", 30)

    def reset(self) -> None:
        self.send("reset")
        self.expect("reset", 30)

    def reconnect(self, timeout: float) -> dict[str, Any]:
        self.send("reconnect")
        return self.expect("reconnected", timeout)

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.poll() is None:
            try:
                self.send("quit")
            except LoadGenError:
                pass
        super().stop(timeout)


def fd_limit() -> int:
    """Open files one process may have (the hard limit: raising it needs CAP_SYS_RESOURCE, which even root may
    lack in a container)."""
    import resource

    return int(resource.getrlimit(resource.RLIMIT_NOFILE)[1])


class LoadGenGroup:
    """Several load generators acting as one (when N exceeds one process's open-file limit): clients are split
    into contiguous shares, each generator on its own source addresses; stats are summed and the latency
    histograms merged, so percentiles are exact to the bucket as with one generator."""

    def __init__(self, members: list[LoadGen], shares: list[int], streams: int) -> None:
        self.members = members
        self.shares = shares
        self.streams = streams

    @property
    def pid(self) -> int:
        return self.members[0].pid

    @property
    def pids(self) -> list[int]:
        return [member.pid for member in self.members]

    def connected(self, timeout: float) -> dict[str, Any]:
        hellos = [member.connected(timeout) for member in self.members]
        reading = [0] * self.streams
        for hello in hellos:
            for index, count in enumerate(hello["reading_per_stream"]):
                reading[index] += count
        return {
            "event": "connected",
            "open": sum(h["open"] for h in hellos),
            "clients": sum(h["clients"] for h in hellos),
            "failed": sum(h["failed"] for h in hellos),
            "elapsed_s": max(h["elapsed_s"] for h in hellos),
            "reading_per_stream": reading,
        }

    def reset(self) -> None:
        for member in self.members:
            member.send("reset")
        for member in self.members:
            member.expect("reset", 30)

    def stats(self) -> dict[str, Any]:
        for member in self.members:
            member.send("stats")
        parts = [member.expect("stats", 30) for member in self.members]
        for member in self.members:
            member.send("histogram")
        histograms = [member.expect("histogram", 30) for member in self.members]
        merged: dict[int, int] = {}
        for histogram in histograms:
            for bound, count in histogram["buckets"]:
                merged[bound] = merged.get(bound, 0) + count
        total = sum(merged.values())
        max_us: int = max(h["max_us"] for h in histograms)

        def percentile(q: float) -> int:
            if not total:
                return 0
            rank = min(int(q * total), total - 1)
            seen = 0
            for bound in sorted(merged):
                seen += merged[bound]
                if seen > rank:
                    return min(bound, max_us)
            return max_us

        summed = {key: sum(p[key] for p in parts) for key in ("frames", "bytes", "latency_count", "unparsed")}
        summed.update({key: sum(p[key] for p in parts) for key in ("open", "reading", "zero_frame_clients")})
        summed.update({key: sum(p[key] for p in parts) for key in ("lost", "lost_total", "close_frames", "pings")})
        return {
            "event": "stats",
            **summed,
            "p50_us": percentile(0.50),
            "p90_us": percentile(0.90),
            "p99_us": percentile(0.99),
            "p999_us": percentile(0.999),
            "max_us": max_us,
            "min_frames": min(p["min_frames"] for p in parts),
            "max_frames": max(p["max_frames"] for p in parts),
            "last_close_code": max(p["last_close_code"] for p in parts),
            # CPU summed over the generators: above 100 % means more than one core's worth.
            "cpu_user_s": sum(p["cpu_user_s"] for p in parts),
            "cpu_sys_s": sum(p["cpu_sys_s"] for p in parts),
            "monotonic_s": max(p["monotonic_s"] for p in parts),
        }

    def reconnect(self, timeout: float) -> dict[str, Any]:
        for member in self.members:
            member.send("reconnect")
        hellos = [member.expect("reconnected", timeout) for member in self.members]
        return {"event": "reconnected", "open": sum(h["open"] for h in hellos)}

    def stop(self, timeout: float = 10.0) -> None:
        for member in self.members:
            member.stop(timeout)
