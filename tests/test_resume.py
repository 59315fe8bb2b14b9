"""``resilient.resume`` and ``resilient resume RUN_DIR``: a run continued from its directory alone."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import resilient
from resilient._cli import main as cli
from resilient._resume import _facts_of_older_spec
from resilient._rundir import RunDir
from tests.conftest import make_data, make_model
from tests.fixtures import make_rundir_v0 as v0

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = Path(__file__).parent / "fixtures" / "rundir_v0"


def _cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, "-m", "resilient", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


@pytest.mark.e2e
@pytest.mark.usefixtures("no_leftover_processes")
@pytest.mark.fault("sigkill", "mid-epoch", incident="none in the resuming call",
                   outcome="`resilient resume RUN_DIR` finishes a run left by a SIGKILL (written by 0.1.0) from its "
                           "directory alone; weights and History equal an uninterrupted run's",
                   lost="2 steps (since the checkpoint at step 9)", corrupted="no")
def test_the_cli_resumes_a_run_from_its_directory_alone_to_an_uninterrupted_runs_weights(tmp_path):
    run_dir = tmp_path / "old"
    shutil.copytree(FIXTURE, run_dir)  # left mid-run by a SIGKILL, written by release 0.1.0

    proc = _cli("resume", str(run_dir))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"completed: 2 epochs in {run_dir}" in proc.stdout
    starts = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()
              if '"run_started"' in line]
    assert starts[-1]["via"] == "resume" and starts[-1]["resumed"] is True

    # The finished run: resume returns its result at once, the model loaded from the run directory.
    resumed = resilient.resume(run_dir, verbose=0)
    x, y, xv, yv = v0.data()
    clean_model = v0.model()
    clean = resilient.fit(clean_model, x, y, validation_data=(xv, yv), run_dir=tmp_path / "clean",
                          **{**v0.ARGS, "faults": None})
    assert resumed.epoch == clean.epoch == [0, 1]
    for key in clean.history:
        np.testing.assert_allclose(resumed.history[key], clean.history[key], rtol=1e-5, err_msg=key)
    model = resumed.model
    for a, b in zip(clean_model.get_weights(), model.get_weights()):
        np.testing.assert_allclose(b, a, atol=1e-6)
    assert int(model.optimizer.iterations.numpy()) == int(clean_model.optimizer.iterations.numpy()) == 12
    assert resumed.params == {"verbose": 0, "epochs": 2, "steps": clean.params["steps"]}


@pytest.mark.e2e
@pytest.mark.usefixtures("no_leftover_processes")
def test_resume_continues_with_the_policy_the_run_was_started_with(tmp_path):
    x, y = make_data(128)
    run_dir = tmp_path / "run"
    with pytest.raises(resilient.TrainingFailedError):
        resilient.fit(make_model(), x, y, epochs=2, batch_size=32, seed=1, run_dir=run_dir, verbose=0,
                      faults="sigkill@5", max_restarts=0, checkpoint_every=2, policy="conservative")
    spec = RunDir(run_dir).read_spec()
    assert spec.policy_name == "conservative"
    assert spec.input_facts is not None and not spec.input_facts.cacheable  # arrays: no cache to drop

    history = resilient.resume(run_dir, verbose=0)
    assert history.epoch == [0, 1] and history.incidents == []
    assert int(history.model.optimizer.iterations.numpy()) == 8


def test_resume_refuses_a_directory_without_a_run_and_writes_nothing(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(resilient.RunDirError, match=r"No run to resume in .*empty: it has no run\.json"):
        resilient.resume(empty)
    assert list(empty.iterdir()) == []
    missing = tmp_path / "missing"
    assert cli(["resume", str(missing)]) == 2
    assert "No run to resume" in capsys.readouterr().err
    assert not missing.exists()


def test_a_run_started_with_a_policy_object_resumes_with_the_default_and_says_so(tmp_path):
    from resilient._resume import _policy

    spec = RunDir(FIXTURE).read_spec().model_copy(update={"policy_name": None})
    policy, note = _policy(None, spec)
    assert policy.ladders == resilient.load_policy("default").ladders
    assert "Policy object" in note and "default" in note
    policy, note = _policy("conservative", spec)
    assert note == "" and policy.ladders == resilient.load_policy("conservative").ladders


def test_fit_records_its_policy_as_resume_can_load_it_again(tmp_path):
    from resilient._fit import _policy_name

    assert _policy_name("colab-free") == "colab-free"
    assert _policy_name(resilient.Policy()) is None
    file = tmp_path / "mine.toml"
    assert _policy_name(str(file)) == str(file.absolute())
    assert _policy_name(Path("rel") / "p.toml") == str(Path.cwd() / "rel" / "p.toml")


def test_a_run_json_without_input_facts_resumes_with_what_its_data_kind_tells():
    spec = RunDir(FIXTURE).read_spec()  # written by 0.1.0: no input_facts, no policy_name
    assert spec.input_facts is None and spec.policy_name is None
    facts = _facts_of_older_spec(spec)
    assert (facts.cacheable, facts.buffered, facts.batch_size_fixed) == (False, False, False)


def test_the_cli_lists_resume_and_demo():
    from resilient._cli import build_parser

    text = build_parser().format_help()
    assert "resume" in text and "demo" in text


@pytest.mark.e2e
@pytest.mark.usefixtures("no_leftover_processes")
def test_the_quickstart_demo_heals_and_finishes(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "demo.py"), "--epochs", "2",
                           "--faults", "segfault@30", "--run-dir", str(tmp_path / "demo")],
                          capture_output=True, text=True, env=env, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "It survived 1 failure(s)" in proc.stdout and "crash at epoch 2" in proc.stdout
    assert "Healed and finished." in proc.stdout
