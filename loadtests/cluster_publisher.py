"""The broker-scale benchmark's ingest: ~370-byte Binance ``24hrTicker`` payloads on the ticker streams it is given,
published into a Redis Cluster at a controlled rate through ingest's real publish path.

``pricegate ingest`` publishes through the broker :func:`shared.broker.factory.redis_broker` makes for its
``PRICEGATE_REDIS_URL``: for ``redis+cluster://`` a :class:`shared.broker.redis_cluster.ClusterBroker`, which runs
the publish script on the primary of each stream's slot (one pipeline per primary per batch) and ``SPUBLISH``es
there. This process starts that broker, announces a fencing epoch in every slot (``take_fencing_epoch``, as a new
leader does) and publishes fenced, with an event identity per message (a per-stream counter, as the live source's
ids) and ``keep_last`` (a state stream), so the script does all its work: fence check, duplicate check, ``INCR``,
``XADD`` + ``PEXPIRE``, last value, ``SPUBLISH``, event id. Two ways to send (``--via``):

- ``broker``: ``ClusterBroker.publish`` itself, exactly what ingest calls. Its client side (redis-py packing every
  argument and parsing every reply, ~30 µs of CPU per message here) is the ceiling of one process long before a
  shard is;
- ``packed``: the same ``EVALSHA`` commands, byte for byte (the per-stream templates are recorded from
  ``ClusterBroker.publish`` itself; ``tests/test_broker_scale.py`` compares a packed command with what the broker
  hands redis-py), sent one pipeline per primary per batch on a connection of our own (up to ``--pipelines`` batches
  in flight per primary, so a shard never waits for this process), with each stream's floor (the last
  ``(epoch, seq)`` answered) kept from the replies as the broker keeps it. Redis does identical work and the gateways
  see identical envelopes; the client costs a few µs per message, so the shards can be saturated.

The publish time travels in the payload's ``E`` field in microseconds (as in ``loadtests/publisher.py``), taken when
a batch is built: the load generator measures publish -> receive from it.

Run by the orchestrator as ``python -m loadtests.cluster_publisher --redis-url URL --prefix P --streams a,b,...``;
one JSON command per line on stdin (``{"cmd":"run","rate":R,"duration":D}``, ``{"cmd":"quit"}``), one JSON line per
command on stdout. It exits when stdin closes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from loadtests.publisher import MAX_BATCH, ticker_template
from shared.broker.contract import EventId, OutgoingMessage
from shared.broker.factory import redis_broker
from shared.broker.redis_cluster import ClusterBroker
from shared.redis.scripts import PUBLISH_KEYS
from shared.redis.slots import Address, key_slot

FENCING_TOKEN = "broker-scale"  # any non-empty token: on a cluster the script checks the fencing epoch, not a token
_MARK = b"\x00pricegate-broker-scale-payload\x00"
_MARK_EVENT = 987_654_321_012_345
_MARK_FLOOR = (918_273_645, 192_837_465)


def encode_arg(value: Any) -> bytes:
    """One argument as redis-py's encoder sends it (bytes as they are, str as UTF-8, int in decimal)."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise TypeError(f"unexpected argument type {type(value).__name__}")
    return str(value).encode()


def bulk(value: Any) -> bytes:
    data = encode_arg(value)
    return b"$%d\r\n%b\r\n" % (len(data), data)


async def record_publish(broker: ClusterBroker, messages: Sequence[OutgoingMessage]) -> list[tuple[Any, ...]]:
    """The script arguments (keys..., args...) ``broker.publish(messages, fencing_token=...)`` sends, one tuple per
    message: the broker's round trips are swapped for one that records the calls and answers like the script."""
    recorded: list[tuple[Any, ...]] = []

    async def record(messages: Sequence[OutgoingMessage], slots: list[int], calls: list[tuple[Any, ...]]) -> list[Any]:
        recorded.extend(calls)
        return [[1, index + 1] for index in range(len(calls))]

    broker._run_rounds = record  # type: ignore[method-assign]
    floors = dict(broker._calls.floors)
    try:
        await broker.publish(messages, fencing_token=FENCING_TOKEN)
    finally:
        del broker._run_rounds  # the class's method again
        broker._calls.floors.clear()
        broker._calls.floors.update(floors)
    return recorded


