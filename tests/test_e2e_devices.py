"""Several devices: the worker trains under MirroredStrategy, here over two logical CPU devices.

``RESILIENT_LOGICAL_CPUS=2`` (a testing aid the worker reads) splits the worker's CPU in two, so
``devices=["cpu:0", "cpu:1"]`` runs the same strategy code path as two GPUs would. A mirrored run's
numerics equal a single-device run of the same global batch only up to the order of the float
reduction, so exactness is checked against an uninterrupted *mirrored* run.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import resilient
from resilient._rundir import RunDir
from resilient.steps import halve_batch
from tests.conftest import make_data, make_model

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("no_leftover_processes")]

TWO = ["cpu:0", "cpu:1"]
KEYS = {"loss", "accuracy", "val_loss", "val_accuracy"}


@pytest.fixture(autouse=True)
def _two_logical_cpus(monkeypatch):
    monkeypatch.setenv("RESILIENT_LOGICAL_CPUS", "2")  # the workers inherit it


def _fit(run_dir, model=None, **kwargs):
    x, y = make_data()
    args = {"epochs": 2, "batch_size": 32, "seed": 4, "verbose": 0, "validation_split": 0.25, "checkpoint_every": 2,
            "devices": TWO, **kwargs}
    return resilient.fit(model if model is not None else make_model(), x, y, run_dir=run_dir, **args)


@pytest.fixture(scope="module")
def mirrored_ref(tmp_path_factory):
    """An uninterrupted two-device run: (its model, its History)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RESILIENT_LOGICAL_CPUS", "2")
        model = make_model()
        history = _fit(tmp_path_factory.mktemp("ref") / "run", model)
    return model, history


def _devices_seen(run_dir):
    return [e["replicas"] for e in RunDir(run_dir).read_events() if e["event"] == "devices"]


@pytest.mark.fault("sigkill", "mid-epoch", incident="killed",
                   outcome="completed under MirroredStrategy (2 devices); weights and History equal the "
                           "uninterrupted mirrored run (1e-6)", lost="1 step", corrupted="no")
@pytest.mark.fault("segfault", "mid-epoch", incident="crash",
                   outcome="completed under MirroredStrategy (2 devices); weights and History equal the "
                           "uninterrupted mirrored run (1e-6)", lost="1 step", corrupted="no")
