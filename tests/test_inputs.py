"""Inputs refused before any worker starts (and the run directory left as it was); pipelines checked in-process.

No worker is started here: every refused call must raise within a second or two, and the sources are
exercised directly (cache vs no cache, a resume offset vs the uninterrupted epoch).
"""

from __future__ import annotations

import threading
import time
import tracemalloc

import numpy as np
import pytest
from pydantic import ValidationError

import resilient
from resilient._fit import _fingerprint
from resilient._plan import Plan
from resilient._rundir import ArraysData, ObjectData, RunDir, RunSpec
from resilient.data.arrays import store_array
from resilient.data.dispatch import make_source, prepare_inputs
from resilient.data.factory import FactorySource
from resilient.data.folder import ImageFolderSource
from resilient.data.pydataset import PyDatasetSource
from tests.conftest import make_data, make_model
from tests.input_helpers import make_image_model, snapshot, write_image_folder

# ----------------------------------------------------------------------------------------- helpers


def refused(tmp_path, *, error=resilient.InvalidArgumentError, match=None, model=None, run_dir=None, **kwargs):
    """Calls fit, expects ``error`` quickly, and checks the run directory was not created or changed."""
    run_dir = run_dir or tmp_path / "run"
    model = model if model is not None else make_model()
    before = snapshot(run_dir)
    start = time.monotonic()
    with pytest.raises(error, match=match) as info:
        resilient.fit(model, run_dir=run_dir, verbose=0, **kwargs)
    assert time.monotonic() - start < 10, "refused before any worker starts"
    assert snapshot(run_dir) == before, "a refused call leaves the run directory as it was"
    return str(info.value)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("images") / "imgs")


def pydataset(x, y, batch=32, **kwargs):
    import keras

    class Batches(keras.utils.PyDataset):
        def __init__(self) -> None:
            super().__init__(**kwargs)
            self.x, self.y = x, y

        def __len__(self) -> int:
            return int(np.ceil(len(self.x) / batch))

        def __getitem__(self, i):
            return self.x[i * batch:(i + 1) * batch], self.y[i * batch:(i + 1) * batch]

    return Batches()


# ----------------------------------------------------------------------------------------- arrays


def test_tf_dataset_is_refused_with_how_to_wrap_it(tmp_path):
    import tensorflow as tf

    x, y = make_data()
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(32)
    message = refused(tmp_path, x=ds)
    assert "tf.data.Dataset" in message and "def make_dataset(plan):" in message
    message = refused(tmp_path, x=x, y=y, validation_data=ds)
    assert "make_dataset" in message


@pytest.mark.fault("bad_data", "before start", incident="none (InvalidArgumentError)",
                   outcome="refused in < 10 s before any worker, with what was received and expected; run_dir unchanged",
                   lost="nothing started", corrupted="no")
def test_shapes_that_do_not_fit_the_model_are_refused(tmp_path):
    x, y = make_data(features=5)
    message = refused(tmp_path, x=x, y=y, match="x does not fit the model's input")
    assert "x.shape=(256, 5)" in message and "(8,)" in message
    x, y = make_data()
    vx, vy = make_data(n=16, features=6)
    refused(tmp_path, x=x, y=y, validation_data=(vx, vy), match="validation_data does not match")
    refused(tmp_path, x=x, y=y[:10], match="different numbers of samples")
    refused(tmp_path, x=x, y=None, match="Missing argument `y`")
    refused(tmp_path, x="some/folder", y=None, match="image_folder")


@pytest.mark.fault("bad_data", "before start", incident="none (InvalidArgumentError)",
                   outcome="refused in < 10 s before any worker, with what was received and expected; run_dir unchanged",
                   lost="nothing started", corrupted="no")
def test_labels_out_of_range_for_the_loss_are_refused(tmp_path):
    x, y = make_data()
    y = y.copy()
    y[7] = 2  # the model has 2 output units
    message = refused(tmp_path, x=x, y=y)
    assert "Invalid value for argument `y`" in message and ">= 2" in message and "[0, 1]" in message
    y[7] = -1
    assert "negative" in refused(tmp_path, x=x, y=y)
    vx, vy = make_data(n=16)
    refused(tmp_path, x=x, y=np.abs(y), validation_data=(vx, vy + 5), match="argument `y_val`")
    # Non-integer class indices.
    refused(tmp_path, x=x, y=np.abs(y).astype("float32") + 0.5, match="non-integer")