class PackedCalls:
    """``ClusterBroker.publish``'s ``EVALSHA`` per stream as a template: constant parts packed once, the variable
    ones (:attr:`ORDER`: candidate epoch and publish time per batch; payload, event identity and the stream's floor
    per message) filled in with one ``%`` per message. Built from the broker's own calls (:func:`record_publish` with
    marker values), so it follows any change to the script's keys or arguments, and says so if a variable part
    moved."""

    ORDER = ("candidate", "published_ms", "payload", "event", "floor_epoch", "floor_seq")

    def __init__(self, sha: str, formats: list[bytes], slots: dict[str, int]) -> None:
        self.sha = sha
        self.formats = formats  # per stream: the packed command with %b where each ORDER part goes
        self.slots = slots

    @classmethod
    async def from_broker(cls, broker: ClusterBroker, streams: Sequence[str]) -> PackedCalls:
        for stream in streams:
            broker._calls.floors[stream] = _MARK_FLOOR
        try:
            calls = await record_publish(
                broker, [OutgoingMessage(stream, _MARK, True, EventId(_MARK_EVENT, _MARK_EVENT)) for stream in streams]
            )
        finally:
            for stream in streams:
                broker._calls.floors.pop(stream, None)
        formats: list[bytes] = []
        for call in calls:
            command = ("EVALSHA", broker._script_sha, PUBLISH_KEYS, *call)
            found = {
                "payload": [index for index, arg in enumerate(command) if arg is _MARK],
                "event": [index for index, arg in enumerate(command) if arg == _MARK_EVENT],
                "floor_epoch": [index for index, arg in enumerate(command) if arg == _MARK_FLOOR[0]],
                "floor_seq": [index for index, arg in enumerate(command) if arg == _MARK_FLOOR[1]],
            }
            if any(len(where) != 1 for where in found.values()):
                raise SystemExit(f"ClusterBroker.publish changed shape ({found}): use --via broker")
            where = {name: indices[0] for name, indices in found.items()}
            where["published_ms"] = where["payload"] - 1
            where["candidate"] = where["payload"] - 2
            if not all(isinstance(command[where[name]], int) for name in ("published_ms", "candidate")):
                raise SystemExit(
                    "ClusterBroker.publish changed shape (no publish time before the payload): --via broker"
                )
            if sorted(where, key=where.__getitem__) != list(cls.ORDER):
                raise SystemExit(f"ClusterBroker.publish changed the order of its arguments ({where}): --via broker")
            variable = set(where.values())
            parts = [b"*%d\r\n" % len(command)]
            parts += [
                b"%b" if index in variable else bulk(arg).replace(b"%", b"%%") for index, arg in enumerate(command)
            ]
            formats.append(b"".join(parts))
        slots = {stream: key_slot(broker.namer.channel(stream)) for stream in streams}
        return cls(broker._script_sha, formats, slots)

    def command(self, index: int, values: tuple[bytes, ...]) -> bytes:
        """The packed command of stream ``index``; ``values`` are the :attr:`ORDER` parts, each already a bulk."""
        return self.formats[index] % values


