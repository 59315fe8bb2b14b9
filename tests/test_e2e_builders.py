"""Builders whose model has a custom layer, through every degradation that rebuilds the model in the worker."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest

import resilient
from resilient._rundir import RunDir
from tests.conftest import make_data

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("no_leftover_processes")]

ROOT = Path(__file__).resolve().parent.parent


class Scale(keras.layers.Layer):
    """A custom layer that is not registered: the worker finds it only on the builder's model."""

    def __init__(self, init: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.init = init

    def build(self, shape):
        self.scale = self.add_weight(shape=(), initializer=keras.initializers.Constant(self.init), name="scale")

    def call(self, x):
        return x * keras.ops.cast(self.scale, x.dtype)

    def get_config(self):
        return {**super().get_config(), "init": self.init}


@keras.saving.register_keras_serializable(package="test_e2e_builders")
class RegisteredScale(Scale):
    """The same layer, registered."""


def build_with_scale():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8,)), Scale(0.5), keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dense(2)])
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def build_with_registered_scale():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8,)), RegisteredScale(0.5), keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dense(2)])
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def _status(run_dir) -> str:
    [finished] = [e for e in RunDir(run_dir).read_events() if e["event"] == "run_finished"]
    return finished["status"]


def test_a_builder_with_an_unregistered_custom_layer_survives_halve_batch_with_accumulation(tmp_path):
    # keep_effective_batch turns on gradient accumulation: the worker rebuilds the builder's model from its config.
    policy_file = tmp_path / "policy.toml"
    policy_file.write_text(
        '[ladders]\ngpu_oom = [{ step = "halve_batch", min_batch = 4, keep_effective_batch = true }]\n'
        "[probe]\nenabled = false\n"
    )
    x, y = make_data()
    run_dir = tmp_path / "run"
    history = resilient.fit(build_with_scale, x, y, epochs=2, batch_size=32, seed=3, run_dir=run_dir, verbose=0,
                            policy=str(policy_file), faults="gpu_oom@3", checkpoint_every=2)
    assert [i.kind for i in history.incidents] == ["gpu_oom"]
    assert (history.plan.batch_size, history.plan.grad_accum_steps) == (16, 2)
    assert _status(run_dir) == "completed"
    assert history.epoch == [0, 1]
    trained = history.model
    assert int(trained.optimizer.iterations.numpy()) == 16  # 256 samples / 32 per update * 2 epochs
    assert float(trained.layers[0].scale.numpy()) != 0.5  # the custom layer's weight trained and came back


def test_a_builder_with_a_registered_custom_layer_survives_mixed_precision_then_accumulation(tmp_path):
    # This CPU may lack bf16 support, so the built-in mixed_precision step could decline; a custom step forces
    # the switch (as in test_e2e_policy). The second OOM rebuilds the bf16 model with gradient accumulation.
    from resilient.policy import register_step
    from resilient.steps import halve_batch

    @register_step("force_bfloat16_for_builder_test", replace=True)
    def force_bfloat16(plan, incident, context):
        return None if plan.precision != "float32" else plan.replace(precision="mixed_bfloat16")

    policy = resilient.Policy(
        ladders={"gpu_oom": ["force_bfloat16_for_builder_test", halve_batch(min_batch=4, keep_effective_batch=True)]},
        probe={"enabled": False},
    )
    x, y = make_data()
    run_dir = tmp_path / "run"
    history = resilient.fit(build_with_registered_scale, x, y, epochs=2, batch_size=32, seed=3, run_dir=run_dir,
                            verbose=0, policy=policy, faults="gpu_oom@3,gpu_oom@6", checkpoint_every=2)
    assert [i.kind for i in history.incidents] == ["gpu_oom", "gpu_oom"]
    plan = history.plan
    assert (plan.precision, plan.batch_size, plan.grad_accum_steps) == ("mixed_bfloat16", 16, 2)
    assert _status(run_dir) == "completed"
    assert int(history.model.optimizer.iterations.numpy()) == 16
    assert all(np.isfinite(w).all() for w in history.model.get_weights())


NOTEBOOK = textwrap.dedent(
    """
    import os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import keras, numpy as np
    import resilient

    class Scale(keras.layers.Layer):
        # Defined in __main__ as in a notebook: it travels by value with the builder, unregistered.
        def __init__(self, init=1.0, **kwargs):
            super().__init__(**kwargs)
            self.init = init

        def build(self, shape):
            self.scale = self.add_weight(shape=(), initializer=keras.initializers.Constant(self.init), name="scale")

        def call(self, x):
            return x * keras.ops.cast(self.scale, x.dtype)

        def get_config(self):
            return {**super().get_config(), "init": self.init}

    def build():
        keras.utils.set_random_seed(0)
        m = keras.Sequential([keras.Input((8,)), Scale(0.5), keras.layers.Dense(2)])
        m.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return m

    rng = np.random.default_rng(0)
    x = rng.normal(size=(128, 8)).astype("float32")
    y = (x[:, :4].sum(axis=1) > 0).astype("int32")
    policy = resilient.Policy(ladders={"gpu_oom": [resilient.steps.halve_batch(min_batch=4, keep_effective_batch=True)]},
                              probe={"enabled": False})
    history = resilient.fit(build, x, y, epochs=1, batch_size=32, seed=1, run_dir=sys.argv[1], verbose=0,
                            policy=policy, faults="gpu_oom@2", checkpoint_every=1)
    print("PLAN", history.plan.batch_size, history.plan.grad_accum_steps)
    print("INCIDENTS", [i.kind for i in history.incidents])
    """
)


def test_a_notebook_builder_with_a_main_module_custom_layer_survives_accumulation(tmp_path):
    script = tmp_path / "notebook.py"
    script.write_text(NOTEBOOK)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "run")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "INCIDENTS ['gpu_oom']" in proc.stdout
    assert "PLAN 16 2" in proc.stdout
    assert _status(tmp_path / "run") == "completed"