def test_ignore_class_labels_are_accepted(tmp_path):
    import keras

    x, y = make_data()
    y = y.copy()
    y[3] = -1
    model = make_model()
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=-1))
    prepare_inputs(x, y, None, model=model, plan=Plan())  # no error


@pytest.mark.fault("bad_data", "before start", incident="none (InvalidArgumentError)",
                   outcome="refused in < 10 s before any worker, with what was received and expected; run_dir unchanged",
                   lost="nothing started", corrupted="no")
def test_one_hot_and_integer_labels_must_match_the_loss(tmp_path):
    x, y = make_data()
    model = make_model()
    model.compile(optimizer="adam", loss="categorical_crossentropy")
    message = refused(tmp_path, model=model, x=x, y=y)
    assert "one-hot" in message and "sparse_categorical_crossentropy" in message
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    message = refused(tmp_path, model=model, x=x, y=np.eye(2, dtype="float32")[y])
    assert "categorical_crossentropy" in message and "argmax" in message


def test_memmap_is_stored_in_chunks_never_loaded_whole(tmp_path):
    shape = (4096, 2048)  # 32 MiB of float32
    mm = np.lib.format.open_memmap(tmp_path / "big.npy", mode="w+", dtype="float32", shape=shape)
    mm[:] = np.arange(shape[0], dtype="float32")[:, None]
    mm.flush()
    x = np.load(tmp_path / "big.npy", mmap_mode="r")
    y = np.zeros(shape[0], dtype="int32")
    inputs = prepare_inputs(x, y, None, model=None, plan=Plan())
    assert np.shares_memory(inputs.x, x), "np.asarray views the memmap, it does not copy it"
    tracemalloc.start()
    try:
        store_array(tmp_path / "stored.npy", inputs.x)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < x.nbytes / 4, f"storing used {peak} bytes of Python/NumPy memory for a {x.nbytes}-byte memmap"
    stored = np.load(tmp_path / "stored.npy", mmap_mode="r")
    assert stored.shape == shape and stored.dtype == np.float32
    np.testing.assert_array_equal(stored[::511], x[::511])


