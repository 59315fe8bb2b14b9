"""The worker -> supervisor channel: message validation, and delivery over a real pipe."""

from __future__ import annotations

import json
import os
import threading

import pytest
from pydantic import ValidationError

from resilient._protocol import (
    ChannelReader,
    ChannelWriter,
    CheckpointSaved,
    EpochBegin,
    EpochEnd,
    FaultFired,
    Heartbeat,
    Hello,
    Notice,
    parse_message,
)

# ------------------------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("payload", "cls", "fields"),
    [
        ({"type": "hello", "pid": 42}, Hello, {"pid": 42, "epoch": 0, "step": 0, "resumed_from": None}),
        ({"type": "hello", "pid": 42, "epoch": 2, "step": 90, "resumed_from": 80}, Hello, {"resumed_from": 80}),
        ({"type": "heartbeat", "epoch": 1, "step": 12}, Heartbeat, {"phase": "train", "step_seconds": None}),
        (
            # rss_bytes: sent by no worker and dropped; a line that still carries it parses
            {"type": "heartbeat", "phase": "save", "epoch": 1, "step": 12, "step_seconds": 0.02, "rss_bytes": 10},
            Heartbeat,
            {"phase": "save", "step_seconds": 0.02},
        ),
        (
            {"type": "checkpoint_saved", "epoch": 0, "step": 5, "seconds": 0.5, "bytes": 100, "path": "/c/ckpt-5"},
            CheckpointSaved,
            {"reason": "interval", "bytes": 100, "path": "/c/ckpt-5"},
        ),
        ({"type": "epoch_end", "epoch": 0, "step": 10, "logs": {"loss": 0.5}}, EpochEnd, {"logs": {"loss": 0.5}}),
        ({"type": "epoch_end", "epoch": 0, "step": 10}, EpochEnd, {"logs": {}}),
        ({"type": "epoch_begin", "epoch": 1, "step": 10}, EpochBegin, {"epochs": None, "steps": None}),
        (
            {"type": "epoch_begin", "epoch": 1, "step": 10, "epochs": 3, "steps": 6, "steps_per_epoch": 10,
             "samples_per_step": 32},
            EpochBegin,
            {"steps": 6, "steps_per_epoch": 10, "samples_per_step": 32},
        ),
        ({"type": "fault", "kind": "preempt", "step": 3, "key": "preempt@3"}, FaultFired, {"key": "preempt@3"}),
        (
            {"type": "notice", "event": "checkpoint_corrupt", "fields": {"path": "x"}},
            Notice,
            {"event": "checkpoint_corrupt", "fields": {"path": "x"}},
        ),
    ],
)
def test_parse_message_accepts_each_type(payload, cls, fields):
    for line in (json.dumps(payload), json.dumps(payload).encode()):
        msg = parse_message(line)
        assert isinstance(msg, cls)
        for name, value in fields.items():
            assert getattr(msg, name) == value
        assert isinstance(msg.t, float)  # stamped by default


def test_parse_message_keeps_the_senders_timestamp():
    assert parse_message('{"type": "heartbeat", "epoch": 0, "step": 1, "t": 12.5}').t == 12.5


def test_parse_message_ignores_unknown_extra_fields():
    msg = parse_message('{"type": "heartbeat", "epoch": 0, "step": 1, "gpu": "T4"}')
    assert isinstance(msg, Heartbeat)
    assert not hasattr(msg, "gpu")


@pytest.mark.parametrize(
    "line",
    [
        "",
        "not json",
        "{",
        "[]",
        "42",
        "null",
        '{"epoch": 0, "step": 1}',  # no type
        '{"type": "bogus", "epoch": 0}',  # unknown type
        '{"type": "hello"}',  # hello without pid
        '{"type": "hello", "pid": "abc"}',
        '{"type": "heartbeat", "epoch": 0}',  # no step
        '{"type": "heartbeat", "epoch": 0, "step": "many"}',
        '{"type": "heartbeat", "epoch": 0, "step": 1, "phase": "dancing"}',
        '{"type": "checkpoint_saved", "epoch": 0, "step": 1, "seconds": 0.1, "bytes": 5}',  # no path
        '{"type": "epoch_end", "epoch": 0, "step": 1, "logs": {"loss": "low"}}',
        '{"type": "fault", "kind": "hang", "step": 1}',  # no key
        '{"type": "notice", "fields": {}}',  # no event
        '{"type": "notice", "event": "x", "fields": [1, 2]}',
        b"\xff\xfe garbage bytes",
    ],
)
def test_parse_message_rejects_garbage_and_wrong_fields(line):
    assert parse_message(line) is None


def test_messages_round_trip_through_json():
    for msg in (
        Hello(pid=1, epoch=2, step=3, resumed_from=2),
        Heartbeat(phase="validate", epoch=1, step=9, step_seconds=0.5),
        CheckpointSaved(epoch=0, step=5, seconds=0.25, bytes=1024, path="/tmp/x", reason="preempt"),
        EpochEnd(epoch=0, step=10, logs={"loss": 1.0}),
        EpochBegin(epoch=1, step=10, epochs=2, steps=10, steps_per_epoch=10, samples_per_step=1),
        FaultFired(kind="gpu_oom", step=4, key="gpu_oom@4"),
        Notice(event="probe", fields={"batch": 16}),
    ):
        assert parse_message(msg.model_dump_json()) == msg


