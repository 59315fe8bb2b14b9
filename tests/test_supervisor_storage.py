"""The supervisor and the run's storage, against the scripted fake worker: a full disk, damaged
checkpoints, what interrupted saves leave behind, and the memory cgroups of dead supervisors."""

# ruff: noqa: F811 (the fixtures of test_supervisor.py, imported, are the tests' arguments)

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import types

import pytest

from resilient._checkpoint import CheckpointStore
from resilient._errors import DiskFullError, TrainingFailedError
from resilient.supervisor.disk import DISK_MARGIN
from resilient.supervisor.memory import MemoryCgroup, cgroup_support
from tests.test_supervisor import (  # noqa: F401 (fixtures)
    COMPLETE,
    HELLO,
    RESULT,
    beat,
    die,
    no_leftover_workers,
    report,
    supervise,
)

pytestmark = pytest.mark.timeout(60)

ENOSPC_REPORT = report(None, type="OSError", message="[Errno 28] No space left on device: '/run/checkpoints/.tmp-1'",
                       errno=errno.ENOSPC)


def free_space(free: int):
    """A ``shutil.disk_usage`` stand-in reporting ``free`` bytes."""
    return lambda path: types.SimpleNamespace(total=1 << 40, used=0, free=free)


# ------------------------------------------------------------------------------------------- disk full


@pytest.mark.fault("disk_full", "checkpoint save", incident="disk_full",
                   outcome="stopped at once with DiskFullError (free space, path, what to do); no retry loop",
                   lost="2 steps (back to the checkpoint at step 4)", corrupted="no")
def test_a_full_disk_stops_the_run_while_it_stays_full(supervise):
    h = supervise({"default": [HELLO, beat(4), {"do": "checkpoint"}, beat(2), ENOSPC_REPORT]},
                  disk_usage=free_space(4096))
    with pytest.raises(DiskFullError) as info:
        h.supervisor.run()
    err = info.value
    text = str(err)

    assert isinstance(err, TrainingFailedError)
    assert [(i.kind, i.step, i.checkpoint_step) for i in err.incidents] == [("disk_full", 6, 4)]
    ckpt_bytes = CheckpointStore(h.run.checkpoints).newest_bytes()
    assert (err.path, err.free_bytes, err.needed_bytes) == (str(h.run.path), 4096, ckpt_bytes + DISK_MARGIN)
    assert "training failed after 1 attempt(s): disk full: 4.0 KiB free on " in text
    assert str(h.run.path) in text
    assert "Root cause: the last attempt ended with disk_full: OSError: [Errno 28] No space left on device" in text
    assert "free space there" in text and "call fit again with the same run_dir" in text
    assert len(h.events("attempt_started")) == 1 and h.waits == []  # not restarted into the same failure
    incident, = h.events("incident")
    assert incident["kind"] == "disk_full" and incident["action"].startswith("stop: the disk is still full")
    assert incident["evidence"]["free_bytes"] == 4096
    assert h.events("run_finished")[-1]["status"] == "failed"
    assert "not restarted: 4.0 KiB free on" in h.stream.getvalue()
    # The checkpoint before the failed save is intact: the next call resumes from it.
    assert CheckpointStore(h.run.checkpoints).latest().step == 4
    h.assert_workers_gone()


@pytest.mark.fault("disk_full", "checkpoint save", incident="disk_full",
                   outcome="restarted once space came back; completed", lost="2 steps (back to the checkpoint "
                   "at step 4)", corrupted="no")
def test_a_full_disk_restarts_once_space_came_back(supervise):
    h = supervise({"attempts": {"0": [HELLO, beat(4), {"do": "checkpoint"}, beat(2), ENOSPC_REPORT]},
                   "default": COMPLETE}, disk_usage=free_space(1 << 40))
    result = h.supervisor.run()
    assert [(i.kind, i.step, i.checkpoint_step) for i in result.incidents] == [("disk_full", 6, 4)]
    assert result.incidents[0].action == "restart with the same plan"
    assert h.events("worker_ready")[-1]["resumed_from_step"] == 4
    h.assert_workers_gone()


def test_a_report_the_worker_could_not_write_arrives_over_the_channel(supervise):
    sent = {"type": "OSError", "message": "[Errno 28] No space left on device", "errno": errno.ENOSPC, "step": 2}
    h = supervise({"default": [HELLO, beat(2), {"do": "notice", "event": "error_report",
                                                "fields": {"report": sent, "unwritten": "error.json: ENOSPC"}},
                               {"do": "exit", "code": 3}]}, disk_usage=free_space(0))
    with pytest.raises(DiskFullError) as info:
        h.supervisor.run()
    assert [i.kind for i in info.value.incidents] == ["disk_full"]  # not "crash (exit code 3)"
    assert not (h.run.attempt_dir(0) / "error.json").exists()


def test_the_worker_sends_its_report_when_error_json_cannot_be_written(tmp_path):
    from resilient._protocol import ChannelWriter, Notice, parse_message
    from resilient.worker.__main__ import _write_report

    read_fd, write_fd = os.pipe()
    missing = tmp_path / "gone" / "attempts" / "000"  # writing error.json there raises an OSError
    _write_report(missing, OSError(errno.ENOSPC, "No space left on device"), None, channel=ChannelWriter(write_fd))
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as f:
        msg = parse_message(f.readline())
    assert isinstance(msg, Notice) and msg.event == "error_report"
    assert msg.fields["report"]["errno"] == errno.ENOSPC and "error.json" in msg.fields["unwritten"]