def test_a_callback_that_cannot_be_carried_is_refused(tmp_path):
    import keras

    class Locked(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.lock = threading.Lock()

    x, y = make_data()
    refused(tmp_path, x=x, y=y, callbacks=[Locked()], match="cannot be carried")


def test_a_generator_or_a_class_is_refused(tmp_path):
    x, y = make_data()
    refused(tmp_path, x=(b for b in [(x, y)]), match="generator")
    import keras

    refused(tmp_path, x=keras.utils.PyDataset, match="Received the class PyDataset")


# ----------------------------------------------------------------------------------------- image folder


def test_image_folder_spec_is_frozen_and_validated(tmp_path):
    spec = resilient.data.image_folder(tmp_path, image_size=16)
    assert spec.image_size == (16, 16) and spec.path == str(tmp_path) and spec.channels == 3
    with pytest.raises(ValidationError):
        spec.image_size = (8, 8)
    with pytest.raises(resilient.InvalidArgumentError, match=r"validation_split.*Received: validation_split=1\.0"):
        resilient.data.image_folder(tmp_path, validation_split=1.0)
    with pytest.raises(resilient.InvalidArgumentError, match="color_mode"):
        resilient.data.image_folder(tmp_path, color_mode="cmyk")
    with pytest.raises(resilient.InvalidArgumentError, match="image_size"):
        resilient.data.image_folder(tmp_path, image_size=(0, 4))


def test_image_folder_that_does_not_exist_is_refused(tmp_path):
    message = refused(tmp_path, model=make_image_model(), x=resilient.data.image_folder(tmp_path / "nope", image_size=8))
    assert "does not exist" in message and str(tmp_path / "nope") in message


def test_empty_image_folder_is_refused(tmp_path):
    empty = tmp_path / "empty"
    (empty / "cats").mkdir(parents=True)
    (empty / "dogs").mkdir()
    (empty / "dogs" / "notes.txt").write_text("not an image")
    message = refused(tmp_path, model=make_image_model(), x=resilient.data.image_folder(empty, image_size=8))
    assert "no images" in message and "cats" in message
    bare = tmp_path / "bare"
    bare.mkdir()
    assert "no class subfolder" in refused(tmp_path, model=make_image_model(), x=resilient.data.image_folder(bare))


def test_image_folder_with_more_classes_than_outputs_is_refused(tmp_path, folder):
    message = refused(tmp_path, model=make_image_model(classes=2), x=resilient.data.image_folder(folder, image_size=8))
    assert "3 classes" in message and "class0, class1, class2" in message and "2 units" in message


def test_image_folder_label_mode_must_suit_the_loss(tmp_path, folder):
    model = make_image_model(loss="categorical_crossentropy")
    spec = resilient.data.image_folder(folder, image_size=8)
    assert "label_mode='categorical'" in refused(tmp_path, model=model, x=spec)
    prepare_inputs(resilient.data.image_folder(folder, image_size=8, label_mode="categorical"), None, None,
                   model=model, plan=Plan())
    binary = resilient.data.image_folder(folder, image_size=8, label_mode="binary")
    assert "exactly 2 classes" in refused(tmp_path, model=make_image_model(classes=1), x=binary)


def test_image_folder_that_does_not_fit_a_fixed_size_model_is_refused(tmp_path, folder):
    model = make_image_model(input_shape=(16, 16, 3))
    message = refused(tmp_path, model=model, x=resilient.data.image_folder(folder, image_size=8))
    assert "(8, 8, 3)" in message and "(16, 16, 3)" in message
    refused(tmp_path, model=model, x=resilient.data.image_folder(folder, image_size=16, color_mode="grayscale"),
            match="does not fit")


def test_image_folder_conflicts_are_refused(tmp_path, folder):
    _, y = make_data()
    spec = resilient.data.image_folder(folder, image_size=8)
    refused(tmp_path, model=make_image_model(), x=spec, y=y, match="Expected y=None")
    refused(tmp_path, model=make_image_model(), x=spec, validation_data=spec, match="validation_split=0")
    tiny = resilient.data.image_folder(folder, image_size=8, validation_split=0.01)
    refused(tmp_path, model=make_image_model(), x=tiny, match="no validation image")


def test_resuming_with_a_changed_image_folder_is_refused(tmp_path):
    images = write_image_folder(tmp_path / "imgs", classes=2, per_class=4)
    model = make_image_model(classes=2)
    spec = resilient.data.image_folder(images, image_size=8, validation_split=0.25)
    inputs = prepare_inputs(spec, None, None, model=model, plan=Plan())
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    data = inputs.write(run, seed=5)
    fingerprint, name = _fingerprint(model, False)
    run.write_spec(RunSpec(epochs=1, seed=5, data=data, model_fingerprint=fingerprint, model_name=name,
                           initial_plan=Plan()))
    write_image_folder(tmp_path / "imgs", classes=2, per_class=5, seed=1)  # one more image per class
    message = refused(tmp_path, error=resilient.RunDirError, model=model, x=spec, run_dir=run.path)
    assert "8 files then, 10 now: 2 added" in message
    # Arrays where a folder was trained on.
    x, y = np.zeros((10, 8, 8, 3), "float32"), np.zeros(10, "int32")
    refused(tmp_path, error=resilient.RunDirError, model=model, x=x, y=y, run_dir=run.path, match="image folder")


def test_resuming_with_other_arrays_is_refused(tmp_path):
    x, y = make_data()
    model = make_model()
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    data = prepare_inputs(x, y, None, model=model, plan=Plan()).write(run, seed=1)
    assert isinstance(data, ArraysData)
    fingerprint, name = _fingerprint(model, False)
    run.write_spec(RunSpec(epochs=1, seed=1, data=data, model_fingerprint=fingerprint, model_name=name,
                           initial_plan=Plan()))
    x2, y2 = make_data(n=128)
    refused(tmp_path, error=resilient.RunDirError, model=model, x=x2, y=y2, run_dir=run.path,
            match=r"shape \(256, 8\).*shape \(128, 8\)")


# ----------------------------------------------------------------------------------------- factories, PyDatasets


def _unbatched(plan):
    import tensorflow as tf

    x, y = make_data()
    return tf.data.Dataset.from_tensor_slices((x, y))


def _infinite(plan):
    return _unbatched(plan).batch(plan.batch_size).repeat()


def _not_a_dataset(plan):
    return make_data()


def _wrong_width(plan):
    return _unbatched(plan).map(lambda a, b: (a[:5], b)).batch(plan.batch_size)


def _one_hot_for_sparse(plan):
    import tensorflow as tf

    return _unbatched(plan).map(lambda a, b: (a, tf.one_hot(b, 2))).batch(plan.batch_size)


def _two_arguments(plan, other):
    return _unbatched(plan).batch(plan.batch_size)


@pytest.mark.fault("bad_data", "before start", incident="none (InvalidArgumentError)",
                   outcome="refused in < 10 s before any worker, with what was received and expected; run_dir unchanged",
                   lost="nothing started", corrupted="no")
def test_bad_factories_are_refused(tmp_path):
    assert ".batch(plan.batch_size)" in refused(tmp_path, x=_unbatched)
    assert "infinite" in refused(tmp_path, x=_infinite)
    assert "returned tuple" in refused(tmp_path, x=_not_a_dataset)
    assert "does not fit the model's input" in refused(tmp_path, x=_wrong_width)
    assert "integer class indices" in refused(tmp_path, x=_one_hot_for_sparse)
    assert "make_dataset(plan)" in refused(tmp_path, x=_two_arguments)
    x, y = make_data()
    refused(tmp_path, x=x, y=y, validation_data=_wrong_width, match="does not fit")

    lock = threading.Lock()

    def holds_a_lock(plan):
        with lock:
            return _unbatched(plan).batch(plan.batch_size)

    assert "cannot be carried" in refused(tmp_path, x=holds_a_lock)


@pytest.mark.fault("bad_data", "before start", incident="none (InvalidArgumentError)",
                   outcome="refused in < 10 s before any worker, with what was received and expected; run_dir unchanged",
                   lost="nothing started", corrupted="no")
def test_bad_pydatasets_are_refused(tmp_path):
    x, y = make_data()
    refused(tmp_path, x=pydataset(x, y), y=y, match="Expected y=None")
    assert "(32, 5)" in refused(tmp_path, x=pydataset(x[:, :5], y))
    bad = y.copy()
    bad[0] = 9
    assert ">= 2" in refused(tmp_path, x=pydataset(x, bad))
    assert "0 batches" in refused(tmp_path, x=pydataset(x[:0], y[:0]))
    assert "cannot be carried" in refused(tmp_path, x=pydataset(x, y), callbacks=None,
                                          validation_data=_with_lock(pydataset(x, y)))


def _with_lock(ds):
    ds.lock = threading.Lock()
    return ds


# ----------------------------------------------------------------------------------------- pipelines


def _spec_for(data, seed=4, shuffle=True):
    return RunSpec(epochs=3, seed=seed, shuffle=shuffle, data=data, model_fingerprint="x", initial_plan=Plan())


def _batches(ds):
    out = []
    for item in ds:
        out.append(tuple(np.asarray(t) for t in item) if isinstance(item, tuple) else np.asarray(item))
    return out


def _concat(batches):
    if isinstance(batches[0], tuple):
        return tuple(np.concatenate([b[i] for b in batches]) for i in range(len(batches[0])))
    return np.concatenate(batches)


def test_image_folder_source_cache_and_resume_give_the_same_samples(tmp_path, folder):
    spec = resilient.data.image_folder(folder, image_size=(8, 6), validation_split=0.2)
    inputs = prepare_inputs(spec, None, None, model=make_image_model(), plan=Plan())
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    data = inputs.write(run, seed=4)
    assert data.kind == "image_folder" and data.samples == 48
    run_spec = _spec_for(data)
    plan = Plan(batch_size=8)
    source = make_source(run_spec, run, {})
    assert isinstance(source, ImageFolderSource)
    first = _concat(_batches(source.epoch(plan, 0, 0)[0]))  # decodes and fills the cache
    assert first[0].shape == (48, 8, 6, 3) and first[0].dtype == np.float32 and first[1].dtype == np.int32
    cached, steps = source.epoch(plan, 1, 0)  # gathers from the full cache
    assert steps == 6
    cached = _concat(_batches(cached))
    uncached = _concat(_batches(make_source(run_spec, run, {}).epoch(plan.replace(cache=False), 1, 0)[0]))
    for a, b in zip(cached, uncached):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[1], cached[1]), "each epoch has its own order"
    # A resume 20 samples into epoch 1, in a fresh worker (empty cache), with another batch size.
    tail, steps = make_source(run_spec, run, {}).epoch(Plan(batch_size=4), 1, 20)
    assert steps == 7
    tail = _concat(_batches(tail))
    for a, b in zip(tail, cached):
        np.testing.assert_array_equal(a, b[20:])
    # Validation: the 12 held-out images, at the plan's (lowered) size.
    val = _concat(_batches(source.validation(Plan(batch_size=5, image_size=(4, 3)))))
    assert val[0].shape == (12, 4, 3, 3)


