"""A custom degradation step, registered by name and used from Python and from a TOML policy.

``cool_down`` answers a NaN loss by cutting the learning rate hard, once, before the built-in
``lower_learning_rate`` takes smaller bites. The run below poisons a weight at step 20 (the ``nan``
fault), so the loss turns NaN; resilient rolls back to the last good checkpoint and applies the
ladder.

    python examples/custom_step.py
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import resilient  # noqa: I001  (first, so this process never reserves the whole GPU)

import keras
import numpy as np


@resilient.register_step("cool_down")
def cool_down(plan: resilient.Plan, incident: resilient.Incident, context: resilient.StepContext,
              factor: float = 0.1) -> resilient.Plan | None:
    """Cut the learning rate by ``factor`` after the first NaN; not applicable after that."""
    if plan.learning_rate_scale < 1.0:
        return None  # already cooled down once: let the next rung decide
    return plan.replace(learning_rate_scale=plan.learning_rate_scale * factor)


POLICY_TOML = """
description = "Cool down hard after the first NaN, then in small steps"
max_restarts = 5

[ladders]
nan_loss = [{ step = "cool_down", factor = 0.1 }, { step = "lower_learning_rate", factor = 0.5 }]
gpu_oom  = [{ step = "halve_batch", min_batch = 8 }]
"""


def main() -> int:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1024, 16)).astype("float32")
    y = (x[:, :8].sum(axis=1) > 0).astype("int32")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(32, activation="relu"), keras.layers.Dense(2)])
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])

    work = Path(tempfile.mkdtemp(prefix="resilient-custom-step-"))
    policy_file = work / "cool.toml"
    policy_file.write_text(POLICY_TOML)
    # The same policy in Python would be:
    #   resilient.Policy(ladders={"nan_loss": [cool_down(factor=0.1), resilient.steps.lower_learning_rate()]})
    history = resilient.fit(model, x, y, epochs=3, batch_size=32, seed=0, run_dir=work / "run",
                            policy=str(policy_file), faults="nan@20", checkpoint_every=10, verbose=0)
    for inc in history.incidents:
        print(f"{inc.kind} at step {inc.step}: {inc.action} -> {inc.plan_after.describe()}")
    lr = float(model.optimizer.learning_rate.numpy())
    print(f"learning rate now {lr:.2g}; final loss {history.history['loss'][-1]:.3f}")
    return 0 if history.plan.learning_rate_scale == 0.1 else 1


if __name__ == "__main__":
    sys.exit(main())
