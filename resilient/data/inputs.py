"""What ``fit`` does with its inputs in the caller's process, before any worker starts.

``prepare_inputs`` recognises ``x`` and ``validation_data`` (NumPy arrays, a ``resilient.data``
image folder, a ``make_dataset(plan)`` factory, a ``keras.utils.PyDataset``), checks them against the
model (sample shapes, labels against the loss and the output units) and lists image folders. It
reads and writes nothing in the run directory: a refused call leaves it as it was. The returned
:class:`Inputs` then checks a resumed run's stored inputs (``check_resume``) and, once the run
directory is locked, stores what the worker needs (``write``) and returns ``RunSpec.data``.
"""

from __future__ import annotations

import collections.abc
import inspect
import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from .._errors import InvalidArgumentError, RunDirError
from .._plan import Plan
from .._rundir import ArraysData, ObjectData, RunDir, RunSpec, atomic_file, atomic_write_text
from . import IMAGE_FORMATS, ImageFolder
from .pipelines import (
    FOLDER_INDEX,
    VAL_ARRAYS,
    VAL_OBJECT,
    VAL_SAMPLE_WEIGHT,
    FolderIndex,
    as_batch,
    call_factory,
    is_pydataset,
    num_batches,
    read_folder_index,
)

#: Arrays are copied into the run directory this many bytes at a time (a memmap is never loaded whole).
STORE_CHUNK_BYTES = 16 << 20

_WRAP_DATASET = (
    "A dataset object cannot be carried to the worker process faithfully. Wrap its construction in a "
    "function of the plan instead:\n"
    "    def make_dataset(plan):\n"
    "        return build_my_dataset().batch(plan.batch_size)\n"
    "    resilient.fit(model, make_dataset, ...)"
)


# ------------------------------------------------------------------------------------ model facts


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


# ------------------------------------------------------------------------------------ the checks


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


# ------------------------------------------------------------------------------------ recognising


def _is_tf_dataset(obj: Any) -> bool:
    if "tensorflow" not in sys.modules:
        return False
    import tensorflow as tf

    return isinstance(obj, tf.data.Dataset)


def _kind(obj: Any, arg: str) -> str:
    """``"arrays" | "image_folder" | "factory" | "pydataset"``; a clear error for what cannot be carried."""
    if _is_tf_dataset(obj):
        raise InvalidArgumentError(
            f"Invalid value for argument `{arg}`. Received a tf.data.Dataset. Expected NumPy arrays, a "
            f"resilient.data spec, a keras.utils.PyDataset or a dataset factory. {_WRAP_DATASET}"
        )
    if isinstance(obj, ImageFolder):
        return "image_folder"
    if is_pydataset(obj):
        return "pydataset"
    if isinstance(obj, (str, os.PathLike)):
        raise InvalidArgumentError(
            f"Invalid value for argument `{arg}`. Received a path: {arg}={os.fspath(obj)!r}. Expected NumPy arrays "
            "or a resilient.data spec; for a folder of images (one subfolder per class) pass "
            f"resilient.data.image_folder({os.fspath(obj)!r}, image_size=(height, width))."
        )
    if inspect.isclass(obj):
        raise InvalidArgumentError(
            f"Invalid value for argument `{arg}`. Received the class {obj.__name__}. Expected an instance "
            f"(e.g. {obj.__name__}(...)) or a function make_dataset(plan)."
        )
    if inspect.isgenerator(obj) or (
        isinstance(obj, collections.abc.Iterator) and not isinstance(obj, np.ndarray)
    ):
        raise InvalidArgumentError(
            f"Invalid value for argument `{arg}`. Received a {type(obj).__name__} (a generator or iterator), which "
            "cannot be carried to the worker process nor rewound to resume. Expected NumPy arrays, a "
            "keras.utils.PyDataset (indexable batches), or a function make_dataset(plan) that builds a tf.data "
            "pipeline (tf.data.Dataset.from_generator inside it works)."
        )
    if callable(obj):
        return "factory"
    return "arrays"


