"""NumPy arrays ``x, y`` (and ``validation_data=(x_val, y_val)``), as for ``model.fit``.

Caller side: the arrays are checked (numeric, same length, samples that fit the model, labels that
fit the loss; fit's ``sample_weight`` and ``validation_split``, which holds out the last samples as
Keras does), then stored once in ``run_dir/data`` in chunks (:func:`store_array`: a ``np.memmap`` is
never loaded whole). Worker side: :class:`ArraysSource` memory-maps them and gathers each epoch's
batches in the epoch's order (:class:`ArrayPipeline`), resized when ``x`` holds images and the plan
lowers ``image_size``. Resume is exact.

Stored: ``data/x.npy``, ``data/y.npy`` (``ArraysData``), ``data/sample_weight.npy`` with fit's
``sample_weight``; validation arrays ``data/val_x.npy`` and ``data/val_y.npy``, with
``data/val_sample_weight.npy`` when they carry sample weights.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._errors import InvalidArgumentError, RunDirError
from .._plan import Plan
from .._rundir import ArraysData, RunDir, RunSpec, atomic_file
from .base import (
    EpochStream,
    Inputs,
    Source,
    ValidationInput,
    ValidationSource,
    autotune,
    epoch_order,
    epoch_span,
    is_tf_dataset,
    refuse_tf_dataset,
    span_steps,
)
from .checks import ModelFacts, check_labels, check_sample_shape

if TYPE_CHECKING:
    import tensorflow as tf

#: Arrays are copied into the run directory this many bytes at a time (a memmap is never loaded whole).
STORE_CHUNK_BYTES = 16 << 20

#: Arrays up to this size are loaded into the worker's memory and gathered in-graph (fastest);
#: larger ones stay memory-mapped and are gathered batch by batch, so RSS does not grow with them.
IN_MEMORY_LIMIT = 256 << 20

VAL_ARRAYS = "data/val_x.npy"
VAL_SAMPLE_WEIGHT = "data/val_sample_weight.npy"


# ------------------------------------------------------------------------------------ caller: checks


def to_arrays(x: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    """``x, y`` as arrays (``np.asarray``: a memmap stays a memmap), with their basic checks."""
    if x is None:
        raise InvalidArgumentError(
            "Missing argument `x`. Expected NumPy arrays x and y (as for model.fit), a resilient.data spec, "
            "a keras.utils.PyDataset, or a function make_dataset(plan)."
        )
    try:
        x_arr = np.asarray(x)
    except Exception as e:
        raise InvalidArgumentError(
            f"Invalid value for argument `x`. Received: {type(x).__name__}, which cannot be converted to an array "
            f"({e}). Expected a numeric NumPy array with samples on the first axis."
        ) from None
    if y is None:
        raise InvalidArgumentError(
            f"Missing argument `y`. Received: x.shape={x_arr.shape} and y=None. Expected labels for x, as for model.fit."
        )
    try:
        y_arr = np.asarray(y)
    except Exception as e:
        raise InvalidArgumentError(
            f"Invalid value for argument `y`. Received: {type(y).__name__}, which cannot be converted to an array "
            f"({e}). Expected a numeric NumPy array."
        ) from None
    if x_arr.ndim == 0 or x_arr.dtype == object or x_arr.dtype.kind not in "biufc":
        raise InvalidArgumentError(
            f"Invalid value for argument `x`. Received an array of shape {x_arr.shape} and dtype {x_arr.dtype}. "
            "Expected a numeric array with samples on the first axis."
        )
    if y_arr.ndim == 0 or y_arr.dtype == object or y_arr.dtype.kind not in "biufc":
        raise InvalidArgumentError(
            f"Invalid value for argument `y`. Received an array of shape {y_arr.shape} and dtype {y_arr.dtype}. "
            "Expected a numeric array with samples on the first axis."
        )
    if len(x_arr) != len(y_arr):
        raise InvalidArgumentError(
            f"x and y have different numbers of samples. Received: x.shape={x_arr.shape}, y.shape={y_arr.shape}. "
            "Expected the same length on the first axis."
        )
    if len(x_arr) == 0:
        raise InvalidArgumentError(
            f"Received empty arrays: x.shape={x_arr.shape}, y.shape={y_arr.shape}. Expected at least one sample."
        )
    return x_arr, y_arr


def check_sample_weight(sample_weight: Any, x: np.ndarray, *, what: str = "sample_weight") -> np.ndarray:
    """fit's ``sample_weight`` (or the validation data's): numeric, one weight (or row) per sample of ``x``."""
    try:
        sw = np.asarray(sample_weight)
    except Exception as e:
        raise InvalidArgumentError(
            f"Invalid value for argument `{what}`. Received: {type(sample_weight).__name__}, which cannot be "
            f"converted to an array ({e}). Expected a NumPy array of shape ({len(x)},)."
        ) from None
    if sw.ndim == 0 or sw.dtype == object or sw.dtype.kind not in "biuf" or len(sw) != len(x):
        raise InvalidArgumentError(
            f"Invalid value for argument `{what}`. Received: {what} of shape {sw.shape} and dtype {sw.dtype} for "
            f"{len(x)} samples. Expected a numeric array of shape ({len(x)},): one weight per sample, in the order "
            "of x (or (samples, timesteps) for a temporal loss)."
        )
    return sw


#: Arrays are checked for NaN and Inf this many bytes at a time (a memmap is read, never loaded whole).
FINITE_CHUNK_BYTES = 16 << 20


def check_finite(arr: np.ndarray, name: str) -> None:
    """Refuse a float array holding NaN or Inf, naming the array, the first bad index and the count.

    A non-finite input makes the loss NaN at the first batch that holds it; the nan_loss ladder then
    halves the learning rate attempt after attempt for nothing. Checked in chunks of rows, so a
    ``np.memmap`` is streamed from disk; the common case (all finite) costs one sum per chunk, since
    a finite sum proves every term finite (NaN and Inf propagate). Only a chunk whose sum is not
    finite (a bad value, or an overflow) is searched element by element. Measured on 1 GB of float32
    (2 cores): 0.16 s in memory or from the page cache; 1.1 s when every chunk's sum overflows.
    """
    if arr.dtype.kind not in "fc" or arr.size == 0:
        return
    row_bytes = max(1, arr.dtype.itemsize * int(np.prod(arr.shape[1:], dtype=np.int64)))
    rows = max(1, FINITE_CHUNK_BYTES // row_bytes)
    count, first = 0, None
    fast = arr.dtype.itemsize >= 4  # float16 sums overflow at 65504: search those directly
    for start in range(0, arr.shape[0], rows):
        chunk = np.asarray(arr[start:start + rows])
        with np.errstate(over="ignore", invalid="ignore"):  # an overflowing sum only sends us the slow way
            if fast and np.isfinite(chunk.sum()):
                continue
        bad = ~np.isfinite(chunk)
        n = int(np.count_nonzero(bad))
        if n and first is None:
            first = (start + int(np.argmax(bad.reshape(len(chunk), -1).any(axis=1))),
                     *(int(i) for i in np.argwhere(bad)[0][1:]))
        count += n
    if count:
        where = first[0] if len(first) == 1 else first
        raise InvalidArgumentError(
            f"Invalid value for argument `{name}`: it holds {count} non-finite value{'s' if count > 1 else ''} "
            f"(NaN or Inf), the first at index {where} (sample {first[0]}), of shape {arr.shape}. Training on them "
            "makes the loss NaN. Expected finite numbers: drop those samples (e.g. keep = np.isfinite("
            f"{name}).reshape(len({name}), -1).all(axis=1)) or replace the values (np.nan_to_num)."
        )


def check_arrays(x: Any, y: Any, facts: ModelFacts, *, sample_weight: Any,
                 class_weight: dict[int, float] | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``x``, ``y`` and fit's ``sample_weight`` as arrays, checked against the model and each other."""
    x_arr, y_arr = to_arrays(x, y)
    check_sample_shape(facts, x_arr.shape[1:], what="x", received=f"x.shape={x_arr.shape}")
    check_labels(facts, y_arr)
    sw = None if sample_weight is None else check_sample_weight(sample_weight, x_arr)
    for name, arr in (("x", x_arr), ("y", y_arr), ("sample_weight", sw)):
        if arr is not None:
            check_finite(arr, name)
    if sw is not None and class_weight is not None:
        raise InvalidArgumentError(
            "Invalid value for argument `class_weight`. Received both class_weight and sample_weight, which "
            "model.fit refuses too (\"You cannot `class_weight` and `sample_weight` at the same time\"). "
            "Expected one of them: fold the class weights into sample_weight (e.g. sample_weight * "
            "np.vectorize(class_weight.get)(y)), or pass class_weight alone."
        )
    return x_arr, y_arr, sw


