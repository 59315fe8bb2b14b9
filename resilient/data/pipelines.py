"""Input pipelines built in the worker, per Plan and per epoch, so a resume is exact.

A source answers: ``epoch(plan, epoch, offset)`` -> ``(batched dataset of what is left of the epoch
after offset, steps or None)``, ``validation(plan)`` -> dataset or None, and
``samples_per_step(plan)``: how far ``offset`` advances per training step. The order of an epoch is a
function of ``(seed, epoch)`` alone and the position is kept in samples (batches, for a PyDataset,
which picks its own batch size), so a resume with the same or another batch size continues at
exactly the right sample.

Inputs, as ``RunSpec.data`` describes them:

- ``ArraysData``: NumPy arrays in ``data/`` (memory-mapped). Exact.
- ``ObjectData(kind="image_folder", key="data/image_folder.json")``: a :class:`FolderIndex` (the
  listed files, labels and the train/validation split). Exact, with or without the cache.
- ``ObjectData(kind="factory", key="data")``: ``objects["data"]``, a ``make_dataset(plan)``. Exact only
  when the factory's order per epoch is deterministic (see ``resilient.data.DatasetFactory``).
- ``ObjectData(kind="pydataset", key="data")``: ``objects["data"]``, a ``keras.utils.PyDataset``. Exact
  when ``__getitem__`` is deterministic and ``on_epoch_end`` changes state deterministically.

Validation data: ``ArraysData.val_x/val_y``; the image folder's own split; or ``val_key``:
``"data/val_x.npy"`` (arrays ``data/val_x.npy`` and ``data/val_y.npy``, with
``data/val_sample_weight.npy`` when they carry sample weights) or ``"val_data"``
(``objects["val_data"]``: a factory, a PyDataset, or a FolderIndex of a whole folder). With
``ArraysData``, ``objects["val_data"]`` holds a non-array validation input.
"""

from __future__ import annotations

import collections
import inspect
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from .._rundir import ArraysData, ObjectData, RunDir, RunSpec
from . import ImageFolder

#: Arrays up to this size are loaded into the worker's memory and gathered in-graph (fastest);
#: larger ones stay memory-mapped and are gathered batch by batch, so RSS does not grow with them.
IN_MEMORY_LIMIT = 256 << 20

FOLDER_INDEX = "data/image_folder.json"
VAL_ARRAYS = "data/val_x.npy"
VAL_OBJECT = "val_data"
VAL_SAMPLE_WEIGHT = "data/val_sample_weight.npy"


def epoch_order(seed: int, epoch: int, n: int, shuffle: bool) -> np.ndarray:
    """The sample order of ``epoch``: a permutation that depends on ``(seed, epoch)`` only."""
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    return np.random.default_rng([seed, epoch]).permutation(n).astype(np.int64)


def epoch_span(spec: RunSpec, epoch: int, n: int) -> tuple[int, int, int]:
    """``(pass, start, end)``: ``epoch`` trains positions ``[start, end)`` of pass ``pass``'s order.

    Without ``steps_per_epoch`` an epoch is a whole pass. With it, as Keras's epoch iterator does for
    finite data, the epochs continue one iterator (counted from ``initial_epoch``) through the data in
    steps of the requested batch size; the epoch that reaches the end of a pass stops there (shorter),
    and the next starts a new pass. Positions are samples, so a plan with another batch size trains
    the same samples in each epoch.
    """
    steps, batch = spec.steps_per_epoch, spec.initial_plan.batch_size
    batches = math.ceil(n / batch)
    if steps is None or steps >= batches:
        return epoch, 0, n
    chunks = math.ceil(batches / steps)
    passes, chunk = divmod(epoch - spec.initial_epoch, chunks)
    return spec.initial_epoch + passes, chunk * steps * batch, min((chunk + 1) * steps * batch, n)


