"""The two entry points, one per side of the process boundary, and the only code that knows every input kind.

- :func:`prepare_inputs` (caller, ``resilient.fit``): recognises ``x`` and ``validation_data``
  (NumPy arrays, a ``resilient.data`` image folder, a ``make_dataset(plan)`` factory, a
  ``keras.utils.PyDataset``), refuses what cannot be carried to the worker, and hands each to its
  kind's module to check against the model. It reads the inputs (an image folder's listing, a
  PyDataset's first batch, a factory's element_spec) but writes nothing in the run directory: a
  refused call leaves it as it was. The returned ``Inputs`` then checks a resumed run's stored
  inputs (``check_resume``) and, once the run directory is locked, stores what the worker needs
  (``write``) and returns ``RunSpec.data``.
- :func:`make_source` (worker): the ``Source`` that ``RunSpec.data`` describes.

Inputs, as ``RunSpec.data`` describes them (one module each):

- ``ArraysData``: NumPy arrays in ``data/`` (memory-mapped), :mod:`.arrays`. Exact.
- ``ObjectData(kind="image_folder", key="data/image_folder.json")``: a ``FolderIndex`` (the listed
  files, labels and the train/validation split), :mod:`.folder`. Exact, with or without the cache.
- ``ObjectData(kind="factory", key="data")``: ``objects["data"]``, a ``make_dataset(plan)``,
  :mod:`.factory`. Exact only when the factory's order per epoch is deterministic (see
  ``resilient.data.DatasetFactory``).
- ``ObjectData(kind="pydataset", key="data")``: ``objects["data"]``, a ``keras.utils.PyDataset``,
  :mod:`.pydataset`. Exact when ``__getitem__`` is deterministic and ``on_epoch_end`` changes state
  deterministically.

Validation data: ``ArraysData.val_x/val_y``; the image folder's own split; or ``val_key``:
``"data/val_x.npy"`` (arrays ``data/val_x.npy`` and ``data/val_y.npy``, with
``data/val_sample_weight.npy`` when they carry sample weights) or ``"val_data"``
(``objects["val_data"]``: a factory, a PyDataset, or a FolderIndex of a whole folder). With
``ArraysData``, ``objects["val_data"]`` holds a non-array validation input.

Both entry points live here, rather than one in each kind's module or one per side, so that adding
an input kind is one new module plus one branch in each function below, and the kind modules never
import each other. Importing this module imports neither TensorFlow nor Keras: the caller imports it.
"""

from __future__ import annotations

import collections.abc
import inspect
import os
from typing import Any

import numpy as np

from .._errors import InvalidArgumentError
from .._plan import Plan
from .._rundir import ArraysData, ObjectData, RunDir, RunSpec
from . import ImageFolder
from .arrays import (
    VAL_ARRAYS,
    ArrayInputs,
    ArraysSource,
    ArrayValidationInput,
    check_arrays,
    prepare_array_validation,
    split_arrays,
    stored_validation,
    to_arrays,
)
from .base import (
    VAL_OBJECT,
    Inputs,
    ObjectValidationInput,
    Source,
    ValidationInput,
    ValidationSource,
    describe_kind,
    is_tf_dataset,
    refuse_tf_dataset,
)
from .checks import ModelFacts
from .factory import FactoryInputs, FactorySource, FactoryValidationSource, check_factory
from .folder import (
    FolderIndex,
    FolderInputs,
    FolderValidationSource,
    ImageFolderSource,
    check_folder,
    prepare_folder_validation,
    read_folder_index,
    with_local_copy,
)
from .pydataset import (
    PyDatasetInputs,
    PyDatasetSource,
    PyDatasetValidationSource,
    as_batch,
    check_pydataset,
    is_pydataset,
)

# ------------------------------------------------------------------------------------ caller


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
        to_arrays(x, y)  # raises: the message for a missing x
    kind = _input_kind(x, "x")
    if kind != "arrays":
        _refuse_for_kind(kind, y=y, sample_weight=sample_weight, validation_split=validation_split,
                         steps_per_epoch=steps_per_epoch)
    if validation_batch_size is not None and is_pydataset(validation_data):
        raise InvalidArgumentError(
            f"Invalid value for argument `validation_batch_size`. Received: validation_batch_size="
            f"{validation_batch_size} with validation_data={type(validation_data).__name__}, a PyDataset, which "
            "makes its own batches. Expected validation_batch_size=None (model.fit ignores it there too)."
        )
    if kind == "arrays":
        x_arr, y_arr, sw = check_arrays(x, y, facts, sample_weight=sample_weight, class_weight=class_weight)
        if validation_split and validation_data is None:
            (x_arr, y_arr, sw), held_out = split_arrays((x_arr, y_arr, sw), validation_split)
            val: ValidationInput = ArrayValidationInput(held_out)
        else:
            val = prepare_validation(validation_data, facts, plan, (x_arr, y_arr))
        return ArrayInputs(x_arr, y_arr, val, sw)
    if kind == "image_folder":
        listing = check_folder(x, facts, validation_data)
        return FolderInputs(x, listing, prepare_validation(validation_data, facts, plan, None))
    if kind == "pydataset":
        batches = check_pydataset(x, facts, "x")
        if class_weight is not None:
            _refuse_weighted(as_batch(x[0]), f"{type(x).__name__}[0] returns")
        return PyDatasetInputs(x, batches, prepare_validation(validation_data, facts, plan, None))
    element_spec = check_factory(x, facts, plan, "x")
    if class_weight is not None:
        _refuse_weighted(element_spec, f"{getattr(x, '__name__', 'make_dataset')}(plan) yields")
    return FactoryInputs(x, prepare_validation(validation_data, facts, plan, None))


