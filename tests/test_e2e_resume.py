"""A new process (a recycled VM) picks a run up from its directory."""

from __future__ import annotations

import numpy as np
import pytest

import resilient
from resilient._rundir import RunDir
from tests.conftest import make_data, make_model

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("no_leftover_processes")]


@pytest.mark.fault("sigkill", "mid-epoch", incident="killed",
                   outcome="TrainingFailedError (max_restarts=0); a new fit call resumes; weights and History exact",
                   lost="2 steps (since the checkpoint at step 9)", corrupted="no")
def test_a_second_fit_call_resumes_the_run_and_matches_the_uninterrupted_one(tmp_path):
    x, y = make_data()
    ref_model = make_model()
    ref = resilient.fit(ref_model, x, y, epochs=2, batch_size=32, seed=4, run_dir=tmp_path / "ref", verbose=0,
                        checkpoint_every=3)
    run_dir = tmp_path / "run"
    # The first session dies for good at step 11 (no restarts allowed), as when a VM is recycled.
    with pytest.raises(resilient.TrainingFailedError):
        resilient.fit(make_model(), x, y, epochs=2, batch_size=32, seed=4, run_dir=run_dir, verbose=0,
                      checkpoint_every=3, faults="sigkill@11", max_restarts=0)
    # A new session: a freshly built model (new layer names), the same call.
    model = make_model()
    history = resilient.fit(model, x, y, epochs=2, batch_size=32, seed=4, run_dir=run_dir, verbose=0,
                            checkpoint_every=3, faults="sigkill@11", max_restarts=0)
    assert history.incidents == []  # the fault already fired in the first session
    assert history.epoch == [0, 1]
    for a, b in zip(ref_model.get_weights(), model.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
    np.testing.assert_allclose(history.history["loss"], ref.history["loss"], rtol=1e-6)
    ready = [e for e in RunDir(run_dir).read_events() if e["event"] == "worker_ready"]
    assert ready[-1]["resumed_from_step"] == 9
    from resilient._status import summarize

    text = summarize(run_dir)
    assert "killed" in text and "SIGKILL" in text and "status: completed" in text
    assert "last checkpoint: step 16" in text


def test_resuming_with_another_architecture_is_refused_without_touching_the_run(tmp_path):
    import keras

    x, y = make_data()
    run_dir = tmp_path / "run"
    resilient.fit(make_model(), x, y, epochs=1, batch_size=32, seed=4, run_dir=run_dir, verbose=0)
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    other = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4), keras.layers.Dense(2)])
    other.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    with pytest.raises(resilient.RunDirError, match="belongs to another model"):
        resilient.fit(other, x, y, epochs=1, run_dir=run_dir, verbose=0)
    after = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    assert before == after