def class_weight_fn(class_weight: dict[int, float]) -> Any:
    """A ``tf.data`` map that turns fit's ``class_weight`` into sample weights, as Keras does.

    Labels are read as Keras reads them (argmax of one-hot, rounded otherwise); a class the dict
    leaves out weighs 1.0, as in Keras's array path (its tf.data path would fail on one past the
    largest key).
    """
    import keras
    import tensorflow as tf

    size = max(class_weight) + 1
    table = tf.constant([float(class_weight.get(c, 1.0)) for c in range(size)], dtype=tf.float32)

    def weigh(*data: Any) -> Any:
        x, y, sw = keras.utils.unpack_x_y_sample_weight(data if len(data) > 1 else data[0])
        if sw is not None:
            raise ValueError("You cannot `class_weight` and `sample_weight` at the same time.")
        if y is None or tf.nest.is_nested(y):
            raise ValueError("`class_weight` is only supported for Models with a single output.")
        if y.shape.rank is not None and y.shape.rank >= 2:
            classes = tf.__internal__.smart_cond.smart_cond(
                tf.shape(y)[-1] > 1,
                lambda: tf.argmax(y, axis=-1, output_type=tf.int32),
                lambda: tf.cast(tf.round(tf.squeeze(y, axis=-1)), tf.int32),
            )
        else:
            classes = tf.cast(tf.round(y), tf.int32)
        known = tf.logical_and(classes >= 0, classes < size)
        weights = tf.where(known, tf.gather(table, tf.clip_by_value(classes, 0, size - 1)), 1.0)
        return x, y, weights

    return weigh


def _autotune(value: int | None) -> int:
    import tensorflow as tf

    return tf.data.AUTOTUNE if value is None else value


# ----------------------------------------------------------------------------------------- arrays


class _ArrayPipeline:
    """Batches of ``x[idx], y[idx]`` for index lists, resized when x holds images and the plan asks."""

    def __init__(self, x: np.ndarray, y: np.ndarray | None, image_axes: tuple[int, int] | None,
                 sw: np.ndarray | None = None) -> None:
        self.x, self.y, self.image_axes = x, y, image_axes
        self.sw = sw  # sample weights, yielded third: (x, y, sw)
        self._gather: Any = None

    def _gather_fn(self) -> Any:
        """Built once per process: small arrays are copied into TensorFlow once, not every epoch."""
        if self._gather is None:
            self._gather = self._make_gather_fn()
        return self._gather

    def _make_gather_fn(self) -> Any:
        import tensorflow as tf

        x, y, sw = self.x, self.y, self.sw
        if sw is not None:
            return self._make_weighted_gather_fn()
        if x.nbytes + (y.nbytes if y is not None else 0) <= IN_MEMORY_LIMIT:
            xt = tf.constant(np.asarray(x))
            yt = tf.constant(np.asarray(y)) if y is not None else None

            def gather(idx: Any) -> Any:
                return (tf.gather(xt, idx), tf.gather(yt, idx)) if yt is not None else tf.gather(xt, idx)

            return gather

        x_dtype = tf.as_dtype(x.dtype)
        y_dtype = tf.as_dtype(y.dtype) if y is not None else None

        def load(idx: np.ndarray) -> Any:
            return (np.asarray(x[idx]), np.asarray(y[idx])) if y is not None else np.asarray(x[idx])

        def gather_mm(idx: Any) -> Any:
            if y is None:
                out = tf.numpy_function(load, [idx], x_dtype)
                out.set_shape((None, *x.shape[1:]))
                return out
            bx, by = tf.numpy_function(load, [idx], [x_dtype, y_dtype])
            bx.set_shape((None, *x.shape[1:]))
            by.set_shape((None, *y.shape[1:]))
            return bx, by

        return gather_mm

    def _make_weighted_gather_fn(self) -> Any:
        """``(x, y, sample_weight)`` batches, in memory or memory-mapped as for ``(x, y)``."""
        import tensorflow as tf

        arrays = [a for a in (self.x, self.y, self.sw) if a is not None]
        if sum(a.nbytes for a in arrays) <= IN_MEMORY_LIMIT:
            tensors = [tf.constant(np.asarray(a)) for a in arrays]

            def gather(idx: Any) -> Any:
                return tuple(tf.gather(t, idx) for t in tensors)

            return gather
        dtypes = [tf.as_dtype(a.dtype) for a in arrays]

        def load(idx: np.ndarray) -> Any:
            return [np.asarray(a[idx]) for a in arrays]

        def gather_mm(idx: Any) -> Any:
            out = tf.numpy_function(load, [idx], dtypes)
            for t, a in zip(out, arrays):
                t.set_shape((None, *a.shape[1:]))
            return tuple(out)

        return gather_mm

    def _resize_fn(self, plan: Any) -> Any:
        axes = self.image_axes
        if plan.image_size is None or axes is None:
            return None
        source = (self.x.shape[1 + axes[0]], self.x.shape[1 + axes[1]])
        if tuple(plan.image_size) == tuple(source):
            return None
        import tensorflow as tf

        size = list(plan.image_size)
        dtype = tf.as_dtype(self.x.dtype)

        def resize(bx: Any, by: Any = None, *rest: Any) -> Any:
            out = tf.cast(tf.image.resize(tf.cast(bx, tf.float32), size, antialias=True), dtype)
            return out if by is None else (out, by, *rest)

        return resize

    def dataset(self, idx: np.ndarray, plan: Any) -> Any:
        import tensorflow as tf

        calls = _autotune(plan.parallel_calls)
        ds = tf.data.Dataset.from_tensor_slices(idx).batch(plan.batch_size)
        ds = ds.map(self._gather_fn(), num_parallel_calls=calls, deterministic=True)
        resize = self._resize_fn(plan)
        if resize is not None:
            ds = ds.map(resize, num_parallel_calls=calls, deterministic=True)
        return ds.prefetch(_autotune(plan.prefetch))


