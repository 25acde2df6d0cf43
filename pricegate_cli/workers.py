"""``pricegate gateway --workers N``: a supervisor process that runs N gateway workers sharing one port.

Each worker is a whole gateway, exactly what ``--workers 1`` runs (its own event loop, broker connection, Redis
subscriptions, node and hub), listening on PRICEGATE_PORT through its own SO_REUSEPORT socket: the kernel spreads
new connections over the workers' accept queues, and a worker that dies takes only its own clients with it. Worker
i serves /metrics on PRICEGATE_METRICS_PORT + i, so each worker is its own Prometheus target and nothing is counted
twice (a scrape of the client port would reach a random worker, which is why more than one worker needs the
setting). /livez and /readyz answer from whichever worker takes the connection.

The supervisor serves nothing itself. It

- refuses, with one line naming the setting, what cannot work: no metrics port, metrics ports out of range or in
  use, the client port taken by another server (it then holds the port with sockets that never listen, so a server
  that does not share ports cannot take it while a worker is replaced);
- starts worker 0 alone, so a configuration problem (Redis unreachable, ...) is one line from one process and exit
  code 2, then the others, and prints the banner once all of them serve;
- replaces a worker that dies (at once; one that dies again within ``STABLE_AFTER_S`` of starting waits
  longer each time, up to ``RESTART_DELAY_MAX_S``), and logs both;
- on SIGTERM or SIGINT sends SIGTERM to every worker, which drains as a single gateway does (clients closed with
  1001 spread over PRICEGATE_SHUTDOWN_DRAIN_S), kills a worker still running ``KILL_AFTER_DRAIN_S`` after that,
  and exits 0 when every worker stopped cleanly.

Why not uvicorn's own ``--workers`` (``uvicorn.supervisors.Multiprocess``): its workers accept from one socket
inherited from the parent (one accept queue, drained by whichever worker wakes first), are anonymous (no index to
give each its metrics port), run ``uvicorn.Server(config)`` rather than our entry point (broker first, then the
server), and restart a crash loop without pause. We do use what it uses: ``multiprocessing``'s spawn context
(a fresh interpreter per worker, the settings pickled to it, and a sentinel per process to wait on).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from types import FrameType

from gateway.server import hold_port, shared_port_sockets
from shared.backoff import backoff_delays
from shared.errors import ConfigError, PricegateError
from shared.settings import WORKERS_AUTO, Settings, env_name

logger = logging.getLogger("pricegate.workers")

EXIT_CONFIG = 2  # as pricegate_cli.__main__: a configuration problem, reported in one line
# A worker that served this long before it died is replaced at once; one that dies sooner is in a crash loop.
STABLE_AFTER_S = 30.0
RESTART_DELAY_FIRST_S = 0.5
RESTART_DELAY_MAX_S = 30.0
# After the drain window: uvicorn's graceful timeout (gateway/server.py: drain + 5 s), then the lifespan closes the
# relay and the broker. A worker still running then is killed.
KILL_AFTER_DRAIN_S = 10.0


def available_cores() -> int:
    """The CPUs this process may run on (a cpuset or ``taskset`` narrows it), not every CPU of the machine."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1  # not Linux


def worker_count(settings: Settings, cores: Callable[[], int] = available_cores) -> int:
    """PRICEGATE_WORKERS as a number of processes (``auto``: one per available core)."""
    return cores() if settings.workers == WORKERS_AUTO else settings.workers


def check_metrics_ports(settings: Settings, count: int) -> None:
    """Refuse (one ``ConfigError`` naming PRICEGATE_METRICS_PORT) metrics ports that ``count`` workers cannot use."""
    setting = env_name("metrics_port")
    first = settings.metrics_port
    if not first:
        raise ConfigError(
            setting,
            first,
            f"required with {count} gateway workers (PRICEGATE_WORKERS): worker i serves /metrics on it + i; "
            "on the client port a scrape would reach a random worker",
        )
    last = first + count - 1
    if last > 65535:
        raise ConfigError(setting, first, f"{count} workers need ports {first}-{last}, beyond 65535")
    if first <= settings.port <= last:
        raise ConfigError(setting, first, f"ports {first}-{last} (one per worker) include PRICEGATE_PORT")
    for index in range(count):
        # prometheus_client binds each worker's port only once the worker starts, and its failure there would be a
        # traceback and a crash loop: find a taken port now (a race with another process remains possible).
        try:
            with socket.create_server((settings.host, first + index)):
                pass
        except OSError as error:
            raise ConfigError(
                setting,
                first,
                f"port {first + index} (worker {index}'s /metrics) is not free: {os.strerror(error.errno or 0)}",
            ) from None


def supervise(settings: Settings, count: int) -> int:
    """Run ``count`` gateway workers until SIGTERM/SIGINT; returns the process's exit code."""
    check_metrics_ports(settings, count)
    try:
        held, port = hold_port(settings.host, settings.port)
    except OSError as error:
        raise ConfigError(env_name("port"), settings.port, f"cannot listen on {settings.host}: {error}") from None
    try:
        if settings.port == 0:  # the kernel chose it: recheck against the metrics ports
            settings = settings.with_overrides({"port": port})
            check_metrics_ports(settings, count)
        return Supervisor(settings, count).run()
    finally:
        for sock in held:
            sock.close()


