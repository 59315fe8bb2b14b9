"""End-to-end, real TensorFlow workers on CPU: a hang right after a restart, before the first step; Ctrl-C
in a caller whose worker hangs."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

import resilient
from resilient._rundir import RunDir
from tests.conftest import make_data, make_model

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("no_leftover_processes")]


@pytest.mark.timeout(180)
@pytest.mark.fault("hang", "first step", incident="hang", outcome="completed; killed after the calibrated first_step "
                   "timeout (seconds), not 600 s", lost="nothing (resumed from the checkpoint at the hang's step)",
                   corrupted="no")
def test_a_hang_at_the_first_step_after_a_restart_is_caught_in_seconds(tmp_path):
    # Attempt 0 saves a checkpoint at step 6 and aborts there (faults at one step fire in the order of their
    # kinds); attempt 1 resumes at step 6 and hangs before its first step. Its first_step phase is timed from attempt 0's: the hang costs seconds.
    x, y = make_data()
    run_dir = tmp_path / "run"
    started = time.monotonic()
    history = resilient.fit(make_model(), x, y, epochs=2, batch_size=32, seed=1, run_dir=run_dir, verbose=0,
                            faults="abort@6,hang@6", checkpoint_every=2, hang_timeout=3)
    elapsed = time.monotonic() - started

    crash, hang = history.incidents
    assert (crash.kind, crash.step, crash.checkpoint_step) == ("crash", 6, 6)
    assert (hang.kind, hang.step, hang.checkpoint_step) == ("hang", 6, 6)
    assert hang.evidence["phase"] == "first_step"
    events = RunDir(run_dir).read_events()
    first_step = next(e for e in events if e["event"] == "attempt_ended")["startup_seconds"]["first_step"]
    timeout = hang.evidence["timeout"]
    # 3x the first step measured, at least 5 s, plus 3x the slowest step for each of the 6 batches skipped.
    assert max(5.0, 3.0, 3 * first_step) <= timeout < 30.0
    assert next(e for e in events if e["event"] == "worker_ready" and e["attempt"] == 1)["skip_steps"] == 6
    assert timeout <= hang.evidence["heartbeat_age"] < timeout + 1.0
    assert history.epoch == [0, 1]
    print(f"measured first step {first_step:.2f}s, timeout {timeout:.1f}s, the whole run {elapsed:.1f}s")
    assert elapsed < 120.0  # three worker starts (~8 s each on an idle 2-core machine) and the timeout


CALLER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {root!r})
    from tests.conftest import make_data, make_model
    import resilient
    x, y = make_data()
    try:
        resilient.fit(make_model(), x, y, epochs=50, batch_size=8, seed=1, run_dir={run_dir!r}, verbose=2,
                      faults="hang@10", checkpoint_every=4, hang_timeout=600)
    except KeyboardInterrupt:
        print("KeyboardInterrupt", flush=True)
        sys.exit(130)
    """
)


@pytest.mark.timeout(180)
@pytest.mark.fault("ctrl_c", "mid-epoch", incident="none (run_finished: interrupted)", outcome="KeyboardInterrupt "
                   "within seconds with a hung real worker; attempt_ended journaled; the worker reaped",
                   lost="steps since the last checkpoint", corrupted="no")
def test_ctrl_c_in_the_caller_with_a_hung_real_worker_returns_within_seconds(tmp_path):
    run_dir = tmp_path / "run"
    script = CALLER.format(root=str(Path(__file__).resolve().parent.parent), run_dir=str(run_dir))
    caller = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not _events(run_dir, "fault_fired"):
            time.sleep(0.2)
        assert _events(run_dir, "fault_fired"), "the worker never reached the hang"
        worker_pid = _events(run_dir, "worker_ready")[-1]["pid"]
        time.sleep(1.0)  # into the hang: the worker is silent
        pressed = time.monotonic()
        caller.send_signal(signal.SIGINT)
        out, _ = caller.communicate(timeout=60)
        took = time.monotonic() - pressed
    finally:
        if caller.poll() is None:
            caller.kill()
            caller.wait()
    assert caller.returncode == 130 and "KeyboardInterrupt" in out, out
    assert took < 10.0, f"Ctrl-C took {took:.1f}s"  # not the 120 s preemption grace
    assert "interrupted (Ctrl-C), checkpoint at step 8; the worker did not stop on SIGTERM" in out
    ended = _events(run_dir, "attempt_ended")
    assert len(ended) == 1 and ended[0]["interrupted"] and ended[0]["signal"] == "SIGKILL"
    finished = _events(run_dir, "run_finished")[-1]
    assert (finished["status"], finished["checkpoint_step"]) == ("interrupted", 8)
    assert not psutil.pid_exists(worker_pid)
    print(f"Ctrl-C returned in {took:.1f}s")


def _events(run_dir: Path, name: str) -> list[dict]:
    if not (run_dir / "events.jsonl").exists():
        return []
    return [e for e in RunDir(run_dir).read_events() if e["event"] == name]