def _load_arrays(run: RunDir, x: str, y: str | None) -> tuple[np.ndarray, np.ndarray | None]:
    return np.load(run.path / x, mmap_mode="r"), (np.load(run.path / y, mmap_mode="r") if y else None)


def _image_axes(x: np.ndarray) -> tuple[int, int] | None:
    return (0, 1) if x.ndim == 4 else None


# ----------------------------------------------------------------------------------------- sources


class _Source:
    """What every source shares: the run's seed and shuffle flag, and the validation input."""

    def __init__(self, spec: RunSpec, val: Any = None) -> None:
        self.spec = spec
        self._val = val  # None, or an object with .dataset(plan)

    def samples_per_step(self, plan: Any) -> int:
        return plan.batch_size

    def validation(self, plan: Any) -> Any:
        if self._val is not None and self.spec.validation_batch_size is not None:
            plan = plan.replace(batch_size=self.spec.validation_batch_size)  # fit's validation_batch_size
        return None if self._val is None else self._val.dataset(plan)

    def _weighed(self, ds: Any) -> Any:
        """The training batches with fit's ``class_weight`` applied as sample weights."""
        if not self.spec.class_weight:
            return ds
        return ds.map(class_weight_fn(self.spec.class_weight))


class ArraysSource(_Source):
    """NumPy arrays stored in the run directory, memory-mapped. Resume is exact."""

    def __init__(self, spec: RunSpec, data: ArraysData, run: RunDir, objects: dict[str, Any] | None = None) -> None:
        self.data = data
        self.x, self.y = _load_arrays(run, data.x, data.y)
        self.n = int(self.x.shape[0])
        sw = np.load(run.path / data.sample_weight, mmap_mode="r") if data.sample_weight else None
        self._pipe = _ArrayPipeline(self.x, self.y, data.image_axes, sw)
        val: Any = None
        if data.val_x:
            vx, vy = _load_arrays(run, data.val_x, data.val_y)
            vsw = np.load(run.path / data.val_sample_weight, mmap_mode="r") if data.val_sample_weight else None
            val = _ArrayValidation(_ArrayPipeline(vx, vy, data.image_axes, vsw))
        elif objects and VAL_OBJECT in objects:
            val = _validation_input(objects[VAL_OBJECT])
        super().__init__(spec, val)

    def epoch(self, plan: Any, epoch: int, offset: int) -> tuple[Any, int]:
        order, start, end = epoch_span(self.spec, epoch, self.n)
        idx = epoch_order(self.spec.seed, order, self.n, self.spec.shuffle)[start + offset:end]
        return self._weighed(self._pipe.dataset(idx, plan)), math.ceil(len(idx) / plan.batch_size)