# ---------------------------------------------------------------- the worker process


def _worker_main(settings: Settings, index: int, report: Connection) -> None:
    """A worker's process (spawned): the gateway on its own SO_REUSEPORT sockets. It tells the supervisor the port
    once it serves, and exits as ``pricegate gateway`` does (0 after a drain, 2 on a configuration problem)."""
    from pricegate_cli.__main__ import _configure_logging, _runner, run_gateway

    _configure_logging(settings)
    threading.Thread(target=_stop_when_orphaned, name="supervisor-watch", daemon=True).start()
    try:
        try:
            sockets = shared_port_sockets(settings.host, settings.port)
        except OSError as error:
            raise ConfigError(env_name("port"), settings.port, f"cannot listen on {settings.host}: {error}") from None
        with _runner() as runner:
            runner.run(run_gateway(settings, sockets=sockets, on_serving=report.send))
    # The same one-line reports as pricegate_cli.__main__.main, which this process does not run.
    except ConfigError as error:
        print(f"pricegate: configuration error: {error}", file=sys.stderr, flush=True)
        sys.exit(EXIT_CONFIG)
    except PricegateError as error:
        print(f"pricegate: gateway worker {index}: {error}", file=sys.stderr, flush=True)
        sys.exit(1)
    except KeyboardInterrupt:
        pass  # Ctrl-C in a terminal reaches every process of its group; the supervisor stops us anyway


def _stop_when_orphaned() -> None:
    # A supervisor killed with SIGKILL cannot stop its workers: each notices (the parent's sentinel closes), drains
    # and exits rather than holding the port with nobody to replace it.
    parent = multiprocessing.parent_process()
    if parent is not None:
        parent.join()
        os.kill(os.getpid(), signal.SIGTERM)


# ---------------------------------------------------------------- the supervisor


@dataclass
class _Worker:
    index: int
    process: BaseProcess
    report: Connection
    started_at: float
    serving_at: float | None = None
    replaces: tuple[int, float] | None = None  # the dead worker's pid and when it was found dead

    @property
    def pid(self) -> int:
        assert self.process.pid is not None  # started
        return self.process.pid


@dataclass
class _Slot:
    """Worker i's place: its settings (its metrics port), the process in it, a pending restart and its backoff."""

    index: int
    settings: Settings
    worker: _Worker | None = None
    restart_at: float | None = None
    replaces: tuple[int, float] | None = None
    delays: Iterator[float] | None = None  # while crash-looping


def _describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