def test_factory_source_skips_batches_on_resume(tmp_path):
    x, y = make_data(n=64)
    calls = []

    def make_dataset(plan, epoch):
        import tensorflow as tf

        calls.append(epoch)
        return tf.data.Dataset.from_tensor_slices((x, y)).shuffle(64, seed=epoch).batch(plan.batch_size)

    source = FactorySource(_spec_for(ObjectData(kind="factory", key="data")), make_dataset, None)
    full, steps = source.epoch(Plan(batch_size=8), 2, 0)
    assert steps == 8
    tail, steps = source.epoch(Plan(batch_size=8), 2, 24)
    assert steps == 5 and calls == [2, 2]
    np.testing.assert_array_equal(_concat(_batches(tail))[0], _concat(_batches(full))[0][24:])


def test_pydataset_source_orders_batches_by_seed_and_epoch_and_replays_epoch_ends(tmp_path):
    x, y = make_data(n=80)
    ended = []
    pyds = pydataset(x, y, batch=16, workers=2)
    pyds.on_epoch_end = lambda: ended.append(1)
    spec = _spec_for(ObjectData(kind="pydataset", key="data", samples=5))
    source = PyDatasetSource(spec, pyds, None)
    assert source.samples_per_step(Plan(batch_size=64)) == 1
    full, steps = source.epoch(Plan(), 2, 0)
    assert steps == 5 and len(ended) == 2, "a worker resuming at epoch 2 replays two epoch ends"
    full = _concat(_batches(full))
    assert sorted(full[0][:, 0].tolist()) == sorted(x[:, 0].tolist())
    assert not np.array_equal(full[0], x), "batches are shuffled"
    tail, steps = PyDatasetSource(spec, pyds, None).epoch(Plan(), 2, 3)
    assert steps == 2
    np.testing.assert_array_equal(_concat(_batches(tail))[0], full[0][48:])