def _carriable(obj: Any, arg: str, described: str) -> None:
    import cloudpickle

    try:
        cloudpickle.dumps(obj)
    except Exception as e:
        raise InvalidArgumentError(
            f"Invalid value for argument `{arg}`. Received: {described}, which cannot be carried to the worker "
            f"process ({type(e).__name__}: {e}). Expected an object cloudpickle can serialise: open files, "
            "clients and tf.data pipelines inside it (in make_dataset, or in __getitem__), not in advance."
        ) from None


# ------------------------------------------------------------------------------------ arrays


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
    for name, arr in arrays.items():
        path = run.data_dir / f"{name}.npy"
        if not path.exists():
            continue
        stored = np.load(path, mmap_mode="r")
        if stored.shape != arr.shape or stored.dtype != arr.dtype:
            raise RunDirError(
                f"The run directory {run.path} was trained on {name} of shape {stored.shape} and dtype {stored.dtype}; "
                f"this call passes shape {arr.shape} and dtype {arr.dtype}. Pass the same data to resume, or a new run_dir."
            )


# ------------------------------------------------------------------------------------ image folder


def list_folder(folder: ImageFolder, *, arg: str = "x") -> tuple[tuple[str, ...], tuple[int, ...] | None, tuple[str, ...] | None]:
    """(files relative to the folder, labels, class names), in keras.utils.image_dataset_from_directory's order."""
    root = folder.path
    if not os.path.exists(root):
        raise InvalidArgumentError(
            f"Invalid value for argument `path` of image_folder() (passed as `{arg}`). Received: path={root!r}, which "
            "does not exist. Expected a directory of images with one subfolder per class (path/cat/1.png, ...)."
        )
    if not os.path.isdir(root):
        raise InvalidArgumentError(
            f"Invalid value for argument `path` of image_folder() (passed as `{arg}`). Received: path={root!r}, which "
            "is a file. Expected a directory of images with one subfolder per class."
        )
    formats = " ".join(IMAGE_FORMATS)
    if folder.labels == "inferred":
        subdirs = sorted(
            d for d in os.listdir(root) if not d.startswith(".") and os.path.isdir(os.path.join(root, d))
        )
        if folder.class_names is not None:
            missing = [c for c in folder.class_names if c not in subdirs]
            if missing:
                raise InvalidArgumentError(
                    f"Invalid value for argument `class_names` of image_folder(). Received: "
                    f"class_names={list(folder.class_names)!r}; {missing!r} are not subfolders of {root}. "
                    f"Expected names among its subfolders: {subdirs!r}."
                )
            subdirs = list(folder.class_names)
        if not subdirs:
            loose = len(_walk(root, folder.follow_links))
            detail = (
                f"it holds {loose} images directly but no class subfolders. Expected one subfolder per class "
                "(path/cat/1.png, path/dog/2.png), or labels=None for images without labels."
                if loose else f"Expected one subfolder per class holding {formats} files."
            )
            raise InvalidArgumentError(
                f"Invalid value for argument `path` of image_folder(). Received: path={root!r}, in which no class "
                f"subfolder was found: {detail}"
            )
        files: list[str] = []
        labels: list[int] | None = []
        for label, sub in enumerate(subdirs):
            found = _walk(os.path.join(root, sub), folder.follow_links)
            files.extend(os.path.join(sub, f) for f in found)
            labels.extend([label] * len(found))  # type: ignore[union-attr]
        class_names: tuple[str, ...] | None = tuple(subdirs)
    else:
        files = _walk(root, folder.follow_links)
        labels = None
        class_names = None
        if isinstance(folder.labels, tuple):
            labels = list(folder.labels)
            if len(labels) != len(files):
                raise InvalidArgumentError(
                    f"Invalid value for argument `labels` of image_folder(). Received {len(labels)} labels for "
                    f"{len(files)} image files in {root}. Expected one label per file, in the sorted order of the "
                    "file paths."
                )
            if labels and min(labels) < 0:
                raise InvalidArgumentError(
                    f"Invalid value for argument `labels` of image_folder(). Received labels from {min(labels)} to "
                    f"{max(labels)}. Expected class indices >= 0."
                )
            class_names = tuple(str(v) for v in range(max(labels) + 1)) if labels else ()
    if not files:
        where = f"in its {len(class_names)} class subfolders ({', '.join(class_names[:5])}{', ...' if len(class_names) > 5 else ''})" if class_names else "in it"
        raise InvalidArgumentError(
            f"Invalid value for argument `path` of image_folder(). Received: path={root!r}, with no images {where}. "
            f"Expected at least one {formats} file."
        )
    if folder.label_mode == "binary" and folder.has_labels and class_names is not None and len(class_names) != 2:
        raise InvalidArgumentError(
            f"Invalid value for argument `label_mode` of image_folder(). Received: label_mode='binary' with "
            f"{len(class_names)} classes ({', '.join(class_names[:5])}). Expected exactly 2 classes, or "
            "label_mode='int' / 'categorical'."
        )
    return tuple(files), (tuple(labels) if labels is not None and folder.has_labels else None), class_names


