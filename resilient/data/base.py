"""What every input kind builds on, on both sides of the process boundary.

Caller side (``resilient.fit``'s process): :class:`Inputs`, one fit call's checked inputs, which
check a resumed run's stored inputs (``check_resume``) and store what the worker needs (``write``,
once the run directory is locked); :class:`ValidationInput`, a checked validation input.

Worker side: :class:`Source`, which answers ``epoch(plan, epoch, offset)`` -> ``(batched dataset of
what is left of the epoch after offset, steps or None)``, ``epochs(plan)`` -> an :class:`EpochStream`
(one dataset for all the epochs of an attempt, or None where the kind cannot give one),
``validation(plan)`` -> dataset or None, and ``samples_per_step(plan)``: how far ``offset`` advances
per training step; :class:`ValidationSource` builds the validation dataset. The order of an epoch is
a function of ``(seed, epoch)`` alone (:func:`epoch_order`, :func:`epoch_span`) and the position is
kept in samples (batches, for a PyDataset, which picks its own batch size), so a resume with the same
or another batch size continues at exactly the right sample.

TensorFlow is imported inside the worker-side functions only: the caller imports this module.
"""

from __future__ import annotations

import abc
import math
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from .._errors import InvalidArgumentError, RunDirError
from .._plan import Plan
from .._rundir import ArraysData, ObjectData, RunDir, RunSpec
from .checks import ModelFacts

if TYPE_CHECKING:
    import tensorflow as tf

#: The key in objects.pkl of a validation input carried by value (a factory, a PyDataset, a folder index).
VAL_OBJECT = "val_data"

_WRAP_DATASET = (
    "A dataset object cannot be carried to the worker process faithfully. Wrap its construction in a "
    "function of the plan instead:\n"
    "    def make_dataset(plan):\n"
    "        return build_my_dataset().batch(plan.batch_size)\n"
    "    resilient.fit(model, make_dataset, ...)"
)


# ------------------------------------------------------------------------------------ caller side


def describe_kind(kind: str) -> str:
    """An input kind as messages name it: ``"image_folder"`` -> ``"an image folder"``."""
    return {"arrays": "NumPy arrays", "image_folder": "an image folder", "factory": "a dataset factory",
            "pydataset": "a keras.utils.PyDataset"}.get(kind, kind)


def is_tf_dataset(obj: Any) -> bool:
    """Whether ``obj`` is a ``tf.data.Dataset`` (False without importing TensorFlow when nothing has)."""
    if "tensorflow" not in sys.modules:
        return False
    import tensorflow as tf

    return isinstance(obj, tf.data.Dataset)


def refuse_tf_dataset(arg: str) -> None:
    """A ``tf.data.Dataset`` passed as ``arg``: refused, with the factory to write instead."""
    raise InvalidArgumentError(
        f"Invalid value for argument `{arg}`. Received a tf.data.Dataset. Expected NumPy arrays, a "
        f"resilient.data spec, a keras.utils.PyDataset or a dataset factory. {_WRAP_DATASET}"
    )


def check_carriable(obj: Any, arg: str, described: str) -> None:
    """``obj`` (a factory, a PyDataset) must pickle: it travels to the worker in objects.pkl."""
    import cloudpickle

    try:
        cloudpickle.dumps(obj)
    except Exception as e:
        raise InvalidArgumentError(
            f"Invalid value for argument `{arg}`. Received: {described}, which cannot be carried to the worker "
            f"process ({type(e).__name__}: {e}). Expected an object cloudpickle can serialise: open files, "
            "clients and tf.data pipelines inside it (in make_dataset, or in __getitem__), not in advance."
        ) from None


class ValidationInput:
    """A validation input, checked (this base: none); ``write`` stores it and says where (``val_key``)."""

    kind = "none"

    def __init__(self, value: Any = None) -> None:
        self.value = value

    def write(self, run: RunDir) -> str | None:
        return None


class ObjectValidationInput(ValidationInput):
    """A validation input carried by value in objects.pkl as ``objects["val_data"]``."""

    kind = "object"

    def write(self, run: RunDir) -> str | None:
        return VAL_OBJECT


class Inputs(abc.ABC):
    """Checked inputs of one fit call. ``write`` stores them once the run directory is locked."""

    kind = "arrays"
    #: (height, width) of the source images when resilient builds the image pipeline (resizable).
    source_image_size: tuple[int, int] | None = None

    def __init__(self, val: ValidationInput) -> None:
        self.val = val
        self.objects: dict[str, Any] = {}
        if isinstance(val, ObjectValidationInput):
            self.objects[VAL_OBJECT] = val.value

    def resizable_input(self, facts: ModelFacts) -> bool:
        """Whether a lower_resolution step can apply: resilient resizes, and the model takes any (h, w)."""
        shape = facts.input_full
        if self.source_image_size is None or shape is None or len(shape) != 4:
            return False
        return shape[1] is None and shape[2] is None

    def check_resume(self, run: RunDir, old: RunSpec) -> None:
        if old.data.kind != self.kind:
            raise RunDirError(
                f"The run directory {run.path} was trained on {describe_kind(old.data.kind)}; this call passes "
                f"{describe_kind(self.kind)}. Pass the same input to resume, or a new run_dir."
            )

    @abc.abstractmethod
    def write(self, run: RunDir, seed: int) -> ArraysData | ObjectData:
        """Store what the worker needs in ``run`` and describe it for ``RunSpec.data``."""


# ------------------------------------------------------------------------------------ worker side


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


def span_steps(spec: RunSpec, epoch: int, offset: int, n: int, batch_size: int) -> int:
    """The steps of ``epoch`` from ``offset`` (samples) in batches of ``batch_size``: as many as ``epoch_span`` gives."""
    _, start, end = epoch_span(spec, epoch, n)
    return math.ceil(max(0, end - start - offset) / batch_size)


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


