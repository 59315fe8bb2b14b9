"""``resilient status`` on hand-written run directories: the state of a finished, failed, interrupted, running
and stopped run, the ETA, the lock holder, and ``--follow`` against a journal written while it follows."""

from __future__ import annotations

import datetime as dt
import fcntl
import io
import json
import os
from pathlib import Path
from typing import Any

import pytest

from resilient._cli import main
from resilient._plan import Plan
from resilient._rundir import ArraysData, RunDir, RunSpec
from resilient._status import follow, lock_holder, run_state, story_line, summarize

pytestmark = pytest.mark.timeout(60)

PLAN = Plan(batch_size=32)
T0 = dt.datetime(2026, 11, 30, 6, 0, tzinfo=dt.timezone.utc).timestamp()


def _stamp(seconds: float) -> str:
    return dt.datetime.fromtimestamp(T0 + seconds, dt.timezone.utc).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def make_run(path: Path, events: list[tuple[float, str, dict[str, Any]]], epochs: int = 5) -> RunDir:
    """A run directory with run.json, plan.json and a journal of ``(seconds after T0, event, fields)``."""
    run = RunDir(path)
    run.create()
    run.write_spec(RunSpec(epochs=epochs, seed=1, data=ArraysData(x="data/x.npy", y="data/y.npy", samples=320),
                           model_fingerprint="f", initial_plan=PLAN))
    run.write_plan(PLAN)
    write_events(run, events)
    return run


def write_events(run: RunDir, events: list[tuple[float, str, dict[str, Any]]]) -> None:
    with open(run.events, "a") as f:
        for seconds, event, fields in events:
            f.write(json.dumps({"time": _stamp(seconds), "event": event, **fields}) + "\n")


PLAN_JSON = PLAN.model_dump(mode="json")
STARTED = [(0, "run_started", {"pid": 4242, "epochs": 5, "resumed": False}),
           (1, "attempt_started", {"attempt": 0, "plan": PLAN_JSON}),
           (9, "worker_ready", {"attempt": 0, "epoch": 0, "step": 0})]
EPOCHS = [(10 + 10 * e, "epoch_end", {"attempt": 0, "epoch": e, "step": 10 * (e + 1), "logs": {"loss": 1.0 / (e + 1)}})
          for e in range(2)]  # 10 steps an epoch, one step a second
GPU_OOM = [(25, "incident", {"kind": "gpu_oom", "attempt": 0, "epoch": 2, "step": 25, "detail": "ResourceExhaustedError",
                             "action": "degrade: halve_batch"}),
           (25, "attempt_ended", {"attempt": 0, "returncode": 3})]