def _walk(directory: str, follow_links: bool) -> list[str]:
    """Image files under ``directory``, relative to it, sorted as Keras does (by folder, then name)."""
    out = []
    for root, _dirs, names in sorted(os.walk(directory, followlinks=follow_links), key=lambda t: t[0]):
        rel = os.path.relpath(root, directory)
        for name in sorted(names):
            if name.lower().endswith(IMAGE_FORMATS):
                out.append(name if rel == "." else os.path.join(rel, name))
    return out


def split(n: int, validation_split: float, seed: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Train and validation file indices: a seeded shuffle of the files, the last part held out (as Keras)."""
    order = np.random.RandomState(seed % (2**32)).permutation(n)
    n_val = int(validation_split * n)
    return tuple(int(i) for i in order[: n - n_val]), tuple(int(i) for i in order[n - n_val:])


def check_folder_labels(facts: ModelFacts, folder: ImageFolder, labels: tuple[int, ...] | None,
                        class_names: tuple[str, ...] | None) -> None:
    if facts.loss is None or labels is None:
        return
    k = len(class_names) if class_names is not None else (max(labels) + 1)
    mode, loss = folder.label_mode, facts.loss_name
    names = f" ({', '.join(class_names[:5])}{', ...' if len(class_names) > 5 else ''})" if class_names else ""
    if facts.loss == "sparse":
        if mode != "int":
            raise InvalidArgumentError(
                f"Invalid value for argument `label_mode` of image_folder(). Received: label_mode={mode!r} with loss "
                f"{loss}, which takes integer class indices. Expected label_mode='int' (or a categorical loss)."
            )
        if facts.units is not None and k > facts.units:
            raise InvalidArgumentError(
                f"Invalid value for argument `x`. Received: an image folder with {k} classes{names}, labels 0 to "
                f"{k - 1}. Expected at most {facts.units} classes for {loss}: {facts.labels_hint()}. Give the last "
                f"layer {k} units (one per class), or pass class_names=[...] to use fewer classes."
            )
    elif facts.loss == "categorical":
        if mode != "categorical":
            raise InvalidArgumentError(
                f"Invalid value for argument `label_mode` of image_folder(). Received: label_mode={mode!r} with loss "
                f"{loss}, which takes one-hot labels. Expected label_mode='categorical' (or "
                "loss='sparse_categorical_crossentropy' with label_mode='int')."
            )
        if facts.units is not None and k != facts.units:
            raise InvalidArgumentError(
                f"Invalid value for argument `x`. Received: an image folder with {k} classes{names} (one-hot labels "
                f"of width {k}). Expected {facts.units} classes: {facts.labels_hint()}. Give the last layer {k} units."
            )
    elif facts.loss == "binary":
        if k > 2:
            raise InvalidArgumentError(
                f"Invalid value for argument `x`. Received: an image folder with {k} classes{names} and loss {loss}. "
                "Expected 2 classes for a binary loss, or loss='sparse_categorical_crossentropy' with one output "
                "unit per class."
            )


# ------------------------------------------------------------------------------------ validation inputs


class _Validation:
    """A validation input, checked; ``write`` stores it and says where (``val_key``)."""

    kind = "none"

    def __init__(self, value: Any = None) -> None:
        self.value = value

    def write(self, run: RunDir) -> str | None:
        return None


class _ArrayValidation(_Validation):
    kind = "arrays"

    @property
    def weighted(self) -> bool:
        return len(self.value) == 3 and self.value[2] is not None

    def write(self, run: RunDir) -> str | None:
        vx, vy = self.value[:2]
        store_array(run.data_dir / "val_x.npy", vx)
        store_array(run.data_dir / "val_y.npy", vy)
        if self.weighted:
            store_array(run.path / VAL_SAMPLE_WEIGHT, self.value[2])
        else:
            (run.path / VAL_SAMPLE_WEIGHT).unlink(missing_ok=True)  # the worker looks for it by name
        return VAL_ARRAYS


class _ObjectValidation(_Validation):
    kind = "object"  # carried in objects.pkl as objects["val_data"]

    def write(self, run: RunDir) -> str | None:
        return VAL_OBJECT


def _prepare_validation(validation_data: Any, facts: ModelFacts, plan: Plan,
                        train_arrays: tuple[np.ndarray, np.ndarray] | None) -> _Validation:
    if validation_data is None:
        return _Validation()
    arg = "validation_data"
    if isinstance(validation_data, (tuple, list)):
        if len(validation_data) not in (2, 3):
            raise InvalidArgumentError(
                f"Invalid value for argument `validation_data`. Received a {type(validation_data).__name__} of "
                f"{len(validation_data)} items. Expected (x_val, y_val) or (x_val, y_val, val_sample_weight) of NumPy "
                "arrays, a resilient.data spec, a keras.utils.PyDataset or a function make_dataset(plan)."
            )
        for item in validation_data:
            if _is_tf_dataset(item):
                _kind(item, arg)
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
        return _ArrayValidation((vx, vy, vsw))
    kind = _kind(validation_data, arg)
    if kind == "image_folder":
        folder: ImageFolder = validation_data
        files, labels, class_names = list_folder(folder, arg=arg)
        check_sample_shape(facts, folder.sample_shape(), what="validation_data",
                           received=f"images of shape {folder.sample_shape()} (image_size={folder.image_size}, "
                                    f"color_mode={folder.color_mode!r})")
        check_folder_labels(facts, folder, labels, class_names)
        index = FolderIndex(folder=folder, root=folder.path, files=files, labels=labels, class_names=class_names,
                            train=(), validation=tuple(range(len(files))))
        return _ObjectValidation(index)
    if kind == "pydataset":
        _check_pydataset(validation_data, facts, arg)
        return _ObjectValidation(validation_data)
    if kind == "factory":
        _check_factory(validation_data, facts, plan, arg, validation=True)
        return _ObjectValidation(validation_data)
    raise InvalidArgumentError(
        f"Invalid value for argument `validation_data`. Received: {type(validation_data).__name__}. Expected "
        "(x_val, y_val) of NumPy arrays, a resilient.data spec, a keras.utils.PyDataset or a function make_dataset(plan)."
    )


# ------------------------------------------------------------------------------------ factories, PyDatasets


def _check_factory(fn: Any, facts: ModelFacts, plan: Plan, arg: str, *, validation: bool = False) -> Any:
    """Check a factory by calling it once; returns its dataset's element_spec."""
    name = getattr(fn, "__name__", type(fn).__name__)
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = None
    if params is not None:
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
    _carriable(fn, arg, f"the function {name}")
    try:
        # Only to check what it returns: epoch 0, and a stand-in for the seed (fit chooses it later).
        ds = call_factory(fn, plan, epoch=None if validation else 0, seed=None if validation else 0)
    except Exception as e:
        raise InvalidArgumentError(
            f"Invalid value for argument `{arg}`: calling {name}(plan) with the initial plan ({plan.describe()}) "
            f"raised {type(e).__name__}: {e}. Expected it to return a batched tf.data.Dataset."
        ) from e
    if not _is_tf_dataset(ds):
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
    if isinstance(spec, tuple):
        if not 1 <= len(spec) <= 3:
            raise InvalidArgumentError(
                f"Invalid value for argument `{arg}`. Received: {name}(plan) yields tuples of {len(spec)} items. "
                "Expected (x, y) or (x, y, sample_weight)."
            )
        x_spec, y_spec = spec[0], (spec[1] if len(spec) > 1 else None)
    else:
        x_spec, y_spec = spec, None
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
    return spec


def _check_pydataset(pyds: Any, facts: ModelFacts, arg: str) -> int:
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
    _carriable(pyds, arg, f"the PyDataset {name}")
    try:
        first = as_batch(pyds[0])
    except Exception as e:
        raise InvalidArgumentError(
            f"Invalid value for argument `{arg}`: {name}[0] raised {type(e).__name__}: {e}. Expected it to return "
            "a batch (x, y) or (x, y, sample_weight)."
        ) from e
    if isinstance(first, tuple):
        if not 1 <= len(first) <= 3:
            raise InvalidArgumentError(
                f"Invalid value for argument `{arg}`. Received: {name}[0] returned {len(first)} items. "
                "Expected (x, y) or (x, y, sample_weight)."
            )
        bx, by = first[0], (first[1] if len(first) > 1 else None)
    else:
        bx, by = first, None
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


# ------------------------------------------------------------------------------------ the inputs


class Inputs:
    """Checked inputs of one fit call. ``write`` stores them once the run directory is locked."""

    kind = "arrays"
    #: (height, width) of the source images when resilient builds the image pipeline (resizable).
    source_image_size: tuple[int, int] | None = None

    def __init__(self, val: _Validation) -> None:
        self.val = val
        self.objects: dict[str, Any] = {}
        if isinstance(val, _ObjectValidation):
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
                f"The run directory {run.path} was trained on {_describe_kind(old.data.kind)}; this call passes "
                f"{_describe_kind(self.kind)}. Pass the same input to resume, or a new run_dir."
            )

    def write(self, run: RunDir, seed: int) -> ArraysData | ObjectData:
        raise NotImplementedError


