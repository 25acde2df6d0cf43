"""The benchmark's ingest: publish ~370-byte Binance ``24hrTicker`` payloads to Redis on 20 ticker channels at a
controlled rate, through :meth:`shared.broker.redis.RedisBroker.publish` (one Lua script per message, pipelined
per batch, exactly like ``pricegate ingest``), so every publication is ``<epoch>:<seq>:<published_ms>:<payload>``
on ``<prefix>:binance:{<stream>}`` and the gateway's relay sees proper envelopes, sequences and history.

The publish time travels in the payload's ``E`` field in **microseconds** since the epoch (the shape Binance
sends with ``timeUnit=MICROSECOND``), taken when the batch is built, just before the pipeline is sent: the load
generator reads it with one ``memmem`` and no JSON parse.

Two ways to send, the same Redis commands either way (``--via``):

- ``packed`` (default): :class:`PackedScript` sends, per message, exactly the ``EVALSHA`` that
  ``RedisBroker.publish`` sends (RedisBroker's own ``PUBLISH_SCRIPT``, loaded by a started ``RedisBroker``; the
  same KEYS and ARGV, byte for byte: the templates are recorded from ``RedisBroker.publish`` itself and
  ``tests/test_loadtests.py`` compares a packed command with what the broker hands redis-py),
  pipelined per batch on its own connection, with the constant parts of each command packed once. Redis does
  identical work and the gateway sees identical envelopes, but the publisher costs ~2 µs per message instead
  of redis-py's ~30 µs, which matters because it shares the load CPU with the load generator and Redis.
- ``broker``: ``RedisBroker.publish`` itself (what ``pricegate ingest`` calls); fine up to a few thousand
  messages/s, after which its CPU starts to crowd the load generator.

Rate control: the publisher keeps a schedule (message k is due at ``start + k / rate``); each turn publishes
every message that is due in one pipeline (capped at ``MAX_BATCH``), so when a pipeline is slow the next one is
bigger and the achieved rate catches up. It reports what it really achieved and how far behind it ever fell,
so the orchestrator can tell "the server did not keep up" from "the publisher did not".

Run by the orchestrator as ``python -m loadtests.publisher --redis-url URL --prefix P``; it reads one JSON
command per line on stdin (``{"cmd":"run","rate":R,"duration":D}``, ``{"cmd":"quit"}``) and answers each with
one JSON line on stdout. It exits when stdin closes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import resource
import sys
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from shared.broker.contract import OutgoingMessage
from shared.broker.redis import RedisBroker
from shared.redis.resp import pack_command, parse_reply

SYMBOLS = (
    "BTCUSDT", "ETHUSDT", "BNBUSDT", "SOLUSDT", "XRPUSDT", "ADAUSDT", "DOGEUSDT", "TRXUSDT", "DOTUSDT", "LINKUSDT",
    "LTCUSDT", "AVAXUSDT", "ATOMUSDT", "UNIUSDT", "XLMUSDT", "ETCUSDT", "FILUSDT", "APTUSDT", "ARBUSDT", "NEARUSDT",
)  # fmt: skip
STREAMS = tuple(f"{symbol.lower()}@ticker" for symbol in SYMBOLS)
MAX_BATCH = 2000
EVEN_SLICE_S = 0.001  # even pace: one send carries at most this much of the schedule


def ticker_template(symbol: str) -> bytes:
    """A Binance 24hrTicker payload with ``%d`` where the publish time (µs) goes; the field layout and string
    numbers are Binance's. ``E`` comes first after ``e`` so a reader finds it within the first 30 bytes."""
    return (
        b'{"e":"24hrTicker","E":%d,"s":"' + symbol.encode("ascii") + b'","p":"0.00000200","P":"0.000",'
        b'"w":"4.29628482","x":"4.00000000","c":"4.00000200","Q":"0.00000200","b":"4.00000000",'
        b'"B":"12.50000000","a":"4.00000200","A":"3.25000000","o":"4.00000000","h":"4.10000000",'
        b'"l":"3.90000000","v":"913.30000000","q":"264.08137180","O":1700000000000,"C":1700086400000,'
        b'"F":0,"L":18150,"n":18151}'
    )


TEMPLATES = tuple(ticker_template(symbol) for symbol in SYMBOLS)


def ticker_payload(index: int, publish_us: int) -> bytes:
    return TEMPLATES[index % len(TEMPLATES)] % publish_us


