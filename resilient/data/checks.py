"""Does the data fit the model? The caller-side checks every input kind shares (NumPy only, no TensorFlow).

:class:`ModelFacts` reads what the checks need from the model once (input sample shape, output units,
loss kind); the checks compare a sample shape, labels or a batch's label shape with it and raise
``InvalidArgumentError`` with what was received and what the model expects.
"""

from __future__ import annotations

import collections.abc
import inspect
from typing import Any

import numpy as np

from .._errors import InvalidArgumentError


class ModelFacts:
    """What the checks need to know about the model: input sample shape, output units, loss kind."""

    def __init__(self, model: Any | None) -> None:
        self.input_shape: tuple[Any, ...] | None = None
        self.input_full: tuple[Any, ...] | None = None
        self.units: int | None = None
        self.output_full: tuple[Any, ...] | None = None
        self.loss: str | None = None  # "sparse" | "categorical" | "binary"
        self.loss_name = ""
        self.ignore_class: int | None = None
        if model is None:
            return
        try:
            inputs = model.inputs
        except (AttributeError, ValueError):
            inputs = None  # a subclassed model not yet built: its first step will tell
        if inputs and len(inputs) == 1:
            self.input_full = tuple(inputs[0].shape)
            self.input_shape = self.input_full[1:]
        try:
            outputs = model.outputs
        except (AttributeError, ValueError):
            outputs = None
        if outputs and len(outputs) == 1:
            self.output_full = tuple(outputs[0].shape)
            last = self.output_full[-1] if self.output_full else None
            self.units = int(last) if last is not None else None
        self.loss, self.loss_name, self.ignore_class = _loss_kind(getattr(model, "loss", None))

    def expected(self) -> str:
        return f"samples of shape {self.input_shape} (model.inputs[0].shape={self.input_full})"

    def labels_hint(self) -> str:
        return f"the model's output has {self.units} units (model.outputs[0].shape={self.output_full})"


def _loss_kind(loss: Any) -> tuple[str | None, str, int | None]:
    if isinstance(loss, collections.abc.Mapping):
        loss = next(iter(loss.values())) if len(loss) == 1 else None
    elif isinstance(loss, collections.abc.Sequence) and not isinstance(loss, str):
        loss = loss[0] if len(loss) == 1 else None
    if loss is None:
        return None, "", None
    ignore = None
    if isinstance(loss, str):
        name = loss
    else:
        fn = getattr(loss, "fn", None)
        name = type(loss).__name__
        if name == "LossFunctionWrapper" and fn is not None:
            name = getattr(fn, "__name__", name)
        elif inspect.isfunction(loss) or inspect.isbuiltin(loss):
            name = getattr(loss, "__name__", "")
        ignore = getattr(loss, "ignore_class", None)
    key = name.lower().replace("_", "")
    kind = None
    if key == "sparsecategoricalcrossentropy":
        kind = "sparse"
    elif key in {"categoricalcrossentropy", "categoricalfocalcrossentropy"}:
        kind = "categorical"
    elif key in {"binarycrossentropy", "binaryfocalcrossentropy"}:
        kind = "binary"
    return kind, name, (int(ignore) if ignore is not None else None)


def check_sample_shape(facts: ModelFacts, got: tuple[Any, ...], *, what: str, received: str) -> None:
    """``got`` (one sample's shape) must fit the model's single input where both are known."""
    expected = facts.input_shape
    if expected is None:
        return
    if len(expected) != len(got) or any(e is not None and g is not None and e != g for e, g in zip(expected, got)):
        raise InvalidArgumentError(
            f"{what} does not fit the model's input. Received: {received}. Expected {facts.expected()}."
        )


def check_labels(facts: ModelFacts, y: Any, *, what: str = "y") -> None:
    """Labels ``y`` (all of them, or one batch) against the loss and the model's output units."""
    if facts.loss is None:
        return
    y = np.asarray(y)
    if y.dtype == object or y.size == 0:
        return
    n = y.shape[0] if y.ndim else 1
    loss, units = facts.loss_name, facts.units
    if facts.loss == "sparse":
        _check_class_indices(facts, y, what=what, n=n)
    elif facts.loss == "categorical":
        if units is not None and (y.ndim < 2 or y.shape[-1] != units):
            raise InvalidArgumentError(
                f"Invalid value for argument `{what}`. Received: {what}.shape={y.shape} with loss {loss}, which takes "
                f"one-hot labels. Expected {what} of shape ({n}, {units}): {facts.labels_hint()}. For integer class "
                f"labels use loss='sparse_categorical_crossentropy', or keras.utils.to_categorical({what}, {units})."
            )
    elif facts.loss == "binary" and y.dtype.kind in "iufb":
        lo, hi = y.min(), y.max()
        if lo < 0 or hi > 1:
            raise InvalidArgumentError(
                f"Invalid value for argument `{what}`. Received: labels from {_num(lo)} to {_num(hi)} with loss "
                f"{loss}. Expected targets in [0, 1]. For more than two classes use "
                "loss='sparse_categorical_crossentropy' with one output unit per class."
            )


