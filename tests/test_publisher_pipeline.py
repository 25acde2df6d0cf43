"""The live publisher with two publish calls in flight (``Publisher(pipeline=2)``, what ``pricegate ingest`` runs), on
a real Redis: a call on other streams goes out while one is unanswered, a call on a stream in flight waits for it,
a third waits for room, and a call that fails hands its messages back to be published, in order, before anything
newer of their streams. The broker is the real ``RedisBroker``; only its ``publish`` is held at a gate, so that
the test decides when Redis may answer."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import pytest

from ingest.metrics import IngestMetrics
from ingest.publish.publisher import Publisher
from shared.broker.contract import EventId, OutgoingMessage
from shared.broker.redis import RedisBroker
from shared.errors import PublishIncomplete
from shared.frames import Publication, decode_publication

pytestmark = pytest.mark.timeout(20)


class GatedBroker(RedisBroker):
    """A RedisBroker whose publish calls wait at a gate the test opens, one call at a time; ``fail`` makes the next
    opened call fail before it reaches Redis (as a broken connection would)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.waiting: list[tuple[list[str], asyncio.Event]] = []
        self.fail: set[str] = set()

    async def publish(
        self, messages: Sequence[OutgoingMessage], *, fencing_token: str | None = None
    ) -> list[Publication]:
        gate = asyncio.Event()
        streams = [message.stream for message in messages]
        self.waiting.append((streams, gate))
        await gate.wait()
        if self.fail & set(streams):
            self.fail -= set(streams)
            raise PublishIncomplete("the connection broke before Redis answered", 0)
        return await super().publish(messages, fencing_token=fencing_token)

    async def open_gate(self, stream: str) -> None:
        """Let the waiting call that carries ``stream`` go on, and give it time to finish."""
        for streams, gate in self.waiting:
            if stream in streams and not gate.is_set():
                gate.set()
                self.waiting.remove((streams, gate))
                for _ in range(20):
                    await asyncio.sleep(0.01)
                return
        raise AssertionError(f"no call carrying {stream} is waiting: {self.waiting}")

    def waiting_streams(self) -> list[list[str]]:
        return [streams for streams, _ in self.waiting]


def trade(stream: str, trade_id: int) -> OutgoingMessage:
    return OutgoingMessage(stream, b'{"e":"trade","t":%d}' % trade_id, False, EventId(trade_id, trade_id, 1))


@pytest.fixture
async def broker(redis_url: str, key_prefix: str) -> AsyncIterator[GatedBroker]:
    broker = GatedBroker(redis_url, prefix=key_prefix)
    await broker.start()
    yield broker
    for _, gate in broker.waiting:
        gate.set()
    await broker.close()


async def history_ids(broker: GatedBroker, stream: str) -> list[int]:
    return [int(decode_publication(p).payload.split(b'"t":')[1][:-1]) for p in await raw_history(broker, stream)]


async def raw_history(broker: GatedBroker, stream: str) -> list[bytes]:
    client = broker._require_client()
    entries = await client.xrange(broker.namer.keys(stream).history)
    return [value for _, fields in entries or () if fields is not None and isinstance(value := fields[b"e"], bytes)]


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0.01)


async def test_calls_on_other_streams_overlap_and_a_stream_waits_for_its_own(broker: GatedBroker) -> None:
    publisher = Publisher(broker, IngestMetrics(), pipeline=2)
    await publisher.publish([trade("aaausdt@trade", 1)])
    await publisher.publish([trade("bbbusdt@trade", 1)])  # another stream: sent while the first is unanswered
    await settle()
    assert broker.waiting_streams() == [["aaausdt@trade"], ["bbbusdt@trade"]]

    third = asyncio.create_task(publisher.publish([trade("cccusdt@trade", 1)]))  # no room: two in flight
    await settle()
    assert not third.done() and broker.waiting_streams() == [["aaausdt@trade"], ["bbbusdt@trade"]]
    await broker.open_gate("bbbusdt@trade")
    await third
    await settle()
    assert broker.waiting_streams() == [["aaausdt@trade"], ["cccusdt@trade"]]

    same = asyncio.create_task(publisher.publish([trade("aaausdt@trade", 2)]))  # a@trade is in flight: it waits
    await settle()
    assert not same.done() and broker.waiting_streams() == [["aaausdt@trade"], ["cccusdt@trade"]]
    await broker.open_gate("aaausdt@trade")
    await same
    await settle()
    assert broker.waiting_streams() == [["cccusdt@trade"], ["aaausdt@trade"]]
    await broker.open_gate("cccusdt@trade")
    await broker.open_gate("aaausdt@trade")
    await publisher.aclose()
    assert await history_ids(broker, "aaausdt@trade") == [1, 2]
    assert await history_ids(broker, "bbbusdt@trade") == [1] and await history_ids(broker, "cccusdt@trade") == [1]


async def test_a_failed_call_is_published_again_before_anything_newer_of_its_streams(broker: GatedBroker) -> None:
    publisher = Publisher(broker, IngestMetrics(), pipeline=2, retry_initial_s=0.05, retry_max_s=0.05)
    await publisher.publish([trade("aaausdt@trade", 1), trade("xxxusdt@trade", 1)])
    await publisher.publish([trade("bbbusdt@trade", 1)])
    await settle()
    broker.fail.add("aaausdt@trade")
    await broker.open_gate("aaausdt@trade")  # fails: a1 and x1 go back to the buffer
    assert len(publisher.standby) == 2
    # Newer messages queue behind the held ones (the retry waits for b1's answer first: it may hand messages back).
    newer = asyncio.create_task(publisher.publish([trade("aaausdt@trade", 2), trade("bbbusdt@trade", 2)]))
    await broker.open_gate("bbbusdt@trade")
    for _ in range(100):  # the retry publishes the buffer: a1 x1, then a2 b2
        if broker.waiting:
            await broker.open_gate(broker.waiting[0][0][0])
        elif newer.done() and not len(publisher.standby) and not publisher._in_flight:
            break
        await asyncio.sleep(0.02)
    await newer
    await publisher.aclose()
    assert await history_ids(broker, "aaausdt@trade") == [1, 2]
    assert await history_ids(broker, "xxxusdt@trade") == [1]
    assert await history_ids(broker, "bbbusdt@trade") == [1, 2]


async def test_one_call_at_a_time_without_a_pipeline(broker: GatedBroker) -> None:
    publisher = Publisher(broker, IngestMetrics())
    first = asyncio.create_task(publisher.publish([trade("aaausdt@trade", 1)]))
    await settle()
    assert not first.done()  # publish returns once Redis answered
    await broker.open_gate("aaausdt@trade")
    await first
    await publisher.aclose()
    assert await history_ids(broker, "aaausdt@trade") == [1]