@pytest.mark.fault("disk_full", "mid-epoch",
                   outcome="DiskFullError from the supervisor's own write, never a bare OSError; no torn journal line",
                   lost="none (checkpoint at step 3)", corrupted="no")
def test_the_supervisors_own_writes_on_a_full_disk_end_with_a_clear_error(supervise, tiny_disk):
    disk = tiny_disk("1m")
    # The worker fills the disk and crashes: the supervisor's next write (the journal, or the next
    # attempt's plan.json) finds no space.
    h = supervise({"default": [HELLO, beat(3), {"do": "checkpoint"}, {"do": "fill", "name": "filler"},
                               die("SIGSEGV")]}, run_path=disk / "run")
    with pytest.raises(DiskFullError) as info:
        h.supervisor.run()
    text = str(info.value)
    assert "the disk is full (No space left on device writing " in text
    assert f"Run directory: {disk / 'run'}" in text and f"free on {disk}" in text
    assert "call fit again with run_dir=" in text
    assert info.value.free_bytes is not None and info.value.free_bytes < DISK_MARGIN
    for line in h.run.events.read_text().splitlines():
        json.loads(line)  # a write cut short by the full disk left no partial line
    assert CheckpointStore(h.run.checkpoints).latest().step == 3
    h.assert_workers_gone()


# ------------------------------------------------------------------------------------- damaged checkpoints


@pytest.mark.fault("corrupt_checkpoint", "worker start-up",
                   outcome="the worker's report of a damaged generation said on the console and journaled",
                   corrupted="the damaged generation only (skipped)")
def test_a_damaged_checkpoint_found_by_the_worker_is_said_on_the_console(supervise):
    h = supervise({"default": [HELLO, {"do": "notice", "event": "checkpoint_corrupt",
                                       "fields": {"path": "/r/checkpoints/ckpt-000000000009",
                                                  "reason": "ckpt-000000000009: weights.npz checksum mismatch"}},
                               *COMPLETE[1:]]})
    h.supervisor.run()
    assert ("resilient: attempt 0: checkpoint ckpt-000000000009 is damaged (ckpt-000000000009: weights.npz checksum "
            "mismatch); skipped: the attempt resumes from the newest one that verifies") in h.stream.getvalue()


# ----------------------------------------------------------------------------------------------- leftovers


@pytest.mark.fault("kill_during_save", "checkpoint save", incident="killed",
                   outcome="completed; the .tmp-/.old- dirs of the killed save removed at the next start and the end",
                   corrupted="no")
def test_leftovers_of_interrupted_saves_are_removed_between_attempts_and_at_the_end(supervise):
    ckpts = "checkpoints"
    h = supervise({"attempts": {"0": [HELLO, beat(2), {"do": "checkpoint"}, {"do": "plant", "path": f"{ckpts}/.tmp-a"},
                                      {"do": "plant", "path": f"{ckpts}/.old-b"}, die("SIGKILL")],
                                "1": [HELLO, beat(2), {"do": "checkpoint"}, {"do": "plant", "path": f"{ckpts}/.tmp-c"},
                                      {"do": "epoch_end"}, RESULT]}})
    planted = h.run.checkpoints / ".old-before"
    planted.mkdir(parents=True)
    result = h.supervisor.run()

    assert [i.kind for i in result.incidents] == ["killed"]
    assert sorted(p.name for p in h.run.checkpoints.iterdir()) == ["ckpt-000000000002", "ckpt-000000000004"]
    removed = [e["checkpoints"] for e in h.events("leftovers_removed")]
    assert removed == [[".old-before"], [".tmp-a", ".old-b"], [".tmp-c"]]  # first start, between, end
    h.assert_workers_gone()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.fault("caller_sigkill", "mid-epoch",
                   outcome="the dead supervisor's memory cgroup reaped when the next supervisor starts",
                   corrupted="no")
def test_memory_cgroups_of_dead_supervisors_are_reaped_when_a_supervisor_starts(supervise):
    supported, why = cgroup_support()
    if not supported:
        pytest.skip(f"needs writable memory cgroups: {why}")
    dead = MemoryCgroup.create(1 << 30, name=f"resilient-{_dead_pid()}-0badc0de")
    live = MemoryCgroup.create(1 << 30, name=f"resilient-{os.getpid()}-0badc0de")
    busy = MemoryCgroup.create(1 << 30, name=f"resilient-{_dead_pid()}-0000beef")  # still holds a process
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    busy.add(sleeper.pid)
    try:
        h = supervise({"default": COMPLETE})
        h.supervisor.run()
        assert not dead.path.exists()
        assert live.path.exists() and busy.path.exists()
        assert f"removed the memory cgroup {dead.path} left by a supervisor that was killed" in h.stream.getvalue()
        assert "leftovers_removed" not in h.names()  # another run's group: not this run's story
    finally:
        sleeper.kill()
        sleeper.wait()
        live.remove()
        busy.remove()
        dead.remove()