def _check_class_indices(facts: ModelFacts, y: np.ndarray, *, what: str, n: int) -> None:
    """Labels for a sparse categorical loss: integer class indices within the output units."""
    loss, units = facts.loss_name, facts.units
    if y.ndim > 2 or (y.ndim == 2 and y.shape[1] != 1):
        raise InvalidArgumentError(
            f"Invalid value for argument `{what}`. Received: {what}.shape={y.shape} with loss {loss}, which "
            f"takes integer class indices. Expected {what} of shape ({n},) or ({n}, 1). For one-hot labels "
            f"use loss='categorical_crossentropy', or pass {what}.argmax(axis=-1)."
        )
    if units is None:
        return
    flat = y.reshape(-1)
    if facts.ignore_class is not None:
        flat = flat[flat != facts.ignore_class]
        if flat.size == 0:
            return
    if flat.dtype.kind == "f":
        if not np.all(np.isfinite(flat)) or np.any(flat != np.floor(flat)):
            bad = flat[~np.isfinite(flat) | (flat != np.floor(flat))][:3]
            raise InvalidArgumentError(
                f"Invalid value for argument `{what}`. Received: non-integer labels such as "
                f"{', '.join(repr(float(v)) for v in bad)} with loss {loss}. Expected integer class indices "
                f"in [0, {units - 1}]."
            )
    elif flat.dtype.kind not in "iub":
        return
    lo, hi = flat.min(), flat.max()
    allowed = f"[0, {units - 1}]" + (f" (or {facts.ignore_class}, the loss's ignore_class)" if facts.ignore_class is not None else "")
    if lo < 0:
        count = int(np.count_nonzero(flat < 0))
        raise InvalidArgumentError(
            f"Invalid value for argument `{what}`. Received: labels from {_num(lo)} to {_num(hi)}, {count} of "
            f"them negative. Expected class indices in {allowed} for {loss}: {facts.labels_hint()}."
        )
    if hi >= units:
        count = int(np.count_nonzero(flat >= units))
        raise InvalidArgumentError(
            f"Invalid value for argument `{what}`. Received: labels from {_num(lo)} to {_num(hi)}, {count} of "
            f"them >= {units}. Expected class indices in {allowed} for {loss}: {facts.labels_hint()}. "
            f"Give the last layer {int(hi) + 1} units (one per class), or fix the labels."
        )


def _num(value: Any) -> str:
    value = value.item() if hasattr(value, "item") else value
    return f"{value:g}" if isinstance(value, float) else str(value)


def check_label_spec(facts: ModelFacts, shape: tuple[Any, ...], *, what: str) -> None:
    """The static shape of a batch of labels (from a dataset's element_spec) against the loss."""
    if facts.loss == "sparse" and (len(shape) > 2 or (len(shape) == 2 and shape[1] not in (None, 1))):
        raise InvalidArgumentError(
            f"Invalid value for argument `{what}`. Received: labels of shape {shape} with loss {facts.loss_name}, "
            "which takes integer class indices. Expected labels of shape (batch,) or (batch, 1). For one-hot "
            "labels use loss='categorical_crossentropy'."
        )
    if facts.loss == "categorical" and facts.units is not None and shape and shape[-1] not in (None, facts.units):
        raise InvalidArgumentError(
            f"Invalid value for argument `{what}`. Received: labels of shape {shape} with loss {facts.loss_name}, "
            f"which takes one-hot labels. Expected labels of shape (batch, {facts.units}): {facts.labels_hint()}."
        )


def split_batch(element: Any, *, arg: str, received: str) -> tuple[Any, Any]:
    """``(x, y)`` of one batch or element spec (``y`` None when absent); ``received`` says where it came from.

    A tuple must hold ``(x,)``, ``(x, y)`` or ``(x, y, sample_weight)``, as Keras unpacks it.
    """
    if isinstance(element, tuple):
        if not 1 <= len(element) <= 3:
            raise InvalidArgumentError(
                f"Invalid value for argument `{arg}`. Received: {received} {len(element)} items. "
                "Expected (x, y) or (x, y, sample_weight)."
            )
        return element[0], (element[1] if len(element) > 1 else None)
    return element, None