def publish_time_us(frame: bytes | str) -> int | None:
    """The ``E`` field of a benchmark payload (µs since the epoch), or None: what the load generator parses."""
    data = frame.encode() if isinstance(frame, str) else frame
    start = data.find(b'"E":', 0, 64)
    if start < 0:
        return None
    end = start + 4
    while end < len(data) and 48 <= data[end] <= 57:
        end += 1
    return int(data[start + 4 : end]) if end > start + 4 else None


async def record_publish(broker: RedisBroker, messages: Sequence[OutgoingMessage]) -> list[bytes]:
    """The ``EVALSHA`` command ``broker.publish([message])`` sends to Redis for each message (the one-message
    script; ingest's batches of several go out as batch script calls, which do the same per message in Redis): the
    broker's round trip is swapped for one that records the bytes and answers like the script would."""
    recorded: list[bytes] = []

    async def record(client: Any, packed: bytes, count: int | list[int]) -> list[Any]:
        assert isinstance(count, int), "a batch of one is one call of the one-message script"
        position = 0
        for _ in range(count):  # split the batch's bytes at command boundaries
            parsed = parse_reply(packed, position)
            assert parsed is not None, "a packed command the RESP parser cannot read"
            recorded.append(packed[position : parsed[1]])
            position = parsed[1]
        return [[1, index + 1] for index in range(count)]

    broker._run_script = record  # type: ignore[method-assign]
    client = broker._client
    if client is None:  # a broker that was never started: publish() only checks that it has a client
        broker._client = object()  # type: ignore[assignment]
    try:
        for message in messages:  # one at a time: a batch of several goes out as one batch script call
            await broker.publish([message])
    finally:
        del broker._run_script  # the class's method again
        broker._client = client
    return recorded


_MARK = b"\x00pricegate-benchmark-payload\x00"


