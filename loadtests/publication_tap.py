"""The firehose benchmark's Redis subscriber: counts every publication of one venue and times it against the
exchange's send time, without redis-py.

    python -m loadtests.publication_tap --redis-url redis://127.0.0.1:PORT/0 --pattern 'pg:md:binance:{*'

One ``PSUBSCRIBE`` on a raw socket; each ``pmessage`` is cut out of the read buffer by its RESP lengths (the
pattern part is a constant prefix), so a message costs a few byte searches, not a parse. Per publication it
checks the envelope's sequence (``<epoch>:<seq>:<published_ms>:<payload>``; a seq that is not the channel's last
+ 1 within an epoch is a gap, counted) and, when the payload carries ``"E":<µs>`` (the fake exchange's send time,
``loadtests/fake_exchange.py``), records now - E in µs.

``loadtests/tap.c`` is the same tool in C (:func:`build_c_tap` compiles it once into the load generator's cache):
the benchmark uses it when a C compiler is there, since it costs a fraction of what this one does on the CPU it
shares with Redis. Control on stdin, one JSON answer per line on stdout, the same for both: ``{"cmd":"reset"}``
(start a new window: counts and lags cleared; sequence tracking goes on), ``{"cmd":"count"}`` (publications in the
window so far), ``{"cmd":"report"}`` (the window's count, timed messages, lag p50/p90/p99/max in µs, sequence
gaps, channels and epochs seen, the tap's CPU seconds); ``{"cmd":"quit"}``. Prints ``{"event":"ready"}`` once
Redis confirmed the subscription.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import resource
import selectors
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from loadtests.loadgen import LoadGenError, cache_dir, find_compiler
from shared.redis.resp import pack_command, parse_reply

C_SOURCE = Path(__file__).with_name("tap.c")


def build_c_tap() -> Path | None:
    """The compiled C tap (compiled first if this source version never was), or None without a C compiler."""
    try:
        compiler = find_compiler()
    except LoadGenError:
        return None
    source = C_SOURCE.read_bytes()
    target = cache_dir() / f"tap-{hashlib.sha256(source).hexdigest()[:16]}"
    if target.is_file() and os.access(target, os.X_OK):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    command = [compiler, "-O2", "-std=gnu11", "-Wall", "-o", str(temporary), str(C_SOURCE)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise LoadGenError(f"compiling the tap failed ({' '.join(command)}):\n{result.stderr}")
    temporary.replace(target)  # atomic: concurrent runs never see a half-written binary
    return target


def percentile(ordered: list[int], fraction: float) -> int | None:
    """Nearest-rank percentile of an ascending list (None when empty)."""
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))]


class Tap:
    def __init__(self, pattern: bytes) -> None:
        self.pattern = pattern
        self.prefix = b"*4\r\n$8\r\npmessage\r\n$%d\r\n%b\r\n" % (len(pattern), pattern)
        self.buffer = bytearray()
        self.last_seq: dict[bytes, tuple[bytes, int]] = {}  # channel -> (epoch, seq)
        self.subscribed = False
        self.reset()

    def reset(self) -> None:
        self.count = 0
        self.lags: list[int] = []
        self.gaps = 0
        self.epoch_changes = 0
        self.channels: set[bytes] = set()

    def feed(self, data: bytes) -> None:
        buf = self.buffer
        buf += data
        prefix = self.prefix
        skip = len(prefix)
        pos = 0
        end = len(buf)
        now_us = time.time_ns() // 1000
        lags = self.lags
        last_seq = self.last_seq
        count = 0
        while pos < end:
            if not buf.startswith(prefix, pos):
                parsed = parse_reply(bytes(buf[pos:]), 0)  # the psubscribe confirmation (rare: not the hot path)
                if parsed is None:
                    break
                reply, used = parsed
                if isinstance(reply, list) and reply[:1] == [b"psubscribe"]:
                    self.subscribed = True
                pos += used
                continue
            head = pos + skip
            line = buf.find(b"\r\n", head)
            if line < 0:
                break
            channel_start = line + 2
            channel_end = channel_start + int(buf[head + 1 : line])
            line = buf.find(b"\r\n", channel_end + 2)
            if line < 0:
                break
            start = line + 2
            stop = start + int(buf[channel_end + 3 : line])
            if stop + 2 > end:
                break
            count += 1
            channel = bytes(buf[channel_start:channel_end])
            first = buf.find(b":", start, stop)
            second = buf.find(b":", first + 1, stop)
            epoch = bytes(buf[start:first])
            seq = int(buf[first + 1 : second])
            previous = last_seq.get(channel)
            if previous is not None:
                if previous[0] != epoch:
                    self.epoch_changes += 1
                elif seq != previous[1] + 1:
                    self.gaps += 1
            else:
                self.channels.add(channel)
            last_seq[channel] = (epoch, seq)
            mark = buf.find(b'"E":', second, stop)
            if mark >= 0:
                digits = mark + 4
                close = buf.find(b",", digits, stop)
                lags.append(now_us - int(buf[digits:close]))
            pos = stop + 2
        del buf[:pos]
        self.count += count

    def report(self) -> dict[str, Any]:
        ordered = sorted(self.lags)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "event": "report",
            "count": self.count,
            "timed": len(ordered),
            "lag_p50_us": percentile(ordered, 0.50),
            "lag_p90_us": percentile(ordered, 0.90),
            "lag_p99_us": percentile(ordered, 0.99),
            "lag_max_us": ordered[-1] if ordered else None,
            "seq_gaps": self.gaps,
            "epoch_changes": self.epoch_changes,
            "new_channels": len(self.channels),
            "channels_total": len(self.last_seq),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
        }


def _connect(url: str) -> socket.socket:
    parts = urlsplit(url)
    if parts.scheme != "redis":
        raise SystemExit("the tap needs a redis:// URL")
    sock = socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 6379))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 2**20)
    if parts.password:
        sock.sendall(pack_command(b"AUTH", (parts.username or "default").encode(), parts.password.encode()))
        if not sock.recv(64).startswith(b"+OK"):
            raise SystemExit("Redis refused AUTH")
    return sock


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--pattern", required=True, help="the PSUBSCRIBE pattern, e.g. 'pg:md:binance:{*'")
    args = parser.parse_args(argv)
    tap = Tap(args.pattern.encode())
    sock = _connect(args.redis_url)
    sock.sendall(pack_command(b"PSUBSCRIBE", tap.pattern))
    while not tap.subscribed:
        data = sock.recv(1 << 16)
        if not data:
            raise SystemExit("Redis closed the connection")
        tap.feed(data)
    _emit({"event": "ready"})
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ, "redis")
    selector.register(sys.stdin, selectors.EVENT_READ, "stdin")
    stdin = sys.stdin.fileno()
    pending = b""
    while True:
        for key, _ in selector.select():
            if key.data == "redis":
                data = sock.recv(1 << 20)
                if not data:
                    _emit({"event": "error", "error": "Redis closed the connection"})
                    return 1
                tap.feed(data)
                continue
            chunk = os.read(stdin, 4096)
            if not chunk:
                return 0  # the orchestrator went away
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                command = json.loads(line).get("cmd")
                if command == "reset":
                    tap.reset()
                    _emit({"event": "reset"})
                elif command == "count":
                    _emit({"event": "count", "count": tap.count})
                elif command == "report":
                    _emit(tap.report())
                elif command == "quit":
                    return 0
                else:
                    _emit({"event": "error", "error": f"unknown command {command!r}"})


if __name__ == "__main__":
    sys.exit(main())