def split_arrays(arrays: tuple[Any, ...], validation_split: float) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """The last ``validation_split`` of each array held out, before any shuffling (Keras's train_validation_split)."""
    n = len(arrays[0])
    split_at = math.floor(n * (1.0 - validation_split))
    if split_at == 0 or split_at == n:
        raise InvalidArgumentError(
            f"Invalid value for argument `validation_split`. Received: validation_split={validation_split} of {n} "
            f"samples, which leaves {'no training' if split_at == 0 else 'no validation'} sample. Expected a split "
            "that leaves at least one sample on each side: more data, or another validation_split."
        )
    return (tuple(None if a is None else a[:split_at] for a in arrays),
            tuple(None if a is None else a[split_at:] for a in arrays))


def prepare_array_validation(validation_data: tuple[Any, ...] | list[Any], facts: ModelFacts,
                             train_arrays: tuple[np.ndarray, np.ndarray] | None) -> ArrayValidationInput:
    """``validation_data=(x_val, y_val[, val_sample_weight])``, checked against the model or the training arrays."""
    if len(validation_data) not in (2, 3):
        raise InvalidArgumentError(
            f"Invalid value for argument `validation_data`. Received a {type(validation_data).__name__} of "
            f"{len(validation_data)} items. Expected (x_val, y_val) or (x_val, y_val, val_sample_weight) of NumPy "
            "arrays, a resilient.data spec, a keras.utils.PyDataset or a function make_dataset(plan)."
        )
    if any(is_tf_dataset(item) for item in validation_data):
        refuse_tf_dataset("validation_data")
    vx, vy = np.asarray(validation_data[0]), np.asarray(validation_data[1])
    vsw = None
    if len(validation_data) == 3 and validation_data[2] is not None:
        vsw = check_sample_weight(validation_data[2], vx, what="val_sample_weight")
    if vx.ndim == 0 or len(vx) != len(vy) or len(vx) == 0:
        raise InvalidArgumentError(
            f"Invalid value for argument `validation_data`. Received mismatched or empty arrays: "
            f"x_val.shape={vx.shape}, y_val.shape={vy.shape}. Expected (x_val, y_val) with the same number of samples."
        )
    if train_arrays is not None:
        x, y = train_arrays
        if vx.shape[1:] != x.shape[1:] or vy.shape[1:] != y.shape[1:]:
            raise InvalidArgumentError(
                f"validation_data does not match the training data. Received: x_val.shape={vx.shape}, "
                f"y_val.shape={vy.shape}; training x.shape={x.shape}, y.shape={y.shape}. Expected the same sample shapes."
            )
    else:
        check_sample_shape(facts, vx.shape[1:], what="validation_data", received=f"x_val.shape={vx.shape}")
    check_labels(facts, vy, what="y_val")
    for name, arr in (("x_val", vx), ("y_val", vy), ("val_sample_weight", vsw)):
        if arr is not None:
            check_finite(arr, name)
    return ArrayValidationInput((vx, vy, vsw))