class PackedSender:
    """One connection per primary; a batch is one pipeline per primary. Up to ``depth`` batches are in flight per
    node (a reader task per node takes the replies as they come), so a shard is never idle while this process
    reads replies and packs the next batch: with one batch at a time a shard cannot pass ~90 % busy."""

    def __init__(self, owners: dict[str, Address], depth: int = 2) -> None:
        self.owners = owners
        self.depth = depth
        self.connections: dict[Address, tuple[asyncio.StreamReader, asyncio.StreamWriter]] = {}
        self.pending: dict[Address, deque[list[int]]] = {}
        self.readers: list[asyncio.Task[None]] = []
        self.progress = asyncio.Event()
        self.failure: BaseException | None = None
        self.on_reply: Callable[[int, tuple[bytes, bytes]], None] = lambda index, reply: None

    async def connect(self) -> None:
        for address in sorted(set(self.owners.values())):
            self.connections[address] = await asyncio.open_connection(*address)
            self.pending[address] = deque()
            self.readers.append(asyncio.create_task(self._read(address)))

    async def send(self, per_node: dict[Address, list[bytes]], order: dict[Address, list[int]]) -> None:
        """Write one batch (``order``: the stream index of each command), then wait while a node has ``depth``
        batches unanswered."""
        for address, commands in per_node.items():
            self.connections[address][1].write(b"".join(commands))
            self.pending[address].append(order[address])
        await self._wait(lambda: all(len(batches) < self.depth for batches in self.pending.values()))

    async def drain(self) -> None:
        """Until every batch sent is answered."""
        await self._wait(lambda: not any(self.pending.values()))

    async def _wait(self, done: Callable[[], bool]) -> None:
        while not done():
            if self.failure is not None:
                raise self.failure
            self.progress.clear()
            await self.progress.wait()
        if self.failure is not None:
            raise self.failure

    async def _read(self, address: Address) -> None:
        """Replies in order: ``*2 :epoch :seq`` per publication (handed to :attr:`on_reply` with its stream index),
        ``:0`` per duplicate; anything else (an error reply) fails the run."""
        reader = self.connections[address][0]
        pending = self.pending[address]
        data = b""
        position = 0
        answered = 0
        try:
            while True:
                chunk = await reader.read(1 << 16)
                if not chunk:
                    raise ConnectionError("Redis closed the publishing connection")
                data = data[position:] + chunk
                position = 0
                while True:
                    end = data.find(b"\r\n", position)
                    if end < 0:
                        break
                    if data.startswith(b"*2\r\n", position):
                        epoch_end = data.find(b"\r\n", end + 2)
                        seq_end = data.find(b"\r\n", epoch_end + 2) if epoch_end >= 0 else -1
                        if seq_end < 0:
                            break
                        reply = (data[end + 3 : epoch_end], data[epoch_end + 3 : seq_end])
                        self.on_reply(pending[0][answered], reply)
                        position = seq_end + 2
                    elif data.startswith(b":", position):
                        position = end + 2  # a duplicate: nothing published, the floor stays
                    else:
                        raise RuntimeError(f"Redis refused a publish: {data[position:end].decode(errors='replace')}")
                    answered += 1
                    if answered == len(pending[0]):
                        pending.popleft()
                        answered = 0
                        self.progress.set()
        except asyncio.CancelledError:
            raise
        except BaseException as error:  # handed to the sender, which raises it in the run
            self.failure = error
            self.progress.set()

    async def close(self) -> None:
        for task in self.readers:
            task.cancel()
        for _reader, writer in self.connections.values():
            writer.close()


