"""A ``keras.utils.PyDataset`` instance: carried to the worker by value, indexed batch by batch.

Caller side: :func:`check_pydataset` wants a finite number of batches, an object that pickles, and a
first batch that fits the model. Worker side: :class:`PyDatasetSource` yields ``pyds[i]`` in the
epoch's batch order, through ``tf.data.Dataset.from_generator``. Exact when ``__getitem__`` is
deterministic and ``on_epoch_end`` changes state deterministically.
"""

from __future__ import annotations

import collections
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from .._errors import InvalidArgumentError, RunDirError
from .._plan import Plan
from .._rundir import ObjectData, RunDir, RunSpec
from .base import EpochStream, Inputs, Source, ValidationInput, ValidationSource, autotune, check_carriable, epoch_order
from .checks import ModelFacts, check_labels, check_sample_shape, split_batch

if TYPE_CHECKING:
    import tensorflow as tf


def is_pydataset(obj: Any) -> bool:
    """Whether ``obj`` is a ``keras.utils.PyDataset`` (False without importing Keras when nothing has)."""
    if "keras" not in sys.modules:
        return False
    import keras

    return isinstance(obj, keras.utils.PyDataset)


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


# ------------------------------------------------------------------------------------ caller


def check_pydataset(pyds: Any, facts: ModelFacts, arg: str) -> int:
    """A finite, carriable PyDataset whose first batch fits the model; returns its number of batches."""
    name = type(pyds).__name__
    try:
        n = num_batches(pyds)
    except Exception as e:
        raise InvalidArgumentError(
            f"Invalid value for argument `{arg}`. Received: {name}, whose num_batches / len() raised "
            f"{type(e).__name__}: {e}. Expected a keras.utils.PyDataset with a finite number of batches."
        ) from e
    if n is None:
        raise InvalidArgumentError(
            f"Invalid value for argument `{arg}`. Received: {name} with num_batches=None (infinite). Expected a "
            "finite number of batches per epoch."
        )
    if n <= 0:
        raise InvalidArgumentError(
            f"Invalid value for argument `{arg}`. Received: {name} with {n} batches. Expected at least one batch."
        )
    check_carriable(pyds, arg, f"the PyDataset {name}")
    try:
        first = as_batch(pyds[0])
    except Exception as e:
        raise InvalidArgumentError(
            f"Invalid value for argument `{arg}`: {name}[0] raised {type(e).__name__}: {e}. Expected it to return "
            "a batch (x, y) or (x, y, sample_weight)."
        ) from e
    bx, by = split_batch(first, arg=arg, received=f"{name}[0] returned")
    if isinstance(bx, np.ndarray):
        if facts.input_shape is not None and bx.ndim == len(facts.input_shape):
            raise InvalidArgumentError(
                f"Invalid value for argument `{arg}`. Received: {name}[0] returned x of shape {bx.shape}. Expected "
                f"a batch: {facts.expected()}, with the batch on the first axis."
            )
        check_sample_shape(facts, bx.shape[1:], what=f"{name}[0]", received=f"x.shape={bx.shape}")
    if isinstance(by, np.ndarray):
        check_labels(facts, by, what=f"{name}[0] y")
    return n


class PyDatasetInputs(Inputs):
    kind = "pydataset"

    def __init__(self, pyds: Any, batches: int, val: ValidationInput) -> None:
        super().__init__(val)
        self.objects["data"] = pyds
        self.batches = batches

    def check_resume(self, run: RunDir, old: RunSpec) -> None:
        super().check_resume(run, old)
        samples = old.data.samples if isinstance(old.data, ObjectData) else None
        if samples is not None and samples != self.batches:
            raise RunDirError(
                f"The run directory {run.path} was trained on a PyDataset of {samples} batches; this call passes "
                f"{self.batches} batches. Pass the same data to resume, or a new run_dir."
            )

    def write(self, run: RunDir, seed: int) -> ObjectData:
        return ObjectData(kind="pydataset", key="data", val_key=self.val.write(run), samples=self.batches)


# ------------------------------------------------------------------------------------ worker


class PyDatasetPipeline:
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

    def dataset(self, batch_ids: np.ndarray, plan: Plan) -> tf.data.Dataset:
        import tensorflow as tf

        ids = [int(i) for i in batch_ids]
        ds = self.stream(lambda: ids, plan)
        return ds.apply(tf.data.experimental.assert_cardinality(len(ids)))

    def stream(self, batch_ids: Any, plan: Plan) -> tf.data.Dataset:
        """The batches ``pyds[i]`` for ``i in batch_ids()``, asked for when an iterator starts."""
        import tensorflow as tf

        pyds = self.pyds
        workers = max(1, int(getattr(pyds, "workers", 1) or 1))
        window = max(workers, int(getattr(pyds, "max_queue_size", 10) or 10))

        def generate() -> Any:
            ids = [int(i) for i in batch_ids()]
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
        return ds.prefetch(autotune(plan.prefetch))


class PyDatasetSource(Source):
    """A ``keras.utils.PyDataset``: ``pyds[i]`` for ``i`` in the epoch's batch order.

    The PyDataset picks its own batch size, so ``plan.batch_size`` (and ``halve_batch``) does not
    change it; the position is kept in batches (``samples_per_step`` is 1). With fit's ``shuffle``
    the batch order is a permutation that depends on ``(seed, epoch)``, as Keras shuffles batches.
    ``on_epoch_end()`` is called between epochs; a resumed worker first replays the calls of the
    epochs already done, so state that ``on_epoch_end`` changes deterministically (e.g. a reshuffle
    with the dataset's own seeded RNG) is as it was. Exact when ``__getitem__`` is deterministic.
    """

    def __init__(self, spec: RunSpec, pyds: Any, val: ValidationSource | None) -> None:
        self._pipe = PyDatasetPipeline(pyds)
        self.n = self._pipe.n
        self._epochs_begun = -1  # the last epoch whose on_epoch_begin ran in this process
        self._epochs_ended = 0  # on_epoch_end calls made in this process
        super().__init__(spec, val)

    def samples_per_step(self, plan: Plan) -> int:
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

    def _positions(self, epoch: int, offset: int) -> np.ndarray:
        return epoch_order(self.spec.seed, epoch, self.n, self.spec.shuffle)[offset:]

    def epoch(self, plan: Plan, epoch: int, offset: int) -> tuple[tf.data.Dataset, int]:
        self._advance_to(epoch)
        ids = self._positions(epoch, offset)
        return self._weighed(self._pipe.dataset(ids, plan)), len(ids)

    def epochs(self, plan: Plan) -> EpochStream:
        """The batches of each epoch through one generator; ``on_epoch_begin``/``on_epoch_end`` called as
        ``epoch`` calls them, when the epoch begins."""
        stream = EpochStream(self._positions, lambda e, o: max(0, self.n - o), on_epoch=self._advance_to)
        stream.dataset = self._weighed(self._pipe.stream(stream.read_positions, plan))
        return stream


class PyDatasetValidationSource(ValidationSource):
    """All the batches of a validation PyDataset, in order."""

    def __init__(self, pyds: Any) -> None:
        self._pipe = PyDatasetPipeline(pyds)

    def dataset(self, plan: Plan) -> tf.data.Dataset:
        return self._pipe.dataset(np.arange(self._pipe.n, dtype=np.int64), plan)
