"""Worker pieces that need TensorFlow but no subprocess: schedules, optimizer state by meaning."""

from __future__ import annotations

import numpy as np

from resilient._worker import optimizer_state, per_update_schedule, restore_optimizer_state
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
