"""Recording file format: the writer's exact line layout, round trips with payload bytes intact, clear errors
for malformed input, and the shipped synthetic sample."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from ingest.sources.replay.recording import (
    SAMPLE_PATH,
    RecordedFrame,
    RecordingWriter,
    generate_sample,
    main,
    read_recording,
    sample_streams,
)
from shared.frames import combined_frame
from shared.streams import parse_stream

TRADE = (
    b'{"e":"trade","E":1767225600123,"s":"BTCUSDT","t":5612345678,"p":"94250.01000000","q":"0.00210000",'
    b'"T":1767225600122,"m":true,"M":true}'
)
BOOK = b'{"u":81234567890,"s":"BTCUSDT","b":"94250.00000000","B":"2.10456000","a":"94250.01000000","A":"0.5"}'
# Valid JSON whose bytes an encoder would not reproduce (spacing, key order, a float): must survive verbatim.
ODD = b'{ "e" : "trade" , "x": 1.50, "E":1 }'


def test_line_layout_is_the_frame_embedded_raw(tmp_path: Path) -> None:
    path = tmp_path / "rec.jsonl"
    frame = combined_frame("btcusdt@trade", TRADE)
    with RecordingWriter(path) as writer:
        writer.write(1767225600125, frame)
    assert path.read_bytes() == b'{"ts":1767225600125,"frame":' + frame + b"}\n"


def test_round_trip_keeps_payload_bytes(tmp_path: Path) -> None:
    path = tmp_path / "rec.jsonl"
    frames = [
        (1000, "btcusdt@trade", TRADE),
        (1000, "btcusdt@bookTicker", BOOK),
        (1001, "ethusdt@trade", ODD),
        (1500, "!miniTicker@arr", b"[" + ODD + b"," + ODD + b"]"),
    ]
    with RecordingWriter(str(path)) as writer:
        for received_at, stream, payload in frames:
            writer.write(received_at, combined_frame(stream, payload))
    assert list(read_recording(path)) == [RecordedFrame(*frame) for frame in frames]


def test_append_mode_keeps_earlier_frames(tmp_path: Path) -> None:
    path = tmp_path / "rec.jsonl"
    with RecordingWriter(path) as writer:
        writer.write(1, combined_frame("btcusdt@trade", TRADE))
    with RecordingWriter(path, append=True) as writer:
        writer.write(2, combined_frame("btcusdt@trade", TRADE))
    assert [frame.received_at_ms for frame in read_recording(path)] == [1, 2]
    with RecordingWriter(path) as writer:  # the default truncates
        writer.write(3, combined_frame("btcusdt@trade", TRADE))
    assert [frame.received_at_ms for frame in read_recording(path)] == [3]


def test_writer_flushes_regularly_before_close(tmp_path: Path) -> None:
    path = tmp_path / "rec.jsonl"
    writer = RecordingWriter(path)
    writer.write(1000, combined_frame("btcusdt@trade", TRADE))
    writer.write(2500, combined_frame("btcusdt@trade", TRADE))  # more than a second later: flushed
    assert len(list(read_recording(path))) == 2
    writer.close()
    writer.close()
    with pytest.raises(ValueError, match="closed"):
        writer.write(3000, combined_frame("btcusdt@trade", TRADE))


@pytest.mark.parametrize(
    ("frame", "match"),
    [
        (b"not json", "not valid JSON"),
        (b"[1,2]", "JSON object"),
        (b'{"data":{}}', '"stream"'),
        (b'{"stream":"btcusdt@trade"}', '"data"'),
        (b'{"stream":5,"data":{}}', '"stream"'),
    ],
)
def test_writer_rejects_frames_that_are_not_combined_objects(tmp_path: Path, frame: bytes, match: str) -> None:
    with RecordingWriter(tmp_path / "rec.jsonl") as writer, pytest.raises(ValueError, match=match):
        writer.write(1, frame)


@pytest.mark.parametrize("received_at", [True, -1, 1.5, "1"])
def test_writer_rejects_bad_receive_times(tmp_path: Path, received_at: object) -> None:
    with RecordingWriter(tmp_path / "rec.jsonl") as writer, pytest.raises(ValueError, match="received_at_ms"):
        writer.write(received_at, combined_frame("btcusdt@trade", TRADE))  # type: ignore[arg-type]


def test_a_frame_with_line_breaks_is_stored_on_one_line(tmp_path: Path) -> None:
    path = tmp_path / "rec.jsonl"
    with RecordingWriter(path) as writer:
        writer.write(7, b'{"stream":"btcusdt@trade",\n "data":{"e":"trade",\r\n"E":1}}')
    assert path.read_bytes().count(b"\n") == 1
    assert list(read_recording(path)) == [RecordedFrame(7, "btcusdt@trade", b'{"e":"trade","E":1}')]


@pytest.mark.parametrize(
    ("bad_line", "match"),
    [
        (b"garbage", "not valid JSON"),
        (b'{"ts":1,"frame":{"stream":"btcusdt@trade","data":{}}', "not valid JSON"),  # truncated
        (b"[1]", "JSON object"),
        (b'{"ts":"1","frame":{"stream":"btcusdt@trade","data":{}}}', '"ts" must be an integer'),
        (b'{"ts":true,"frame":{"stream":"btcusdt@trade","data":{}}}', '"ts" must be an integer'),
        (b'{"ts":1,"frame":{"stream":"btcusdt@trade"}}', '"frame" must be an object'),
        (b'{"ts":1,"frame":[]}', '"frame" must be an object'),
    ],
)
def test_malformed_lines_raise_naming_the_line(tmp_path: Path, bad_line: bytes, match: str) -> None:
    path = tmp_path / "rec.jsonl"
    good = b'{"ts":1,"frame":' + combined_frame("btcusdt@trade", TRADE) + b"}\n"
    path.write_bytes(good + good + bad_line + b"\n" + good)
    frames = read_recording(path)
    assert next(frames).received_at_ms == 1
    next(frames)
    with pytest.raises(ValueError, match=match) as error:
        next(frames)
    assert f"{path}:3:" in str(error.value)


def test_blank_lines_are_skipped_and_other_layouts_fall_back_to_a_parse(tmp_path: Path) -> None:
    path = tmp_path / "rec.jsonl"
    path.write_bytes(
        b"\n" + b'{"frame": {"data": {"e": "trade", "E": 1}, "stream": "btcusdt@trade"}, "ts": 42}\n' + b"   \n"
    )
    assert list(read_recording(path)) == [RecordedFrame(42, "btcusdt@trade", b'{"e":"trade","E":1}')]


def test_shipped_sample_parses_and_every_stream_is_canonical() -> None:
    assert SAMPLE_PATH.is_file()
    assert SAMPLE_PATH.stat().st_size <= 320_000
    frames = list(read_recording(SAMPLE_PATH))
    assert len(frames) > 500
    streams = {frame.stream for frame in frames}
    for stream in streams:
        assert parse_stream(stream).name == stream
    assert streams == set(sample_streams(["BTCUSDT", "ETHUSDT"]))
    times = [frame.received_at_ms for frame in frames]
    assert times == sorted(times)
    assert times[-1] - times[0] >= 20_000
    for frame in frames:
        orjson.loads(frame.payload)


def test_generate_sample_is_deterministic(tmp_path: Path) -> None:
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    count = generate_sample(first, ["SOLUSDT"], 3, 99)
    assert generate_sample(second, ["SOLUSDT"], 3, 99) == count > 0
    assert first.read_bytes() == second.read_bytes()
    assert {frame.stream for frame in read_recording(first)} == set(sample_streams(["SOLUSDT"]))


def test_generate_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "cli.jsonl"
    assert main(["--generate", str(path), "--symbols", "bnbusdt", "--seconds", "2", "--seed", "3"]) == 0
    assert "wrote" in capsys.readouterr().err
    assert {frame.stream.split("@")[0] for frame in read_recording(path)} == {"bnbusdt", "!miniTicker"}
