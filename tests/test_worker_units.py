"""Worker pieces that need TensorFlow but no subprocess: schedules, optimizer state by meaning."""

from __future__ import annotations

import numpy as np

from resilient.worker.model import per_update_schedule
from resilient.worker.state import optimizer_state, restore_optimizer_state
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


def test_carry_window_maps_a_partial_window_onto_another_micro_batch():
    from resilient.worker.state import carry_window

    assert carry_window(2, 0, 32, 4, 16) == (0, 1.0)  # at an update: nothing to carry
    assert carry_window(4, 3, 16, 4, 16) == (3, 1.0)  # same plan
    assert carry_window(2, 1, 32, 4, 16) == (2, 2.0)  # 32 samples = two micro-steps of 16
    assert carry_window(8, 2, 8, 4, 16) == (1, 0.5)  # 16 samples = one micro-step of 16
    assert carry_window(8, 1, 8, 4, 16) is None  # 8 samples are half a micro-step of 16
    assert carry_window(8, 4, 8, 2, 32) == (1, 0.25)  # 32 samples = one micro-step of 32
    assert carry_window(2, 1, 32, 1, 64) is None  # no accumulation to continue in
    assert carry_window(2, 1, 32, 2, 16) is None  # another effective batch: another window


def test_a_partial_window_continues_under_a_smaller_micro_batch_with_the_same_update():
    import keras

    x, y = make_data(n=64)

    def compiled(accum):
        # SGD: the update is linear in the gradient, so only the accumulation's arithmetic is compared
        # (Adam's first step is lr * sign(g), which float rounding can flip where g is ~0).
        model = make_model(metrics=False)
        model.compile(optimizer=keras.optimizers.SGD(0.5, gradient_accumulation_steps=accum),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return model

    reference = compiled(None)
    reference.fit(x, y, batch_size=64, epochs=1, verbose=0, shuffle=False)  # one update on 64 samples

    before = compiled(2)
    before.fit(x[:32], y[:32], batch_size=32, epochs=1, verbose=0, shuffle=False)  # half a window of 32x2
    state = optimizer_state(before)
    assert (int(state["meta:iterations"]), int(state["meta:micro_steps"])) == (0, 1)

    after = compiled(4)
    after.set_weights(before.get_weights())
    restore_optimizer_state(after, state, saved_batch=32, batch=16)
    assert int(after.optimizer._iterations.numpy()) == 2  # two of four micro-steps of 16 done
    after.fit(x[32:], y[32:], batch_size=16, epochs=1, verbose=0, shuffle=False)  # the last two
    assert int(after.optimizer.iterations.numpy()) == 1
    for a, b in zip(reference.get_weights(), after.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
