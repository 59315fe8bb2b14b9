"""End-to-end: real worker subprocesses, real signals, real TensorFlow on a tiny model (CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

import resilient
from resilient._rundir import RunDir
from resilient.supervisor.memory import cgroup_support
from tests.conftest import make_data, make_model

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("no_leftover_processes")]

EPOCHS = 2
BATCH = 32  # 256 samples -> 8 steps per epoch, 16 in all


def events(run_dir: Path, name: str | None = None) -> list[dict]:
    evs = RunDir(run_dir).read_events()
    return [e for e in evs if name is None or e["event"] == name]


def test_clean_run_completes_and_caller_model_holds_trained_weights(tmp_path):
    x, y = make_data()
    model = make_model()
    before = [w.copy() for w in model.get_weights()]
    history = resilient.fit(model, x, y, epochs=EPOCHS, batch_size=BATCH, seed=1, run_dir=tmp_path / "run", verbose=0)

    assert history.epoch == [0, 1]
    assert set(history.history) >= {"loss", "accuracy"} and len(history.history["loss"]) == EPOCHS
    assert history.incidents == []
    assert history.plan == resilient.Plan(batch_size=BATCH)
    assert any(not np.allclose(a, b) for a, b in zip(before, model.get_weights()))
    # The caller's optimizer carries the worker's state, exactly as after model.fit.
    assert int(model.optimizer.iterations.numpy()) == EPOCHS * 8
    names = [e["event"] for e in events(tmp_path / "run")]
    for required in ("run_started", "attempt_started", "checkpoint_saved", "attempt_ended", "run_finished"):
        assert required in names
    finished = events(tmp_path / "run", "run_finished")[-1]
    assert finished["status"] == "completed"
    for e in events(tmp_path / "run"):
        assert e["time"].endswith("Z") and "T" in e["time"]
    # The final checkpoint holds exactly the weights now in the caller's model.
    ckpts = sorted((tmp_path / "run" / "checkpoints").glob("ckpt-*"))
    assert len(ckpts) >= 2
    with np.load(ckpts[-1] / "weights.npz") as z:
        for i, w in enumerate(model.get_weights()):
            np.testing.assert_array_equal(z[f"arr_{i}"], w)


def _healed(fault: str, kind: str, outcome: str = "completed; fired once", lost: str = "1 step (since the "
            "checkpoint at step 4)") -> object:
    """A case of test_rehearsed_fault_heals: ``fault`` at step 5 (checkpoints every 2 steps), mid-epoch 0."""
    return pytest.param(f"{fault}@5", kind, id=f"{fault}@5", marks=pytest.mark.fault(
        fault, "mid-epoch", incident=kind, outcome=outcome, lost=lost,
        corrupted="no"))


@pytest.mark.parametrize(
    ("fault", "kind"),
    [
        _healed("gpu_oom", "gpu_oom", "completed; plan degraded (mixed precision, else half batch)"),
        _healed("host_oom", "host_oom", "completed; plan degraded (cgroup or watchdog kill)"),
        _healed("segfault", "crash"),
        _healed("abort", "crash"),
        _healed("sigkill", "killed"),
        _healed("hang", "hang", "completed; killed after hang_timeout (SIGTERM, then SIGKILL)"),
        _healed("preempt", "preempted", lost="0 steps (saved at step 6 on SIGTERM)"),
    ],
)
def test_rehearsed_fault_heals(tmp_path, fault, kind):
    x, y = make_data()
    run_dir = tmp_path / "run"
    history = resilient.fit(
        make_model(), x, y, epochs=EPOCHS, batch_size=BATCH, seed=1, run_dir=run_dir, verbose=0,
        faults=fault, checkpoint_every=2, hang_timeout=3,
    )
    assert [i.kind for i in history.incidents] == [kind]
    assert history.epoch == [0, 1]
    assert len(history.history["loss"]) == EPOCHS
    incident = history.incidents[0]
    if kind == "preempted":
        # SIGTERM arrives during step 5; the worker finishes it, saves at step 6 and exits.
        assert incident.step == incident.checkpoint_step == 6
    else:
        assert incident.step == 5
        assert incident.checkpoint_step == 4
    fired = events(run_dir, "fault_fired")
    assert [f["fault"] for f in fired] == [fault]  # fired once, never again
    assert json.loads((run_dir / "faults_fired.json").read_text()) == [fault]
    assert events(run_dir, "run_finished")[-1]["status"] == "completed"
    ended = events(run_dir, "attempt_ended")
    assert len(ended) == 2
    expected_signal = {"crash": {"SIGSEGV", "SIGABRT"}, "killed": {"SIGKILL"}, "hang": {"SIGKILL", "SIGTERM"}}
    if kind in expected_signal:
        assert ended[0]["signal"] in expected_signal[kind]
    if kind == "gpu_oom":
        # The default policy's first rung is mixed precision where the hardware runs it (a CPU with
        # bfloat16), and halving the batch where it does not.
        from resilient._fit import _cpu_bf16

        if _cpu_bf16():
            assert (history.plan.precision, history.plan.batch_size) == ("mixed_bfloat16", BATCH)
        else:
            assert (history.plan.precision, history.plan.batch_size) == ("float32", BATCH // 2)
        assert events(run_dir, "plan_changed")[0]["to"] == history.plan.model_dump(mode="json")
    if kind == "host_oom":
        assert incident.evidence.get("source") in {"cgroup", "watchdog"}
        assert history.plan != resilient.Plan(batch_size=BATCH)  # the host_oom ladder degraded the plan
    if kind == "preempted":
        saved = [e for e in events(run_dir, "checkpoint_saved") if e.get("reason") == "preempted"]
        assert saved and saved[0]["step"] >= 5


def _train(tmp_path: Path, name: str, **kwargs):
    x, y = make_data()
    model = make_model()
    history = resilient.fit(model, x, y, epochs=3, batch_size=BATCH, seed=7, run_dir=tmp_path / name, verbose=0,
                            checkpoint_every=3, **kwargs)
    return model, history


@pytest.mark.fault("sigkill", "mid-epoch", incident="killed",
                   outcome="completed; weights, History, iterations exact",
                   lost="1 step (since the checkpoints at steps 3 and 12)", corrupted="no")
def test_exact_resume_after_kill_mid_epoch(tmp_path):
    ref_model, ref = _train(tmp_path, "reference")
    # Killed mid-epoch 0 (step 4, last checkpoint at step 3) and mid-epoch 1 (step 13, checkpoint at 12).
    model, hist = _train(tmp_path, "killed", faults="sigkill@4,sigkill@13")

    assert [i.kind for i in hist.incidents] == ["killed", "killed"]
    assert [i.checkpoint_step for i in hist.incidents] == [3, 12]
    for a, b in zip(ref_model.get_weights(), model.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
    assert hist.epoch == ref.epoch == [0, 1, 2]
    for key in ref.history:
        np.testing.assert_allclose(hist.history[key], ref.history[key], rtol=1e-6, atol=1e-7)
    assert int(model.optimizer.iterations.numpy()) == int(ref_model.optimizer.iterations.numpy()) == 24


@pytest.mark.fault("kill_during_save", "checkpoint save", incident="killed",
                   outcome="completed; weights, History, iterations exact", lost="steps since the previous checkpoint",
                   corrupted="no (previous generation kept; a .tmp-* dir may remain)")
def test_a_kill_in_the_middle_of_a_checkpoint_write_resumes_from_the_previous_generation(tmp_path):
    from resilient._checkpoint import CheckpointStore

    ref_model, ref = _train(tmp_path, "reference")
    # save_kill@4: the first save at or after step 4 is the one at step 6 (every 3 steps); the worker
    # dies after writing the weights and optimizer files of ckpt-6, before its manifest and rename.
    model, hist = _train(tmp_path, "killed", faults="save_kill@4")

    [incident] = hist.incidents
    assert incident.kind == "killed" and incident.signal == "SIGKILL"
    assert incident.checkpoint_step == 3  # the previous generation, intact
    [fired] = events(tmp_path / "killed", "fault_fired")
    assert fired["fault"] == "save_kill@4" and fired["step"] == 6
    ready = events(tmp_path / "killed", "worker_ready")
    assert ready[-1]["resumed_from_step"] == 3
    # Interval saves are written in the background, so the kill came during a background write; the
    # supervisor heard of no generation at step 6: a save is announced only once it is renamed into place.
    saved = events(tmp_path / "killed", "checkpoint_saved")
    interval = [e for e in saved if e["reason"] == "interval"]
    assert interval and all(e["background"] and e["snapshot_seconds"] <= e["seconds"] for e in interval)
    assert [e["step"] for e in saved if e["attempt"] == 0] == [3]
    for a, b in zip(ref_model.get_weights(), model.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
    for key in ref.history:
        np.testing.assert_allclose(hist.history[key], ref.history[key], rtol=1e-6, atol=1e-7)
    assert int(model.optimizer.iterations.numpy()) == int(ref_model.optimizer.iterations.numpy()) == 24
    # Every committed generation verifies; the half-written one never became a generation.
    store = CheckpointStore(tmp_path / "killed" / "checkpoints")
    assert store.generations()
    for path in store.generations():
        store.verify(path)
    assert not [e for e in events(tmp_path / "killed") if "corrupt" in e["event"]]


@pytest.mark.fault("concurrent_fit", "mid-epoch", incident="none (refused: RunDirError)",
                   outcome="second call refused in < 5 s, no second run started; the first completes", lost="0 steps",
                   corrupted="no")
def test_a_second_fit_on_a_run_dir_in_training_is_refused_and_the_first_completes(tmp_path):
    import threading

    import keras

    class Slow(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if batch == 2:
                time.sleep(4)  # holds the first call mid-epoch while the second one is made

    x, y = make_data()
    run_dir = tmp_path / "run"
    first: dict = {}

    def train() -> None:
        try:
            first["history"] = resilient.fit(make_model(), x, y, epochs=1, batch_size=BATCH, seed=1, run_dir=run_dir,
                                             verbose=0, callbacks=[Slow()], hang_timeout=60)
        except BaseException as e:  # handed to the test thread
            first["error"] = e

    thread = threading.Thread(target=train)
    thread.start()
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (run_dir.exists() and events(run_dir, "worker_ready")):
            time.sleep(0.1)
        assert events(run_dir, "worker_ready"), "the first call never started its worker"
        before = len(events(run_dir))
        start = time.monotonic()
        with pytest.raises(resilient.RunDirError, match="Another live process is training in"):
            resilient.fit(make_model(), x, y, epochs=1, batch_size=BATCH, seed=1, run_dir=run_dir, verbose=0)
        assert time.monotonic() - start < 5
        assert len([e for e in events(run_dir) if e["event"] == "run_started"]) == 1
    finally:
        thread.join(timeout=120)
    assert "error" not in first, first.get("error")
    assert first["history"].epoch == [0] and first["history"].incidents == []
    assert len(events(run_dir)) > before
    assert events(run_dir, "run_finished")[-1]["status"] == "completed"


@pytest.mark.fault("user_bug", "mid-epoch", incident="user_error",
                   outcome="UserCodeError with the traceback, no restart; the last checkpoint kept",
                   lost="no restart", corrupted="no")
def test_user_bug_raises_promptly_without_restart(tmp_path):
    import keras

    class Buggy(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 3:
                raise ValueError("user bug at batch 3")

    x, y = make_data()
    run_dir = tmp_path / "run"
    start = time.monotonic()
    with pytest.raises(resilient.UserCodeError) as info:
        resilient.fit(make_model(), x, y, epochs=EPOCHS, batch_size=BATCH, seed=1, run_dir=run_dir, verbose=0,
                      callbacks=[Buggy()], checkpoint_every=2)
    assert time.monotonic() - start < 60
    message = str(info.value)
    assert "ValueError" in message and "user bug at batch 3" in message and "Traceback" in message
    assert len(events(run_dir, "attempt_started")) == 1
    assert events(run_dir, "run_finished")[-1]["status"] == "user_error"
    assert events(run_dir, "incident")[0]["kind"] == "user_error"
    assert list((run_dir / "checkpoints").glob("ckpt-*")), "the last checkpoint is kept"


@pytest.mark.fault("abort", "mid-epoch", incident="crash",
                   outcome="TrainingFailedError with a root-cause report (restarts exhausted)",
                   lost="the run stops at its last checkpoint", corrupted="no")
def _user_bug(phase: str, hook: str) -> object:
    return pytest.param(hook, id=hook, marks=pytest.mark.fault(
        "user_bug", phase, incident="user_error", outcome="UserCodeError with the traceback, no restart",
        lost="no restart", corrupted="no"))


@pytest.mark.parametrize("hook", [_user_bug("first step", "on_train_begin_batch_0"),
                                  _user_bug("validation", "on_test_batch_begin"),
                                  _user_bug("epoch end", "on_epoch_end")])
def test_a_user_bug_at_the_first_step_in_validation_or_at_epoch_end_raises_without_restart(tmp_path, hook):
    import keras

    class Buggy(keras.callbacks.Callback):
        def __init__(self, where: str) -> None:
            super().__init__()
            self.where = where

        def on_train_batch_begin(self, batch, logs=None):
            if self.where == "on_train_begin_batch_0":
                raise ValueError(f"user bug in {self.where}")

        def on_test_batch_begin(self, batch, logs=None):
            if self.where == "on_test_batch_begin":
                raise ValueError(f"user bug in {self.where}")

        def on_epoch_end(self, epoch, logs=None):
            if self.where == "on_epoch_end":
                raise ValueError(f"user bug in {self.where}")

    x, y = make_data()
    run_dir = tmp_path / "run"
    with pytest.raises(resilient.UserCodeError) as info:
        resilient.fit(make_model(), x[:192], y[:192], epochs=EPOCHS, batch_size=BATCH, seed=1, run_dir=run_dir,
                      verbose=0, validation_data=(x[192:], y[192:]), callbacks=[Buggy(hook)], checkpoint_every=2)
    assert f"user bug in {hook}" in str(info.value) and "Traceback" in str(info.value)
    assert len(events(run_dir, "attempt_started")) == 1
    assert events(run_dir, "run_finished")[-1]["status"] == "user_error"


def test_restarts_exhausted_raise_a_root_cause_report(tmp_path):
    x, y = make_data()
    run_dir = tmp_path / "run"
    with pytest.raises(resilient.TrainingFailedError) as info:
        resilient.fit(make_model(), x, y, epochs=EPOCHS, batch_size=BATCH, seed=1, run_dir=run_dir, verbose=0,
                      faults="segfault@3,abort@4", max_restarts=1, checkpoint_every=2)
    report = str(info.value)
    assert "restarts exhausted (max_restarts=1)" in report
    assert "SIGSEGV" in report and "SIGABRT" in report
    assert report.count("batch=32 float32") >= 2  # every attempt with its plan
    assert "Last checkpoint: step 4" in report or "Last checkpoint: step 2" in report
    assert "MiB" in report  # memory peak of each attempt
    assert str(run_dir) in report
    assert [i.kind for i in info.value.incidents] == ["crash", "crash"]
    assert events(run_dir, "run_finished")[-1]["status"] == "failed"


SUPERVISOR_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {root!r})
    from tests.conftest import make_data, make_model
    import resilient
    x, y = make_data()
    resilient.fit(make_model(), x, y, epochs=50, batch_size=8, seed=1, run_dir={run_dir!r}, verbose=0,
                  faults="hang@10", hang_timeout=600)
    """
)


