"""TensorBoard logs continue across restarts, and resilient adds its incidents and plan changes there."""

from __future__ import annotations

import pytest

import resilient
from tests.conftest import make_data, make_model

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("no_leftover_processes")]


def _tags(directory):
    import tensorflow as tf

    tags = {}
    for path in directory.rglob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                tags.setdefault(value.tag, []).append(event.step)
    return tags


def test_tensorboard_gets_incidents_and_plan_changes(tmp_path):
    import keras

    x, y = make_data()
    logs = tmp_path / "tb"
    history = resilient.fit(make_model(), x, y, epochs=2, batch_size=32, seed=2, run_dir=tmp_path / "run",
                            verbose=0, callbacks=[keras.callbacks.TensorBoard(log_dir=str(logs))],
                            faults="gpu_oom@5", checkpoint_every=2)
    assert [i.kind for i in history.incidents] == ["gpu_oom"]
    ours = _tags(logs / "resilient")
    assert ours["resilient/incidents"] == [5]
    assert 5 in ours["resilient/batch_size"]
    # Keras's own logs continue in the same directory: both epochs of training are there.
    train = _tags(logs / "train")
    assert any(tag.startswith("epoch_loss") for tag in train)
    assert sorted(set(train["epoch_loss"])) == [0, 1]