class Publisher:
    def __init__(
        self, broker: ClusterBroker, streams: Sequence[str], packed: PackedCalls | None, sender: PackedSender | None
    ) -> None:
        self.broker = broker
        self.streams = list(streams)
        self.templates = [ticker_template(stream.split("@", 1)[0].upper()) for stream in self.streams]
        self.packed = packed
        self.sender = sender
        self.owners = [sender.owners[stream] for stream in self.streams] if sender is not None else []
        if sender is not None:
            sender.on_reply = self._answered
        cluster = broker.cluster
        self.owner_ports = [cluster.owner(key_slot(broker.namer.channel(stream))) for stream in self.streams]
        self.next_index = 0  # round-robin over the streams across runs
        self.pipelines = 0  # node pipelines written (a batch is one per primary it touches)
        self.event_ids = [0] * len(self.streams)
        self.floors: list[tuple[bytes, bytes] | None] = [None] * len(self.streams)  # packed: last (epoch, seq) answered

    async def run(self, rate: float, duration: float) -> dict[str, object]:
        """Each turn sends every message that is due (up to MAX_BATCH): a slow pipeline makes the next one bigger,
        so the achieved rate catches up unless publishing itself is the bottleneck."""
        count = len(self.streams)
        per_stream = [0] * count
        sent = 0
        max_behind = 0.0
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        pipelines0 = self.pipelines
        start = time.monotonic()
        total = max(1, round(rate * duration))
        while sent < total:
            now = time.monotonic()
            due = min(total, int((now - start) * rate) + 1)
            if due <= sent:
                await asyncio.sleep(min(0.005, (sent + 1) / rate - (now - start)))
                continue
            max_behind = max(max_behind, (now - start) - sent / rate)
            batch = min(due - sent, MAX_BATCH)
            publish_us = time.time_ns() // 1000
            indices, events = [], []
            for _ in range(batch):
                index = self.next_index % count
                self.next_index += 1
                per_stream[index] += 1
                self.event_ids[index] += 1
                indices.append(index)
                events.append(self.event_ids[index])
            if self.packed is not None:
                await self._send_packed(indices, events, publish_us)
            else:
                messages = [
                    OutgoingMessage(
                        self.streams[index], self.templates[index] % publish_us, True, EventId(event, event)
                    )
                    for index, event in zip(indices, events, strict=True)
                ]
                # Every event id in a batch differs, so nothing is a duplicate; _run_rounds keeps order per stream.
                await self.broker.publish(messages, fencing_token=FENCING_TOKEN)
                self.pipelines += len({self.owner_ports[index] for index in indices})
            sent += batch
        if self.sender is not None:
            await self.sender.drain()  # the run ends when Redis has answered everything
        elapsed = time.monotonic() - start
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "event": "ran",
            "rate": rate,
            "sent": sent,
            "elapsed_s": round(elapsed, 4),
            "achieved_per_s": round(sent / max(elapsed, (total - 1) / rate, 1e-9), 2),
            "max_behind_ms": round(max_behind * 1000, 3),
            "per_stream": per_stream,
            "cpu_s": round(cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime, 4),
            "pipelines": self.pipelines - pipelines0,
        }

    async def _send_packed(self, indices: list[int], events: list[int], publish_us: int) -> None:
        """One batch, one pipeline per primary: each stream's calls carry its floor as last answered (as
        ``ClusterBroker.publish`` computes every call's arguments before sending any)."""
        packed, sender = self.packed, self.sender
        assert packed is not None and sender is not None
        # As ClusterBroker.publish: a random candidate epoch per batch (used by a stream that has none yet).
        candidate, published_ms = bulk(random.randrange(1, 2**31)), bulk(publish_us // 1000)
        none = (b"$0\r\n\r\n", b"$0\r\n\r\n")
        per_node: dict[Address, list[bytes]] = {}
        order: dict[Address, list[int]] = {}
        owners = self.owners
        for index, event in zip(indices, events, strict=True):
            payload = self.templates[index] % publish_us
            floor_epoch, floor_seq = self.floors[index] or none
            command = packed.command(
                index,
                (
                    candidate,
                    published_ms,
                    b"$%d\r\n%b\r\n" % (len(payload), payload),
                    bulk(event),
                    floor_epoch,
                    floor_seq,
                ),
            )
            address = owners[index]
            commands = per_node.get(address)
            if commands is None:
                commands = per_node[address] = []
                order[address] = []
            commands.append(command)
            order[address].append(index)
        self.pipelines += len(per_node)
        await sender.send(per_node, order)

    def _answered(self, index: int, reply: tuple[bytes, bytes]) -> None:
        """A stream's floor is the last ``(epoch, seq)`` answered (with batches in flight, the floor a batch carries
        may be a batch behind: it only matters after a failover, and is never above the stream's seq)."""
        epoch, seq = reply
        self.floors[index] = (b"$%d\r\n%b\r\n" % (len(epoch), epoch), b"$%d\r\n%b\r\n" % (len(seq), seq))


def _emit(obj: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def main_async(args: argparse.Namespace) -> None:
    streams = [stream for stream in args.streams.split(",") if stream]
    broker = redis_broker(args.redis_url, prefix=args.prefix)
    if not isinstance(broker, ClusterBroker):
        raise SystemExit("--redis-url must be a redis+cluster:// URL")
    await broker.start()
    # As a new leader does before its first publish: the epoch is drawn like the lease's (the server clock in ms).
    await broker.take_fencing_epoch(time.time_ns() // 1_000_000)
    packed = sender = None
    if args.via == "packed":
        packed = await PackedCalls.from_broker(broker, streams)
        await broker.cluster.refresh()
        owners = {stream: broker.cluster.owner(packed.slots[stream]) for stream in streams}
        sender = PackedSender(owners, depth=args.pipelines)
        await sender.connect()
    publisher = Publisher(broker, streams, packed, sender)
    loop = asyncio.get_running_loop()
    try:
        ports = {stream: broker.cluster.owner(key_slot(broker.namer.channel(stream)))[1] for stream in streams}
        _emit({"event": "ready", "streams": streams, "via": args.via, "owners": ports})
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                return  # the orchestrator went away
            command = json.loads(line)
            if command.get("cmd") == "run":
                _emit(await publisher.run(float(command["rate"]), float(command["duration"])))
            elif command.get("cmd") == "quit":
                return
    finally:
        if sender is not None:
            await sender.close()
        await broker.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis-url", required=True, help="redis+cluster://host:port,.../")
    parser.add_argument("--prefix", required=True, help="PRICEGATE_CHANNEL_PREFIX of the gateways under test")
    parser.add_argument("--streams", required=True, help="comma-separated ticker streams (<symbol>@ticker)")
    parser.add_argument("--via", choices=("packed", "broker"), default="packed", help="see the module docstring")
    parser.add_argument(
        "--pipelines", type=int, default=2, help="packed: batches in flight per node (default 2; 1 = as the broker)"
    )
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
