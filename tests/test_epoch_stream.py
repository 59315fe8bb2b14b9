"""``Source.epochs``: one dataset for all the epochs of an attempt gives, epoch by epoch, what ``Source.epoch`` gives.

Each stream is walked as the worker's one ``model.fit`` call walks it: ``begin(epoch, offset)`` as the
epoch begins, then a new iterator of the same dataset. Its batches must equal, bit for bit, those of
the per-epoch dataset that each fit call trained on before (a resumed first epoch included).
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

import resilient
from resilient._plan import Plan
from resilient._rundir import ArraysData, ObjectData, RunDir, RunSpec
from resilient.data.arrays import ArraysSource
from resilient.data.base import claim_steps
from resilient.data.dispatch import make_source, prepare_inputs
from resilient.data.factory import FactorySource
from resilient.data.pydataset import PyDatasetSource
from tests.conftest import make_data
from tests.input_helpers import make_image_model, write_image_folder
from tests.test_inputs import pydataset


def _batches(ds):
    return [tuple(np.asarray(t) for t in item) if isinstance(item, tuple) else (np.asarray(item),) for item in ds]


def _assert_same(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert len(g) == len(w)
        for a, b in zip(g, w):
            np.testing.assert_array_equal(a, b)


def _walk(source, make_reference, plan, walk):
    """Each (epoch, offset) of ``walk`` through one stream against a per-epoch dataset of a fresh source."""
    stream = source.epochs(plan)
    ds = claim_steps(stream.dataset, 99)
    assert int(ds.cardinality()) == 99 and ds.element_spec == stream.dataset.element_spec
    reference = make_reference()
    for epoch, offset in walk:
        steps = stream.begin(epoch, offset)
        want, want_steps = reference.epoch(plan, epoch, offset)
        assert steps == want_steps == stream.steps(epoch, offset)
        _assert_same(_batches(ds), _batches(want))


def test_arrays_stream_equals_the_per_epoch_datasets(tmp_path):
    run = RunDir(tmp_path)
    (tmp_path / "data").mkdir()
    x, y = make_data(20)
    np.save(tmp_path / "data/x.npy", x)
    np.save(tmp_path / "data/y.npy", y)
    np.save(tmp_path / "data/sw.npy", np.arange(20, dtype="float32"))
    data = ArraysData(x="data/x.npy", y="data/y.npy", samples=20, sample_weight="data/sw.npy")
    # Shuffled, and steps_per_epoch=2 with batches of 4: epochs of 2, 2, 1 batches, then a new pass.
    spec = RunSpec(epochs=5, seed=3, shuffle=True, steps_per_epoch=2, data=data, model_fingerprint="f",
                   initial_plan=Plan(batch_size=4))
    _walk(ArraysSource(spec, data, run), lambda: ArraysSource(spec, data, run), Plan(batch_size=4),
          [(1, 4), (2, 0), (3, 0), (4, 0)])
    # class_weight (applied as sample weights) with another batch size, resumed mid-epoch.
    data = ArraysData(x="data/x.npy", y="data/y.npy", samples=20)
    spec = RunSpec(epochs=3, seed=3, shuffle=True, class_weight={0: 0.5, 1: 2.0}, data=data, model_fingerprint="f",
                   initial_plan=Plan(batch_size=4))
    _walk(ArraysSource(spec, data, run), lambda: ArraysSource(spec, data, run), Plan(batch_size=3),
          [(0, 9), (1, 0), (2, 0)])


def test_image_folder_stream_equals_the_per_epoch_datasets_and_reads_the_cache_once_complete(tmp_path):
    folder = write_image_folder(tmp_path / "imgs")
    spec = resilient.data.image_folder(folder, image_size=(8, 6), validation_split=0.2)
    inputs = prepare_inputs(spec, None, None, model=make_image_model(), plan=Plan())
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    data = inputs.write(run, seed=4)
    run_spec = RunSpec(epochs=4, seed=4, shuffle=True, data=data, model_fingerprint="x", initial_plan=Plan())
    plan = Plan(batch_size=8)
    source = make_source(run_spec, run, {})
    # A resumed epoch 0 fills part of the cache; epoch 1 decodes and completes it; epoch 2 reads it.
    _walk(source, lambda: make_source(run_spec, run, {}), plan, [(0, 16), (1, 0), (2, 0)])
    # Once complete, the cache alone serves the stream: the files are no longer read.
    want = _batches(source.epoch(plan, 3, 0)[0])
    shutil.rmtree(folder)
    stream = source.epochs(plan)
    stream.begin(3, 0)
    _assert_same(_batches(stream.dataset), want)


def test_pydataset_stream_equals_the_per_epoch_datasets_and_replays_epoch_ends(tmp_path):
    x, y = make_data(n=80)
    ended = []
    pyds = pydataset(x, y, batch=16, workers=2)
    pyds.on_epoch_end = lambda: ended.append(1)
    spec = RunSpec(epochs=4, seed=4, shuffle=True, data=ObjectData(kind="pydataset", key="data", samples=5),
                   model_fingerprint="x", initial_plan=Plan())
    source = PyDatasetSource(spec, pyds, None)
    stream = source.epochs(Plan())
    assert stream.begin(2, 3) == 2 and len(ended) == 2, "a worker resuming at epoch 2 replays two epoch ends"
    ended.clear()
    _walk(source, lambda: PyDatasetSource(spec, pydataset(x, y, batch=16), None), Plan(),
          [(2, 3), (3, 0)])
    assert len(ended) == 1, "one on_epoch_end between epochs 2 and 3"


def test_a_dataset_factory_has_no_stream():
    spec = RunSpec(epochs=2, seed=1, data=ObjectData(kind="factory", key="data"), model_fingerprint="x",
                   initial_plan=Plan())
    assert FactorySource(spec, lambda plan: None, None).epochs(Plan()) is None


@pytest.mark.parametrize("offset", [0, 12])
def test_a_stream_read_twice_for_an_epoch_gives_the_epoch_twice(tmp_path, offset):
    """Keras may start an iterator it does not use (at an epoch's end, or to build the model): harmless."""
    run = RunDir(tmp_path)
    (tmp_path / "data").mkdir()
    x, y = make_data(20)
    np.save(tmp_path / "data/x.npy", x)
    np.save(tmp_path / "data/y.npy", y)
    data = ArraysData(x="data/x.npy", y="data/y.npy", samples=20)
    spec = RunSpec(epochs=2, seed=3, shuffle=True, data=data, model_fingerprint="f", initial_plan=Plan(batch_size=4))
    stream = ArraysSource(spec, data, run).epochs(Plan(batch_size=4))
    stream.begin(1, offset)
    first, second = _batches(stream.dataset), _batches(stream.dataset)
    _assert_same(first, second)
    assert len(first) == stream.steps(1, offset) == (20 - offset + 3) // 4


@pytest.mark.filterwarnings("ignore:Your input ran out of data")  # a short epoch's end, as in the worker
@pytest.mark.parametrize("steps_per_execution", [1, 3])
def test_one_fit_call_trains_a_short_first_epoch_then_whole_ones_and_callbacks_see_model_fits_batches(
        tmp_path, steps_per_execution):
    """The worker's mechanism in one process: the stream, the claimed cardinality, the continuing callback list."""
    import keras

    from resilient.worker.callbacks import ContinuingCallbackList

    run = RunDir(tmp_path)
    (tmp_path / "data").mkdir()
    x, y = make_data(64)
    np.save(tmp_path / "data/x.npy", x)
    np.save(tmp_path / "data/y.npy", y)
    data = ArraysData(x="data/x.npy", y="data/y.npy", samples=64)
    spec = RunSpec(epochs=3, seed=3, shuffle=True, data=data, model_fingerprint="f", initial_plan=Plan(batch_size=8))
    stream = ArraysSource(spec, data, run).epochs(Plan(batch_size=8))
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(2)])
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  steps_per_execution=steps_per_execution)

    class Seen(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.begun: list[list[int]] = []
            self.steps: list[int] = []

        def on_epoch_begin(self, epoch, logs=None):
            self.begun.append([])
            self.steps.append(self.params["steps"])

        def on_train_batch_begin(self, batch, logs=None):
            self.begun[-1].append(batch)

    seen = Seen()
    offsets = {0: 24}  # epoch 0 resumes 3 batches in: 5 steps, then two whole epochs of 8
    cbl = ContinuingCallbackList([seen], model=model, epochs=3, verbose=0, add_history=True)
    cbl.epoch_begins = lambda epoch: stream.begin(epoch, offsets.get(epoch, 0))
    cbl.set_params({"verbose": 0, "epochs": 3, "steps": cbl.epoch_begins(0)})
    cbl.begin_training()
    model.fit(claim_steps(stream.dataset, 8), epochs=3, callbacks=cbl, verbose=0, shuffle=False)
    assert seen.steps == [5, 8, 8]
    assert seen.begun == [list(range(0, n, steps_per_execution)) for n in (5, 8, 8)]
    assert int(model.optimizer.iterations.numpy()) == 21, "no step, and no optimizer count, past an epoch's data"