@pytest.fixture
def held(tmp_path):
    """Hold a run directory's lock as fit does (this process is the 'caller')."""
    fds = []

    def hold(run: RunDir) -> None:
        fd = os.open(run.lock_file, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fds.append(fd)

    yield hold
    for fd in fds:
        os.close(fd)


def test_a_completed_run(tmp_path):
    run = make_run(tmp_path / "run", [*STARTED, *EPOCHS, (40, "run_finished", {"status": "completed"})], epochs=2)
    text = summarize(run.path)
    assert "  state: finished: completed\n" in text
    assert "lock: free (no live process is training in this run directory)" in text
    assert run_state(run, run.read_events(), 2, T0 + 50).state == "completed"


@pytest.mark.parametrize(("status", "said"), [("failed", "failed (the policy gave up)"),
                                              ("interrupted", "interrupted (Ctrl-C)"),
                                              ("user_error", "failed: a bug in the user's code")])
def test_a_failed_or_interrupted_run(tmp_path, status, said):
    run = make_run(tmp_path / "run", [*STARTED, *EPOCHS, *GPU_OOM, (30, "run_finished", {"status": status})])
    text = summarize(run.path)
    assert f"  state: {said}" in text
    assert "gpu_oom: ResourceExhaustedError" in text and "-> degrade: halve_batch" in text


def test_a_running_run_says_pid_attempt_plan_progress_and_eta(tmp_path, held):
    run = make_run(tmp_path / "run", [*STARTED, *EPOCHS,
                                      (35, "memory_sample", {"attempt": 0, "epoch": 2, "step": 35, "rss_bytes": 1})])
    held(run)
    assert lock_holder(run) == os.getpid()
    state = run_state(run, run.read_events(), 5, T0 + 35)
    assert (state.state, state.pid, state.attempt, state.plan, state.epoch, state.step) == (
        "running", 4242, 0, PLAN, 2, 35)
    assert state.rate == pytest.approx(1.0)  # steps 10 -> 35 in 25 s
    assert state.eta == pytest.approx(15.0)  # 5 epochs of 10 steps: step 50; 15 steps at one a second
    text = summarize(run.path, now=T0 + 35)
    assert "  state: running (pid 4242, attempt 0, plan batch=32 float32 cache, epoch 3/5, step 35, 1 steps/s, ETA 15 s)" in text
    assert f"lock: held by pid {os.getpid()}" in text


def test_a_run_whose_process_died_is_stopped(tmp_path):
    run = make_run(tmp_path / "run", [*STARTED, *EPOCHS])
    (run.lock_file).touch()  # left by the dead caller; nobody holds it
    assert lock_holder(run) is None
    assert "state: stopped: no process holds the run" in summarize(run.path)


def test_a_resumed_call_counts_from_its_own_run_started(tmp_path, held):
    first = [*STARTED, *EPOCHS, (30, "run_finished", {"status": "interrupted"})]
    again = [(100, "run_started", {"pid": 5151, "epochs": 5, "resumed": True}),
             (101, "attempt_started", {"attempt": 1, "plan": PLAN_JSON})]
    run = make_run(tmp_path / "run", first + again)
    held(run)
    state = run_state(run, run.read_events(), 5, T0 + 102)
    assert (state.state, state.pid, state.attempt, state.eta) == ("running", 5151, 1, None)


def test_the_cli_prints_the_status_and_refuses_a_directory_without_a_run(tmp_path):
    run = make_run(tmp_path / "run", [*STARTED, (30, "run_finished", {"status": "completed"})])
    out, err = io.StringIO(), io.StringIO()
    assert main(["status", str(run.path)], out=out, err=err) == 0
    assert "state: finished: completed" in out.getvalue()
    assert main(["status", str(tmp_path / "nothing"), "--follow"], out=out, err=err) == 2
    assert "holds no resilient run" in err.getvalue()


def test_story_lines():
    assert story_line(EPOCHS[1][2] | {"event": "epoch_end"}, 5) == "epoch 2/5 done at step 20: loss=0.5"
    assert story_line(GPU_OOM[0][2] | {"event": "incident"}, 5) == (
        "incident: gpu_oom in attempt 0 at epoch 3, step 25: ResourceExhaustedError -> degrade: halve_batch")
    assert story_line({"event": "memory_sample", "step": 3}, 5) is None


def test_follow_prints_events_as_they_come_and_exits_at_the_end(tmp_path, held):
    run = make_run(tmp_path / "run", STARTED)
    held(run)
    later = [*EPOCHS, *GPU_OOM, (26, "attempt_started", {"attempt": 1, "plan": Plan(batch_size=16).model_dump()}),
             (30, "checkpoint_saved", {"attempt": 1, "epoch": 2, "step": 30, "reason": "interval"}),
             (40, "run_finished", {"status": "completed"})]
    polls = []

    def sleep(seconds: float) -> None:  # one journal line per poll, as a live run would write them
        polls.append(seconds)
        if len(polls) <= len(later):
            write_events(run, [later[len(polls) - 1]])

    out = io.StringIO()
    assert follow(run.path, out, tty=False, poll=0.5, sleep=sleep) == 0
    lines = out.getvalue().splitlines()
    assert lines[0].startswith(f"following {run.path}: running (pid 4242, attempt 0")
    assert lines[1:] == [
        "started by pid 4242: 5 epochs", "attempt 0 started: plan batch=32 float32 cache",
        "epoch 1/5 done at step 10: loss=1", "epoch 2/5 done at step 20: loss=0.5",
        "incident: gpu_oom in attempt 0 at epoch 3, step 25: ResourceExhaustedError -> degrade: halve_batch",
        "attempt 1 started: plan batch=16 float32 cache", "checkpoint at step 30 (epoch 3/5, interval)",
        "run finished: completed"]
    assert set(polls) == {0.5} and "\r" not in out.getvalue()  # not a terminal: plain lines, no redraws


def test_follow_on_a_terminal_redraws_one_progress_line(tmp_path, held):
    run = make_run(tmp_path / "run", [*STARTED, *EPOCHS])
    held(run)
    calls = []

    def sleep(seconds: float) -> None:
        calls.append(seconds)
        if len(calls) == 2:
            write_events(run, [(40, "run_finished", {"status": "failed"})])

    out = io.StringIO()
    assert follow(run.path, out, tty=True, sleep=sleep) == 1
    text = out.getvalue()
    assert "\rpid 4242 | attempt 0 | plan batch=32 float32 cache | epoch 3/5 | step 20" in text
    assert text.endswith("run failed (the policy gave up)\n")


def test_follow_stops_when_the_process_is_gone_without_an_end(tmp_path):
    run = make_run(tmp_path / "run", [*STARTED, *EPOCHS])
    out = io.StringIO()
    polls = []
    assert follow(run.path, out, tty=False, sleep=polls.append) == 1
    assert len(polls) == 1  # seen twice, one poll apart: fit takes the lock before it journals
    assert out.getvalue().splitlines()[-1].startswith("run stopped: no process holds the run")


def test_the_last_checkpoint_says_its_age(tmp_path):
    from resilient._checkpoint import CheckpointStore

    run = make_run(tmp_path / "run", [*STARTED, *EPOCHS, (30, "run_finished", {"status": "interrupted"})])
    saved = CheckpointStore(run.checkpoints).save(20, {"epoch": 2, "offset": 0},
                                                  lambda d: (d / "weights.bin").write_bytes(b"w" * 64))
    mtime = Path(saved.path).stat().st_mtime
    assert "  last checkpoint: step 20, epoch 2, sample 0 (3 min ago)\n" in summarize(run.path, now=mtime + 180)
    assert "(2 h 05 min ago)" in summarize(run.path, now=mtime + 7500)


def test_follow_waits_for_a_fit_that_holds_the_lock_to_write_its_run(tmp_path, held):
    run = RunDir(tmp_path / "run")
    run.create()
    held(run)  # fit takes the lock first, then writes run.json and journals run_started
    polls = []

    def sleep(seconds: float) -> None:
        polls.append(seconds)
        if len(polls) == 2:
            make_run(run.path, [*STARTED, (40, "run_finished", {"status": "completed"})])

    out = io.StringIO()
    assert follow(run.path, out, tty=False, sleep=sleep) == 0
    assert len(polls) == 2 and out.getvalue().endswith("run finished: completed\n")


# ------------------------------------------------------------------------------------------ the mirror

MIRROR_SYNCED = [(12, "checkpoint_saved", {"attempt": 0, "epoch": 1, "step": 12, "reason": "interval"}),
                 (15, "mirror_synced", {"step": 12, "epoch": 1, "lag_seconds": 3.0, "behind_steps": 0,
                                        "path": "/drive/run"}),
                 (24, "checkpoint_saved", {"attempt": 0, "epoch": 2, "step": 24, "reason": "interval"})]


def test_status_tells_the_mirrors_lag_in_steps_and_time_and_that_it_is_failing(tmp_path):
    run = make_run(tmp_path / "run", [*STARTED, *MIRROR_SYNCED,
                                      (26, "mirror_retry", {"attempt": 1, "error": "OSError: [Errno 107] Transport "
                                                            "endpoint is not connected", "wait_seconds": 0.5}),
                                      (28, "mirror_retry", {"attempt": 2, "error": "OSError: [Errno 28] No space left "
                                                            "on device", "wait_seconds": 1.0})])
    text = summarize(run.path, now=T0 + 75)
    assert ("mirror: step 12 verified 60 s ago, 12 steps behind the local checkpoint (step 24), copied 3.0 s after "
            "its save (/drive/run)") in text
    assert "mirror failing since 49 s ago (2 failed passes): OSError: [Errno 28] No space left on device" in text
    # Caught up: in sync, and the failures before the newest copy are history.
    write_events(run, [(30, "mirror_synced", {"step": 24, "lag_seconds": 6.0, "behind_steps": 0})])
    text = summarize(run.path, now=T0 + 75)
    assert "mirror: step 24 verified 45 s ago, in sync with the local checkpoint" in text
    assert "failing" not in text
    assert story_line({"event": "mirror_synced", "step": 24, "lag_seconds": 6.0, "behind_steps": 3}, 5) == \
        "mirror: step 24 copied and verified 6.0 s after its save, 3 steps behind"


def test_status_reads_the_run_from_the_mirror_when_the_local_run_dir_is_gone(tmp_path):
    mirror = make_run(tmp_path / "drive" / "run", [*STARTED, *MIRROR_SYNCED[:2]])
    (mirror.checkpoints / "ckpt-000000000012").mkdir(parents=True)
    (mirror.checkpoints / ".tmp-mirror-0123").mkdir()  # a partial copy: not a generation
    out, err = io.StringIO(), io.StringIO()
    assert main(["status", str(tmp_path / "vm2" / "run"), "--mirror-dir", str(mirror.path)], out=out, err=err) == 0
    text = out.getvalue()
    assert text.startswith(f"run {mirror.path} (the mirror: {tmp_path / 'vm2' / 'run'} holds no run")
    assert "state: stopped" in text
    assert f"on the mirror {mirror.path}: step 12" in text
    # Neither holds a run: said, with both paths.
    assert main(["status", str(tmp_path / "nothing"), "--mirror-dir", str(tmp_path / "none")], out=out, err=err) == 2
    assert "neither" in err.getvalue() and str(tmp_path / "none") in err.getvalue()
    # Without a mirror in the journal or the call, no mirror lines.
    assert "mirror" not in summarize(make_run(tmp_path / "plain", STARTED).path, now=T0 + 20)