def test_make_source_pairs_each_training_input_with_its_validation_input(tmp_path):
    """Arrays with a validation factory (carried in objects.pkl); a factory with validation arrays (stored)."""
    x, y = make_data(n=64)
    vx, vy = make_data(n=24, seed=2)

    def make_validation(plan):
        import tensorflow as tf

        return tf.data.Dataset.from_tensor_slices((vx, vy)).batch(plan.batch_size)

    model = make_model()
    inputs = prepare_inputs(x, y, make_validation, model=model, plan=Plan())
    run = RunDir(tmp_path / "arrays")
    run.path.mkdir()
    data = inputs.write(run, seed=1)
    assert isinstance(data, ArraysData) and data.val_x is None and inputs.objects["val_data"] is make_validation
    val = _concat(_batches(make_source(_spec_for(data), run, inputs.objects).validation(Plan(batch_size=10))))
    np.testing.assert_array_equal(val[0], vx)

    def make_train(plan):
        import tensorflow as tf

        return tf.data.Dataset.from_tensor_slices((x, y)).batch(plan.batch_size)

    inputs = prepare_inputs(make_train, None, (vx, vy), model=model, plan=Plan())
    run = RunDir(tmp_path / "factory")
    run.path.mkdir()
    data = inputs.write(run, seed=1)
    assert data.val_key == "data/val_x.npy" and (run.data_dir / "val_y.npy").exists()
    source = make_source(_spec_for(data), run, inputs.objects)
    assert isinstance(source, FactorySource)
    val = _concat(_batches(source.validation(Plan(batch_size=10))))
    np.testing.assert_array_equal(val[0], vx)
    np.testing.assert_array_equal(val[1], vy)


# ------------------------------------------------------------------------------------ an image folder on Drive

MOUNTS_TEXT = """overlay / overlay rw,relatime 0 0
/dev/sda1 /content ext4 rw,relatime 0 0
drive /content/drive fuse.drive rw,nosuid,nodev,relatime,user_id=0,group_id=0 0 0
server:/export /mnt/nfs\\040share nfs4 rw 0 0
"""


def test_the_file_system_of_a_path_is_read_from_the_mount_table():
    from resilient.data.folder import filesystem_of, is_slow_filesystem

    assert filesystem_of("/content/drive/MyDrive/cats", MOUNTS_TEXT) == ("/content/drive", "fuse.drive")
    assert filesystem_of("/content/drivelike/cats", MOUNTS_TEXT) == ("/content", "ext4")  # a prefix, not a parent
    assert filesystem_of("/mnt/nfs share/x", MOUNTS_TEXT) == ("/mnt/nfs share", "nfs4")
    assert filesystem_of("/tmp/x", MOUNTS_TEXT) == ("/", "overlay")
    assert [is_slow_filesystem(t) for t in ("fuse.drive", "nfs4", "ext4", "overlay", "tmpfs", "fuseblk")] == [
        True, True, False, False, False, False]