class _ArrayValidation:
    def __init__(self, pipe: _ArrayPipeline) -> None:
        self._pipe = pipe

    def dataset(self, plan: Any) -> Any:
        return self._pipe.dataset(np.arange(self._pipe.x.shape[0], dtype=np.int64), plan)


# ------------------------------------------------------------------------------------- image folder


class FolderIndex(BaseModel):
    """An image folder as listed once by fit: what the worker reads, so every attempt sees the same files.

    ``files`` are relative to ``root`` in sorted order; ``labels`` are class indices (one per file);
    ``train`` and ``validation`` index ``files``, in the order of the seeded split.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    folder: ImageFolder
    root: str
    files: tuple[str, ...]
    labels: tuple[int, ...] | None
    class_names: tuple[str, ...] | None
    train: tuple[int, ...]
    validation: tuple[int, ...]

    @property
    def num_classes(self) -> int:
        if self.class_names is not None:
            return len(self.class_names)
        return (max(self.labels) + 1) if self.labels else 0


def encode_labels(index: FolderIndex, ids: np.ndarray) -> np.ndarray | None:
    """Labels of files ``ids`` per the folder's label_mode: int32 (n,), one-hot float32 (n, k), float32 (n, 1)."""
    folder = index.folder
    if not folder.has_labels or index.labels is None:
        return None
    raw = np.asarray(index.labels, dtype=np.int64)[ids]
    if folder.label_mode == "categorical":
        return np.eye(index.num_classes, dtype=np.float32)[raw]
    if folder.label_mode == "binary":
        return raw.astype(np.float32).reshape(-1, 1)
    return raw.astype(np.int32)


class _FolderPipeline:
    """Decoded, resized images of one subset of a folder, with a lazily filled in-memory cache."""

    def __init__(self, index: FolderIndex, subset: Literal["train", "validation"]) -> None:
        ids = np.asarray(index.train if subset == "train" else index.validation, dtype=np.int64)
        self.folder = index.folder
        self.paths = np.asarray([os.path.join(index.root, index.files[i]) for i in ids], dtype=object)
        self.labels = encode_labels(index, ids)
        self.n = len(ids)
        self._cache: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        self._lock = threading.Lock()

    def size(self, plan: Any) -> tuple[int, int]:
        return tuple(plan.image_size or self.folder.image_size)  # type: ignore[return-value]

    def _load_fn(self, size: tuple[int, int]) -> Any:
        import tensorflow as tf

        channels, method = self.folder.channels, self.folder.interpolation

        def load(path: Any) -> Any:
            image = tf.io.decode_image(tf.io.read_file(path), channels=channels, expand_animations=False)
            image = tf.cast(tf.image.resize(image, size, method=method), tf.float32)
            image.set_shape((*size, channels))
            return image

        return load

    def _with_labels(self, ds: Any) -> Any:
        """(positions, images) batches -> (images, labels), or images alone when unlabelled."""
        import tensorflow as tf

        if self.labels is None:
            return ds.map(lambda pos, images: images)
        labels = tf.constant(self.labels)
        return ds.map(lambda pos, images: (images, tf.gather(labels, pos)))

    def dataset(self, positions: np.ndarray, plan: Any, *, cache: bool) -> Any:
        """Batches of the images at ``positions`` (indices into this subset), in that order."""
        import tensorflow as tf

        size = self.size(plan)
        shape = (*size, self.folder.channels)
        calls = _autotune(plan.parallel_calls)
        ds = tf.data.Dataset.from_tensor_slices(np.asarray(positions, dtype=np.int64))
        entry = self._cache.get(size) if cache else None
        if entry is not None and bool(entry[1].all()):
            store = entry[0]

            def gather(pos: np.ndarray) -> np.ndarray:
                return store[pos]

            def from_cache(pos: Any) -> Any:
                images = tf.numpy_function(gather, [pos], tf.float32, stateful=False)
                images.set_shape((None, *shape))
                return pos, images

            ds = ds.batch(plan.batch_size).map(from_cache, num_parallel_calls=calls, deterministic=True)
        else:
            paths = tf.constant(self.paths.astype(str))
            load = self._load_fn(size)
            ds = ds.map(lambda pos: (pos, load(tf.gather(paths, pos))), num_parallel_calls=calls, deterministic=True)
            ds = ds.batch(plan.batch_size)
            if cache:
                ds = ds.map(self._store_fn(size, shape))
        return self._with_labels(ds).prefetch(_autotune(plan.prefetch))

    def _store_fn(self, size: tuple[int, int], shape: tuple[int, ...]) -> Any:
        """A map that copies each decoded batch into the cache (filled as the first full pass decodes)."""
        import tensorflow as tf

        with self._lock:
            if size not in self._cache:
                # np.empty: pages are only committed as images are stored.
                self._cache[size] = (np.empty((self.n, *shape), dtype=np.float32), np.zeros(self.n, dtype=bool))
        store, filled = self._cache[size]

        def keep(pos: np.ndarray, images: np.ndarray) -> np.ndarray:
            store[pos] = images
            filled[pos] = True
            return images

        def stored(pos: Any, images: Any) -> Any:
            out = tf.numpy_function(keep, [pos, images], tf.float32, stateful=True)
            out.set_shape(images.shape)
            return pos, out

        return stored

    def validation_dataset(self, plan: Any, *, cache: bool) -> Any:
        """The whole subset in file order; a fixed order, so ``tf.data`` ``cache()`` is exact here."""
        import tensorflow as tf

        size = self.size(plan)
        paths = tf.constant(self.paths.astype(str))
        load = self._load_fn(size)
        ds = tf.data.Dataset.from_tensor_slices(np.arange(self.n, dtype=np.int64))
        ds = ds.map(lambda pos: (pos, load(tf.gather(paths, pos))), num_parallel_calls=_autotune(plan.parallel_calls),
                    deterministic=True)
        if cache:
            ds = ds.cache()
        return self._with_labels(ds.batch(plan.batch_size)).prefetch(_autotune(plan.prefetch))


