"""model.fit's arguments: bad values refused before any worker starts, and the pieces that carry them.

No worker is started here. Conformance with model.fit itself is in test_e2e_fit_args.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import resilient
from resilient._fit import default_batch_size
from resilient._plan import Plan
from resilient._rundir import ArraysData, RunDir, RunSpec
from resilient.data.arrays import ArraysSource
from resilient.data.base import epoch_span
from tests.conftest import make_data
from tests.input_helpers import write_image_folder
from tests.test_inputs import pydataset, refused


def make_dataset(plan):
    import tensorflow as tf

    x, y = make_data(64)
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(plan.batch_size)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        (dict(validation_split=1.0), "Received: validation_split=1.0. Expected a float in [0, 1)"),
        (dict(validation_split=-0.1), "Received: validation_split=-0.1"),
        (dict(validation_split="0.2"), "Received: validation_split='0.2'"),
        (dict(validation_split=0.6, x=np.zeros((2, 8), "float32"), y=np.zeros(2, "int32")),
         "of 2 samples, which leaves no training sample"),
        (dict(validation_split=1e-17), "which leaves no validation sample"),
        (dict(class_weight={"cat": 1.0}), "Received: a key 'cat' (str). Expected class indices"),
        (dict(class_weight={-1: 1.0}), "Received: a key -1"),
        (dict(class_weight={0: "high"}), "Received: class_weight[0]='high'. Expected a finite number"),
        (dict(class_weight={0: float("nan")}), "Expected a finite number"),
        (dict(class_weight=[1.0, 2.0]), "Expected a non-empty dict mapping class indices to weights"),
        (dict(class_weight={}), "Expected a non-empty dict"),
        (dict(sample_weight=np.ones(10)), "sample_weight of shape (10,) and dtype float64 for 256 samples"),
        (dict(sample_weight=np.array(["a"] * 256)), "Expected a numeric array of shape (256,)"),
        (dict(sample_weight=np.ones(256), class_weight={0: 2.0}), "You cannot `class_weight` and `sample_weight`"),
        (dict(validation_data=(*make_data(16), np.ones(3))), "Received: val_sample_weight of shape (3,)"),
        (dict(initial_epoch=-1), "Received: initial_epoch=-1. Expected an integer >= 0"),
        (dict(steps_per_epoch=0), "Received: steps_per_epoch=0. Expected an integer >= 1"),
        (dict(validation_steps=1.5), "Received: validation_steps=1.5"),
        (dict(validation_batch_size=0), "Received: validation_batch_size=0"),
        (dict(batch_size=0), "Received: batch_size=0"),
        (dict(validation_freq=0), "Received: validation_freq=0. Expected an integer >= 1"),
        (dict(validation_freq=[0, 2]), "Received: validation_freq=[0, 2]"),
        (dict(validation_freq=[]), "a non-empty list of epochs"),
        (dict(validation_freq="2"), "Received: validation_freq='2'"),
        (dict(shuffle="batch"), "Received: shuffle='batch'. Expected True or False"),
    ],
)
def test_bad_values_are_refused_with_what_was_received_and_expected(tmp_path, kwargs, expected):
    if "x" not in kwargs:
        kwargs["x"], kwargs["y"] = make_data()
    message = refused(tmp_path, **kwargs)
    assert expected in message
    assert "Invalid value for argument" in message


def test_array_only_arguments_are_refused_for_datasets_with_what_to_do(tmp_path):
    x, y = make_data(64)
    message = refused(tmp_path, x=make_dataset, validation_split=0.2)
    assert "like model.fit, resilient splits only NumPy arrays" in message and "validation_data=" in message
    message = refused(tmp_path, x=make_dataset, sample_weight=np.ones(64))
    assert "Yield (x, y, sample_weight) batches from make_dataset(plan)" in message
    message = refused(tmp_path, x=make_dataset, steps_per_epoch=2)
    assert "ds.take(steps_per_epoch)" in message
    message = refused(tmp_path, x=pydataset(x, y), steps_per_epoch=2)
    assert "num_batches" in message
    message = refused(tmp_path, x=pydataset(x, y), sample_weight=np.ones(64))
    assert "__getitem__" in message
    message = refused(tmp_path, x=x, y=y, validation_data=pydataset(x, y), validation_batch_size=8)
    assert "makes its own batches" in message


def make_weighted_dataset(plan):
    import tensorflow as tf

    x, y = make_data(64)
    return tf.data.Dataset.from_tensor_slices((x, y, np.ones(64, "float32"))).batch(plan.batch_size)


def test_class_weight_with_batches_that_carry_sample_weights_is_refused(tmp_path):
    message = refused(tmp_path, x=make_weighted_dataset, class_weight={0: 2.0})
    assert "make_weighted_dataset(plan) yields (x, y, sample_weight) batches" in message
    assert "You cannot `class_weight` and `sample_weight`" in message
    x, y = make_data(64)
    message = refused(tmp_path, x=_weighted_batches()(x, y), class_weight={0: 2.0})
    assert "WeightedBatches[0] returns (x, y, sample_weight)" in message


def _weighted_batches():
    import keras

    class WeightedBatches(keras.utils.PyDataset):
        def __init__(self, x, y) -> None:
            super().__init__()
            self.x, self.y = x, y

        def __len__(self) -> int:
            return 2

        def __getitem__(self, i):
            part = slice(i * 32, (i + 1) * 32)
            return self.x[part], self.y[part], np.ones(32, "float32")

    return WeightedBatches


def test_validation_split_of_an_image_folder_points_to_its_own(tmp_path):
    folder = write_image_folder(tmp_path / "imgs", per_class=4)
    from tests.input_helpers import make_image_model

    message = refused(tmp_path, model=make_image_model(), x=resilient.data.image_folder(folder, image_size=(12, 10)),
                      validation_split=0.25)
    assert "image_folder(..., validation_split=0.25)" in message


def test_default_batch_size_is_model_fits():
    x = np.zeros((250, 3))
    assert default_batch_size(x, None, None, 0.0, None) == 32
    assert default_batch_size(x, 16, 7, 0.0, None) == 16
    assert default_batch_size(x, None, 7, 0.0, None) == 36  # ceil(250 / 7)
    assert default_batch_size(x, None, 7, 0.2, None) == 29  # of the 200 left after the split
    assert default_batch_size(x, None, 7, 0.2, (x, x)) == 36  # validation_data overrides the split
    assert default_batch_size(make_dataset, None, 7, 0.0, None) == 32


def _spec(**fields):
    base = dict(epochs=3, seed=1, data=ArraysData(x="data/x.npy", y="data/y.npy", samples=20),
                model_fingerprint="f", initial_plan=Plan(batch_size=4))
    return RunSpec(**{**base, **fields})


def test_epoch_span_follows_keras_iterator_across_epochs():
    # 20 samples, batches of 4: 5 batches. Two steps an epoch: epochs of 2, 2, 1 batches, then a new pass.
    spec = _spec(steps_per_epoch=2)
    assert [epoch_span(spec, e, 20) for e in range(5)] == [(0, 0, 8), (0, 8, 16), (0, 16, 20), (1, 0, 8), (1, 8, 16)]
    # Counted from initial_epoch, as model.fit's iterator starts there.
    spec = _spec(steps_per_epoch=2, initial_epoch=3)
    assert [epoch_span(spec, e, 20) for e in (3, 4, 5, 6)] == [(3, 0, 8), (3, 8, 16), (3, 16, 20), (4, 0, 8)]
    # At least a whole pass an epoch, or no steps_per_epoch: every epoch is one pass.
    assert epoch_span(_spec(steps_per_epoch=5), 2, 20) == (2, 0, 20)
    assert epoch_span(_spec(steps_per_epoch=9), 2, 20) == (2, 0, 20)
    assert epoch_span(_spec(), 4, 20) == (4, 0, 20)


def test_a_run_json_without_the_new_fields_loads_with_model_fits_defaults(tmp_path):
    stored = json.loads(_spec().model_dump_json())
    for key in ("initial_epoch", "steps_per_epoch", "validation_steps", "validation_batch_size", "validation_freq",
                "class_weight"):
        stored.pop(key)
    for key in ("sample_weight", "val_sample_weight"):
        stored["data"].pop(key)
    spec = RunSpec.model_validate_json(json.dumps(stored))
    assert (spec.initial_epoch, spec.steps_per_epoch, spec.validation_freq, spec.class_weight) == (0, None, 1, None)
    assert spec.data.sample_weight is None
    # Class weights survive the JSON round trip with integer keys.
    again = RunSpec.model_validate_json(_spec(class_weight={0: 1.0, 3: 2.5}, validation_freq=(2, 4)).model_dump_json())
    assert again.class_weight == {0: 1.0, 3: 2.5} and again.validation_freq == (2, 4)


def test_arrays_source_yields_sample_weights_in_the_epochs_order_and_resumes_at_the_offset(tmp_path):
    run = RunDir(tmp_path)
    (tmp_path / "data").mkdir()
    x, y = make_data(20)
    sw = np.arange(20, dtype="float32")
    np.save(tmp_path / "data/x.npy", x)
    np.save(tmp_path / "data/y.npy", y)
    np.save(tmp_path / "data/sw.npy", sw)
    data = ArraysData(x="data/x.npy", y="data/y.npy", samples=20, sample_weight="data/sw.npy")
    spec = _spec(data=data, shuffle=True, steps_per_epoch=2)
    source = ArraysSource(spec, data, run)
    plan = Plan(batch_size=4)
    whole = [b for b in source.epoch(plan, 1, 0)[0].as_numpy_iterator()]
    assert all(len(b) == 3 for b in whole)
    order = np.concatenate([b[2] for b in whole]).astype(int)  # the weights name the samples
    np.testing.assert_array_equal(np.concatenate([b[0] for b in whole]), x[order])
    assert len(order) == 8  # the second chunk of two batches of the first pass
    # Resumed one batch in, with another batch size: the same samples follow.
    rest = [b for b in source.epoch(Plan(batch_size=2), 1, 4)[0].as_numpy_iterator()]
    np.testing.assert_array_equal(np.concatenate([b[2] for b in rest]).astype(int), order[4:])


def test_class_weight_becomes_sample_weights_as_in_keras(tmp_path):
    import tensorflow as tf

    from resilient.data.base import class_weight_fn

    y = np.array([0, 1, 2, 1], dtype="int32")
    ds = tf.data.Dataset.from_tensor_slices((np.zeros((4, 2), "float32"), y)).batch(4)
    _, _, w = next(iter(ds.map(class_weight_fn({0: 0.5, 1: 2.0}))))
    np.testing.assert_allclose(w.numpy(), [0.5, 2.0, 1.0, 2.0])  # class 2 is not in the dict: 1.0
    one_hot = np.eye(3, dtype="float32")[y]
    ds = tf.data.Dataset.from_tensor_slices((np.zeros((4, 2), "float32"), one_hot)).batch(4)
    _, _, w = next(iter(ds.map(class_weight_fn({0: 0.5, 1: 2.0, 2: 3.0}))))
    np.testing.assert_allclose(w.numpy(), [0.5, 2.0, 3.0, 2.0])


def test_model_fit_arguments_are_keyword_arguments_of_fit():
    import inspect

    import keras

    ours = inspect.signature(resilient.fit).parameters
    theirs = inspect.signature(keras.Model.fit).parameters
    missing = [name for name in theirs if name not in ours and name != "self"]
    assert missing == []
    for name, param in theirs.items():
        if name not in ("self", "x", "y"):
            assert ours[name].default == param.default, name


def test_checks_run_in_fits_phase_order_arguments_inputs_seed_then_the_run_directory(tmp_path):
    """fit checks its arguments, then the inputs and what is carried, then the seed, and only then opens the
    run directory: each refusal names the earliest problem and leaves the directory as it was."""
    x, y = make_data()
    message = refused(tmp_path, x=x, y=y[:3], faults="nonsense")
    assert "Invalid value for argument `faults`" in message
    message = refused(tmp_path, x=x, y=y[:3], seed=-1)
    assert "Received: seed=-1" not in message  # the inputs are refused before the seed is looked at
    other = tmp_path / "other"
    other.mkdir()
    (other / "run.json").write_text("not a run")
    message = refused(tmp_path, x=x, y=y, seed=-1, run_dir=other)
    assert "Received: seed=-1. Expected an integer >= 0" in message
    message = refused(tmp_path, error=resilient.RunDirError, x=x, y=y, run_dir=other)
    assert "cannot be read as a resilient run" in message