def _describe_kind(kind: str) -> str:
    return {"arrays": "NumPy arrays", "image_folder": "an image folder", "factory": "a dataset factory",
            "pydataset": "a keras.utils.PyDataset"}.get(kind, kind)


class ArrayInputs(Inputs):
    kind = "arrays"

    def __init__(self, x: np.ndarray, y: np.ndarray, val: _Validation, sample_weight: np.ndarray | None = None) -> None:
        super().__init__(val)
        self.x, self.y = x, y
        self.sample_weight = sample_weight
        self.image_axes = (0, 1) if x.ndim == 4 else None
        if self.image_axes:
            self.source_image_size = (int(x.shape[1]), int(x.shape[2]))

    def check_resume(self, run: RunDir, old: RunSpec) -> None:
        super().check_resume(run, old)
        arrays = {"x": self.x, "y": self.y}
        if self.sample_weight is not None:
            arrays["sample_weight"] = self.sample_weight
        check_stored_arrays(run, arrays)

    def write(self, run: RunDir, seed: int) -> ArraysData:
        data_dir = run.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        store_array(data_dir / "x.npy", self.x)
        store_array(data_dir / "y.npy", self.y)
        if self.sample_weight is not None:
            store_array(data_dir / "sample_weight.npy", self.sample_weight)
        has_val = isinstance(self.val, _ArrayValidation)
        if has_val:
            self.val.write(run)
        return ArraysData(
            x="data/x.npy", y="data/y.npy", samples=int(self.x.shape[0]),
            val_x="data/val_x.npy" if has_val else None, val_y="data/val_y.npy" if has_val else None,
            image_axes=self.image_axes,
            sample_weight="data/sample_weight.npy" if self.sample_weight is not None else None,
            val_sample_weight=VAL_SAMPLE_WEIGHT if has_val and self.val.weighted else None,
        )