@pytest.mark.fault("caller_sigkill", "mid-epoch", incident="none (the supervisor is gone)",
                   outcome="the worker dies with its supervisor, no orphan",
                   lost="the steps since the last checkpoint, kept for a later fit", corrupted="no")
def test_killing_the_supervisor_leaves_no_worker(tmp_path):
    run_dir = tmp_path / "run"
    script = SUPERVISOR_SCRIPT.format(root=str(Path(__file__).resolve().parent.parent), run_dir=str(run_dir))
    sup = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        worker_pid = None
        while time.monotonic() < deadline and worker_pid is None:
            ready = [e for e in RunDir(run_dir).read_events() if e["event"] == "fault_fired"]
            if ready:
                worker_pid = [e for e in RunDir(run_dir).read_events() if e["event"] == "worker_ready"][-1]["pid"]
            time.sleep(0.2)
        assert worker_pid is not None, "the worker never reached the hang"
        assert psutil.pid_exists(worker_pid)
        # The worker offers itself to the kernel's OOM killer before the notebook.
        assert Path(f"/proc/{worker_pid}/oom_score_adj").read_text().strip() == "1000"
        os.kill(sup.pid, signal.SIGKILL)
        sup.wait(timeout=10)
        gone = time.monotonic() + 10
        while time.monotonic() < gone and psutil.pid_exists(worker_pid):
            try:
                if psutil.Process(worker_pid).status() == psutil.STATUS_ZOMBIE:
                    break
            except psutil.NoSuchProcess:
                break
            time.sleep(0.1)
        alive = psutil.pid_exists(worker_pid) and psutil.Process(worker_pid).status() != psutil.STATUS_ZOMBIE
        assert not alive, "the worker outlived its supervisor"
    finally:
        if sup.poll() is None:
            sup.kill()
            sup.wait()


