"""Steps in incidents and reports are exact: the worker tells the supervisor every step it begins (on its step
board, shared memory the supervisor reads after the worker is gone; else a cheap line between the throttled
heartbeats), so a worker killed from outside at step 12 is reported at step 12."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

import resilient
from resilient._protocol import ChannelWriter, Heartbeat, StepBoard, parse_message
from tests.conftest import make_data, make_model


def test_the_per_step_line_is_a_heartbeat_without_timing():
    read, write = os.pipe()
    try:
        ChannelWriter(write).send_step("train", 3, 1234)
        line = os.read(read, 4096)
    finally:
        os.close(read)
        os.close(write)
    assert line.endswith(b"\n")
    msg = parse_message(line)
    assert msg == Heartbeat(phase="train", epoch=3, step=1234, t=msg.t) and abs(msg.t - time.time()) < 60


_BOARD_CHILD = """
import sys
from resilient._protocol import StepBoard
board = StepBoard.create()
board.write("validate", 2, 7)
print(board.fd, flush=True)
sys.stdin.readline()
"""


@pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="the step board needs Linux's memfd_create")
def test_the_step_board_of_a_killed_process_still_reads_its_last_step():
    child = subprocess.Popen([sys.executable, "-c", _BOARD_CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        fd = int(child.stdout.readline())
        board = StepBoard.open(child.pid, fd)
    finally:
        child.kill()
        child.wait(timeout=30)
        child.stdin.close()
        child.stdout.close()
    try:
        seq, phase, epoch, step = board.read()
        assert (phase, epoch, step) == ("validate", 2, 7) and seq % 2 == 0
    finally:
        board.close()


@pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="the step board needs Linux's memfd_create")
def test_the_step_board_reads_nothing_before_the_first_write_and_never_a_half_written_record():
    board = StepBoard.create()
    try:
        assert board.read() is None
        board.write("train", 0, 1)
        assert board.read()[1:] == ("train", 0, 1)
        board._mm[0:8] = (board._seq + 1).to_bytes(8, "little")  # a writer stopped halfway through its record
        assert board.read() is None
    finally:
        board.close()


class KillAtBatch:
    """A callback that SIGKILLs its own worker when batch ``at`` of the first epoch begins (a kill from outside:
    no rehearsed fault tells the supervisor the step). With ``run_dir`` and ``durable``, it first waits
    (bounded) until the checkpoint generation at step ``durable`` is on disk: checkpoints are written in the
    background, and a kill right after a snapshot may otherwise come before its write ends."""

    def __new__(cls, at: int, run_dir=None, durable: int | None = None):
        import keras

        from resilient._checkpoint import CheckpointStore

        class _Kill(keras.callbacks.Callback):
            def __init__(self, at: int) -> None:
                super().__init__()
                self.at = at

            def on_train_batch_begin(self, batch, logs=None):
                if batch != self.at:
                    return
                deadline = time.monotonic() + 30
                while durable is not None and time.monotonic() < deadline:
                    meta = CheckpointStore(run_dir / "checkpoints").latest_meta()
                    if meta is not None and int(meta["step"]) >= durable:
                        break
                    time.sleep(0.01)
                os.kill(os.getpid(), signal.SIGKILL)

        return _Kill(at)


@pytest.mark.e2e
@pytest.mark.usefixtures("no_leftover_processes")
@pytest.mark.fault("sigkill", "mid-epoch", incident="killed", outcome="failed (max_restarts=0); the incident's step "
                   "exact", lost="2 steps (since the checkpoint at step 10)", corrupted="no")
def test_a_worker_killed_at_step_12_is_reported_at_step_12(tmp_path):
    x, y = make_data(256)
    with pytest.raises(resilient.TrainingFailedError) as err:
        resilient.fit(make_model(), x, y, epochs=1, batch_size=8, seed=0, run_dir=tmp_path / "run", verbose=0,
                      callbacks=[KillAtBatch(12, tmp_path / "run", durable=10)], checkpoint_every=5, max_restarts=0)
    (incident,) = err.value.incidents
    assert incident.kind == "killed"
    assert (incident.epoch, incident.step, incident.checkpoint_step) == (0, 12, 10)
    assert re.search(r" killed +0/12 ", str(err.value)), str(err.value)  # the report's epoch/step column