class PackedScript:
    """``RedisBroker.publish``'s commands, packed once per stream: only the publish time and payload vary.

    The templates are taken from the broker itself (:func:`record_publish` with a marker payload: the bytes
    ``RedisBroker.publish`` writes), so they follow any change to the script's keys or arguments; they require
    that the publish time is the argument just before the payload, and say so if that ever changes."""

    def __init__(self, heads: list[bytes], tails: list[bytes]) -> None:
        self.heads = heads
        self.tails = tails
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    @classmethod
    async def from_broker(cls, broker: RedisBroker, streams: Sequence[str]) -> PackedScript:
        before = time.time_ns() // 1_000_000
        commands = await record_publish(broker, [OutgoingMessage(stream, _MARK, True) for stream in streams])
        after = time.time_ns() // 1_000_000
        heads, tails = [], []
        for packed in commands:
            head, found, tail = packed.partition(b"$%d\r\n%b\r\n" % (len(_MARK), _MARK))
            # The publish time (ms, taken during the call) is the bulk string just before the payload.
            start = head.rfind(b"$", 0, len(head) - 2)
            length, _, digits = head[start + 1 : -2].partition(b"\r\n")
            if not found:
                raise SystemExit("cannot find the payload in RedisBroker's command: --via broker")
            if not (digits.isdigit() and length == b"%d" % len(digits) and before <= int(digits) <= after):
                raise SystemExit(
                    "RedisBroker.publish changed shape (publish time not before the payload): --via broker"
                )
            heads.append(head[:start])
            tails.append(tail)
        return cls(heads, tails)

    def command(self, index: int, published_ms: bytes, payload: bytes) -> bytes:
        """``published_ms`` is already RESP-encoded (``$13\\r\\n<ms>\\r\\n``): it is shared by a batch."""
        return b"%b%b$%d\r\n%b\r\n%b" % (self.heads[index], published_ms, len(payload), payload, self.tails[index])

    async def connect(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme != "redis":
            raise SystemExit("--via packed needs a redis:// URL (use --via broker otherwise)")
        self.reader, self.writer = await asyncio.open_connection(parts.hostname or "127.0.0.1", parts.port or 6379)
        setup = []
        if parts.password:
            user = (parts.username or "default").encode()
            setup.append(pack_command(b"AUTH", user, parts.password.encode()))
        database = parts.path.strip("/")
        if database:
            setup.append(pack_command(b"SELECT", database.encode()))
        if setup:
            self.writer.write(b"".join(setup))
            await self._replies(len(setup))

    async def send(self, commands: list[bytes]) -> None:
        assert self.writer is not None
        self.writer.write(b"".join(commands))
        await self._replies(len(commands))

    async def _replies(self, count: int) -> None:
        """Read ``count`` replies: ``*2 :epoch :seq`` per script call, ``+OK`` for setup; raise on an error."""
        assert self.reader is not None
        pending_lines = 0
        while count:
            line = await self.reader.readline()
            if not line:
                raise ConnectionError("Redis closed the publishing connection")
            if pending_lines:
                pending_lines -= 1
                if not pending_lines:
                    count -= 1
            elif line.startswith(b"*"):
                pending_lines = int(line[1:])
                if not pending_lines:
                    count -= 1
            elif line.startswith(b"-"):
                raise RuntimeError(f"Redis refused a publish: {line.decode(errors='replace').strip()}")
            else:
                count -= 1

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class Publisher:
    def __init__(self, broker: RedisBroker, streams: int, packed: PackedScript | None = None) -> None:
        self.broker = broker
        self.streams = STREAMS[:streams]
        self.packed = packed
        self.next_index = 0  # round-robin over the streams across runs

    async def run(self, rate: float, duration: float, pace: str = "due") -> dict[str, object]:
        """``pace="due"``: each turn sends every message due (up to MAX_BATCH); ``"even"``: at most one
        millisecond's worth per send, so messages leave spread over time instead of in the bursts a late wake-up
        makes (the timer's resolution, 1 ms, is the finest spacing an event loop offers)."""
        count = len(self.streams)
        per_stream = [0] * count
        sent = 0
        max_behind = 0.0
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        start = time.monotonic()
        total = max(1, round(rate * duration))
        while sent < total:
            now = time.monotonic()
            due = min(total, int((now - start) * rate) + 1)
            if due <= sent:
                await asyncio.sleep(min(0.005, (sent + 1) / rate - (now - start)))
                continue
            max_behind = max(max_behind, (now - start) - sent / rate)
            batch = min(due - sent, MAX_BATCH if pace == "due" else max(1, math.ceil(rate * EVEN_SLICE_S)))
            publish_us = time.time_ns() // 1000
            packed = self.packed
            if packed is not None:
                ms = b"%d" % (publish_us // 1000)
                published_ms = b"$%d\r\n%b\r\n" % (len(ms), ms)
                commands = []
                for _ in range(batch):
                    index = self.next_index % count
                    self.next_index += 1
                    per_stream[index] += 1
                    commands.append(packed.command(index, published_ms, TEMPLATES[index] % publish_us))
                await packed.send(commands)
            else:
                messages = []
                for _ in range(batch):
                    index = self.next_index % count
                    self.next_index += 1
                    per_stream[index] += 1
                    messages.append(OutgoingMessage(self.streams[index], TEMPLATES[index] % publish_us, True))
                await self.broker.publish(messages)
            sent += batch
            if pace == "even" and sent < due:
                await asyncio.sleep(0)  # behind: catch up one slice at a time, letting the loop breathe
        elapsed = time.monotonic() - start
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "event": "ran",
            "rate": rate,
            "pace": pace,
            "sent": sent,
            "elapsed_s": round(elapsed, 4),
            # Messages over the time they took: equals the asked rate unless publishing fell behind.
            "achieved_per_s": round(sent / max(elapsed, (total - 1) / rate, 1e-9), 2),
            "max_behind_ms": round(max_behind * 1000, 3),
            "per_stream": per_stream,
            "cpu_s": round(cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime, 4),
        }


def _emit(obj: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def main_async(args: argparse.Namespace) -> None:
    broker = RedisBroker(args.redis_url, prefix=args.prefix)
    await broker.start()
    packed = None
    if args.via == "packed":
        packed = await PackedScript.from_broker(broker, STREAMS[: args.streams])
        await packed.connect(args.redis_url)
    publisher = Publisher(broker, args.streams, packed)
    loop = asyncio.get_running_loop()
    try:
        payload_bytes = len(ticker_payload(0, time.time_ns() // 1000))
        _emit({"event": "ready", "streams": list(publisher.streams), "payload_bytes": payload_bytes, "via": args.via})
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                return  # the orchestrator went away
            command = json.loads(line)
            if command.get("cmd") == "run":
                pace = str(command.get("pace", "due"))
                _emit(await publisher.run(float(command["rate"]), float(command["duration"]), pace))
            elif command.get("cmd") == "quit":
                return
    finally:
        if packed is not None:
            await packed.close()
        await broker.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--prefix", required=True, help="PRICEGATE_CHANNEL_PREFIX of the server under test")
    parser.add_argument("--via", choices=("packed", "broker"), default="packed", help="see the module docstring")
    parser.add_argument("--streams", type=int, default=len(STREAMS), help="how many ticker channels (max 20)")
    args = parser.parse_args(argv)
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        runner.run(main_async(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
