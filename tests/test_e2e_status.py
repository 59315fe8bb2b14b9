"""End-to-end, real TensorFlow workers on CPU: ``resilient status --follow`` watching a live run started by another
process (a rehearsed segfault mid-run), and the memory samples a real run journals."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from resilient._rundir import RunDir

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("no_leftover_processes")]

ROOT = Path(__file__).resolve().parent.parent
MB = 1 << 20
CALLER = textwrap.dedent(
    """
    from tests.conftest import make_data, make_model
    import resilient
    x, y = make_data()
    resilient.fit(make_model(), x, y, epochs=4, batch_size=32, seed=1, run_dir={run_dir!r}, verbose=0,
                  faults="segfault@10", checkpoint_every=4)
    """
)


@pytest.mark.timeout(240)
@pytest.mark.fault("segfault", "mid-epoch", incident="crash", outcome="completed; `status --follow` in another "
                   "process printed each epoch and the incident live and exited by itself at the end",
                   lost="steps since the last checkpoint (2)", corrupted="no")
def test_status_follow_watches_a_live_run_to_its_end(tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    caller = subprocess.Popen([sys.executable, "-c", CALLER.format(run_dir=str(run_dir))], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    follower = None
    try:
        deadline = time.monotonic() + 60
        while not (run_dir / "run.json").exists() and time.monotonic() < deadline and caller.poll() is None:
            time.sleep(0.1)
        assert (run_dir / "run.json").exists(), caller.communicate()[0]
        follower = subprocess.Popen([sys.executable, "-m", "resilient", "status", str(run_dir), "--follow"], cwd=ROOT,
                                    env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        caller_out, _ = caller.communicate(timeout=180)
        assert caller.returncode == 0, caller_out
        # It exits by itself once the run journals run_finished (within a poll), not when killed.
        out, _ = follower.communicate(timeout=30)
    finally:
        for proc in (caller, follower):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    print(out)
    assert follower.returncode == 0, out
    lines = out.splitlines()
    assert lines[0].startswith(f"following {run_dir}: running"), "it followed a live run, not a finished one"
    for epoch in range(1, 5):
        assert any(line.startswith(f"epoch {epoch}/4 done at step {8 * epoch}: accuracy=") for line in lines), out
    incident, = [line for line in lines if line.startswith("incident:")]
    assert incident.startswith("incident: crash in attempt 0 at epoch 2, step 10: ")
    assert incident.index("incident") < out.index("attempt 1 started")
    assert lines[-1] == "run finished: completed"
    assert "\r" not in out  # a pipe, not a terminal: plain lines
    events = RunDir(run_dir).read_events()
    ready = [e for e in events if e["event"] == "worker_ready"]
    assert ready[1]["step"] == 8  # resumed from the checkpoint at step 8: 2 steps lost

    # The same run's memory telemetry: samples from both attempts, a real worker's RSS, and the attempt's peak.
    for attempt in (0, 1):
        samples = [e for e in events if e["event"] == "memory_sample" and e["attempt"] == attempt]
        ended = next(e for e in events if e["event"] == "attempt_ended" and e["attempt"] == attempt)
        assert len(samples) >= 2, f"attempt {attempt}: its first sample and its end at least"
        rss = [s["rss_bytes"] for s in samples if s["rss_bytes"] is not None]
        assert 50 * MB < max(rss) < 8192 * MB, rss  # TensorFlow loaded: tens to hundreds of MB
        assert max(rss) == ended["memory_peak_bytes"]
        assert samples[-1]["host_limit_bytes"] is None and samples[-1]["limit_mechanism"] is None
    print(f"{sum(e['event'] == 'memory_sample' for e in events)} memory samples, peaks "
          f"{[e['memory_peak_bytes'] // MB for e in events if e['event'] == 'attempt_ended']} MiB")
