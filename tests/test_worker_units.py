"""Worker pieces that need TensorFlow but no subprocess: schedules, optimizer state by meaning."""

from __future__ import annotations

import numpy as np
import pytest

from resilient.worker.model import per_update_schedule
from resilient.worker.state import optimizer_state, restore_optimizer_state
from tests.conftest import make_data, make_model


def test_per_update_schedule_counts_optimizer_updates_not_micro_steps():
    import keras

    base = keras.optimizers.schedules.ExponentialDecay(1e-2, decay_steps=10, decay_rate=0.5)
    wrapped = per_update_schedule(base, accum=4)
    for update in (0, 1, 7, 25):
        for micro in range(4):
            np.testing.assert_allclose(float(wrapped(update * 4 + micro)), float(base(update)), rtol=1e-6)


def test_optimizer_state_carries_across_gradient_accumulation_by_meaning():
    import keras

    x, y = make_data(n=64)
    model = make_model()
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)  # 4 updates
    state = optimizer_state(model)
    assert int(state["meta:iterations"]) == 4

    rebuilt = make_model()
    rebuilt.compile(optimizer=keras.optimizers.Adam(1e-2, gradient_accumulation_steps=2),
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    skipped = restore_optimizer_state(rebuilt, state)
    assert skipped == []
    assert int(rebuilt.optimizer.iterations.numpy()) == 4  # still counts updates
    assert int(rebuilt.optimizer._iterations.numpy()) == 8  # micro-steps under accumulation
    # The two models' layers have different names in this process; the moments still line up.
    after = optimizer_state(rebuilt)
    moments = [k for k in state if k.endswith((":momentum", ":velocity"))]
    assert len(moments) == 2 * len(model.trainable_variables)
    for key in moments:
        np.testing.assert_array_equal(after[key], state[key])
    assert any(k.endswith(":gradient_accumulator") for k in after)


def test_carry_window_maps_a_partial_window_onto_another_micro_batch():
    from resilient.worker.state import carry_window

    assert carry_window(2, 0, 32, 4, 16) == (0, 1.0)  # at an update: nothing to carry
    assert carry_window(4, 3, 16, 4, 16) == (3, 1.0)  # same plan
    assert carry_window(2, 1, 32, 4, 16) == (2, 2.0)  # 32 samples = two micro-steps of 16
    assert carry_window(8, 2, 8, 4, 16) == (1, 0.5)  # 16 samples = one micro-step of 16
    assert carry_window(8, 1, 8, 4, 16) is None  # 8 samples are half a micro-step of 16
    assert carry_window(8, 4, 8, 2, 32) == (1, 0.25)  # 32 samples = one micro-step of 32
    assert carry_window(2, 1, 32, 1, 64) is None  # no accumulation to continue in
    assert carry_window(2, 1, 32, 2, 16) is None  # another effective batch: another window


def test_a_partial_window_continues_under_a_smaller_micro_batch_with_the_same_update():
    import keras

    x, y = make_data(n=64)

    def compiled(accum):
        # SGD: the update is linear in the gradient, so only the accumulation's arithmetic is compared
        # (Adam's first step is lr * sign(g), which float rounding can flip where g is ~0).
        model = make_model(metrics=False)
        model.compile(optimizer=keras.optimizers.SGD(0.5, gradient_accumulation_steps=accum),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return model

    reference = compiled(None)
    reference.fit(x, y, batch_size=64, epochs=1, verbose=0, shuffle=False)  # one update on 64 samples

    before = compiled(2)
    before.fit(x[:32], y[:32], batch_size=32, epochs=1, verbose=0, shuffle=False)  # half a window of 32x2
    state = optimizer_state(before)
    assert (int(state["meta:iterations"]), int(state["meta:micro_steps"])) == (0, 1)

    after = compiled(4)
    after.set_weights(before.get_weights())
    restore_optimizer_state(after, state, saved_batch=32, batch=16)
    assert int(after.optimizer._iterations.numpy()) == 2  # two of four micro-steps of 16 done
    after.fit(x[32:], y[32:], batch_size=16, epochs=1, verbose=0, shuffle=False)  # the last two
    assert int(after.optimizer.iterations.numpy()) == 1
    for a, b in zip(reference.get_weights(), after.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)


def test_a_checkpoint_round_trips_model_optimizer_metrics_and_callbacks_with_its_meta(tmp_path):
    import keras

    from resilient._checkpoint import CheckpointStore
    from resilient._protocol import CheckpointMeta
    from resilient.worker import state

    x, y = make_data(n=64)
    model = make_model()
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
    stopper = keras.callbacks.EarlyStopping(patience=3)
    stopper.wait, stopper.best = 2, 0.25
    meta = CheckpointMeta(epoch=1, offset=32, global_step=6, epochs_done=[0], history={"loss": [0.5]},
                          plan={"batch_size": 16}, attempt=0, reason="interval", weight_paths=[w.path for w in model.weights])
    metrics = [np.asarray(v.numpy()) for v in model.metrics_variables]
    store = CheckpointStore(tmp_path / "checkpoints")
    state.save(store, model, meta, metrics, [stopper])

    fresh = make_model(seed=1)
    restored = state.restore(store.latest(), fresh, batch_size=16)
    assert restored.step == 6 and restored.meta == meta
    assert store.latest().meta == meta.model_dump(mode="json")  # the manifest holds the meta as plain JSON
    for a, b in zip(model.get_weights(), fresh.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert int(fresh.optimizer.iterations.numpy()) == int(model.optimizer.iterations.numpy())
    assert restored.skipped == []
    assert [m.shape for m in restored.metric_values] == [m.shape for m in metrics]  # mid-epoch: metrics continue
    assert restored.callback_states[0]["wait"] == 2 and restored.callback_states[0]["best"] == 0.25
    assert "model" not in restored.callback_states[0]


def test_the_continuing_callback_list_begins_and_ends_one_training_across_fit_calls():
    import keras

    from resilient.worker.callbacks import ContinuingCallbackList

    class Recorder(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.events, self.restored = [], None

        def on_train_begin(self, logs=None):
            self.events.append("begin")

        def on_epoch_begin(self, epoch, logs=None):
            self.events.append(f"epoch{epoch}")

        def on_train_end(self, logs=None):
            self.events.append("end")

    x, y = make_data(n=32)
    model = make_model()
    rec = Recorder()
    cbl = ContinuingCallbackList([rec], resume_states=[(rec, {"restored": "yes"})], add_history=True, model=model,
                                 epochs=2, verbose=0)
    assert isinstance(cbl, keras.callbacks.CallbackList) and type(cbl) is ContinuingCallbackList
    cbl.begin_training()
    assert rec.restored == "yes"  # the saved state lands after on_train_begin, which would reset it
    for epoch in range(2):
        model.fit(x, y, batch_size=16, epochs=epoch + 1, initial_epoch=epoch, callbacks=cbl, verbose=0)
    cbl.end_training()
    assert rec.events == ["begin", "epoch0", "epoch1", "end"]


def test_a_rehearsed_fault_fires_once_and_is_recorded_before_it_fires(tmp_path):
    import threading

    from resilient._faults import FiredFaults, parse_faults
    from resilient._protocol import ChannelWriter
    from resilient.worker.faults import FaultSchedule

    model = make_model()
    fired = FiredFaults(tmp_path / "faults_fired.json")
    schedule = FaultSchedule(parse_faults("nan@3"), fired, ChannelWriter(None), threading.Event())
    schedule.at(2, model)
    assert fired.load() == set() and np.isfinite(model.trainable_variables[0].numpy()).all()
    schedule.at(3, model)
    assert fired.load() == {"nan@3"} and np.isnan(model.trainable_variables[0].numpy()).all()
    # Every trainable variable: the output layer's too, so no activation can turn the loss finite again.
    assert all(np.isnan(v.numpy()).all() for v in model.trainable_variables)
    model.trainable_variables[0].assign(np.zeros(model.trainable_variables[0].shape, dtype="float32"))
    schedule.at(3, model)  # a later attempt at the same step: already met
    assert np.isfinite(model.trainable_variables[0].numpy()).all()


def test_a_save_kill_is_due_at_the_first_save_at_or_after_its_step_and_never_at_a_step(tmp_path):
    import threading

    from resilient._faults import FiredFaults, parse_faults
    from resilient._protocol import ChannelWriter
    from resilient.worker.faults import FaultSchedule

    fired = FiredFaults(tmp_path / "faults_fired.json")
    schedule = FaultSchedule(parse_faults("save_kill@4"), fired, ChannelWriter(None), threading.Event())
    schedule.at(4, model=None)  # met by a save, not by the step: nothing happens here
    assert fired.load() == set()
    assert schedule.during_save(3) is None
    assert callable(schedule.during_save(6))  # the first save at or after step 4
    fired.record(parse_faults("save_kill@4")[0])
    assert schedule.during_save(9) is None  # fired once, never again
    assert FaultSchedule((), fired, ChannelWriter(None), threading.Event()).during_save(6) is None


def test_the_worker_reports_what_was_raised_and_leaves_the_judging_to_the_supervisor(tmp_path):
    from resilient._protocol import ErrorReport
    from resilient.worker.__main__ import _write_report

    try:
        try:
            raise MemoryError("no room")
        except MemoryError as inner:
            raise RuntimeError("the input pipeline failed") from inner
    except RuntimeError as exc:
        _write_report(tmp_path, exc, None)
    report = ErrorReport.model_validate_json((tmp_path / "error.json").read_text())
    assert report.kind is None  # classified by the supervisor from the facts below
    assert (report.type, report.message) == ("RuntimeError", "the input pipeline failed")
    assert [c.type for c in report.causes] == ["MemoryError"]
    assert "raise RuntimeError" in report.traceback

    _write_report(tmp_path, None, None, kind="preempted")
    report = ErrorReport.model_validate_json((tmp_path / "error.json").read_text())
    assert (report.kind, report.type, report.traceback) == ("preempted", None, "")


def test_the_auto_checkpoint_interval_keeps_the_snapshot_and_the_write_under_one_percent():
    from resilient.worker.attempt import AUTO_CEILING, AUTO_FLOOR, auto_interval

    assert auto_interval(None) == AUTO_FLOOR == 5.0  # before the first save is measured
    assert auto_interval(0.001, 0.01, 0.005, cpus=2) == AUTO_FLOOR  # a tiny model: the floor
    assert auto_interval(0.2, 0.5, 0.1, cpus=2) == pytest.approx(20.0)  # 0.2 s snapshot / 1%
    assert auto_interval(0.01, 0.5, 0.8, cpus=2) == pytest.approx(40.0)  # the write's CPU per core / 1%
    assert auto_interval(0.01, 30.0, 0.1, cpus=2) == pytest.approx(60.0)  # a slow disk: twice the write
    assert auto_interval(10.0, 1.0, 1.0) == AUTO_CEILING == 300.0


def test_a_snapshot_is_a_copy_written_later_as_the_same_checkpoint(tmp_path):
    from resilient._checkpoint import CheckpointStore
    from resilient._protocol import CheckpointMeta
    from resilient.worker import state

    x, y = make_data(n=64)
    model = make_model()
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
    meta = CheckpointMeta(epoch=1, offset=0, global_step=4, epochs_done=[0], history={"loss": [0.5]},
                          plan={"batch_size": 16}, attempt=0, reason="interval")
    metrics = [np.asarray(v.numpy()) for v in model.metrics_variables]
    now = CheckpointStore(tmp_path / "now")
    state.save(now, model, meta, metrics, [])
    snap = state.snapshot(model, meta, metrics, [])
    assert snap.nbytes > 0
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)  # the training goes on meanwhile
    later = CheckpointStore(tmp_path / "later")
    state.write(later, snap)
    a, b = now.latest(), later.latest()
    for name in ("weights.npz", "optimizer.npz", "metrics.npz", "rng.npz", "callbacks.pkl"):
        assert a.file(name).read_bytes() == b.file(name).read_bytes(), name  # the state at the snapshot