@pytest.mark.cgroup
@pytest.mark.fault("host_oom", "mid-epoch", incident="host_oom",
                   outcome="completed after a real kernel OOM kill in the cgroup (evidence: cgroup oom_kills)",
                   lost="the steps since the last checkpoint", corrupted="no")
def test_real_kernel_oom_kill_in_memory_cgroup(tmp_path):
    ok, why = cgroup_support()
    if not ok:
        pytest.skip(f"memory cgroups are not writable on this machine: {why}")
    x, y = make_data()
    run_dir = tmp_path / "run"
    history = resilient.fit(make_model(), x, y, epochs=EPOCHS, batch_size=BATCH, seed=1, run_dir=run_dir,
                            verbose=0, faults="host_oom@4", host_memory_limit="1.5GB", checkpoint_every=2)
    [incident] = history.incidents
    assert incident.kind == "host_oom"
    assert incident.evidence["source"] == "cgroup" and incident.evidence["oom_kills"] >= 1
    assert incident.signal == "SIGKILL"
    assert "OOM killer" in incident.detail
    assert incident.memory_peak_bytes is not None and incident.memory_peak_bytes <= 1.5e9 * 1.01
    enforcement = events(run_dir, "memory_enforcement")
    assert enforcement and enforcement[0]["mechanism"].startswith("cgroup")
    assert history.epoch == [0, 1]