def prepare_validation(validation_data: Any, facts: ModelFacts, plan: Plan,
                       train_arrays: tuple[np.ndarray, np.ndarray] | None) -> ValidationInput:
    """``validation_data`` of any kind, checked against the model (and the training arrays, if any)."""
    if validation_data is None:
        return ValidationInput()
    arg = "validation_data"
    if isinstance(validation_data, (tuple, list)):
        return prepare_array_validation(validation_data, facts, train_arrays)
    kind = _input_kind(validation_data, arg)
    if kind == "image_folder":
        return prepare_folder_validation(validation_data, facts)
    if kind == "pydataset":
        check_pydataset(validation_data, facts, arg)
        return ObjectValidationInput(validation_data)
    if kind == "factory":
        check_factory(validation_data, facts, plan, arg, validation=True)
        return ObjectValidationInput(validation_data)
    raise InvalidArgumentError(
        f"Invalid value for argument `validation_data`. Received: {type(validation_data).__name__}. Expected "
        "(x_val, y_val) of NumPy arrays, a resilient.data spec, a keras.utils.PyDataset or a function make_dataset(plan)."
    )


def _input_kind(obj: Any, arg: str) -> str:
    """``"arrays" | "image_folder" | "factory" | "pydataset"``; a clear error for what cannot be carried."""
    if is_tf_dataset(obj):
        refuse_tf_dataset(arg)
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


def _refuse_for_kind(kind: str, *, y: Any, sample_weight: Any, validation_split: float,
                     steps_per_epoch: int | None) -> None:
    """model.fit's array-only arguments, refused for the other inputs with what to do instead."""
    what = describe_kind(kind)
    if y is not None:
        raise InvalidArgumentError(
            f"Invalid value for argument `y`. Received: y={type(y).__name__} with x={what}, which "
            "provides its own labels. Expected y=None."
        )
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


def _refuse_weighted(element: Any, source: str) -> None:
    """class_weight with batches that carry their own sample weights: model.fit refuses the pair."""
    if isinstance(element, tuple) and len(element) == 3:
        raise InvalidArgumentError(
            f"Invalid value for argument `class_weight`. Received class_weight while {source} (x, y, "
            "sample_weight) batches; model.fit refuses the pair (\"You cannot `class_weight` and `sample_weight` at "
            "the same time\"). Expected one of them: fold the class weights into the batches' sample weights, or "
            "yield (x, y)."
        )


# ------------------------------------------------------------------------------------ worker


def make_source(spec: RunSpec, run: RunDir, objects: dict[str, Any]) -> Source:
    """The input source the run directory describes; ``source.folder_reads``: where its image folders are read
    from (a complete local copy, or the original; ``folder_read`` in the journal)."""
    data = spec.data
    reads: list[dict[str, Any]] = []
    if isinstance(data, ArraysData):
        carried = objects and VAL_OBJECT in objects and not data.val_x
        source: Source = ArraysSource(spec, data, run,
                                      validation_source(objects[VAL_OBJECT], run, reads) if carried else None)
    else:
        val = _object_validation(run, data, objects, reads)
        if data.kind == "image_folder":
            index, note = with_local_copy(read_folder_index(run, data.key), run, "x")
            reads.extend([note] if note else [])
            source = ImageFolderSource(spec, index, val)
        elif data.kind == "factory":
            source = FactorySource(spec, objects[data.key], val)
        elif data.kind == "pydataset":
            source = PyDatasetSource(spec, objects[data.key], val)
        else:
            raise NotImplementedError(f"input kind {data.kind!r} is not supported by this worker")
    source.folder_reads = tuple(reads)
    return source


def validation_source(obj: Any, run: RunDir | None = None, reads: list[dict[str, Any]] | None = None) -> ValidationSource:
    """A validation input carried by value in objects.pkl: a whole folder's index, a PyDataset, a factory.
    A folder is read from its local copy when ``run`` has a complete one (noted in ``reads``)."""
    if isinstance(obj, FolderIndex):
        if run is not None:
            obj, note = with_local_copy(obj, run, "validation_data")
            if note is not None and reads is not None:
                reads.append(note)
        return FolderValidationSource(obj, "validation")
    if is_pydataset(obj):
        return PyDatasetValidationSource(obj)
    if callable(obj):
        return FactoryValidationSource(obj)
    raise TypeError(f"unsupported validation input {type(obj).__name__}")


def _object_validation(run: RunDir, data: ObjectData, objects: dict[str, Any],
                       reads: list[dict[str, Any]]) -> ValidationSource | None:
    if data.val_key is None:
        return None
    if data.val_key == VAL_ARRAYS:
        return stored_validation(run)
    return validation_source(objects[data.val_key], run, reads)