def test_a_mirrored_run_resumes_exactly_after_a_kill_and_a_segfault(tmp_path, mirrored_ref):
    ref_model, ref = mirrored_ref
    assert ref.plan.replicas == 2 and ref.plan.describe().startswith("batch=32 (2x16)")
    model = make_model()
    history = _fit(tmp_path / "run", model, faults="sigkill@5,segfault@9")
    assert [i.kind for i in history.incidents] == ["killed", "crash"]
    assert _devices_seen(tmp_path / "run") == [2, 2, 2]
    for a, b in zip(ref_model.get_weights(), model.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
    # Validation and the History are those of the uninterrupted run: same keys, same values.
    assert set(history.history) == set(ref.history) == KEYS
    for key in KEYS:
        np.testing.assert_allclose(history.history[key], ref.history[key], rtol=1e-6)


@pytest.mark.fault("sigkill", "mid-epoch", incident="killed",
                   outcome="TrainingFailedError (max_restarts=0) on 2 devices; resumed on 1 device, killed, "
                           "resumed on 2: weights within 1e-5 of the uninterrupted 2-device run",
                   lost="1 step per kill", corrupted="no")
def test_a_two_device_run_resumes_on_one_device_and_back(tmp_path, mirrored_ref):
    ref_model, ref = mirrored_ref
    run_dir = tmp_path / "run"
    faults = "sigkill@5,sigkill@11"
    with pytest.raises(resilient.TrainingFailedError):
        _fit(run_dir, faults=faults, max_restarts=0)  # dies at step 5 on two devices
    with pytest.raises(resilient.TrainingFailedError):
        _fit(run_dir, faults=faults, max_restarts=0, devices="cpu")  # resumes on one, dies at step 11
    assert json.loads(RunDir(run_dir).plan_json.read_text())["replicas"] == 1
    model = make_model()
    history = _fit(run_dir, model, faults=faults, max_restarts=0)  # back on two devices
    assert _devices_seen(run_dir) == [2, 1, 2]
    changes = [e["reason"] for e in RunDir(run_dir).read_events() if e["event"] == "plan_changed"]
    assert changes == ["devices: 2 -> 1 replicas, the global batch kept",
                       "devices: 1 -> 2 replicas, the global batch kept"]
    assert history.plan.replicas == 2 and history.plan.batch_size == 32  # the global batch carried over
    assert set(history.history) == KEYS
    # Steps 4-9 ran on one device: the same global batch, its gradient reduced in another order, so the
    # weights may drift from the mirrored run's by float32 rounding (measured: 6e-8, one ulp near 1.0).
    # 1e-5 leaves a hundredfold margin for that and is still a thousandth of one Adam step (lr 1e-2):
    # a step lost, repeated or taken with another batch would fail it.
    for a, b in zip(ref_model.get_weights(), model.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    np.testing.assert_allclose(history.history["loss"], ref.history["loss"], rtol=1e-5)


@pytest.mark.fault("gpu_oom", "mid-epoch", incident="gpu_oom",
                   outcome="completed under MirroredStrategy; halve_batch halves the per-device batch "
                           "(batch=32 (2x16) -> batch=16 (2x8))", lost="1 step", corrupted="no")
def test_a_gpu_oom_under_the_strategy_halves_the_per_device_batch(tmp_path):
    policy = resilient.Policy(ladders={"gpu_oom": [halve_batch(min_batch=4)]})
    history = _fit(tmp_path / "run", faults="gpu_oom@3", policy=policy)
    incident, = history.incidents
    assert incident.kind == "gpu_oom"
    # The rehearsed OOM is raised as a real one is, naming the device that ran out (the last replica's).
    assert "device:CPU:1" in incident.detail
    assert (incident.device, incident.evidence["device_source"]) == ("CPU:1", "worker report")
    assert history.plan.batch_size == 16 and history.plan.replicas == 2
    assert history.plan.describe().startswith("batch=16 (2x8)")
    assert _devices_seen(tmp_path / "run") == [2, 2]
    assert set(history.history) == KEYS and history.epoch == [0, 1]


@pytest.mark.fault("segfault", "mid-epoch", incident="crash",
                   outcome="completed: fewer_devices drops the 2-device run to 1 device, the global batch kept; "
                           "weights within 1e-5 of the uninterrupted 2-device run", lost="1 step", corrupted="no")
def test_fewer_devices_continues_a_two_device_run_on_one(tmp_path, mirrored_ref):
    from resilient.steps import fewer_devices

    ref_model, ref = mirrored_ref
    model = make_model()
    policy = resilient.Policy(ladders={"crash": [fewer_devices()]})
    history = _fit(tmp_path / "run", model, faults="segfault@5", policy=policy)
    assert [(i.kind, i.plan_before.replicas, i.plan_after.replicas) for i in history.incidents] == [("crash", 2, 1)]
    assert history.plan.replicas == 1 and history.plan.batch_size == 32
    assert _devices_seen(tmp_path / "run") == [2, 1]  # what each worker trained on, in its own words
    changes = [e for e in RunDir(tmp_path / "run").read_events() if e["event"] == "plan_changed"]
    assert [(c["from"]["replicas"], c["to"]["replicas"]) for c in changes] == [(2, 1)]
    assert "fewer_devices" in changes[0]["reason"]
    assert json.loads(RunDir(tmp_path / "run").plan_json.read_text())["replicas"] == 1
    # The same global batch on one device: equal to the mirrored run up to float reduction order (see above).
    for a, b in zip(ref_model.get_weights(), model.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    assert set(history.history) == KEYS and history.epoch == [0, 1]
    np.testing.assert_allclose(history.history["loss"], ref.history["loss"], rtol=1e-5)
    np.testing.assert_allclose(history.history["val_loss"], ref.history["val_loss"], rtol=1e-5)


def _counting_callback():
    """A user callback with state: the batches and epochs it saw, and the validation loss at each epoch's end."""
    import keras

    class Count(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.batches, self.epochs, self.val_loss = 0, [], []

        def on_train_batch_end(self, batch, logs=None):
            self.batches += 1

        def on_epoch_end(self, epoch, logs=None):
            self.epochs.append(epoch)
            self.val_loss.append(float(logs["val_loss"]))

    return Count()


@pytest.mark.fault("host_oom", "mid-epoch", incident="host_oom",
                   outcome="completed under MirroredStrategy (2 devices) with the same plan; weights, History and "
                           "a user callback's state equal the uninterrupted mirrored run (1e-6)",
                   lost="the steps since the last checkpoint", corrupted="no")
@pytest.mark.fault("preempt", "mid-epoch", incident="preempted",
                   outcome="completed under MirroredStrategy (2 devices); the SIGTERM checkpoint resumes exactly: "
                           "weights, History and a user callback's state equal the uninterrupted mirrored run (1e-6)",
                   lost="0 steps", corrupted="no")
def test_a_mirrored_run_resumes_exactly_after_a_host_oom_and_a_preemption(tmp_path, mirrored_ref):
    ref_model, ref = mirrored_ref
    model, counter = make_model(), _counting_callback()
    # Empty ladders: each restart keeps the 2-device plan, so the weights can be compared exactly.
    history = _fit(tmp_path / "run", model, faults="host_oom@3,preempt@8", policy=resilient.Policy(ladders={}),
                   callbacks=[counter])
    assert [i.kind for i in history.incidents] == ["host_oom", "preempted"]
    # The rehearsal's limit, enforced by the kernel in a memory cgroup where the machine allows one, else the watchdog.
    assert history.incidents[0].evidence["source"] in ("cgroup", "watchdog")
    assert all(i.plan_after == i.plan_before for i in history.incidents) and history.plan.replicas == 2
    assert _devices_seen(tmp_path / "run") == [2, 2, 2]
    saved = [e["reason"] for e in RunDir(tmp_path / "run").read_events() if e["event"] == "checkpoint_saved"]
    assert "preempted" in saved
    for a, b in zip(ref_model.get_weights(), model.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
    assert set(history.history) == KEYS and history.epoch == [0, 1]
    for key in KEYS:
        np.testing.assert_allclose(history.history[key], ref.history[key], rtol=1e-6)
    # The caller's callback holds the state of one uninterrupted run: 6 steps an epoch, no step counted twice.
    assert (counter.batches, counter.epochs) == (12, [0, 1])
    np.testing.assert_allclose(counter.val_loss, ref.history["val_loss"], rtol=1e-6)