class _FolderValidation:
    def __init__(self, index: FolderIndex, subset: Literal["train", "validation"] = "validation") -> None:
        self._pipe = _FolderPipeline(index, subset)

    def dataset(self, plan: Any) -> Any:
        return self._pipe.validation_dataset(plan, cache=bool(plan.cache and self._pipe.folder.cache))


class ImageFolderSource(_Source):
    """An image folder (``resilient.data.image_folder``). Resume is exact, with or without the cache."""

    def __init__(self, spec: RunSpec, index: FolderIndex, val: Any) -> None:
        self.index = index
        self._pipe = _FolderPipeline(index, "train")
        self.n = self._pipe.n
        if val is None and index.validation:
            val = _FolderValidation(index, "validation")
        super().__init__(spec, val)

    def epoch(self, plan: Any, epoch: int, offset: int) -> tuple[Any, int]:
        order, start, end = epoch_span(self.spec, epoch, self.n)
        positions = epoch_order(self.spec.seed, order, self.n, self.spec.shuffle)[start + offset:end]
        cache = bool(plan.cache and self.index.folder.cache)
        ds = self._pipe.dataset(positions, plan, cache=cache)
        return self._weighed(ds), math.ceil(len(positions) / plan.batch_size)


def read_folder_index(run: RunDir, key: str) -> FolderIndex:
    return FolderIndex.model_validate_json((run.path / key).read_text())


# ------------------------------------------------------------------------------------------ factory


def call_factory(factory: Any, plan: Any, *, epoch: int | None = None, seed: int | None = None) -> Any:
    """``factory(plan)``, passing ``epoch=`` and ``seed=`` when its signature takes them."""
    kwargs: dict[str, Any] = {}
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if epoch is not None and ("epoch" in params or takes_any):
        kwargs["epoch"] = epoch
    if seed is not None and ("seed" in params or takes_any):
        kwargs["seed"] = seed
    return factory(plan, **kwargs)


