"""End-to-end degradations on tiny real models: the plan changes and the training keeps its meaning."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import resilient
from resilient.steps import halve_batch
from tests.conftest import make_data, make_model

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("no_leftover_processes")]


@pytest.mark.fault("gpu_oom", "mid-epoch", incident="gpu_oom",
                   outcome="completed; batch halved per OOM",
                   lost="the steps since the last checkpoint", corrupted="no")
def test_two_gpu_ooms_under_halve_batch_leave_a_quarter_of_the_batch(tmp_path):
    x, y = make_data()
    policy = resilient.Policy(ladders={"gpu_oom": [halve_batch(min_batch=4)]})
    history = resilient.fit(make_model(), x, y, epochs=2, batch_size=32, seed=3, run_dir=tmp_path / "run",
                            verbose=0, policy=policy, faults="gpu_oom@3,gpu_oom@10", checkpoint_every=2)
    assert [i.kind for i in history.incidents] == ["gpu_oom", "gpu_oom"]
    assert [i.plan_after.batch_size for i in history.incidents] == [16, 8]
    assert history.plan.batch_size == 8
    assert resilient.Plan.model_validate_json((tmp_path / "run" / "plan.json").read_text()).batch_size == 8
    assert history.epoch == [0, 1]


@pytest.mark.fault("gpu_oom", "mid-epoch", incident="gpu_oom",
                   outcome="completed; half batch with accumulation, weights as the uninterrupted run",
                   lost="1 step (since the checkpoint at step 4)", corrupted="no")
def test_keep_effective_batch_matches_the_uninterrupted_run(tmp_path):
    x, y = make_data()
    ref_model = make_model(metrics=False)
    resilient.fit(ref_model, x, y, epochs=2, batch_size=32, seed=5, run_dir=tmp_path / "ref", verbose=0,
                  checkpoint_every=2)
    model = make_model(metrics=False)
    policy = resilient.Policy(ladders={"gpu_oom": [halve_batch(min_batch=4, keep_effective_batch=True)]})
    history = resilient.fit(model, x, y, epochs=2, batch_size=32, seed=5, run_dir=tmp_path / "degraded",
                            verbose=0, policy=policy, faults="gpu_oom@5", checkpoint_every=2)
    assert history.plan.batch_size == 16 and history.plan.grad_accum_steps == 2
    # iterations counts full-batch updates: 256 samples / 32 per update * 2 epochs.
    assert int(model.optimizer.iterations.numpy()) == int(ref_model.optimizer.iterations.numpy()) == 16
    for a, b in zip(ref_model.get_weights(), model.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


@pytest.mark.fault("nan_loss", "mid-epoch", incident="nan_loss",
                   outcome="completed; rolled back to the last good checkpoint, learning rate lowered, weights finite",
                   lost="1 step (since the checkpoint at step 4)", corrupted="no")
def test_nan_loss_rolls_back_and_lowers_the_learning_rate(tmp_path):
    x, y = make_data()
    model = make_model()
    history = resilient.fit(model, x, y, epochs=2, batch_size=32, seed=3, run_dir=tmp_path / "run", verbose=0,
                            faults="nan@5", checkpoint_every=2)
    [incident] = history.incidents
    assert incident.kind == "nan_loss" and incident.step == 5
    assert incident.checkpoint_step == 4  # the last good checkpoint; the poisoned step was never saved
    assert history.plan.learning_rate_scale < 1.0
    assert all(np.isfinite(w).all() for w in model.get_weights())
    assert all(np.isfinite(history.history["loss"]))
    lr = float(model.optimizer.learning_rate.numpy())
    assert lr == pytest.approx(1e-2 * history.plan.learning_rate_scale, rel=1e-5)


@pytest.mark.fault("bad_policy", "before start", incident="none (InvalidPolicyError)",
                   outcome="refused in < 5 s with the file, key, received and expected; no worker, run_dir untouched",
                   lost="nothing started", corrupted="no")
def test_invalid_policy_file_fails_fast_without_starting_a_worker(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('max_restarts = 3\n[ladders]\ngpu_oom = [{ step = "halve_batch", min_batch = 0 }]\n')
    run_dir = tmp_path / "run"
    x, y = make_data()
    model = make_model()
    start = time.monotonic()
    with pytest.raises(resilient.InvalidPolicyError) as info:
        resilient.fit(model, x, y, epochs=1, run_dir=run_dir, policy=str(bad), verbose=0)
    assert time.monotonic() - start < 5
    message = str(info.value)
    assert "bad.toml" in message and "min_batch" in message and "received 0" in message
    assert not run_dir.exists(), "a refused call must not touch the run directory"


@pytest.mark.fault("bad_policy", "before start", incident="none (CLI exit code)",
                   outcome="`policies check` rejects the file quickly, naming it",
                   lost="nothing started", corrupted="no")
def test_cli_rejects_a_bad_policy_file_quickly(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[ladders]\ngpu_oom = ["no_such_step"]\n')
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "resilient", "policies", "check", str(bad)],
                          capture_output=True, text=True, timeout=30)
    assert time.monotonic() - start < 5
    assert proc.returncode == 2
    assert "no_such_step" in proc.stdout + proc.stderr


class SlowSteps:
    """Makes each step take a while, so the supervisor sees stable stretches at a known pace."""

    def __new__(cls, seconds: float):
        import keras

        class _Slow(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                time.sleep(seconds)

        return _Slow()


def test_probing_back_up_settles_above_blind_halving(tmp_path):
    x, y = make_data(n=512)
    policy = resilient.Policy(ladders={"gpu_oom": [halve_batch(min_batch=4)]},
                              probe={"enabled": True, "stable_steps": 4, "max_probes": 2, "measure_seconds": 0.3})
    run_dir = tmp_path / "run"
    history = resilient.fit(make_model(), x, y, epochs=2, batch_size=32, seed=3, run_dir=run_dir, verbose=0,
                            policy=policy, faults="gpu_oom@3", checkpoint_every=2, callbacks=[SlowSteps(0.05)])
    assert [i.kind for i in history.incidents] == ["gpu_oom"]
    evs = resilient._rundir.RunDir(run_dir).read_events()
    started = [e for e in evs if e["event"] == "probe_started"]
    assert started and started[0]["from"]["batch_size"] == 16 and 16 < started[0]["to"]["batch_size"] < 32
    # Probes are restarts we chose, not incidents; the run still completes every epoch.
    assert history.epoch == [0, 1]
    assert 16 < history.plan.batch_size < 32
    settled = resilient.Plan.model_validate_json((run_dir / "plan.json").read_text())
    assert settled == history.plan, "a new VM resumes from the settled plan"


class PacedByBatch:
    """Sleeps ``k * batch**2`` per step, so smaller micro-batches train more samples per second.

    The batch is the plan of the attempt, read from its file in the run directory (the newest attempt's:
    attempts run one after another), not kept on the callback: its state is checkpointed and would carry
    the previous attempt's batch.
    """

    def __new__(cls, k: float, run_dir: Path):
        import json

        import keras

        attempts = Path(run_dir) / "attempts"

        class _Paced(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                plan = json.loads(sorted(attempts.glob("*/plan.json"))[-1].read_text())
                time.sleep(k * plan["batch_size"] ** 2)

        return _Paced()


def test_the_search_settles_on_the_fastest_micro_batch_and_keeps_the_math(tmp_path):
    x, y = make_data(n=1024)
    ref = make_model(metrics=False)
    resilient.fit(ref, x, y, epochs=2, batch_size=64, seed=4, run_dir=tmp_path / "ref", verbose=0)
    model = make_model(metrics=False)
    policy = resilient.Policy(ladders={"gpu_oom": [halve_batch(min_batch=2, keep_effective_batch=True)]},
                              probe={"stable_steps": 8, "max_probes": 2, "min_batch": 8, "measure_seconds": 0.5})
    run_dir = tmp_path / "run"
    history = resilient.fit(model, x, y, epochs=2, batch_size=64, seed=4, run_dir=run_dir, verbose=0, policy=policy,
                            faults="gpu_oom@3", checkpoint_every=2, callbacks=[PacedByBatch(0.0002, run_dir)])
    evs = resilient._rundir.RunDir(run_dir).read_events()
    plans = [(e["plan"]["batch_size"], e["plan"]["grad_accum_steps"]) for e in evs if e["event"] == "attempt_started"]
    # 64 OOM -> 32x2; nothing divides 64 between 32 and 64, so the search measures smaller micro-batches.
    assert plans == [(64, 1), (32, 2), (16, 4), (8, 8)]
    assert [e["plan"]["batch_size"] for e in evs if e["event"] == "probe_succeeded"] == [16, 8]
    rates = {e["plan"]["batch_size"]: e["samples_per_s"] for e in evs if e["event"] == "throughput_measured"}
    assert rates[8] > rates[16] > rates[32]
    assert [i.kind for i in history.incidents] == ["gpu_oom"]
    assert history.plan == resilient.Plan(batch_size=8, grad_accum_steps=8)
    assert resilient.Plan.model_validate_json((run_dir / "plan.json").read_text()) == history.plan
    assert [int(e["attempt"]) for e in evs if e["event"] == "attempt_started"] == [0, 1, 2, 3]
    from resilient._status import summarize

    status = summarize(run_dir)
    assert status.count("-> probe kept") == 2 and "samples/s" in status
    # Four processes and three micro-batch sizes, and still the run of batch 64: 32 updates, same weights.
    assert history.epoch == [0, 1]
    assert int(model.optimizer.iterations.numpy()) == int(ref.optimizer.iterations.numpy()) == 32
    for a, b in zip(ref.get_weights(), model.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_mixed_precision_rebuild_carries_the_optimizer_state(tmp_path):
    # This CPU may lack bf16 support, so the built-in step would decline; a custom step forces the switch
    # to exercise the real path: rebuild under the new dtype policy, load float32 weights, carry the optimizer.
    from resilient.policy import register_step

    @register_step("force_bfloat16_for_test", replace=True)
    def force_bfloat16(plan, incident, context):
        return None if plan.precision != "float32" else plan.replace(precision="mixed_bfloat16")

    x, y = make_data()
    model = make_model()
    policy = resilient.Policy(ladders={"gpu_oom": ["force_bfloat16_for_test"]})
    run_dir = tmp_path / "run"
    history = resilient.fit(model, x, y, epochs=2, batch_size=32, seed=3, run_dir=run_dir, verbose=0,
                            policy=policy, faults="gpu_oom@5", checkpoint_every=2)
    assert history.plan.precision == "mixed_bfloat16"
    # iterations continued from the checkpoint (4 updates) instead of restarting at 0: 16 updates in all.
    assert int(model.optimizer.iterations.numpy()) == 16
    evs = resilient._rundir.RunDir(run_dir).read_events()
    assert not [e for e in evs if e["event"] == "optimizer_state_skipped"]
    assert all(np.isfinite(w).all() for w in model.get_weights())
    assert history.history["loss"][-1] < history.history["loss"][0]