class FolderInputs(Inputs):
    kind = "image_folder"

    def __init__(self, folder: ImageFolder, listing: tuple[Any, Any, Any], val: _Validation) -> None:
        super().__init__(val)
        self.folder = folder
        self.files, self.labels, self.class_names = listing
        self.source_image_size = folder.image_size
        self._stored: FolderIndex | None = None

    def _same(self, stored: FolderIndex) -> str | None:
        """Why ``stored`` is not this folder's listing (None: it is; the folder may have moved)."""
        mine = self.folder.model_dump(exclude={"path"})
        theirs = stored.folder.model_dump(exclude={"path"})
        if mine != theirs:
            changed = sorted(k for k in mine if mine[k] != theirs.get(k))
            return f"image_folder arguments differ: {', '.join(f'{k}={theirs.get(k)!r} then, {mine[k]!r} now' for k in changed)}"
        if stored.files != self.files or stored.labels != self.labels or stored.class_names != self.class_names:
            added = len(set(self.files) - set(stored.files))
            removed = len(set(stored.files) - set(self.files))
            return (f"the folder changed since the run started ({len(stored.files)} files then, {len(self.files)} now: "
                    f"{added} added, {removed} removed)")
        return None

    def check_resume(self, run: RunDir, old: RunSpec) -> None:
        super().check_resume(run, old)
        key = old.data.key if isinstance(old.data, ObjectData) else FOLDER_INDEX
        if not (run.path / key).exists():
            return
        try:
            stored = read_folder_index(run, key)
        except Exception as e:
            raise RunDirError(f"{run.path / key} cannot be read ({e}). Pass a new run_dir.") from None
        why = self._same(stored)
        if why is not None:
            raise RunDirError(
                f"The run directory {run.path} was trained on the image folder {stored.root}, and {why}. An exact "
                "resume needs the same files: restore the folder, or pass a new run_dir."
            )
        self._stored = stored

    def write(self, run: RunDir, seed: int) -> ObjectData:
        run.data_dir.mkdir(parents=True, exist_ok=True)
        if self._stored is not None:
            # A resume: the same files and split; only the folder's location may have changed.
            index = self._stored.model_copy(update={"folder": self.folder, "root": self.folder.path})
        else:
            split_seed = self.folder.seed if self.folder.seed is not None else seed
            train, validation = split(len(self.files), self.folder.validation_split, split_seed)
            index = FolderIndex(folder=self.folder, root=self.folder.path, files=self.files, labels=self.labels,
                                class_names=self.class_names, train=train, validation=validation)
        atomic_write_text(run.path / FOLDER_INDEX, index.model_dump_json())
        return ObjectData(kind="image_folder", key=FOLDER_INDEX, val_key=self.val.write(run), samples=len(index.train))


