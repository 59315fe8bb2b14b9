"""End-to-end: a real worker that hangs right after a restart, before its first step (real TensorFlow, CPU)."""

from __future__ import annotations

import time

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
    assert timeout == max(5.0, 3.0, 3 * first_step) < 60.0
    assert timeout <= hang.evidence["heartbeat_age"] < timeout + 1.0
    assert history.epoch == [0, 1]
    print(f"measured first step {first_step:.2f}s, timeout {timeout:.1f}s, the whole run {elapsed:.1f}s")
    assert elapsed < 120.0  # three worker starts (~8 s each on an idle 2-core machine) and the timeout