def _check_factory_result(ds: Any, what: str) -> Any:
    import tensorflow as tf

    if not isinstance(ds, tf.data.Dataset):
        raise TypeError(f"{what} returned {type(ds).__name__}; expected a batched tf.data.Dataset of (x, y).")
    return ds


class FactorySource(_Source):
    """A ``make_dataset(plan)`` factory, called per epoch.

    Resume skips ``offset // plan.batch_size`` batches of the re-created epoch (``ds.skip``): exact
    when the factory's order for an epoch is deterministic and it batches by ``plan.batch_size``.
    """

    def __init__(self, spec: RunSpec, factory: Any, val: Any) -> None:
        self.factory = factory
        super().__init__(spec, val)

    def epoch(self, plan: Any, epoch: int, offset: int) -> tuple[Any, int | None]:
        ds = _check_factory_result(call_factory(self.factory, plan, epoch=epoch, seed=self.spec.seed), "make_dataset")
        skip = offset // plan.batch_size
        if skip:
            ds = ds.skip(skip)
        cardinality = int(ds.cardinality())
        return self._weighed(ds), (cardinality if cardinality >= 0 else None)


class _FactoryValidation:
    def __init__(self, factory: Any) -> None:
        self.factory = factory

    def dataset(self, plan: Any) -> Any:
        return _check_factory_result(call_factory(self.factory, plan), "the validation_data factory")


# ---------------------------------------------------------------------------------------- PyDataset


def num_batches(pyds: Any) -> int | None:
    n = getattr(pyds, "num_batches", None)
    if n is None and hasattr(pyds, "__len__"):
        n = len(pyds)
    return None if n is None else int(n)


def as_batch(item: Any) -> Any:
    """A PyDataset item as tf.data wants it: tuples (not lists) of arrays, dicts kept."""
    import tensorflow as tf

    if isinstance(item, list):
        item = tuple(item)
    return tf.nest.map_structure(np.asarray, item)


class _PyDatasetPipeline:
    """Batches ``pyds[i]`` for a list of batch indices, through ``tf.data.Dataset.from_generator``.

    With ``workers > 1`` the batches are fetched by that many threads (``use_multiprocessing`` is
    not honoured: the worker is already a separate process), at most ``max_queue_size`` ahead.
    """

    def __init__(self, pyds: Any) -> None:
        self.pyds = pyds
        self.n = num_batches(pyds) or 0
        self._signature: Any = None

    def signature(self) -> Any:
        if self._signature is None:
            import tensorflow as tf

            first = as_batch(self.pyds[0])
            self._signature = tf.nest.map_structure(
                lambda a: tf.TensorSpec((None, *a.shape[1:]), tf.as_dtype(a.dtype)), first
            )
        return self._signature

    def dataset(self, batch_ids: np.ndarray, plan: Any) -> Any:
        import tensorflow as tf

        pyds = self.pyds
        ids = [int(i) for i in batch_ids]
        workers = max(1, int(getattr(pyds, "workers", 1) or 1))
        window = max(workers, int(getattr(pyds, "max_queue_size", 10) or 10))

        def generate() -> Any:
            if workers == 1:
                for i in ids:
                    yield as_batch(pyds[i])
                return
            pool = ThreadPoolExecutor(workers, thread_name_prefix="resilient-pydataset")
            try:
                pending: collections.deque[Any] = collections.deque()
                it = iter(ids)
                for i in it:
                    pending.append(pool.submit(pyds.__getitem__, i))
                    if len(pending) >= window:
                        break
                while pending:
                    item = pending.popleft().result()
                    nxt = next(it, None)
                    if nxt is not None:
                        pending.append(pool.submit(pyds.__getitem__, nxt))
                    yield as_batch(item)
            finally:
                pool.shutdown(wait=True, cancel_futures=True)

        ds = tf.data.Dataset.from_generator(generate, output_signature=self.signature())
        return ds.apply(tf.data.experimental.assert_cardinality(len(ids))).prefetch(_autotune(plan.prefetch))