class FactoryInputs(Inputs):
    kind = "factory"

    def __init__(self, factory: Any, val: _Validation) -> None:
        super().__init__(val)
        self.objects["data"] = factory

    def write(self, run: RunDir, seed: int) -> ObjectData:
        if isinstance(self.val, _ArrayValidation):
            run.data_dir.mkdir(parents=True, exist_ok=True)
        return ObjectData(kind="factory", key="data", val_key=self.val.write(run))


class PyDatasetInputs(Inputs):
    kind = "pydataset"

    def __init__(self, pyds: Any, batches: int, val: _Validation) -> None:
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
        if isinstance(self.val, _ArrayValidation):
            run.data_dir.mkdir(parents=True, exist_ok=True)
        return ObjectData(kind="pydataset", key="data", val_key=self.val.write(run), samples=self.batches)


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


def _refuse_for_kind(kind: str, *, sample_weight: Any, validation_split: float, steps_per_epoch: int | None) -> None:
    """model.fit's array-only arguments, refused for the other inputs with what to do instead."""
    what = _describe_kind(kind)
    if sample_weight is not None:
        instead = {"image_folder": "Pass NumPy arrays to weight single samples, or class_weight={class: weight}.",
                   "factory": "Yield (x, y, sample_weight) batches from make_dataset(plan) instead.",
                   "pydataset": "Return (x, y, sample_weight) from the PyDataset's __getitem__ instead."}[kind]
        raise InvalidArgumentError(
            f"Invalid value for argument `sample_weight`. Received sample_weight with x={what}, as model.fit refuses "
            f"it for datasets. Expected sample_weight=None. {instead}"
        )
    if validation_split:
        instead = {"image_folder": f"Pass image_folder(..., validation_split={validation_split}) instead: it holds "
                                   "out part of the folder's images.",
                   "factory": "Pass validation_data=make_validation_dataset (a factory) instead.",
                   "pydataset": "Pass validation_data= (another PyDataset, arrays or a factory) instead."}[kind]
        raise InvalidArgumentError(
            f"Invalid value for argument `validation_split`. Received: validation_split={validation_split} with "
            f"x={what}; like model.fit, resilient splits only NumPy arrays. {instead}"
        )
    if steps_per_epoch is not None and kind in ("factory", "pydataset"):
        instead = ("make_dataset(plan) is called once per epoch: return steps_per_epoch batches from it "
                   "(e.g. ds.take(steps_per_epoch)) and omit steps_per_epoch"
                   if kind == "factory" else
                   "resilient orders and resumes a PyDataset by its own batches, one pass per epoch: make "
                   "num_batches return the steps you want per epoch and omit steps_per_epoch")
        raise InvalidArgumentError(
            f"Invalid value for argument `steps_per_epoch`. Received: steps_per_epoch={steps_per_epoch} with "
            f"x={what}, whose epochs resilient cannot cut and resume exactly as model.fit's continuing iterator "
            f"does. Expected steps_per_epoch=None: {instead}."
        )


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


