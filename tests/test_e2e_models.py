"""Models as people bring them: custom layers defined in __main__, fixed input sizes, builders."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import resilient
from tests.conftest import make_data

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("no_leftover_processes")]

ROOT = Path(__file__).resolve().parent.parent

NOTEBOOK = textwrap.dedent(
    """
    import os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import resilient
    import keras, numpy as np
    import tensorflow as tf

    class InputSizeProbe(keras.layers.Layer):
        # Defined in __main__ as in a notebook: it must travel to the worker by value.
        def build(self, shape):
            self.seen = self.add_weight(shape=(2,), initializer="zeros", trainable=False, name="seen")

        def call(self, x):
            self.seen.assign(tf.cast(tf.shape(x)[1:3], "float32"))
            return x

    rng = np.random.default_rng(0)
    x = rng.random((96, 16, 16, 1)).astype("float32")
    y = (x[:, :8].mean(axis=(1, 2, 3)) > x[:, 8:].mean(axis=(1, 2, 3))).astype("int32")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((16, 16, 1)), InputSizeProbe(), keras.layers.Conv2D(4, 3),
                              keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(2)])
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    policy = resilient.Policy(ladders={"gpu_oom": [resilient.steps.lower_resolution(factor=0.5, min_size=4)]},
                              probe={"enabled": False})
    history = resilient.fit(model, x, y, epochs=2, batch_size=16, seed=1, run_dir=sys.argv[1], verbose=0,
                            policy=policy, faults="gpu_oom@3", checkpoint_every=2)
    print("PLAN", history.plan.image_size)
    print("SEEN", [int(v) for v in model.layers[0].seen.numpy()])
    print("INCIDENTS", [i.kind for i in history.incidents])
    """
)


def test_notebook_custom_layer_and_fixed_input_model_train_at_the_lower_resolution(tmp_path):
    script = tmp_path / "notebook.py"
    script.write_text(NOTEBOOK)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "run")], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "INCIDENTS ['gpu_oom']" in out
    assert "PLAN (8, 8)" in out
    # The probe layer's weight records the spatial size of the last batch the worker trained on.
    assert "SEEN [8, 8]" in out


@pytest.mark.fault("segfault", "mid-epoch", incident="crash",
                   outcome="completed; the builder rebuilds the model, iterations exact",
                   lost="1 step (since the checkpoint at step 8)", corrupted="no")
def test_a_builder_function_trains_and_history_model_holds_the_weights(tmp_path):
    import keras

    def build():
        keras.utils.set_random_seed(0)
        m = keras.Sequential([keras.Input((8,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(2)])
        m.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return m

    x, y = make_data()
    history = resilient.fit(build, x, y, epochs=2, batch_size=32, seed=1, run_dir=tmp_path / "run", verbose=0,
                            faults="segfault@9", checkpoint_every=4)
    assert [i.kind for i in history.incidents] == ["crash"]
    trained = history.model
    assert int(trained.optimizer.iterations.numpy()) == 16
    assert any(not np.allclose(a, b) for a, b in zip(trained.get_weights(), build().get_weights()))