# ------------------------------------------------------------------------------------ caller: storage


def store_array(path: Path, arr: np.ndarray) -> None:
    """Write ``arr`` as ``.npy`` at ``path`` atomically, in chunks (a memmap is never loaded whole).

    Kept as it is when ``path`` already holds an array of the same shape and dtype (a resume).
    """
    if path.exists():
        try:
            stored = np.load(path, mmap_mode="r")
        except (OSError, ValueError):
            stored = None
        if stored is not None and stored.shape == arr.shape and stored.dtype == arr.dtype:
            return
    header = {"descr": np.lib.format.dtype_to_descr(arr.dtype), "fortran_order": False, "shape": arr.shape}
    row_bytes = max(1, arr.dtype.itemsize * int(np.prod(arr.shape[1:], dtype=np.int64)))
    rows = max(1, STORE_CHUNK_BYTES // row_bytes)
    with atomic_file(path) as f:
        try:
            np.lib.format.write_array_header_1_0(f, header)
        except ValueError:  # a header over 64 KiB
            f.seek(0)
            f.truncate()
            np.lib.format.write_array_header_2_0(f, header)
        if arr.size:
            for start in range(0, arr.shape[0], rows):
                # A view of a contiguous memmap is written as it is; anything else is copied a chunk at a time.
                f.write(memoryview(np.ascontiguousarray(arr[start:start + rows])).cast("B"))


def check_stored_arrays(run: RunDir, arrays: dict[str, np.ndarray]) -> None:
    """A resume: the arrays stored in ``run`` must have the shapes and dtypes of this call's."""
    for name, arr in arrays.items():
        path = run.data_dir / f"{name}.npy"
        if not path.exists():
            continue
        stored = load_stored(path)
        if stored.shape != arr.shape or stored.dtype != arr.dtype:
            raise RunDirError(
                f"The run directory {run.path} was trained on {name} of shape {stored.shape} and dtype {stored.dtype}; "
                f"this call passes shape {arr.shape} and dtype {arr.dtype}. Pass the same data to resume, or a new run_dir."
            )


def load_stored(path: Path) -> np.ndarray:
    """A stored array, memory-mapped; a damaged file (cut short, overwritten) is a RunDirError naming it."""
    try:
        return np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError):
        raise RunDirError(
            f"{path} is damaged: {_npy_problem(path)}. It holds training data stored by an earlier call; delete it "
            "and call fit again with the same data to store it afresh (the checkpoints are kept), or pass a new "
            "run_dir."
        ) from None


