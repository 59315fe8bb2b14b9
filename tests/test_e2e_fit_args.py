"""Conformance of model.fit's arguments: resilient.fit against model.fit itself, on the same data and seed.

With ``shuffle=False`` and no faults, resilient.fit must give model.fit's weights (1e-5) and History
(keys, epochs and values). Several arguments share one run, since every run starts a worker. With
faults and a fixed seed (shuffled), a run must end as the same run without faults.
"""

from __future__ import annotations

import numpy as np
import pytest

import resilient
from tests.conftest import make_data, make_model

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("no_leftover_processes")]


def keras_fit(x, y, **kwargs):
    model = make_model()
    history = model.fit(x, y, verbose=0, shuffle=False, **kwargs)
    return model, history


def resilient_fit(tmp_path, name, x, y, *, shuffle=False, **kwargs):
    model = make_model()
    history = resilient.fit(model, x, y, verbose=0, shuffle=shuffle, seed=3, run_dir=tmp_path / name, **kwargs)
    return model, history


def assert_same(ours, theirs):
    (model, history), (ref_model, ref) = ours, theirs
    for a, b in zip(model.get_weights(), ref_model.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    assert history.epoch == ref.epoch
    assert sorted(history.history) == sorted(ref.history)
    for key, values in ref.history.items():
        np.testing.assert_allclose(history.history[key], values, rtol=1e-5, atol=1e-6, err_msg=key)


def test_validation_split_with_class_weight_and_default_batch_size(tmp_path):
    # 250 samples: the last 50 (not a shuffled 50) validate. batch_size=None with steps_per_epoch=7 means
    # batches of ceil(200 / 7) = 29 samples, as in model.fit.
    x, y = make_data(250)
    kwargs = dict(epochs=2, validation_split=0.2, class_weight={0: 1.0, 1: 3.5}, steps_per_epoch=7)
    ours = resilient_fit(tmp_path, "run", x, y, **kwargs)
    assert_same(ours, keras_fit(x, y, **kwargs))
    assert "val_loss" in ours[1].history
    assert ours[1].plan.batch_size == 29


def test_sample_weight_with_weighted_validation_data_steps_and_batch_size(tmp_path):
    x, y = make_data(200)
    vx, vy = make_data(90, seed=1)
    rng = np.random.default_rng(5)
    sw, vsw = rng.uniform(0.1, 2.0, 200).astype("float32"), rng.uniform(0.1, 2.0, 90).astype("float32")
    kwargs = dict(epochs=2, batch_size=16, sample_weight=sw, validation_data=(vx, vy, vsw),
                  validation_batch_size=20, validation_steps=3)  # 3 of 5 validation batches, the same each epoch
    assert_same(resilient_fit(tmp_path, "run", x, y, **kwargs), keras_fit(x, y, **kwargs))


def test_initial_epoch_with_validation_freq(tmp_path):
    x, y = make_data(160)
    vx, vy = make_data(64, seed=1)
    # Epochs 1..3 trained; validation after epochs 2 and 4 (1-based), as model.fit counts them. Five batches
    # of 32 at two steps an epoch: model.fit's iterator starts at initial_epoch, so epochs of 2, 2, 1 steps.
    kwargs = dict(epochs=4, initial_epoch=1, batch_size=32, validation_data=(vx, vy), validation_freq=[2, 4],
                  steps_per_epoch=2)
    ours = resilient_fit(tmp_path, "run", x, y, **kwargs)
    theirs = keras_fit(x, y, **kwargs)
    assert_same(ours, theirs)
    assert ours[1].epoch == [1, 2, 3]
    assert len(ours[1].history["val_loss"]) == 2 and len(ours[1].history["loss"]) == 3
    assert int(ours[0].optimizer.iterations.numpy()) == 5


def test_steps_per_epoch_continues_through_the_data_like_model_fit(tmp_path):
    # 200 samples in batches of 32: 7 batches. Three steps per epoch: epochs of 3, 3, 1 batches, then a new pass.
    x, y = make_data(200)
    kwargs = dict(epochs=4, batch_size=32, steps_per_epoch=3, validation_freq=2, validation_split=0.0,
                  validation_data=make_data(40, seed=2))
    ours = resilient_fit(tmp_path, "run", x, y, **kwargs)
    assert_same(ours, keras_fit(x, y, **kwargs))
    assert int(ours[0].optimizer.iterations.numpy()) == 3 + 3 + 1 + 3


@pytest.mark.fault("segfault", "mid-epoch", incident="crash",
                   outcome="completed; weights and History as the clean shuffled run",
                   lost="1 step (since the checkpoint at step 8)", corrupted="no")
def test_faults_resume_sample_weight_validation_split_and_steps_exactly(tmp_path):
    # Shuffled, so the resumed order must be the run's own: the same as a run without faults.
    x, y = make_data(256)
    sw = np.random.default_rng(7).uniform(0.5, 1.5, 256).astype("float32")
    # 192 training samples: 6 batches of 32, 4 steps per epoch -> epochs of 4, 2, 4, 2 steps.
    kwargs = dict(epochs=4, batch_size=32, sample_weight=sw, validation_split=0.25, steps_per_epoch=4,
                  checkpoint_every=4, shuffle=True)
    clean = resilient_fit(tmp_path, "clean", x, y, **kwargs)
    # Killed at step 9 of epoch 2 (its steps are 7..10): resumed from the step-8 checkpoint, mid-epoch.
    faulty = resilient_fit(tmp_path, "faulty", x, y, faults="segfault@9", **kwargs)
    assert [i.kind for i in faulty[1].incidents] == ["crash"]
    assert faulty[1].incidents[0].checkpoint_step == 8
    assert_same(faulty, clean)
    assert int(faulty[0].optimizer.iterations.numpy()) == 12


def _dataset(n, seed, batch):
    import tensorflow as tf

    x, y = make_data(n, seed=seed)
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)


def make_train(plan):
    return _dataset(200, 0, plan.batch_size)


def make_val(plan):
    return _dataset(80, 1, plan.batch_size)


def test_factory_with_class_weight_validation_steps_and_freq(tmp_path):
    # model.fit applies class_weight to a tf.data dataset too; a factory's datasets get it the same way.
    kwargs = dict(epochs=3, class_weight={0: 0.5, 1: 2.0}, validation_steps=2, validation_freq=2)
    model = make_model()
    history = resilient.fit(model, make_train, validation_data=make_val, batch_size=25, verbose=0, seed=3,
                            run_dir=tmp_path / "run", **kwargs)
    ref_model = make_model()
    ref = ref_model.fit(_dataset(200, 0, 25), validation_data=_dataset(80, 1, 25), verbose=0, shuffle=False,
                        **kwargs)
    assert_same((model, history), (ref_model, ref))
