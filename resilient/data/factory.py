"""A dataset factory, ``make_dataset(plan)`` (see :class:`resilient.data.DatasetFactory`).

Caller side: the function must take the plan (and may take ``epoch=`` and ``seed=``), pickle (it
travels to the worker by value in objects.pkl), and return a finite, batched ``tf.data.Dataset``
whose ``element_spec`` fits the model: :func:`check_factory` calls it once with the initial plan and
reads no element. Worker side: :class:`FactorySource` calls it per epoch (one ``model.fit`` call per
epoch) and skips what a resumed epoch already trained. Exact only when the factory's order per epoch
is deterministic.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

from .._errors import InvalidArgumentError
from .._plan import Plan
from .._rundir import ObjectData, RunDir, RunSpec
from .base import Inputs, Source, ValidationInput, ValidationSource, check_carriable, is_tf_dataset
from .checks import ModelFacts, check_label_spec, check_sample_shape, split_batch

if TYPE_CHECKING:
    import tensorflow as tf


def call_factory(factory: Any, plan: Plan, *, epoch: int | None = None, seed: int | None = None) -> Any:
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


# ------------------------------------------------------------------------------------ caller


def check_factory(fn: Any, facts: ModelFacts, plan: Plan, arg: str, *, validation: bool = False) -> Any:
    """Check a factory by calling it once; returns its dataset's element_spec."""
    name = getattr(fn, "__name__", type(fn).__name__)
    _check_signature(fn, name, arg, validation=validation)
    check_carriable(fn, arg, f"the function {name}")
    try:
        # Only to check what it returns: epoch 0, and a stand-in for the seed (fit chooses it later).
        ds = call_factory(fn, plan, epoch=None if validation else 0, seed=None if validation else 0)
    except Exception as e:
        raise InvalidArgumentError(
            f"Invalid value for argument `{arg}`: calling {name}(plan) with the initial plan ({plan.describe()}) "
            f"raised {type(e).__name__}: {e}. Expected it to return a batched tf.data.Dataset."
        ) from e
    if not is_tf_dataset(ds):
        raise InvalidArgumentError(
            f"Invalid value for argument `{arg}`. Received: {name}(plan) returned {type(ds).__name__}. Expected a "
            "batched tf.data.Dataset of (x, y) or (x, y, sample_weight)."
        )
    import tensorflow as tf

    cardinality = int(ds.cardinality())
    if cardinality == int(tf.data.INFINITE_CARDINALITY):
        raise InvalidArgumentError(
            f"Invalid value for argument `{arg}`. Received: {name}(plan) returned an infinite dataset (.repeat()?). "
            "Expected a finite dataset: one epoch of batches. resilient re-creates it for every epoch."
        )
    if cardinality == 0:
        raise InvalidArgumentError(
            f"Invalid value for argument `{arg}`. Received: {name}(plan) returned an empty dataset. Expected at "
            "least one batch."
        )
    spec = ds.element_spec
    _check_element_spec(spec, facts, name, arg)
    return spec


def _check_signature(fn: Any, name: str, arg: str, *, validation: bool) -> None:
    """One required positional parameter (the plan); ``epoch`` and ``seed`` may be required keywords."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return
    required = [
        p for p in params.values()
        if p.default is inspect.Parameter.empty
        and p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                       inspect.Parameter.KEYWORD_ONLY)
        and p.name not in ({"epoch", "seed"} if not validation else set())
    ]
    positional = [p for p in params.values() if p.kind in (inspect.Parameter.POSITIONAL_ONLY,
                                                           inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                           inspect.Parameter.VAR_POSITIONAL)]
    if len(required) > 1 or not positional:
        raise InvalidArgumentError(
            f"Invalid value for argument `{arg}`. Received: the function {name}{inspect.signature(fn)}. Expected "
            "a dataset factory make_dataset(plan) (optionally also taking epoch= and seed= keywords) that "
            "returns a batched tf.data.Dataset."
        )


def _check_element_spec(spec: Any, facts: ModelFacts, name: str, arg: str) -> None:
    """The batches' static shapes: batched x that fits the model, labels that fit the loss."""
    import tensorflow as tf

    x_spec, y_spec = split_batch(spec, arg=arg, received=f"{name}(plan) yields tuples of")
    if isinstance(x_spec, tf.TensorSpec) and facts.input_shape is not None and x_spec.shape.rank is not None:
        shape = tuple(x_spec.shape.as_list())
        if len(shape) == len(facts.input_shape):
            raise InvalidArgumentError(
                f"Invalid value for argument `{arg}`. Received: {name}(plan) yields unbatched x of shape {shape}. "
                f"Expected batches of {facts.expected()}: end the pipeline with .batch(plan.batch_size)."
            )
        check_sample_shape(facts, shape[1:], what=f"{name}(plan)", received=f"batches of x of shape {shape}")
    if isinstance(y_spec, tf.TensorSpec) and y_spec.shape.rank is not None:
        check_label_spec(facts, tuple(y_spec.shape.as_list()), what=arg)


class FactoryInputs(Inputs):
    kind = "factory"

    def __init__(self, factory: Any, val: ValidationInput) -> None:
        super().__init__(val)
        self.objects["data"] = factory

    def write(self, run: RunDir, seed: int) -> ObjectData:
        return ObjectData(kind="factory", key="data", val_key=self.val.write(run))


# ------------------------------------------------------------------------------------ worker


def _check_factory_result(ds: Any, what: str) -> tf.data.Dataset:
    import tensorflow as tf

    if not isinstance(ds, tf.data.Dataset):
        raise TypeError(f"{what} returned {type(ds).__name__}; expected a batched tf.data.Dataset of (x, y).")
    return ds


class FactorySource(Source):
    """A ``make_dataset(plan)`` factory, called per epoch.

    Resume skips ``offset // plan.batch_size`` batches of the re-created epoch (``ds.skip``): exact
    when the factory's order for an epoch is deterministic and it batches by ``plan.batch_size``.

    No ``epochs`` stream: each epoch's dataset is whatever the user's Python function returns for it,
    which cannot be rebuilt inside a tf.data function when an iterator starts. The worker therefore
    calls ``model.fit`` once per epoch for this kind (journaled: ``fit_call`` with ``mode="per_epoch"``).
    """

    def __init__(self, spec: RunSpec, factory: Any, val: ValidationSource | None) -> None:
        self.factory = factory
        super().__init__(spec, val)

    def epoch(self, plan: Plan, epoch: int, offset: int) -> tuple[tf.data.Dataset, int | None]:
        ds = _check_factory_result(call_factory(self.factory, plan, epoch=epoch, seed=self.spec.seed), "make_dataset")
        skip = offset // plan.batch_size
        if skip:
            ds = ds.skip(skip)
        cardinality = int(ds.cardinality())
        return self._weighed(ds), (cardinality if cardinality >= 0 else None)


class FactoryValidationSource(ValidationSource):
    """A ``validation_data`` factory, called once per attempt."""

    def __init__(self, factory: Any) -> None:
        self.factory = factory

    def dataset(self, plan: Plan) -> tf.data.Dataset:
        return _check_factory_result(call_factory(self.factory, plan), "the validation_data factory")
