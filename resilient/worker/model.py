"""The model an attempt trains: loaded (or built), rebuilt under the plan's precision, gradient
accumulation or flexible input, and compiled.

A layer's dtype policy is fixed when it is built, and Keras counts a learning-rate schedule in
micro-steps under gradient accumulation; so a plan that changes either rebuilds the model from its
config and carries the weights over. Only the worker imports this module.
"""

from __future__ import annotations

import warnings
from typing import Any

import keras

from .._plan import Plan
from .._rundir import RunDir, RunSpec
from .reshape import with_flexible_input
from .state import inner_optimizer

_PRECISIONS = {"float32", "mixed_float16", "mixed_bfloat16"}
_COMPILE_OBJECTS = {"loss", "metrics", "weighted_metrics", "loss_weights"}


def build_model(run: RunDir, spec: RunSpec, plan: Plan, objects: dict[str, Any]) -> Any:
    """The model for ``plan``: loaded (or built), put under the plan's precision, compiled."""
    # Keras restores optimizer variables by position and warns when the counts differ; the
    # checkpoint restores them by meaning right after, so the warning would only mislead.
    warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
    custom = objects.get("custom_objects", {})
    keras.mixed_precision.set_global_policy(plan.precision)
    if spec.model_builder:
        model = objects["builder"]()
        custom = _with_builders_custom_objects(model, custom)
    else:
        with keras.saving.custom_object_scope(custom):
            model = keras.saving.load_model(run.model_file, compile=True, safe_mode=False)
        flex = spec.flexible_input and plan.image_size is not None and _fixed_spatial_input(model)
        if plan.precision != "float32" or plan.grad_accum_steps > 1 or flex:
            model = _rebuild(model, plan, custom, flexible_input=flex)
    if getattr(model, "optimizer", None) is None or not getattr(model, "compiled", False):
        raise TypeError(
            "The model is not compiled. Expected a compiled keras.Model (call model.compile(...) before "
            "resilient.fit), or a builder that returns one."
        )
    if plan.grad_accum_steps > 1 and spec.model_builder:
        model = _rebuild(model, plan, custom)
    return model


def _with_builders_custom_objects(model: Any, carried: dict[str, Any]) -> dict[str, Any]:
    """The custom objects a rebuild of the builder's model needs: found on it, and anything carried."""
    from .._carry import custom_objects_of

    if not hasattr(model, "_flatten_layers"):
        return carried  # not a keras.Model: the compiled-model check below says so
    return {**custom_objects_of(model), **carried}


def _fixed_spatial_input(model: Any) -> bool:
    try:
        shape = tuple(model.inputs[0].shape)
    except (AttributeError, ValueError, IndexError):
        return False
    return len(shape) == 4 and (shape[1] is not None or shape[2] is not None)


def _rebuild(model: Any, plan: Plan, custom: dict[str, Any], flexible_input: bool = False) -> Any:
    """Rebuild ``model`` under ``plan``'s dtype policy and gradient accumulation; weights carried over.

    With ``flexible_input``, its image input takes any (height, width) (see reshape.py).
    """
    config = model.get_config()
    if flexible_input:
        config = with_flexible_input(config)
    _set_dtype_policies(config, plan.precision)
    compile_config = dict(model.get_compile_config() or {})
    with keras.saving.custom_object_scope(custom), _as_loaded():
        new = model.__class__.from_config(config)
        if not new.built and model.get_build_config():
            new.build_from_config(model.get_build_config())
        new.set_weights(model.get_weights())
        compile_config["optimizer"] = _optimizer_for(model.optimizer, plan.grad_accum_steps)
        new.compile(**{k: _deserialize_compile_arg(k, v) for k, v in compile_config.items()})
    return new


def _optimizer_for(optimizer: Any, accum: int) -> Any:
    """A fresh copy of ``optimizer`` (unwrapped from loss scaling) accumulating ``accum`` micro-steps."""
    config = keras.optimizers.serialize(inner_optimizer(optimizer))
    config["config"]["gradient_accumulation_steps"] = accum if accum > 1 else None
    new = keras.optimizers.deserialize(config)
    schedule = getattr(new, "_learning_rate", None)
    if accum > 1 and isinstance(schedule, keras.optimizers.schedules.LearningRateSchedule):
        new._learning_rate = per_update_schedule(schedule, accum)
    return new


def _as_loaded() -> Any:
    """Deserialize as ``build_model`` loads (``safe_mode=False``): a Lambda layer's function rebuilds too."""
    from keras.src.saving.serialization_lib import SafeModeScope

    return SafeModeScope(False)


class _PerUpdate(keras.optimizers.schedules.LearningRateSchedule):
    """A schedule evaluated at the optimizer update, not at the micro-step Keras passes it."""

    def __init__(self, schedule: Any, accum: int) -> None:
        self.schedule = schedule
        self.accum = accum

    def __call__(self, step: Any) -> Any:
        return self.schedule(keras.ops.floor_divide(step, self.accum))

    def get_config(self) -> dict[str, Any]:
        return {"schedule": keras.saving.serialize_keras_object(self.schedule), "accum": self.accum}


def per_update_schedule(schedule: Any, accum: int) -> Any:
    """``schedule`` evaluated per optimizer update rather than per micro-batch.

    Keras evaluates a schedule at the micro-step counter when gradients are accumulated, so without
    this a ``halve_batch(keep_effective_batch=True)`` would run the schedule ``accum`` times faster.
    """
    return _PerUpdate(schedule, accum)


def _deserialize_compile_arg(key: str, value: Any) -> Any:
    if key in _COMPILE_OBJECTS and value is not None:
        return keras.saving.deserialize_keras_object(value) if isinstance(value, dict) else _deser_nested(value)
    return value


def _deser_nested(value: Any) -> Any:
    if isinstance(value, dict) and "class_name" in value:
        return keras.saving.deserialize_keras_object(value)
    if isinstance(value, list):
        return [_deser_nested(v) for v in value]
    if isinstance(value, dict):
        return {k: _deser_nested(v) for k, v in value.items()}
    return value


def _set_dtype_policies(config: Any, precision: str) -> None:
    """Point every layer's dtype policy in a model config at ``precision`` (in place)."""
    if isinstance(config, dict):
        if config.get("class_name") in {"DTypePolicy", "FloatDTypePolicy"} and isinstance(config.get("config"), dict):
            if config["config"].get("name", "") in _PRECISIONS:
                config["config"]["name"] = precision
        for v in config.values():
            _set_dtype_policies(v, precision)
    elif isinstance(config, list):
        for v in config:
            _set_dtype_policies(v, precision)
