"""resilient.fit gives what model.fit gives: History, callback logs and callback objects, after any restart.

Every comparison is against ``model.fit`` itself (and an uninterrupted resilient.fit) on the same data,
seed and initial weights with ``shuffle=False``, never against numbers written down.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

import resilient
from resilient._rundir import RunDir
from tests.conftest import make_data, make_model

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("no_leftover_processes")]

N, VAL, BATCH, EPOCHS, SEED = 256, 64, 32, 2, 7  # 8 steps an epoch, 16 in all
STEPS = N // BATCH
NEVER = 10_000  # checkpoint_every: only epoch-end checkpoints exist


def _data():
    x, y = make_data(N + VAL)
    return (x[:N], y[:N]), (x[N:], y[N:])


def _recorder():
    """A callback that collects the logs it receives at each epoch end (defined here: carried by value)."""
    import keras

    class Recorder(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.logs: list[dict] = []
            self.began = 0
            self.end_logs: dict | None = None

        def on_train_begin(self, logs=None):
            self.began += 1

        def on_epoch_end(self, epoch, logs=None):
            self.logs.append({"epoch": epoch, **{k: float(v) for k, v in (logs or {}).items()}})

        def on_train_end(self, logs=None):
            self.end_logs = None if logs is None else {k: float(v) for k, v in logs.items()}

    return Recorder()


def _keras_fit(epochs=EPOCHS, callbacks=(), validation=True):
    (x, y), val = _data()
    model = make_model()
    hist = model.fit(x, y, batch_size=BATCH, epochs=epochs, validation_data=val if validation else None,
                     shuffle=False, verbose=0, callbacks=list(callbacks))
    return model, hist


def _resilient_fit(run_dir, epochs=EPOCHS, callbacks=(), validation=True, model=None, **kwargs):
    (x, y), val = _data()
    model = make_model() if model is None else model
    kwargs.setdefault("checkpoint_every", NEVER)
    hist = resilient.fit(model, x, y, batch_size=BATCH, epochs=epochs, validation_data=val if validation else None,
                         shuffle=False, verbose=0, seed=SEED, run_dir=run_dir, callbacks=list(callbacks), **kwargs)
    return model, hist


def assert_same_history(got, want):
    assert got.epoch == want.epoch
    assert set(got.history) == set(want.history)
    for key in want.history:
        np.testing.assert_allclose(got.history[key], want.history[key], rtol=1e-5, err_msg=key)


def assert_same_logs(got, want):
    """The logs two Recorders received, at each epoch end and at the training end."""
    assert [sorted(g) for g in got.logs] == [sorted(w) for w in want.logs]
    for g, w in zip(got.logs, want.logs):
        for key in w:
            np.testing.assert_allclose(g[key], w[key], rtol=1e-5, err_msg=f"epoch {w['epoch']} {key}")
    assert (got.end_logs is None) == (want.end_logs is None)
    if want.end_logs is not None:
        assert sorted(got.end_logs) == sorted(want.end_logs)
        for key in want.end_logs:
            np.testing.assert_allclose(got.end_logs[key], want.end_logs[key], rtol=1e-5, err_msg=f"train end {key}")


def assert_same_weights(a, b):
    for wa, wb in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_allclose(wa, wb, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def keras_reference():
    rec = _recorder()
    model, hist = _keras_fit(callbacks=[rec])
    return model, hist, rec


@pytest.fixture(scope="module")
def resilient_reference(tmp_path_factory):
    rec = _recorder()
    run_dir = tmp_path_factory.mktemp("fidelity") / "ref"
    model, hist = _resilient_fit(run_dir, callbacks=[rec])
    return model, hist, rec, run_dir


def test_an_uninterrupted_run_equals_model_fit(keras_reference, resilient_reference):
    k_model, k_hist, k_rec = keras_reference
    model, hist, rec, _ = resilient_reference
    assert_same_history(hist, k_hist)
    assert_same_weights(model, k_model)
    assert_same_logs(rec, k_rec)
    assert hist.params == k_hist.params == {"verbose": 0, "epochs": EPOCHS, "steps": STEPS}
    assert hist.model is model


def test_epoch_end_checkpoints_hold_the_training_metrics_not_the_validation(resilient_reference):
    _, hist, _, run_dir = resilient_reference
    for ckpt in sorted((run_dir / "checkpoints").glob("ckpt-*")):
        epoch = int(ckpt.name.split("-")[1]) // STEPS - 1
        with np.load(ckpt / "metrics.npz") as z:  # loss total, count; accuracy total, count
            total, count, correct, seen = (float(z[f"arr_{i}"]) for i in range(4))
        assert count == seen == N, "counted over the training samples, not the validation's"
        np.testing.assert_allclose(total / count, hist.history["loss"][epoch], rtol=1e-5)
        np.testing.assert_allclose(correct / seen, hist.history["accuracy"][epoch], rtol=1e-5)


@pytest.mark.parametrize(
    ("faults", "every", "resumed_from"),
    [
        # Killed right after the epoch-end checkpoint (after validation), then mid-epoch: both resume at
        # the epoch boundary, where the metrics must start fresh.
        pytest.param("sigkill@8,segfault@12", NEVER, [STEPS, STEPS], marks=[
            pytest.mark.fault("sigkill", "epoch end", incident="killed", outcome="completed; weights, History, "
                              "logs = model.fit", lost="0 steps (right after the epoch-end checkpoint)",
                              corrupted="no"),
            pytest.mark.fault("segfault", "mid-epoch", incident="crash", outcome="completed; weights, History, "
                              "logs = model.fit", lost="4 steps (since the epoch-end checkpoint)", corrupted="no")]),
        # Resumed inside epochs: after the first step of the run, after the first step of an epoch,
        # mid-epoch, and before the last step; the running metrics continue from the checkpoint.
        pytest.param("sigkill@1,sigkill@9,segfault@12,sigkill@15", 1, [1, 9, 12, 15], marks=[
            pytest.mark.fault("sigkill", "last step", incident="killed", outcome="completed; weights, History, "
                              "logs = model.fit", lost="0 steps (checkpoint every step)", corrupted="no"),
            pytest.mark.fault("sigkill", "mid-epoch", incident="killed", outcome="completed; weights, History, "
                              "logs = model.fit", lost="0 steps (checkpoint every step)", corrupted="no")]),
    ],
    ids=["epoch-boundary", "mid-epoch"],
)
def test_history_and_callback_logs_after_restarts_equal_model_fit(
    tmp_path, keras_reference, resilient_reference, faults, every, resumed_from
):
    k_model, k_hist, k_rec = keras_reference
    r_model, r_hist, _, _ = resilient_reference
    rec = _recorder()
    model, hist = _resilient_fit(tmp_path / "run", callbacks=[rec], faults=faults, checkpoint_every=every)
    assert [i.checkpoint_step for i in hist.incidents] == resumed_from
    assert_same_history(hist, r_hist)
    assert_same_history(hist, k_hist)
    assert_same_weights(model, r_model)
    assert_same_weights(model, k_model)
    # The callback's own record, restored from the worker, holds the logs model.fit's callbacks see.
    assert_same_logs(rec, k_rec)
    assert rec.began == 1
    assert hist.params == k_hist.params


def test_fit_again_on_a_finished_run_returns_its_result_at_once(resilient_reference, keras_reference, capsys):
    import keras

    _, k_hist, k_rec = keras_reference
    r_model, r_hist, _, run_dir = resilient_reference
    attempts = len([e for e in RunDir(run_dir).read_events() if e["event"] == "attempt_started"])
    model = make_model()
    rec = _recorder()
    t0 = time.monotonic()
    (x, y), val = _data()
    hist = resilient.fit(model, x, y, batch_size=BATCH, epochs=EPOCHS, validation_data=val, shuffle=False,
                         verbose=1, seed=SEED, run_dir=run_dir, callbacks=[rec], checkpoint_every=NEVER)
    assert time.monotonic() - t0 < 10, "no worker is started for a finished run"
    assert "already complete" in capsys.readouterr().out
    assert len([e for e in RunDir(run_dir).read_events() if e["event"] == "attempt_started"]) == attempts
    assert hist.epoch == r_hist.epoch and hist.history == r_hist.history
    assert hist.params == {**k_hist.params, "verbose": 1}
    assert_same_weights(model, r_model)
    assert int(model.optimizer.iterations.numpy()) == EPOCHS * STEPS
    for a, b in zip(model.optimizer.variables, r_model.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert_same_logs(rec, k_rec)
    assert rec.model is model and isinstance(rec.model, keras.Model)


def _kill_at_train_end(marker):
    """A callback that SIGKILLs its worker in on_train_end, once: after the last epoch-end checkpoint."""
    import os
    import signal

    import keras

    class KillAtTrainEnd(keras.callbacks.Callback):
        def on_train_end(self, logs=None):
            if not os.path.exists(marker):
                open(marker, "w").close()
                os.kill(os.getpid(), signal.SIGKILL)

    return KillAtTrainEnd()


@pytest.mark.parametrize(
    ("faults", "kill_at_end", "kinds"),
    [
        # SIGTERM in the last step: saved at the end
        pytest.param(f"preempt@{EPOCHS * STEPS - 1}", False, ["preempted"], marks=pytest.mark.fault(
            "preempt", "last step", incident="preempted", outcome="completed by an attempt with nothing left to "
            "train; = model.fit", lost="0 steps", corrupted="no")),
        # SIGKILL after the last epoch-end checkpoint, before the final one
        pytest.param(None, True, ["killed"], marks=pytest.mark.fault(
            "sigkill", "epoch end", incident="killed", outcome="completed by an attempt with nothing left to train; "
            "= model.fit", lost="0 steps (after the last epoch-end checkpoint)", corrupted="no")),
    ],
    ids=["preempt-last-step", "sigkill-after-last-checkpoint"],
)
def test_an_attempt_with_nothing_left_to_train_completes_the_run(
    tmp_path, keras_reference, faults, kill_at_end, kinds
):
    k_model, k_hist, k_rec = keras_reference
    rec = _recorder()
    cbs = [rec] + ([_kill_at_train_end(str(tmp_path / "killed"))] if kill_at_end else [])
    model, hist = _resilient_fit(tmp_path / "run", callbacks=cbs, faults=faults)
    assert [i.kind for i in hist.incidents] == kinds
    ended = [e for e in RunDir(tmp_path / "run").read_events() if e["event"] == "attempt_ended"]
    assert [e["returncode"] for e in ended][-1] == 0
    assert_same_history(hist, k_hist)
    assert_same_weights(model, k_model)
    assert_same_logs(rec, k_rec)
    assert hist.params == k_hist.params


def test_epochs_zero_is_model_fit_epochs_zero(tmp_path):
    rec_k, rec_r = _recorder(), _recorder()
    _, k_hist = _keras_fit(epochs=0, callbacks=[rec_k])
    model = make_model()
    before = [w.copy() for w in model.get_weights()]
    _, hist = _resilient_fit(tmp_path / "run", epochs=0, callbacks=[rec_r], model=model)
    assert hist.history == k_hist.history == {}
    assert hist.epoch == k_hist.epoch == []
    assert hist.params == k_hist.params
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert rec_r.began == rec_k.began == 1 and rec_r.logs == rec_k.logs == []
    assert_same_logs(rec_r, rec_k)


def test_a_longer_epochs_continues_a_finished_run_like_one_model_fit(tmp_path):
    k_rec = _recorder()
    k_model, k_hist = _keras_fit(epochs=3, callbacks=[k_rec])
    _resilient_fit(tmp_path / "run", epochs=1, callbacks=[_recorder()])
    rec = _recorder()
    model, hist = _resilient_fit(tmp_path / "run", epochs=3, callbacks=[rec])
    assert_same_history(hist, k_hist)
    assert_same_weights(model, k_model)
    assert_same_logs(rec, k_rec)
    assert hist.params == k_hist.params


def _stateful_callbacks():
    import keras

    return [
        keras.callbacks.EarlyStopping(monitor="val_loss", min_delta=0.02, patience=1, restore_best_weights=False),
        keras.callbacks.ReduceLROnPlateau(monitor="loss", min_delta=0.05, factor=0.5, patience=0, verbose=0),
        _recorder(),
    ]


def test_the_callers_callbacks_hold_their_state_as_after_model_fit(tmp_path):
    k_cbs = _stateful_callbacks()
    k_model, k_hist = _keras_fit(epochs=8, callbacks=k_cbs)
    k_es, k_rlr, k_rec = k_cbs
    assert 0 < k_es.stopped_epoch < 7, "the reference should stop early for the comparison to mean something"
    cbs = _stateful_callbacks()
    collected = cbs[2].logs  # a list handed out before fit holds the values too
    model, hist = _resilient_fit(tmp_path / "run", epochs=8, callbacks=cbs)
    es, rlr, rec = cbs
    assert_same_history(hist, k_hist)
    assert_same_weights(model, k_model)
    for attr in ("wait", "stopped_epoch", "best_epoch", "patience"):
        assert getattr(es, attr) == getattr(k_es, attr), attr
    np.testing.assert_allclose(es.best, k_es.best, rtol=1e-5)
    for attr in ("wait", "cooldown_counter"):
        assert getattr(rlr, attr) == getattr(k_rlr, attr), attr
    np.testing.assert_allclose(rlr.best, k_rlr.best, rtol=1e-5)
    np.testing.assert_allclose(float(model.optimizer.learning_rate), float(k_model.optimizer.learning_rate))
    assert_same_logs(rec, k_rec)
    assert collected is rec.logs and len(collected) == len(k_hist.epoch)
    for cb, k_cb in zip(cbs, k_cbs):
        assert cb.model is model
        assert cb.params == k_cb.params
    assert hist.params == k_hist.params
    # Called again, the finished (early-stopped) run returns the same, without training on.
    cbs2 = _stateful_callbacks()
    again_model, again = _resilient_fit(tmp_path / "run", epochs=8, callbacks=cbs2)
    assert again.history == hist.history and again.epoch == hist.epoch
    assert cbs2[0].stopped_epoch == es.stopped_epoch and cbs2[2].logs == rec.logs
    assert_same_weights(again_model, model)


def _kill_in_validation(marker, signum):
    """A callback that sends its worker ``signum`` at the first validation batch, once (epoch 0's validation)."""
    import os

    import keras

    class KillInValidation(keras.callbacks.Callback):
        def on_test_batch_begin(self, batch, logs=None):
            if not os.path.exists(marker):
                open(marker, "w").close()
                os.kill(os.getpid(), signum)

    return KillInValidation()


@pytest.mark.parametrize(
    ("faults", "every", "in_validation", "kinds", "resumed_from"),
    [
        # Before the first compiled step of the run: nothing saved yet, the run starts over.
        pytest.param("segfault@0", NEVER, None, ["crash"], [None], id="segfault-first-step", marks=pytest.mark.fault(
            "segfault", "first step", incident="crash", outcome="completed; weights, History, logs = model.fit",
            lost="0 steps (nothing trained yet)", corrupted="no")),
        # SIGTERM in the first step: it finishes, is saved, and the run resumes after it.
        pytest.param("preempt@0", NEVER, None, ["preempted"], [1], id="preempt-first-step", marks=pytest.mark.fault(
            "preempt", "first step", incident="preempted", outcome="completed; weights, History, logs = model.fit",
            lost="0 steps (saved on SIGTERM)", corrupted="no")),
        # In the last step of the run, 3 steps after the last step checkpoint.
        pytest.param(f"abort@{EPOCHS * STEPS - 1}", 4, None, ["crash"], [12], id="abort-last-step",
                     marks=pytest.mark.fault(
                         "abort", "last step", incident="crash", outcome="completed; weights, History, logs = "
                         "model.fit", lost="3 steps (since the checkpoint at step 12)", corrupted="no")),
        # During epoch 0's validation, after its 8 steps, before the epoch-end checkpoint.
        pytest.param(None, 3, "SIGKILL", ["killed"], [6], id="sigkill-in-validation", marks=pytest.mark.fault(
            "sigkill", "validation", incident="killed", outcome="completed; weights, History, logs = model.fit",
            lost="2 steps and the validation (since the checkpoint at step 6)", corrupted="no")),
        # SIGTERM during epoch 0's validation: the validation finishes, the epoch-end checkpoint is saved.
        pytest.param(None, 3, "SIGTERM", ["preempted"], [STEPS], id="sigterm-in-validation", marks=pytest.mark.fault(
            "preempt", "validation", incident="preempted", outcome="completed; weights, History, logs = model.fit",
            lost="0 steps (the epoch-end checkpoint is written before the exit)", corrupted="no")),
    ],
)
def test_a_fault_at_the_first_or_last_step_or_in_validation_still_equals_model_fit(
    tmp_path, keras_reference, faults, every, in_validation, kinds, resumed_from
):
    k_model, k_hist, k_rec = keras_reference
    rec = _recorder()
    import signal

    cbs = [rec] + ([_kill_in_validation(str(tmp_path / "killed"), getattr(signal, in_validation))]
                   if in_validation else [])
    model, hist = _resilient_fit(tmp_path / "run", callbacks=cbs, faults=faults, checkpoint_every=every)
    assert [i.kind for i in hist.incidents] == kinds
    assert [i.checkpoint_step for i in hist.incidents] == resumed_from
    assert_same_history(hist, k_hist)
    assert_same_weights(model, k_model)
    assert_same_logs(rec, k_rec)
    assert int(model.optimizer.iterations.numpy()) == EPOCHS * STEPS
