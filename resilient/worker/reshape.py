"""Rebuilding a model with a flexible spatial input, so ``lower_resolution`` can apply to it.

A Sequential or functional model declared with a fixed image size (``keras.Input((224, 224, 3))``)
can take another size when its layers allow it: convolutions and pooling are size-agnostic, and a
global pooling layer before the head makes the weights independent of the size. ``Flatten`` before
a Dense layer does not, and then the model cannot be resized (the step reports itself not applicable).

Apart from model.py because the caller's ``fit`` runs ``can_flex`` too: this module imports Keras only
inside it, while model.py (worker only) imports Keras at module level.
"""

from __future__ import annotations

import copy
from typing import Any


def _flex_shape(shape: Any) -> Any:
    if isinstance(shape, (list, tuple)) and len(shape) == 4:
        return [shape[0], None, None, shape[3]]
    return shape


def with_flexible_input(config: dict[str, Any]) -> dict[str, Any]:
    """A copy of a Sequential/functional model config whose image inputs take any (height, width)."""
    config = copy.deepcopy(config)
    for layer in config.get("layers", []):
        if layer.get("class_name") == "InputLayer":
            cfg = layer.get("config", {})
            for key in ("batch_shape", "batch_input_shape"):
                if key in cfg:
                    cfg[key] = _flex_shape(cfg[key])
    if "build_input_shape" in config:
        config["build_input_shape"] = _flex_shape(config["build_input_shape"])
    return config


def can_flex(model: Any, custom_objects: dict[str, Any] | None = None) -> bool:
    """Whether ``model`` (fixed 4-D input) rebuilds with a flexible spatial input and the same weights."""
    import keras

    if not isinstance(model, keras.Model) or model.__class__ not in (keras.Sequential, keras.Model):
        return False  # subclassed models own their build; do not guess
    try:
        inputs = model.inputs
        if len(inputs) != 1 or len(inputs[0].shape) != 4:
            return False
        if inputs[0].shape[1] is None and inputs[0].shape[2] is None:
            return True  # already flexible
        with keras.saving.custom_object_scope(custom_objects or {}):
            clone = model.__class__.from_config(with_flexible_input(model.get_config()))
    except Exception:
        return False
    return [tuple(w.shape) for w in clone.weights] == [tuple(w.shape) for w in model.weights]
