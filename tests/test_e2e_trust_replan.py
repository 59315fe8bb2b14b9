"""With real workers: a run directory and all it holds are private whatever the umask, one that others could
have written resumes only with trust_run_dir=True, and a plan degraded under a memory limit does not outlive it."""

from __future__ import annotations

import os
import stat

import pytest

import resilient
from resilient._rundir import RunDir
from tests.conftest import make_data, make_model

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("no_leftover_processes")]


def _modes(root) -> dict[str, int]:
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            out[os.path.relpath(path, root)] = stat.S_IMODE(os.lstat(path).st_mode)
    return out


def test_everything_a_run_writes_is_private_under_umask_000_and_others_writable_dirs_resume_only_when_trusted(
        tmp_path, open_umask):
    x, y = make_data(64)
    run_dir = tmp_path / "runs" / "run"
    resilient.fit(make_model(), x, y, epochs=1, batch_size=16, seed=1, run_dir=run_dir, verbose=0,
                  validation_split=0.25, checkpoint_every=2)
    modes = _modes(run_dir)
    assert {"run.json", "plan.json", "events.jsonl", "model.keras", "objects.pkl", "result.json", ".lock",
            "data/x.npy", "attempts/000/worker.log"} <= set(modes)
    assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
    wrong = {p: oct(m) for p, m in modes.items()
             if m != (0o700 if (run_dir / p).is_dir() else 0o600)}
    assert wrong == {}, "files must be 0600 and folders 0700 whatever the umask"

    os.chmod(run_dir, 0o770)  # a shared group could have planted code
    with pytest.raises(resilient.RunDirError, match="A run directory is code"):
        resilient.fit(make_model(), x, y, epochs=2, batch_size=16, seed=1, run_dir=run_dir, verbose=0,
                      validation_split=0.25, checkpoint_every=2)
    history = resilient.fit(make_model(), x, y, epochs=2, batch_size=16, seed=1, run_dir=run_dir, verbose=0,
                            validation_split=0.25, checkpoint_every=2, trust_run_dir=True)
    assert history.epoch == [0, 1]
    ready = [e for e in RunDir(run_dir).read_events() if e["event"] == "worker_ready"]
    assert ready[-1]["resumed_from_step"] == 3  # trained on from the first call's checkpoint


@pytest.mark.fault("host_oom", "worker start-up", incident="host_oom",
                   outcome="failed under the limit; a later call without it trains at the requested batch",
                   lost="0", corrupted="no")
def test_a_plan_degraded_under_a_host_limit_is_re_derived_when_the_limit_is_removed(tmp_path, capsys):
    x, y = make_data(64)
    run_dir = tmp_path / "run"
    args = dict(epochs=1, batch_size=16, seed=2, run_dir=run_dir, checkpoint_every=2)
    with pytest.raises(resilient.TrainingFailedError):
        # 150 MB: the worker is OOM-killed while it imports TensorFlow, in its cgroup (or by the watchdog).
        resilient.fit(make_model(), x, y, host_memory_limit="150MB", max_restarts=2, verbose=0, **args)
    degraded = RunDir(run_dir).read_plan()
    assert degraded.batch_size < 16, "the limit degraded the plan (the premise of the test)"

    history = resilient.fit(make_model(), x, y, verbose=2, **args)
    assert (history.plan.batch_size, history.plan.grad_accum_steps) == (16, 1)
    assert history.params["steps"] == 4  # 64 samples at batch 16, as asked
    out = capsys.readouterr().out
    assert "resource settings changed" in out and "host_memory_limit 143.1 MiB -> none" in out
    assert f"{degraded.describe()} -> batch=16" in out
    changed = [e for e in RunDir(run_dir).read_events() if e.get("cause") == "settings_changed"]
    assert len(changed) == 1 and changed[0]["dropped"] == ["host_oom"]
