"""What travels to the worker process, and the proof, before any worker starts, that it arrives intact.

The worker gets a compiled model as a ``.keras`` file, loaded back with the model's custom objects,
and everything else (the builder, callbacks, custom objects, dataset factories, PyDatasets) by value
in ``objects.pkl`` (cloudpickle). Either can fail only on the way back: a custom layer without
``**kwargs``, a function Keras cannot find by name. ``prove_carriable`` takes that way back in the
caller (save once, load once, pickle once, unpickle once), so such a run is refused with an
InvalidArgumentError before the run directory is touched, instead of a UserCodeError from the worker.
The saved file is the one placed in the run directory: the model is not saved twice.

Both sides import this module (the caller to prove and carry, the worker for ``custom_objects_of``);
it imports neither and loads Keras only inside functions.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import warnings
import weakref
from pathlib import Path
from typing import Any

from ._errors import InvalidArgumentError

__all__ = ["ProvenModel", "custom_objects_of", "prove_carriable"]


def custom_objects_of(model: Any) -> dict[str, Any]:
    """Classes and functions the saved model refers to that Keras itself does not define.

    They travel to the worker by value when defined in ``__main__`` (a notebook) and by reference
    otherwise; registered ones are also found under their registered name.
    """
    import keras

    found: dict[str, Any] = {}

    def add(obj: Any) -> None:
        cls = obj if isinstance(obj, type) or (callable(obj) and not hasattr(obj, "get_config")) else type(obj)
        module = getattr(cls, "__module__", "") or ""
        if module.startswith(("keras", "tensorflow", "builtins")):
            return
        found[getattr(cls, "__name__", repr(cls))] = cls
        try:
            found[keras.saving.get_registered_name(cls)] = cls
        except Exception:
            pass

    for layer in model._flatten_layers(include_self=True):
        add(layer)
    for item in _flatten(getattr(model, "loss", None)):
        if item is not None and not isinstance(item, str):
            add(item)
    compiled = getattr(model, "compiled_metrics", None) or getattr(model, "_compile_metrics", None)
    for item in _flatten(getattr(compiled, "_user_metrics", None)) + _flatten(getattr(compiled, "_user_weighted_metrics", None)):
        if item is not None and not isinstance(item, str):
            add(item)
    opt = getattr(model, "optimizer", None)
    if opt is not None:
        add(opt)
        schedule = getattr(opt, "_learning_rate", None)
        if schedule is not None and not hasattr(schedule, "assign"):
            add(schedule)
    return found


def _flatten(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, dict):
        return [v for item in value.values() for v in _flatten(item)]
    if isinstance(value, (list, tuple)):
        return [v for item in value for v in _flatten(item)]
    return [value]


# ---------------------------------------------------------------------------- the proof


class ProvenModel:
    """A model file that was saved and loaded back, waiting in a private temporary folder to be placed."""

    def __init__(self, file: Path | None) -> None:
        self.file = file
        if file is not None:  # the folder goes when this object does, whether or not the file was placed
            self._cleanup = weakref.finalize(self, shutil.rmtree, str(file.parent), ignore_errors=True)

    def write_model(self, dest: Path) -> None:
        """Put the proven file at ``dest`` (a move; a copy across file systems, e.g. to Google Drive)."""
        if self.file is None:
            raise RuntimeError("No model was proven: a builder is carried in objects.pkl, not as a model file.")
        shutil.move(str(self.file), str(dest))


def prove_carriable(model: Any, objects: dict[str, Any]) -> ProvenModel:
    """Refuse, before anything is written, what the worker could not get back.

    ``objects`` (what goes into objects.pkl) must pickle and unpickle; ``model`` (None for a builder)
    must save to a ``.keras`` file that loads back as the worker loads it, with the custom objects that
    came back from the pickle. The load goes through ``from_config(get_config())`` of the model and of
    every layer, the same path the worker's rebuild takes to change precision, gradient accumulation or
    the input size, so that path is proven too.
    """
    carried = _round_trip(objects)
    if model is None:
        return ProvenModel(None)
    folder = Path(tempfile.mkdtemp(prefix="resilient-carry-"))
    proven = ProvenModel(folder / "model.keras")
    _save_and_load(model, proven.file, carried.get("custom_objects", {}))
    return proven


def _round_trip(objects: dict[str, Any]) -> dict[str, Any]:
    import cloudpickle

    try:
        return cloudpickle.loads(cloudpickle.dumps(objects))
    except Exception:
        pass
    # Something failed: find which object, one at a time, to name it.
    for label, obj in _labelled(objects):
        try:
            cloudpickle.loads(cloudpickle.dumps(obj))
        except Exception as e:
            raise InvalidArgumentError(
                f"{label} cannot be carried to the worker process: pickling it and loading it back failed with "
                f"{_short(e)}. Expected an object that cloudpickle can carry and load back. {_fix(e, label)}"
            ) from None
    return cloudpickle.loads(cloudpickle.dumps(objects))  # the parts pass alone: let a whole-dict failure show


def _labelled(objects: dict[str, Any]) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for key, value in objects.items():
        if key == "builder":
            out.append((f"The model builder {_name(value)}", value))
        elif key == "callbacks":
            out.extend((f"Callback callbacks[{i}] ({type(cb).__name__})", cb) for i, cb in enumerate(value))
        elif key == "custom_objects":
            out.extend((f"The model's custom object {name!r} ({_name(obj)})", obj) for name, obj in value.items())
        elif key == "data":
            out.append((f"The training data `x` ({_name(value)})", value))
        elif key == "val_data":
            out.append((f"The validation data `validation_data` ({_name(value)})", value))
        else:
            out.append((f"The carried object {key!r} ({_name(value)})", value))
    return out


def _culprit_or_model(model: Any, custom: dict[str, Any]) -> str:
    return _culprit(model, custom) or f"The model {model.name!r} ({type(model).__name__})"


def _save_and_load(model: Any, file: Path, custom: dict[str, Any]) -> None:
    import keras

    try:
        model.save(file)
    except Exception as e:
        culprit = _culprit_or_model(model, custom)
        raise InvalidArgumentError(
            f"{culprit} cannot be saved to a .keras file for the worker process: {_short(e)}. "
            f"Expected layers with a get_config() that returns their constructor arguments. {_fix(e, culprit)}"
        ) from None
    try:
        with warnings.catch_warnings(), keras.saving.custom_object_scope(custom):
            # An optimizer not built yet has no variables to load: Keras warns, the worker's own load says why.
            warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
            loaded = keras.saving.load_model(file, compile=True, safe_mode=False)  # as the worker loads it
    except Exception as e:
        culprit = _culprit_or_model(model, custom)
        raise InvalidArgumentError(
            f"{culprit} does not load back from its saved config, as the worker process must load it: "
            f"{_short(e)}. Expected classes that from_config(get_config()) re-creates. {_fix(e, culprit)}"
        ) from None
    del loaded


def _culprit(model: Any, custom: dict[str, Any]) -> str | None:
    """The first custom layer (or loss, metric, optimizer) that does not come back from its config."""
    import keras

    candidates = [*model._flatten_layers(include_self=False), model]
    for obj in candidates:
        module = type(obj).__module__ or ""
        if module.startswith("keras") and obj is not model:
            continue
        try:
            with keras.saving.custom_object_scope(custom):
                config = keras.saving.serialize_keras_object(obj)
                keras.saving.deserialize_keras_object(config, safe_mode=False)
        except Exception:
            kind = "model" if obj is model else "layer"
            return f"The {kind} {getattr(obj, 'name', '?')!r} (class {type(obj).__name__})"
    return None


def _fix(error: Exception, label: str) -> str:
    text = str(error)
    of_model = label.startswith(("The layer", "The model"))
    builder = "or pass a builder (a zero-argument function that builds and compiles the model) instead of the model."
    missing = re.search(r"Could not locate (class|function) '([^']+)'", text)
    if missing and of_model:
        kind, name = missing.groups()
        return (
            f"Keras finds the {kind} {name!r} by name when it loads the model: register it with "
            f"`@keras.saving.register_keras_serializable()`, {builder}"
        )
    if missing:
        kind, name = missing.groups()
        # Registering the function would not do: the worker loads this object before it imports anything of
        # the caller's, so the registry there is empty when Keras looks the name up.
        return (
            f"A Keras layer inside it travels as its config, which names the {kind} {name!r}, and Keras cannot find "
            "it by that name when it loads the layer back. Create the layer inside the function from plain values "
            "(for an adapted TextVectorization: `vocabulary=layer.get_vocabulary()` and the same `standardize`), "
            "or define the function in a module (a .py file): the worker then imports it instead of carrying it."
        )
    if "unexpected keyword argument" in text or "get_config" in text or "from_config" in text:
        return (
            "Add `**kwargs` to the layer's __init__ and pass them to super().__init__(**kwargs), and give it a "
            f"get_config() that returns its constructor arguments (merged with super().get_config()); {builder}"
        )
    if of_model or label.startswith("The model builder"):
        return "Define it at module level or in the notebook, and keep open files, locks or clients out of it; " + builder
    return "Define it at module level or in the notebook, and keep open files, locks or clients out of its attributes."


def _name(obj: Any) -> str:
    name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None)
    return f"`{name}`" if name else type(obj).__name__


def _short(error: Exception) -> str:
    """The root of a Keras deserialization error (its last 'Exception encountered'), on one line."""
    text = str(error)
    parts = text.split("Exception encountered:")
    root = parts[-1].strip() if len(parts) > 1 else text.strip()
    root = root.split("Full object config:")[0].strip()
    root = " ".join(root.split()).rstrip(".")
    if len(root) > 300:
        root = root[:300] + "..."
    return f"{type(error).__name__}: {root}"