def prepare_inputs(x: Any, y: Any, validation_data: Any, *, model: Any | None, plan: Plan, sample_weight: Any = None,
                   validation_split: float = 0.0, class_weight: dict[int, float] | None = None,
                   steps_per_epoch: int | None = None, validation_batch_size: int | None = None) -> Inputs:
    """Recognise and check ``x``, ``y`` and ``validation_data`` against ``model`` (None: a builder, not checked).

    Also model.fit's data arguments: ``sample_weight`` and ``validation_split`` (arrays only; the
    split holds out the last samples, as Keras does, and ``validation_data`` overrides it), and
    whether ``class_weight``, ``steps_per_epoch`` and ``validation_batch_size`` apply to the inputs.
    Reads the inputs (an image folder's listing, a PyDataset's first batch, a factory's element_spec)
    but writes nothing. Raises InvalidArgumentError with what was received and what was expected.
    """
    facts = ModelFacts(model)
    if x is None:
        to_arrays(x, y)
    kind = _kind(x, "x")
    if kind != "arrays" and y is not None:
        raise InvalidArgumentError(
            f"Invalid value for argument `y`. Received: y={type(y).__name__} with x={_describe_kind(kind)}, which "
            "provides its own labels. Expected y=None."
        )
    if kind != "arrays":
        _refuse_for_kind(kind, sample_weight=sample_weight, validation_split=validation_split,
                         steps_per_epoch=steps_per_epoch)
    if validation_batch_size is not None and is_pydataset(validation_data):
        raise InvalidArgumentError(
            f"Invalid value for argument `validation_batch_size`. Received: validation_batch_size="
            f"{validation_batch_size} with validation_data={type(validation_data).__name__}, a PyDataset, which "
            "makes its own batches. Expected validation_batch_size=None (model.fit ignores it there too)."
        )
    if kind == "arrays":
        x_arr, y_arr = to_arrays(x, y)
        check_sample_shape(facts, x_arr.shape[1:], what="x", received=f"x.shape={x_arr.shape}")
        check_labels(facts, y_arr)
        sw = None if sample_weight is None else check_sample_weight(sample_weight, x_arr)
        if sw is not None and class_weight is not None:
            raise InvalidArgumentError(
                "Invalid value for argument `class_weight`. Received both class_weight and sample_weight, which "
                "model.fit refuses too (\"You cannot `class_weight` and `sample_weight` at the same time\"). "
                "Expected one of them: fold the class weights into sample_weight (e.g. sample_weight * "
                "np.vectorize(class_weight.get)(y)), or pass class_weight alone."
            )
        if validation_split and validation_data is None:
            (x_arr, y_arr, sw), held_out = split_arrays((x_arr, y_arr, sw), validation_split)
            val: _Validation = _ArrayValidation(held_out)
        else:
            val = _prepare_validation(validation_data, facts, plan, (x_arr, y_arr))
        return ArrayInputs(x_arr, y_arr, val, sw)
    if kind == "image_folder":
        folder: ImageFolder = x
        listing = list_folder(folder)
        files, labels, class_names = listing
        n_val = int(folder.validation_split * len(files))
        if folder.validation_split > 0 and (n_val == 0 or n_val == len(files)):
            raise InvalidArgumentError(
                f"Invalid value for argument `validation_split` of image_folder(). Received: "
                f"validation_split={folder.validation_split} of {len(files)} images, which leaves "
                f"{'no validation' if n_val == 0 else 'no training'} image. Expected a split that leaves at least "
                "one image on each side, or validation_split=0."
            )
        if folder.validation_split > 0 and validation_data is not None:
            raise InvalidArgumentError(
                f"Invalid value for argument `validation_data`. Received validation_data={type(validation_data).__name__} "
                f"while x=image_folder(..., validation_split={folder.validation_split}) holds out its own validation "
                "images. Expected one of the two: pass validation_split=0, or validation_data=None."
            )
        check_sample_shape(facts, folder.sample_shape(), what="x",
                           received=f"images of shape {folder.sample_shape()} (image_size={folder.image_size}, "
                                    f"color_mode={folder.color_mode!r})")
        check_folder_labels(facts, folder, labels, class_names)
        val = _prepare_validation(validation_data, facts, plan, None)
        return FolderInputs(folder, listing, val)
    if kind == "pydataset":
        batches = _check_pydataset(x, facts, "x")
        if class_weight is not None:
            _refuse_weighted(as_batch(x[0]), f"{type(x).__name__}[0] returns")
        val = _prepare_validation(validation_data, facts, plan, None)
        return PyDatasetInputs(x, batches, val)
    element_spec = _check_factory(x, facts, plan, "x")
    if class_weight is not None:
        _refuse_weighted(element_spec, f"{getattr(x, '__name__', 'make_dataset')}(plan) yields")
    val = _prepare_validation(validation_data, facts, plan, None)
    return FactoryInputs(x, val)


def _refuse_weighted(element: Any, source: str) -> None:
    """class_weight with batches that carry their own sample weights: model.fit refuses the pair."""
    if isinstance(element, tuple) and len(element) == 3:
        raise InvalidArgumentError(
            f"Invalid value for argument `class_weight`. Received class_weight while {source} (x, y, "
            "sample_weight) batches; model.fit refuses the pair (\"You cannot `class_weight` and `sample_weight` at "
            "the same time\"). Expected one of them: fold the class weights into the batches' sample weights, or "
            "yield (x, y)."
        )