def test_an_image_folder_on_a_fuse_mount_is_read_with_a_warning_about_speed(tmp_path, monkeypatch):
    from resilient.data import folder as folder_module

    root = write_image_folder(tmp_path / "drive" / "cats", per_class=2)
    mounts = tmp_path / "mounts"
    mounts.write_text(f"/dev/sda1 / ext4 rw 0 0\ndrive {tmp_path / 'drive'} fuse.drive rw 0 0\n")
    monkeypatch.setattr(folder_module, "MOUNTS", str(mounts))
    x = resilient.data.image_folder(root, image_size=(12, 10), validation_split=0)
    with pytest.warns(UserWarning, match=r"is on a fuse.drive file system .* Copy the folder to local disk") as got:
        prepare_inputs(x, None, x, model=make_image_model(), plan=Plan())
    ours = [str(w.message) for w in got if "image folder" in str(w.message)]
    assert sorted(text.split(f"{root} (")[1].split(")")[0] for text in ours) == ["validation_data", "x"], ours
    mounts.write_text("/dev/sda1 / ext4 rw 0 0\n")  # local disk: no warning
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepare_inputs(x, None, None, model=make_image_model(), plan=Plan())


def test_the_image_folders_of_a_fit_call_are_copied_and_the_worker_reads_the_complete_copy(tmp_path, monkeypatch):
    from collections import namedtuple
    from types import SimpleNamespace

    from resilient._rundir import Journal
    from resilient.data import folder as folder_module
    from resilient.data.folder import folder_copy_jobs, stored_folder_copy_jobs
    from resilient.supervisor.folder_copy import FolderCopier

    root = write_image_folder(tmp_path / "drive" / "cats", per_class=2)
    x = resilient.data.image_folder(root, image_size=(12, 10), validation_split=0)
    inputs = prepare_inputs(x, None, x, model=make_image_model(), plan=Plan())
    jobs = folder_copy_jobs(inputs)
    assert [j.role for j in jobs] == ["x", "validation_data"]
    assert all(j.root == str(root) and len(j.files) == 6 for j in jobs)
    run = RunDir(tmp_path / "run")
    run.create()
    data = inputs.write(run, seed=0)
    # resume (no fit arguments): the x folder from the index stored in the run directory.
    assert stored_folder_copy_jobs(run, SimpleNamespace(data=data)) == jobs[:1]
    plan = Plan(batch_size=4)
    before = make_source(_spec_for(data), run, inputs.objects)
    assert before.folder_reads == ()  # no copy folder: nothing to say
    # Declared on a Drive mount: both folders copied beside the run directory; the worker reads the copies.
    mounts = tmp_path / "mounts"
    mounts.write_text(f"/dev/sda1 / ext4 rw 0 0\ndrive {tmp_path / 'drive'} fuse.drive rw 0 0\n")
    monkeypatch.setattr(folder_module, "MOUNTS", str(mounts))
    free = namedtuple("Usage", "total used free")(100 << 30, 0, 100 << 30)
    copier = FolderCopier(run.path, jobs, Journal(run.events), disk_usage=lambda path: free)
    for job in jobs:
        copier.copy(job)
    after = make_source(_spec_for(data), run, inputs.objects)
    assert [(r["role"], r["from_copy"]) for r in after.folder_reads] == [("validation_data", True), ("x", True)]
    assert all(str(p).startswith(str(tmp_path / "run.images" / "x")) for p in after._pipe.paths)
    assert all(str(p).startswith(str(tmp_path / "run.images" / "validation_data")) for p in after._val._pipe.paths)
    for a, b in zip(_concat(_batches(before.epoch(plan, 1, 0)[0])), _concat(_batches(after.epoch(plan, 1, 0)[0]))):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(_concat(_batches(before.validation(plan))), _concat(_batches(after.validation(plan)))):
        np.testing.assert_array_equal(a, b)
    arrays = prepare_inputs(np.zeros((4, 12, 10, 3), "float32"), np.zeros(4, "int32"), None,
                            model=make_image_model(), plan=Plan())
    assert folder_copy_jobs(arrays) == ()