class PyDatasetSource(_Source):
    """A ``keras.utils.PyDataset``: ``pyds[i]`` for ``i`` in the epoch's batch order.

    The PyDataset picks its own batch size, so ``plan.batch_size`` (and ``halve_batch``) does not
    change it; the position is kept in batches (``samples_per_step`` is 1). With fit's ``shuffle``
    the batch order is a permutation that depends on ``(seed, epoch)``, as Keras shuffles batches.
    ``on_epoch_end()`` is called between epochs; a resumed worker first replays the calls of the
    epochs already done, so state that ``on_epoch_end`` changes deterministically (e.g. a reshuffle
    with the dataset's own seeded RNG) is as it was. Exact when ``__getitem__`` is deterministic.
    """

    def __init__(self, spec: RunSpec, pyds: Any, val: Any) -> None:
        self._pipe = _PyDatasetPipeline(pyds)
        self.n = self._pipe.n
        self._epochs_begun = -1  # the last epoch whose on_epoch_begin ran in this process
        self._epochs_ended = 0  # on_epoch_end calls made in this process
        super().__init__(spec, val)

    def samples_per_step(self, plan: Any) -> int:
        return 1

    def _advance_to(self, epoch: int) -> None:
        """Call on_epoch_begin / on_epoch_end as Keras would have up to the start of ``epoch``."""
        pyds = self._pipe.pyds
        begin = getattr(pyds, "on_epoch_begin", None)
        while self._epochs_ended < epoch:
            if begin is not None and self._epochs_begun < self._epochs_ended:
                begin()
            self._epochs_begun = self._epochs_ended
            pyds.on_epoch_end()
            self._epochs_ended += 1
        if begin is not None and self._epochs_begun < epoch:
            begin()
        self._epochs_begun = epoch

    def epoch(self, plan: Any, epoch: int, offset: int) -> tuple[Any, int]:
        self._advance_to(epoch)
        ids = epoch_order(self.spec.seed, epoch, self.n, self.spec.shuffle)[offset:]
        return self._weighed(self._pipe.dataset(ids, plan)), len(ids)


class _PyDatasetValidation:
    def __init__(self, pyds: Any) -> None:
        self._pipe = _PyDatasetPipeline(pyds)

    def dataset(self, plan: Any) -> Any:
        return self._pipe.dataset(np.arange(self._pipe.n, dtype=np.int64), plan)


# ------------------------------------------------------------------------------------------- entry


def is_pydataset(obj: Any) -> bool:
    import sys

    if "keras" not in sys.modules:
        return False
    import keras

    return isinstance(obj, keras.utils.PyDataset)


def _validation_input(obj: Any) -> Any:
    if isinstance(obj, FolderIndex):
        return _FolderValidation(obj, "validation")
    if is_pydataset(obj):
        return _PyDatasetValidation(obj)
    if callable(obj):
        return _FactoryValidation(obj)
    raise TypeError(f"unsupported validation input {type(obj).__name__}")


def _object_validation(run: RunDir, data: ObjectData, objects: dict[str, Any]) -> Any:
    if data.val_key is None:
        return None
    if data.val_key == VAL_ARRAYS:
        vx, vy = _load_arrays(run, VAL_ARRAYS, "data/val_y.npy")
        vsw = run.path / VAL_SAMPLE_WEIGHT
        vsw_arr = np.load(vsw, mmap_mode="r") if vsw.exists() else None
        return _ArrayValidation(_ArrayPipeline(vx, vy, _image_axes(vx), vsw_arr))
    return _validation_input(objects[data.val_key])


def make_source(spec: RunSpec, run: RunDir, objects: dict[str, Any]) -> Any:
    """The input source the run directory describes."""
    data = spec.data
    if isinstance(data, ArraysData):
        return ArraysSource(spec, data, run, objects)
    val = _object_validation(run, data, objects)
    if data.kind == "image_folder":
        return ImageFolderSource(spec, read_folder_index(run, data.key), val)
    if data.kind == "factory":
        return FactorySource(spec, objects[data.key], val)
    if data.kind == "pydataset":
        return PyDatasetSource(spec, objects[data.key], val)
    raise NotImplementedError(f"input kind {data.kind!r} is not supported by this worker")