def _npy_problem(path: Path) -> str:
    """What is wrong with a .npy file that does not load: its size against what its header promises."""
    size = path.stat().st_size if path.exists() else 0
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(f)
            expected = f.tell() + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    except Exception:
        return f"not a NumPy .npy file ({size} bytes, no readable header)"
    return f"it is cut short ({size} bytes; its header promises shape {shape}, {expected} bytes)"


class ArrayValidationInput(ValidationInput):
    """Validation arrays ``(x_val, y_val, val_sample_weight or None)``, stored beside the training data."""

    kind = "arrays"

    @property
    def weighted(self) -> bool:
        return len(self.value) == 3 and self.value[2] is not None

    def write(self, run: RunDir) -> str | None:
        run.private_dir(run.data_dir)
        vx, vy = self.value[:2]
        store_array(run.data_dir / "val_x.npy", vx)
        store_array(run.data_dir / "val_y.npy", vy)
        if self.weighted:
            store_array(run.path / VAL_SAMPLE_WEIGHT, self.value[2])
        else:
            (run.path / VAL_SAMPLE_WEIGHT).unlink(missing_ok=True)  # the worker looks for it by name
        return VAL_ARRAYS


class ArrayInputs(Inputs):
    kind = "arrays"

    def __init__(self, x: np.ndarray, y: np.ndarray, val: ValidationInput,
                 sample_weight: np.ndarray | None = None) -> None:
        super().__init__(val)
        self.x, self.y = x, y
        self.sample_weight = sample_weight
        self.image_axes = image_axes(x)
        if self.image_axes:
            self.source_image_size = (int(x.shape[1]), int(x.shape[2]))

    def check_resume(self, run: RunDir, old: RunSpec) -> None:
        super().check_resume(run, old)
        arrays = {"x": self.x, "y": self.y}
        if self.sample_weight is not None:
            arrays["sample_weight"] = self.sample_weight
        check_stored_arrays(run, arrays)

    def write(self, run: RunDir, seed: int) -> ArraysData:
        data_dir = run.private_dir(run.data_dir)
        store_array(data_dir / "x.npy", self.x)
        store_array(data_dir / "y.npy", self.y)
        if self.sample_weight is not None:
            store_array(data_dir / "sample_weight.npy", self.sample_weight)
        # A validation input carried by value (a factory...) is in objects.pkl, not in ArraysData.
        val = self.val if isinstance(self.val, ArrayValidationInput) else None
        if val is not None:
            val.write(run)
        return ArraysData(
            x="data/x.npy", y="data/y.npy", samples=int(self.x.shape[0]),
            val_x="data/val_x.npy" if val else None, val_y="data/val_y.npy" if val else None,
            image_axes=self.image_axes,
            sample_weight="data/sample_weight.npy" if self.sample_weight is not None else None,
            val_sample_weight=VAL_SAMPLE_WEIGHT if val and val.weighted else None,
        )


