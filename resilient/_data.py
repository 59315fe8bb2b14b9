"""Input pipelines built in the worker, per Plan and per epoch, so a resume is exact.

A source answers two questions: ``epoch(plan, epoch, offset)`` -> the batched dataset of what is
left of ``epoch`` after ``offset`` samples, and ``validation(plan)``. The order of an epoch is a
function of ``(seed, epoch)`` alone, and the position is kept in samples, so a resume with the
same or a different batch size continues at exactly the right sample.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ._rundir import ArraysData, RunDir, RunSpec

#: Arrays up to this size are loaded into the worker's memory and gathered in-graph (fastest);
#: larger ones stay memory-mapped and are gathered batch by batch, so RSS does not grow with them.
IN_MEMORY_LIMIT = 256 << 20


def epoch_order(seed: int, epoch: int, n: int, shuffle: bool) -> np.ndarray:
    """The sample order of ``epoch``: a permutation that depends on ``(seed, epoch)`` only."""
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    return np.random.default_rng([seed, epoch]).permutation(n).astype(np.int64)


class ArraysSource:
    """NumPy arrays stored in the run directory, memory-mapped."""

    def __init__(self, spec: RunSpec, data: ArraysData, run: RunDir) -> None:
        self.spec = spec
        self.data = data
        self.x = np.load(run.path / data.x, mmap_mode="r")
        self.y = np.load(run.path / data.y, mmap_mode="r") if data.y else None
        self.val_x = np.load(run.path / data.val_x, mmap_mode="r") if data.val_x else None
        self.val_y = np.load(run.path / data.val_y, mmap_mode="r") if data.val_y else None
        self.n = int(self.x.shape[0])
        self._tensors: tuple[Any, Any] | None = None

    def _gather_fn(self, x: np.ndarray, y: np.ndarray | None) -> Any:
        import tensorflow as tf

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

    def _pipeline(self, idx: np.ndarray, plan: Any, x: np.ndarray, y: np.ndarray | None) -> Any:
        import tensorflow as tf

        autotune = tf.data.AUTOTUNE
        ds = tf.data.Dataset.from_tensor_slices(idx).batch(plan.batch_size)
        ds = ds.map(self._gather_fn(x, y), num_parallel_calls=plan.parallel_calls or autotune, deterministic=True)
        resize = self._resize_fn(plan)
        if resize is not None:
            ds = ds.map(resize, num_parallel_calls=plan.parallel_calls or autotune, deterministic=True)
        return ds.prefetch(plan.prefetch if plan.prefetch is not None else autotune)

    def _resize_fn(self, plan: Any) -> Any:
        axes = self.data.image_axes
        if plan.image_size is None or axes is None:
            return None
        source = (self.x.shape[1 + axes[0]], self.x.shape[1 + axes[1]])
        if tuple(plan.image_size) == tuple(source):
            return None
        import tensorflow as tf

        size = list(plan.image_size)
        dtype = tf.as_dtype(self.x.dtype)

        def resize(bx: Any, by: Any = None) -> Any:
            out = tf.cast(tf.image.resize(tf.cast(bx, tf.float32), size, antialias=True), dtype)
            return out if by is None else (out, by)

        return resize

    def epoch(self, plan: Any, epoch: int, offset: int) -> tuple[Any, int]:
        idx = epoch_order(self.spec.seed, epoch, self.n, self.spec.shuffle)[offset:]
        return self._pipeline(idx, plan, self.x, self.y), math.ceil(len(idx) / plan.batch_size)

    def validation(self, plan: Any) -> Any:
        if self.val_x is None:
            return None
        idx = np.arange(self.val_x.shape[0], dtype=np.int64)
        return self._pipeline(idx, plan, self.val_x, self.val_y)


def make_source(spec: RunSpec, run: RunDir, objects: dict[str, Any]) -> Any:
    """The input source the run directory describes."""
    data = spec.data
    if isinstance(data, ArraysData):
        return ArraysSource(spec, data, run)
    raise NotImplementedError(f"input kind {data.kind!r} is not supported by this worker")