def test_messages_are_frozen():
    msg = Heartbeat(epoch=0, step=1)
    with pytest.raises(ValidationError):
        msg.step = 2  # type: ignore[misc]


# ------------------------------------------------------------------------------------------- the pipe


def collect(fd: int) -> tuple[ChannelReader, list[object]]:
    received: list[object] = []
    reader = ChannelReader(fd, received.append)
    reader.start()
    return reader, received


def test_writer_and_reader_over_a_real_pipe_deliver_in_order():
    read_fd, write_fd = os.pipe()
    reader, received = collect(read_fd)
    writer = ChannelWriter(write_fd)
    sent = [Hello(pid=os.getpid())]
    sent += [Heartbeat(epoch=0, step=i, step_seconds=0.01) for i in range(200)]
    sent += [CheckpointSaved(epoch=0, step=199, seconds=0.1, bytes=10, path="p"), EpochEnd(epoch=0, step=199)]
    for msg in sent:
        writer.send(msg)
    os.close(write_fd)
    reader.join(timeout=5)
    assert not reader.is_alive()  # EOF ends the reader
    assert received == sent
    assert reader.bad_lines == 0


def test_reader_counts_bad_lines_and_keeps_going():
    read_fd, write_fd = os.pipe()
    reader, received = collect(read_fd)
    writer = ChannelWriter(write_fd)
    writer.send(Heartbeat(epoch=0, step=1))
    os.write(write_fd, b"this is not json\n")
    os.write(write_fd, b'{"type": "heartbeat", "epoch": 0}\n')
    os.write(write_fd, b"\n   \n")  # blank lines are neither messages nor bad
    writer.send(Heartbeat(epoch=0, step=2))
    os.close(write_fd)
    reader.join(timeout=5)
    assert [m.step for m in received] == [1, 2]
    assert reader.bad_lines == 2


def test_reader_reassembles_a_line_split_across_writes():
    read_fd, write_fd = os.pipe()
    reader, received = collect(read_fd)
    data = (Heartbeat(epoch=3, step=77).model_dump_json() + "\n").encode()
    os.write(write_fd, data[:10])
    os.write(write_fd, data[10:])
    os.write(write_fd, b'{"type": "hello", "pid": 5}\n')
    os.close(write_fd)
    reader.join(timeout=5)
    assert [type(m).__name__ for m in received] == ["Heartbeat", "Hello"]
    assert received[0].step == 77


def test_reader_stops_at_eof_and_closes_its_fd():
    read_fd, write_fd = os.pipe()
    reader, received = collect(read_fd)
    os.write(write_fd, b'{"type": "hello", "pid": 5}')  # no newline: a torn last line is dropped
    os.close(write_fd)
    reader.join(timeout=5)
    assert not reader.is_alive()
    assert received == []
    assert reader.bad_lines == 0
    with pytest.raises(OSError):
        os.fstat(read_fd)


def test_reader_survives_concurrent_writers():
    read_fd, write_fd = os.pipe()
    reader, received = collect(read_fd)
    writer = ChannelWriter(write_fd)

    def beat(epoch: int) -> None:
        for step in range(100):
            writer.send(Heartbeat(epoch=epoch, step=step))

    threads = [threading.Thread(target=beat, args=(epoch,)) for epoch in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    os.close(write_fd)
    reader.join(timeout=5)
    assert reader.bad_lines == 0
    for epoch in range(4):
        assert [m.step for m in received if m.epoch == epoch] == list(range(100))


def test_writer_without_a_channel_is_a_no_op():
    ChannelWriter(None).send(Heartbeat(epoch=0, step=0))


def test_writer_gives_up_quietly_when_the_reader_is_gone():
    read_fd, write_fd = os.pipe()
    os.close(read_fd)
    writer = ChannelWriter(write_fd)
    writer.send(Heartbeat(epoch=0, step=0))  # EPIPE: the supervisor is gone
    assert writer.fd is None
    writer.send(Heartbeat(epoch=0, step=1))  # and later sends do nothing
    os.close(write_fd)


def test_epoch_begin_tells_where_the_run_ends_under_the_plan():
    # Resumed 4 steps into epoch 1 of 3 (10 steps an epoch): 6 steps of this epoch, then one more epoch.
    assert EpochBegin(epoch=1, step=14, epochs=3, steps=6, steps_per_epoch=10).end_step() == 30
    assert EpochBegin(epoch=2, step=20, epochs=3, steps=10, steps_per_epoch=10).end_step() == 30
    assert EpochBegin(epoch=0, step=0, epochs=3, steps=None).end_step() is None, "an input of unknown length"
    assert EpochBegin(epoch=0, step=0).end_step() is None, "a worker that does not say"
