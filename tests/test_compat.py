"""A run directory written by an earlier release resumes with this one (people upgrade with runs in flight)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import resilient
from tests.fixtures import make_rundir_v0 as v0

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("no_leftover_processes")]

FIXTURE = Path(__file__).parent / "fixtures" / "rundir_v0"


@pytest.mark.fault("sigkill", "mid-epoch", incident="none in this call (the kill was in the 0.1.0 call)",
                   outcome="a run dir left by release 0.1.0 after a SIGKILL resumes; weights, History, iterations exact",
                   lost="2 steps (since the checkpoint at step 9)", corrupted="no")
def test_a_run_directory_left_mid_run_by_release_0_1_0_resumes_exactly(tmp_path):
    run_dir = tmp_path / "old"
    shutil.copytree(FIXTURE, run_dir)
    x, y, xv, yv = v0.data()
    resumed_model = v0.model()
    resumed = resilient.fit(resumed_model, x, y, validation_data=(xv, yv), run_dir=run_dir, **v0.ARGS)
    assert resumed.incidents == [], "the kill was in the earlier call; the fault never fires again"
    events = [line for line in (run_dir / "events.jsonl").read_text().splitlines() if '"run_finished"' in line]
    assert '"completed"' in events[-1]

    clean_model = v0.model()
    args = {**v0.ARGS, "faults": None}
    clean = resilient.fit(clean_model, x, y, validation_data=(xv, yv), run_dir=tmp_path / "clean", **args)
    for a, b in zip(clean_model.get_weights(), resumed_model.get_weights()):
        np.testing.assert_allclose(b, a, atol=1e-6)
    assert int(resumed_model.optimizer.iterations.numpy()) == int(clean_model.optimizer.iterations.numpy()) == 12
    assert sorted(resumed.history) == sorted(clean.history)
    for key in clean.history:
        np.testing.assert_allclose(resumed.history[key], clean.history[key], rtol=1e-5, err_msg=key)