class Supervisor:
    """Workers in ``count`` slots, run until a signal (see the module docstring); ``run`` returns the exit code."""

    def __init__(self, settings: Settings, count: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.count = count
        self.clock = clock
        base = settings.metrics_port
        self.slots = [_Slot(i, settings.with_overrides({"workers": 1, "metrics_port": base + i})) for i in range(count)]
        self.exit_code = 0
        self.stop_deadline: float | None = None  # set when stopping: a worker still running then is killed
        self.announced = False  # every worker served once and the banner is out
        self._signals: list[int] = []
        self._context = multiprocessing.get_context("spawn")
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)

    # ---- running ----
    def run(self) -> int:
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            settings = self.settings
            logger.info(
                "gateway supervisor (pid %d): %d workers on %s:%d (SO_REUSEPORT), /metrics on ports %d-%d",
                os.getpid(),
                self.count,
                settings.host,
                settings.port,
                settings.metrics_port,
                settings.metrics_port + self.count - 1,
            )
            self._start(self.slots[0])  # alone first: a configuration problem is reported once
            while self.stop_deadline is None or self._live():
                self._wait()
                self._handle_signals()
                self._read_reports()
                self._reap()
                self._restart_due()
                self._kill_overdue()
            logger.info("gateway supervisor: every worker has stopped")
            return self.exit_code
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            os.close(self._wake_read)
            os.close(self._wake_write)

    def _live(self) -> list[_Worker]:
        return [slot.worker for slot in self.slots if slot.worker is not None]

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        self._signals.append(sig)
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_write, b"\0")  # ends the wait in _wait at once

    def _wait(self) -> None:
        waits_on: list[Connection | int] = [self._wake_read]
        for worker in self._live():
            waits_on += [worker.process.sentinel, worker.report]
        deadlines = [slot.restart_at for slot in self.slots if slot.restart_at is not None]
        if self.stop_deadline is not None:
            deadlines.append(self.stop_deadline)
        timeout = max(0.0, min(deadlines) - self.clock()) if deadlines else None
        wait(waits_on, timeout)
        with contextlib.suppress(BlockingIOError):
            os.read(self._wake_read, 4096)

    def _start(self, slot: _Slot) -> None:
        report, child_end = self._context.Pipe(duplex=False)
        process = self._context.Process(
            target=_worker_main, args=(slot.settings, slot.index, child_end), name=f"pricegate-worker-{slot.index}"
        )
        process.start()
        child_end.close()  # the worker holds its end: the report pipe ends when the worker does
        slot.worker = _Worker(slot.index, process, report, self.clock(), replaces=slot.replaces)
        slot.restart_at = slot.replaces = None
        logger.info("gateway worker %d started (pid %d)", slot.index, slot.worker.pid)

    # ---- events ----
    def _handle_signals(self) -> None:
        while self._signals:
            sig = self._signals.pop(0)
            if self.stop_deadline is None:
                self._stop(f"received {signal.Signals(sig).name}")
            elif sig == signal.SIGINT:
                # A second Ctrl-C: as uvicorn, stop without waiting for the drain.
                logger.warning("gateway supervisor: second SIGINT, workers stop without draining")
                self._send_all(signal.SIGINT)

    def _stop(self, why: str) -> None:
        live = self._live()
        logger.info("gateway supervisor: %s; draining %d workers", why, len(live))
        self.stop_deadline = self.clock() + self.settings.shutdown_drain_s + KILL_AFTER_DRAIN_S
        for slot in self.slots:
            slot.restart_at = None
        self._send_all(signal.SIGTERM)

    def _send_all(self, sig: int) -> None:
        for worker in self._live():
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, sig)

    def _read_reports(self) -> None:
        for slot in self.slots:
            worker = slot.worker
            if worker is None or worker.serving_at is not None or not worker.report.poll():
                continue
            try:
                worker.report.recv()
            except (EOFError, OSError):
                continue  # it died before serving: _reap handles it
            worker.serving_at = self.clock()
            if worker.replaces is not None:
                dead_pid, died_at = worker.replaces
                logger.warning(
                    "gateway worker %d replaced: pid %d serves %.1f s after pid %d was found dead",
                    worker.index,
                    worker.pid,
                    worker.serving_at - died_at,
                    dead_pid,
                )
            else:
                logger.info("gateway worker %d (pid %d) serving", worker.index, worker.pid)
            if slot.index == 0 and not self.announced and self.stop_deadline is None:
                for other in self.slots[1:]:
                    if other.worker is None:
                        self._start(other)
        if not self.announced and all(slot.worker and slot.worker.serving_at for slot in self.slots):
            self.announced = True
            from gateway.server import serving_banner

            pids = ", ".join(str(slot.worker.pid) for slot in self.slots if slot.worker)
            print(
                f"{serving_banner(self.settings, self.settings.port, workers=self.count)}\n"
                f"  workers:          {self.count} processes sharing the port (pids {pids}), supervisor pid "
                f"{os.getpid()}",
                flush=True,
            )

    def _reap(self) -> None:
        now = self.clock()
        for slot in self.slots:
            worker = slot.worker
            if worker is None or worker.process.is_alive():
                continue
            worker.process.join()
            worker.report.close()
            slot.worker = None
            code = worker.process.exitcode
            if self.stop_deadline is not None:
                logger.info("gateway worker %d (pid %d) %s", worker.index, worker.pid, _describe_exit(code))
                if code not in (0, -signal.SIGTERM):
                    self.exit_code = 1
                continue
            if not self.announced:
                # Still starting: a worker that cannot start (its one-line report is above) ends the supervisor.
                self.exit_code = EXIT_CONFIG if code == EXIT_CONFIG else 1
                if code != EXIT_CONFIG:
                    print(
                        f"pricegate: gateway worker {worker.index} {_describe_exit(code)} before it served",
                        file=sys.stderr,
                        flush=True,
                    )
                self._stop(f"worker {worker.index} could not start")
                continue
            stable = worker.serving_at is not None and now - worker.started_at >= STABLE_AFTER_S
            if stable or slot.delays is None:
                slot.delays = None if stable else backoff_delays(RESTART_DELAY_FIRST_S, RESTART_DELAY_MAX_S)
                delay = 0.0
            else:
                delay = next(slot.delays)
            slot.restart_at = now + delay
            slot.replaces = (worker.pid, now)
            logger.error(
                "gateway worker %d (pid %d) %s after %.1f s; replacing it%s",
                worker.index,
                worker.pid,
                _describe_exit(code),
                now - worker.started_at,
                f" in {delay:.1f} s (it keeps dying within {STABLE_AFTER_S:.0f} s of starting)" if delay else "",
            )

    def _restart_due(self) -> None:
        now = self.clock()
        for slot in self.slots:
            if slot.restart_at is not None and slot.restart_at <= now and self.stop_deadline is None:
                self._start(slot)

    def _kill_overdue(self) -> None:
        if self.stop_deadline is None or self.clock() < self.stop_deadline:
            return
        for worker in self._live():
            logger.error("gateway worker %d (pid %d) still runs after the drain: killing it", worker.index, worker.pid)
            worker.process.kill()
            self.exit_code = 1
        self.stop_deadline = self.clock() + 5.0  # reaped in the next turns
