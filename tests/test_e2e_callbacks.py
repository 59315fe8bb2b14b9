"""User callbacks run in the worker and their state survives a restart."""

from __future__ import annotations

import numpy as np
import pytest

import resilient
from tests.conftest import make_data, make_model

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("no_leftover_processes")]


def _early_stopping():
    import keras

    return keras.callbacks.EarlyStopping(monitor="loss", min_delta=0.05, patience=2)


@pytest.mark.fault("segfault", "mid-epoch", incident="crash",
                   outcome="completed; EarlyStopping stops at the same epoch, loss equal",
                   lost="1 step", corrupted="no")
def test_early_stopping_state_survives_a_crash(tmp_path):
    x, y = make_data()
    steps_per_epoch = 256 // 32
    ref = resilient.fit(make_model(), x, y, epochs=12, batch_size=32, seed=11, run_dir=tmp_path / "ref", verbose=0,
                        callbacks=[_early_stopping()], checkpoint_every=2)
    stopped = len(ref.epoch)
    assert 3 <= stopped < 12, f"the reference run should stop early (stopped after {stopped} epochs)"
    # Crash in the middle of the last epoch: its patience counter must come back from the checkpoint.
    crash_step = (stopped - 1) * steps_per_epoch + 3
    model = make_model()
    hist = resilient.fit(model, x, y, epochs=12, batch_size=32, seed=11, run_dir=tmp_path / "crash", verbose=0,
                         callbacks=[_early_stopping()], checkpoint_every=2, faults=f"segfault@{crash_step}")
    assert [i.kind for i in hist.incidents] == ["crash"]
    assert hist.epoch == ref.epoch, "EarlyStopping stops at the same epoch as in the uninterrupted run"
    np.testing.assert_allclose(hist.history["loss"], ref.history["loss"], rtol=1e-6)