# ------------------------------------------------------------------------------------ worker


def image_axes(x: np.ndarray) -> tuple[int, int] | None:
    """Axes of (height, width) in one sample when ``x`` holds images (batches of rank 4)."""
    return (0, 1) if x.ndim == 4 else None


def _load_arrays(run: RunDir, x: str, y: str | None) -> tuple[np.ndarray, np.ndarray | None]:
    return load_stored(run.path / x), (load_stored(run.path / y) if y else None)


class ArrayPipeline:
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
        """``(x, y)`` (or ``x``) batches for an index tensor; ``(x, y, sample_weight)`` when weighted."""
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

    def _resize_fn(self, plan: Plan) -> Any:
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

    def dataset(self, idx: np.ndarray, plan: Plan) -> tf.data.Dataset:
        import tensorflow as tf

        return self.batches(tf.data.Dataset.from_tensor_slices(idx), plan)

    def batches(self, positions: tf.data.Dataset, plan: Plan) -> tf.data.Dataset:
        """Batches of the samples at ``positions`` (a dataset of indices), in that order."""
        calls = autotune(plan.parallel_calls)
        ds = positions.batch(plan.batch_size)
        ds = ds.map(self._gather_fn(), num_parallel_calls=calls, deterministic=True)
        resize = self._resize_fn(plan)
        if resize is not None:
            ds = ds.map(resize, num_parallel_calls=calls, deterministic=True)
        return ds.prefetch(autotune(plan.prefetch))


class ArrayValidationSource(ValidationSource):
    """All the validation arrays, in their order."""

    def __init__(self, pipe: ArrayPipeline) -> None:
        self._pipe = pipe

    def dataset(self, plan: Plan) -> tf.data.Dataset:
        return self._pipe.dataset(np.arange(self._pipe.x.shape[0], dtype=np.int64), plan)


def stored_validation(run: RunDir) -> ArrayValidationSource:
    """The validation arrays stored beside another kind of training input (``val_key == VAL_ARRAYS``)."""
    vx, vy = _load_arrays(run, VAL_ARRAYS, "data/val_y.npy")
    vsw = run.path / VAL_SAMPLE_WEIGHT
    vsw_arr = load_stored(vsw) if vsw.exists() else None
    return ArrayValidationSource(ArrayPipeline(vx, vy, image_axes(vx), vsw_arr))


class ArraysSource(Source):
    """NumPy arrays stored in the run directory, memory-mapped. Resume is exact.

    ``other_val``: a validation input of another kind (carried by value), used when the run
    stored no validation arrays.
    """

    def __init__(self, spec: RunSpec, data: ArraysData, run: RunDir,
                 other_val: ValidationSource | None = None) -> None:
        self.data = data
        self.x, self.y = _load_arrays(run, data.x, data.y)
        self.n = int(self.x.shape[0])
        sw = load_stored(run.path / data.sample_weight) if data.sample_weight else None
        self._pipe = ArrayPipeline(self.x, self.y, data.image_axes, sw)
        val = other_val
        if data.val_x:
            vx, vy = _load_arrays(run, data.val_x, data.val_y)
            vsw = load_stored(run.path / data.val_sample_weight) if data.val_sample_weight else None
            val = ArrayValidationSource(ArrayPipeline(vx, vy, data.image_axes, vsw))
        super().__init__(spec, val)

    def _positions(self, epoch: int, offset: int) -> np.ndarray:
        order, start, end = epoch_span(self.spec, epoch, self.n)
        return epoch_order(self.spec.seed, order, self.n, self.spec.shuffle)[start + offset:end]

    def epoch(self, plan: Plan, epoch: int, offset: int) -> tuple[tf.data.Dataset, int]:
        idx = self._positions(epoch, offset)
        return self._weighed(self._pipe.dataset(idx, plan)), math.ceil(len(idx) / plan.batch_size)

    def epochs(self, plan: Plan) -> EpochStream:
        stream = EpochStream(self._positions, lambda e, o: span_steps(self.spec, e, o, self.n, plan.batch_size))
        stream.dataset = self._weighed(self._pipe.batches(stream.positions_dataset(), plan))
        return stream
