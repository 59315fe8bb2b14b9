"""One ``model.fit`` call trains all the epochs of an attempt, and a resumed (short) epoch stays exact.

The count of fit calls comes from the worker itself: each call is journaled as ``fit_call``.
"""

from __future__ import annotations

import numpy as np
import pytest

import resilient
from resilient._rundir import RunDir
from tests.conftest import make_data

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("no_leftover_processes")]


def fit_calls(run_dir) -> dict[int, list[dict]]:
    """The worker's ``fit_call`` journal lines, by attempt."""
    out: dict[int, list[dict]] = {}
    for e in RunDir(run_dir).read_events():
        if e["event"] == "fit_call":
            out.setdefault(e["attempt"], []).append(e)
    return out


def _model(steps_per_execution: int = 1):
    import keras

    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(2)])
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"], steps_per_execution=steps_per_execution)
    return model


@pytest.mark.fault("sigkill", "mid-epoch", incident="killed",
                   outcome="completed; one fit call per attempt; the short resumed epoch and the whole epochs after "
                           "it as model.fit's (weights 1e-6, History, steps_per_execution=2, validation_freq=2)",
                   lost="2 steps (since the checkpoint at step 9)", corrupted="no")
def test_one_fit_call_per_attempt_and_a_resumed_short_epoch_match_model_fit(tmp_path):
    x, y = make_data(n=224)  # 7 steps of 32 an epoch
    xv, yv = make_data(n=64, seed=1)
    sw = np.linspace(0.5, 1.5, len(x)).astype("float32")
    common = dict(epochs=4, batch_size=32, validation_data=(xv, yv), validation_freq=2, sample_weight=sw,
                  shuffle=False, verbose=0)
    ref_model = _model(steps_per_execution=2)
    ref = ref_model.fit(x, y, **common)

    # Killed at step 11 (epoch 1), resumed from the checkpoint at step 9: the second attempt begins with an
    # epoch of 5 steps, then trains epochs 2 and 3 whole (7 steps each) in the same fit call.
    model = _model(steps_per_execution=2)
    hist = resilient.fit(model, x, y, seed=1, run_dir=tmp_path / "run", checkpoint_every=3, faults="sigkill@11",
                         **common)
    assert [i.kind for i in hist.incidents] == ["killed"]
    assert hist.incidents[0].checkpoint_step == 9
    for a, b in zip(ref_model.get_weights(), model.get_weights()):
        np.testing.assert_allclose(b, a, atol=1e-6, rtol=0)
    assert int(model.optimizer.iterations.numpy()) == int(ref_model.optimizer.iterations.numpy()) == 28
    assert hist.epoch == ref.epoch == [0, 1, 2, 3]
    assert sorted(hist.history) == sorted(ref.history)
    for key, values in ref.history.items():
        np.testing.assert_allclose(hist.history[key], values, rtol=1e-5, atol=1e-6, err_msg=key)
    assert hist.params["steps"] == ref.params["steps"] == 7

    calls = fit_calls(tmp_path / "run")
    assert [len(calls[a]) for a in sorted(calls)] == [1, 1], calls
    first, second = calls[min(calls)][0], calls[max(calls)][0]
    assert (first["mode"], first["initial_epoch"], first["epochs"]) == ("all_epochs", 0, 4)
    assert (second["mode"], second["initial_epoch"], second["epochs"]) == ("all_epochs", 1, 4)
    # Every epoch ended where model.fit's did: 7 steps each, the resumed one included.
    ends = [(e["epoch"], e["step"]) for e in RunDir(tmp_path / "run").read_events() if e["event"] == "epoch_end"]
    assert ends == [(0, 7), (1, 14), (2, 21), (3, 28)]