def autotune(value: int | None) -> int:
    """A plan's ``prefetch`` or ``parallel_calls``: None lets tf.data tune it."""
    import tensorflow as tf

    return tf.data.AUTOTUNE if value is None else value


class ValidationSource(abc.ABC):
    """Builds the validation dataset of one attempt, per plan."""

    @abc.abstractmethod
    def dataset(self, plan: Plan) -> tf.data.Dataset:
        """The whole validation data, batched per ``plan``."""


class EpochStream:
    """One dataset for every epoch of an attempt, so that one ``model.fit`` call trains them all.

    Keras starts a new iterator of the training dataset at each epoch, after the callbacks'
    ``on_epoch_begin`` (``fit`` without ``steps_per_epoch``). The worker calls :meth:`begin` there;
    it sets which positions (samples, or batches for a PyDataset) the epoch trains, in the epoch's
    order, and the dataset's iterators read them when they start (:meth:`positions_dataset`), so a
    resumed epoch is shorter (it starts at ``offset``) and every other epoch is whole. The orders
    are those of :meth:`Source.epoch`: both come from the same ``positions`` function.

    The worker hands Keras ``dataset`` claiming the longest epoch's steps (:func:`claim_steps`), and
    ends a shorter epoch at its own steps (``worker.callbacks.ContinuingCallbackList``).

    ``positions(epoch, offset)``: the epoch's positions from ``offset``; ``steps(epoch, offset)``: how
    many batches they make; ``on_epoch(epoch)``: called when an epoch begins (a PyDataset's epoch hooks).
    """

    def __init__(self, positions: Callable[[int, int], np.ndarray], steps: Callable[[int, int], int],
                 on_epoch: Callable[[int], None] | None = None) -> None:
        self._positions, self._steps, self._on_epoch = positions, steps, on_epoch
        self._key: tuple[int, int] | None = None
        self.current = np.zeros(0, dtype=np.int64)
        self.dataset: Any = None

    def steps(self, epoch: int, offset: int = 0) -> int:
        """The steps of ``epoch`` from ``offset``, without building its order."""
        return int(self._steps(epoch, offset))

    def begin(self, epoch: int, offset: int) -> int:
        """``epoch`` begins at ``offset``: the next iterator of ``dataset`` trains it. Its steps."""
        if self._key != (epoch, offset):
            if self._on_epoch is not None:
                self._on_epoch(epoch)
            self.current = np.asarray(self._positions(epoch, offset), dtype=np.int64)
            self._key = (epoch, offset)
        return self.steps(epoch, offset)

    def read_positions(self) -> np.ndarray:
        """The positions of the epoch begun last (called from the dataset's iterators)."""
        return self.current

    def positions_dataset(self) -> tf.data.Dataset:
        """The current epoch's positions, one element each, read when an iterator starts."""
        import tensorflow as tf

        def epoch_positions(_: Any) -> tf.data.Dataset:
            ids = tf.numpy_function(self.read_positions, [], tf.int64, stateful=True)
            ids.set_shape((None,))
            return tf.data.Dataset.from_tensor_slices(ids)

        return tf.data.Dataset.range(1).flat_map(epoch_positions)


def claim_steps(ds: tf.data.Dataset, steps: int) -> tf.data.Dataset:
    """``ds`` with a cardinality of ``steps`` as Keras reads it (``ds.cardinality()``), elements unchanged.

    Keras bounds each epoch by the dataset's cardinality and, when it is unknown, by the length of the
    first epoch it sees, which for a resumed attempt is the short one. ``assert_cardinality`` would fail
    a shorter epoch; this only answers ``cardinality()`` (the iterators run the dataset itself).
    """
    import tensorflow as tf

    class _Claimed(tf.data.Dataset):
        def __init__(self, inner: tf.data.Dataset, n: int) -> None:
            self._inner, self._n = inner, int(n)
            super().__init__(inner._variant_tensor)

        def _inputs(self) -> list[tf.data.Dataset]:
            return [self._inner]

        @property
        def element_spec(self) -> Any:
            return self._inner.element_spec

        def cardinality(self) -> tf.Tensor:
            return tf.constant(self._n, dtype=tf.int64)

    return _Claimed(ds, steps)


class Source(abc.ABC):
    """What every source shares: the run's seed and shuffle flag, and the validation input."""

    #: Where each image folder of the source is read from (``folder_read`` notices), set by ``make_source``.
    folder_reads: tuple[dict[str, Any], ...] = ()

    def __init__(self, spec: RunSpec, val: ValidationSource | None = None) -> None:
        self.spec = spec
        self._val = val

    @abc.abstractmethod
    def epoch(self, plan: Plan, epoch: int, offset: int) -> tuple[tf.data.Dataset, int | None]:
        """What is left of ``epoch`` after ``offset`` (samples), batched per ``plan``, and its steps (None: unknown)."""

    def epochs(self, plan: Plan) -> EpochStream | None:
        """One dataset for all the epochs of an attempt (None: this kind trains one fit call per epoch)."""
        return None

    def samples_per_step(self, plan: Plan) -> int:
        return plan.batch_size

    def validation(self, plan: Plan) -> tf.data.Dataset | None:
        if self._val is not None and self.spec.validation_batch_size is not None:
            plan = plan.replace(batch_size=self.spec.validation_batch_size)  # fit's validation_batch_size
        return None if self._val is None else self._val.dataset(plan)

    def _weighed(self, ds: tf.data.Dataset) -> tf.data.Dataset:
        """The training batches with fit's ``class_weight`` applied as sample weights."""
        if not self.spec.class_weight:
            return ds
        return ds.map(class_weight_fn(self.spec.class_weight))
