"""``resilient.fit``: the drop-in for ``model.fit`` that survives the worker's death."""

from __future__ import annotations

import datetime as _dt
import fcntl
import hashlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ._errors import InvalidArgumentError, RunDirError
from ._faults import parse_faults
from ._history import History
from ._inputs import ModelFacts, prepare_inputs
from ._plan import Plan
from ._rundir import Journal, RunDir, RunSpec, atomic_file, atomic_path
from ._units import parse_duration, parse_size

DEFAULT_RUNS_DIR = "resilient_runs"


def fit(
    model: Any,
    x: Any = None,
    y: Any = None,
    *,
    batch_size: int = 32,
    epochs: int = 1,
    verbose: Literal["auto", 0, 1, 2] | int | str = "auto",
    callbacks: Sequence[Any] | None = None,
    validation_data: Any = None,
    shuffle: bool = True,
    seed: int | None = None,
    run_dir: str | os.PathLike[str] | None = None,
    policy: Any = "default",
    max_restarts: int | None = None,
    checkpoint_every: Literal["auto"] | int | str = "auto",
    hang_timeout: Literal["auto"] | float | str = "auto",
    host_memory_limit: str | int | None = None,
    gpu_memory_limit: str | int | None = None,
    faults: str | Sequence[str] | None = None,
) -> History:
    """Train ``model`` like ``model.fit``, in a supervised worker process that is restarted on failure.

    Args:
        model: a compiled ``keras.Model``, or a zero-argument callable returning one.
        x, y: NumPy arrays, as for ``model.fit`` (stored once in the run directory; a ``np.memmap`` is
            copied in chunks, never loaded whole). Or, with ``y=None``: an image folder
            (``resilient.data.image_folder(path, image_size=...)``), a function ``make_dataset(plan)``
            returning a batched ``tf.data.Dataset`` (see ``resilient.data.DatasetFactory``), or a
            ``keras.utils.PyDataset`` instance. A ``tf.data.Dataset`` object itself is refused: wrap
            its construction in a factory. See ``resilient.data`` for how exactly each resumes.
        validation_data: ``(x_val, y_val)`` arrays, an image folder (used whole), a factory or a
            PyDataset. An image folder passed as ``x`` holds out its own (``validation_split``).
        batch_size, epochs, verbose, callbacks, shuffle: as for ``model.fit``. ``shuffle`` orders the
            samples (the batches, for a PyDataset) by ``(seed, epoch)``; a factory orders its own.
        seed: makes shuffling and initialisation reproducible; chosen and recorded when None, so a
            resumed run continues the same sample order either way.
        run_dir: where checkpoints, the plan and the journal live. If it holds a run, fit resumes it; a
            finished one returns its result at once (a larger ``epochs`` trains on).
            Default: ``./resilient_runs/<time>-<model name>``.
        policy: a preset name (``"default"``, ``"colab-free"``, ``"conservative"``), a TOML file, or a
            ``resilient.Policy``.
        max_restarts: restarts allowed in this call; None takes the policy's value.
        checkpoint_every: ``"auto"`` (under 2% of training time, at most 5 minutes apart), a number of
            steps, or a duration such as ``"5min"``. Checkpoints are also written at every epoch end
            and on SIGTERM.
        hang_timeout: ``"auto"`` (calibrated from observed step times) or seconds / a duration.
        host_memory_limit: a RAM budget for the worker such as ``"12.7GB"``, enforced by a memory
            cgroup where the machine allows it, by a watchdog otherwise.
        gpu_memory_limit: caps TensorFlow's GPU memory in the worker (e.g. ``"15GB"`` to emulate a T4).
        faults: fault rehearsal, e.g. ``"gpu_oom@40,segfault@90"``; each fires once per run.

    Returns:
        A History with ``history``, ``epoch``, ``params``, ``model``, ``incidents``, ``plan`` and ``run_dir``.

    Raises:
        InvalidArgumentError: an argument is wrong; nothing was started or written.
        UserCodeError: the training code raised an ordinary exception (not retried).
        TrainingFailedError: restarts ran out; the message is a root-cause report.

    Example:
        >>> history = resilient.fit(model, x, y, epochs=10, batch_size=64,
        ...                         run_dir="/content/drive/MyDrive/runs/cifar", policy="colab-free")
    """
    from ._policy import load_policy
    from ._supervisor import Supervisor, SupervisorConfig

    # ---- validate everything before touching the disk
    is_builder = callable(model) and not _is_keras_model(model)
    if not is_builder and not _is_keras_model(model):
        raise InvalidArgumentError(
            f"Invalid value for argument `model`. Received: model={type(model).__name__}. "
            "Expected a compiled keras.Model or a zero-argument callable that returns one."
        )
    if not is_builder and not getattr(model, "compiled", False):
        raise InvalidArgumentError(
            "The model is not compiled. Call model.compile(optimizer=..., loss=...) before resilient.fit, "
            "exactly as before model.fit."
        )
    _check_int("batch_size", batch_size, minimum=1)
    _check_int("epochs", epochs, minimum=0)
    verbose_level = _verbose(verbose)
    loaded_policy = load_policy(policy)  # InvalidPolicyError before anything is written
    if max_restarts is not None:
        _check_int("max_restarts", max_restarts, minimum=0)
    restarts = loaded_policy.max_restarts if max_restarts is None else max_restarts
    every_steps, every_seconds = _checkpoint_every(checkpoint_every)
    hang = _hang_timeout(hang_timeout)
    host_limit = _size("host_memory_limit", host_memory_limit)
    gpu_limit = _size("gpu_memory_limit", gpu_memory_limit)
    try:
        fault_specs = parse_faults(faults)
    except ValueError as e:
        raise InvalidArgumentError(str(e)) from None
    initial_plan = Plan(batch_size=batch_size)
    facts = ModelFacts(None if is_builder else model)
    inputs = prepare_inputs(x, y, validation_data, model=None if is_builder else model, plan=initial_plan)
    objects, has_callbacks = _carry_objects(model if is_builder else None, callbacks)
    if not is_builder:
        objects["custom_objects"] = custom_objects_of(model)
        try:
            import cloudpickle

            cloudpickle.dumps(objects["custom_objects"])
        except Exception as e:
            raise InvalidArgumentError(
                f"The model uses custom objects that cannot be carried to the worker process: {e}. Expected "
                "classes and functions that can be pickled (defined at module level or in the notebook), or a "
                "zero-argument function that builds and compiles the model."
            ) from None
    objects.update(inputs.objects)
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
    _check_int("seed", seed, minimum=0)

    fingerprint, model_name = _fingerprint(model, is_builder)
    # A fixed-size image model that rebuilds with a flexible input lets lower_resolution apply.
    flexible = bool(inputs.source_image_size is not None and not is_builder
                    and not inputs.resizable_input(facts) and _can_flex(model))
    run = RunDir(run_dir if run_dir is not None else _default_run_dir(model_name))
    versions = _versions()

    resuming = run.exists()
    if resuming:
        old = _read_spec_or_refuse(run)
        if old.model_fingerprint != fingerprint:
            raise RunDirError(
                f"The run directory {run.path} belongs to another model (fingerprint {old.model_fingerprint[:12]}, "
                f"this model {fingerprint[:12]}). Pass a new run_dir, or the same model architecture to resume."
            )
        inputs.check_resume(run, old)
        seed = old.seed

    from ._gpu import warn_if_caller_holds_gpu

    warn_if_caller_holds_gpu()
    lock = _lock(run)
    params = {"verbose": verbose, "epochs": epochs}  # History.params, as model.fit's (steps from the worker)
    try:
        finished = _finished_result(run, epochs) if resuming else None
        if finished is not None:
            if verbose_level:
                print(f"resilient: the run in {run.path} is already complete ({_trained_text(finished)}); returning "
                      "its result. Pass a larger epochs= to train on, or a new run_dir to start over.", flush=True)
            return _trained_history(run, model, is_builder, callbacks, finished, [], run.read_plan(), params)
        # ---- write the run directory (first the data, then the spec that points at it)
        data = inputs.write(run, seed)
        spec = RunSpec(
            epochs=epochs, seed=seed, shuffle=bool(shuffle), verbose=verbose_level, data=data,
            model_fingerprint=fingerprint, model_name=model_name, model_builder=is_builder,
            checkpoint_every_steps=every_steps, checkpoint_every_seconds=every_seconds, faults=fault_specs,
            gpu_memory_limit_bytes=gpu_limit, host_memory_limit_bytes=host_limit, initial_plan=initial_plan,
            has_callbacks=has_callbacks, versions=versions, flexible_input=flexible,
        )
        if not is_builder and not (resuming and run.model_file.exists()):
            with atomic_path(run.model_file) as tmp:
                model.save(tmp)  # Keras wants a path ending in .keras: atomic_path keeps the suffix
        _write_objects(run, objects)
        run.write_spec(spec)
        if not resuming or not run.plan_json.exists():
            run.write_plan(initial_plan)
        journal = Journal(run.events)
        journal.write("run_started", run_dir=str(run.path), resumed=resuming, epochs=epochs, seed=seed,
                      faults=[f.key for f in fault_specs], host_memory_limit=host_limit, pid=os.getpid())
        if verbose_level:
            verb = "resuming" if resuming else "starting"
            print(f"resilient: {verb} run in {run.path}", flush=True)

        from ._policy import StepContext

        context = StepContext(
            requested_plan=initial_plan, resizable_input=inputs.resizable_input(facts) or flexible,
            source_image_size=inputs.source_image_size, batch_size_fixed=inputs.kind == "pydataset",
            cacheable=inputs.kind != "arrays", buffered=inputs.kind != "arrays",
            **_device_context(),
        )
        supervisor = Supervisor(SupervisorConfig(
            run=run, policy=loaded_policy, context=context, max_restarts=restarts, hang_timeout=hang,
            host_memory_limit=host_limit, rehearse_host_oom=any(f.kind == "host_oom" for f in fault_specs),
            echo=verbose_level != 0,
        ))
        result = supervisor.run()
    finally:
        _unlock(lock)

    done = {**_read_result(run), "history": result.history, "epochs_done": result.epochs_done}
    return _trained_history(run, model, is_builder, callbacks, done, result.incidents, result.plan, params)


# ---------------------------------------------------------------------------- after training


def _read_result(run: RunDir) -> dict[str, Any]:
    """The worker's result.json ({} when absent or unreadable); fields added later may be missing."""
    try:
        result = json.loads(run.result_json.read_text())
    except (OSError, ValueError):
        return {}
    return result if isinstance(result, dict) else {}


def _finished_result(run: RunDir, epochs: int) -> dict[str, Any] | None:
    """The result of a completed run that has nothing left to train for ``epochs``; None otherwise.

    A run stopped by a callback (EarlyStopping) is complete whatever ``epochs``; any other trains on
    up to a larger ``epochs``, as ``model.fit(initial_epoch=...)`` would.
    """
    result = _read_result(run)
    if "history" not in result or "epochs_done" not in result:
        return None
    if result.get("stopped_early") or epochs <= _epochs_trained(result):
        return result
    return None


def _epochs_trained(result: dict[str, Any]) -> int:
    done = result.get("epochs_done") or []
    return int(done[-1]) + 1 if done else 0


def _trained_text(result: dict[str, Any]) -> str:
    n = _epochs_trained(result)
    text = f"{n} epoch{'s' if n != 1 else ''} trained"
    return text + ", stopped early by a callback" if result.get("stopped_early") else text


def _trained_history(run: RunDir, model: Any, is_builder: bool, callbacks: Sequence[Any] | None,
                     result: dict[str, Any], incidents: list[Any], plan: Plan, params: dict[str, Any]) -> History:
    """What fit returns for a completed run: the caller's model and callbacks left as after model.fit."""
    params = {**params, "steps": result.get("steps")}
    if not is_builder:
        load_into(model, run)
    loader = None if not is_builder else (lambda: _load_trained(run, model))
    history = History(result["history"], result["epochs_done"], incidents, plan, run.path,
                      model=None if is_builder else model, loader=loader)
    history.params = params
    load_callbacks_into(callbacks, run, model=None if is_builder else model, params=params)
    return history


def load_into(model: Any, run: RunDir) -> None:
    """Load the newest verified checkpoint's weights and optimizer state into ``model``."""
    from ._checkpoint import CheckpointStore
    from ._worker import restore_optimizer_state

    ckpt = CheckpointStore(run.checkpoints).latest()
    if ckpt is None:
        return
    with np.load(ckpt.file("weights.npz")) as z:
        weights = [z[f"arr_{i}"] for i in range(len(z.files))]
    for var, value in zip(model.weights, weights):
        var.assign(value)
    with np.load(ckpt.file("optimizer.npz")) as z:
        restore_optimizer_state(model, {k: z[k] for k in z.files})


def load_callbacks_into(callbacks: Sequence[Any] | None, run: RunDir, model: Any = None,
                        params: dict[str, Any] | None = None) -> None:
    """Give the caller's callback objects the state they ended the training with (the newest checkpoint's).

    As after ``model.fit``: their attributes as the worker's callbacks left them, ``model`` (when given)
    and ``params``. Lists, dicts and sets already on a callback are filled in place, so a list the caller
    handed to a callback holds the values too.
    """
    cbs = list(callbacks or [])
    if not cbs:
        return
    from ._checkpoint import CheckpointStore

    states: list[dict[str, Any]] = []
    ckpt = CheckpointStore(run.checkpoints).latest()
    if ckpt is not None and ckpt.file("callbacks.pkl").exists():
        try:
            import cloudpickle

            with open(ckpt.file("callbacks.pkl"), "rb") as f:
                states = list(cloudpickle.load(f))
        except Exception as e:
            import warnings

            warnings.warn(f"resilient: the callbacks' state in {ckpt.path} could not be read back ({e!r}); the "
                          "callback objects keep the state they had before fit.", stacklevel=3)
    for cb, state in zip(cbs, states):
        _update_state(cb, state)
    for cb in cbs:
        if params is not None:
            cb.set_params(params)
        if model is not None:
            cb.set_model(model)


def _update_state(obj: Any, state: dict[str, Any]) -> None:
    for key, value in state.items():
        old = obj.__dict__.get(key)
        if type(old) is type(value) and isinstance(old, list):
            old[:] = value
        elif type(old) is type(value) and isinstance(old, (dict, set)):
            old.clear()
            old.update(value)
        else:
            obj.__dict__[key] = value


def _load_trained(run: RunDir, builder: Callable[[], Any]) -> Any:
    model = builder()
    load_into(model, run)
    return model


# ---------------------------------------------------------------------------- validation helpers


def _is_keras_model(obj: Any) -> bool:
    if "keras" not in sys.modules:
        return False
    import keras

    return isinstance(obj, keras.Model)


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise InvalidArgumentError(
            f"Invalid value for argument `{name}`. Received: {name}={value!r}. Expected an integer >= {minimum}."
        )


def _verbose(verbose: Any) -> int:
    if verbose == "auto":
        return 1
    if verbose in (0, 1, 2) and not isinstance(verbose, bool):
        return int(verbose)
    raise InvalidArgumentError(f"Invalid value for argument `verbose`. Received: verbose={verbose!r}. Expected 'auto', 0, 1 or 2.")


def _checkpoint_every(value: Any) -> tuple[int | None, float | None]:
    if value == "auto":
        return None, None
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        _check_int("checkpoint_every", value, minimum=1)
        return int(value), None
    try:
        return None, parse_duration(value, name="checkpoint_every")
    except ValueError as e:
        raise InvalidArgumentError(f"{e} Or 'auto', or an integer number of steps.") from None


def _hang_timeout(value: Any) -> float | None:
    if value == "auto":
        return None
    try:
        return parse_duration(value, name="hang_timeout")
    except ValueError as e:
        raise InvalidArgumentError(f"{e} Or 'auto'.") from None


def _size(name: str, value: Any) -> int | None:
    if value is None:
        return None
    try:
        return parse_size(value, name=name)
    except ValueError as e:
        raise InvalidArgumentError(str(e)) from None


def _carry_objects(builder: Any, callbacks: Sequence[Any] | None) -> tuple[dict[str, Any], bool]:
    import cloudpickle

    objects: dict[str, Any] = {}
    if builder is not None:
        objects["builder"] = builder
    cbs = list(callbacks or [])
    if cbs:
        import keras

        for i, cb in enumerate(cbs):
            if not isinstance(cb, keras.callbacks.Callback):
                raise InvalidArgumentError(
                    f"Invalid value in argument `callbacks`. Received: callbacks[{i}]={type(cb).__name__}. "
                    "Expected keras.callbacks.Callback instances."
                )
            try:
                cloudpickle.dumps(cb)
            except Exception as e:
                raise InvalidArgumentError(
                    f"Callback callbacks[{i}] ({type(cb).__name__}) cannot be carried to the worker process: {e}. "
                    "Expected a callback whose attributes can be pickled; create open files, locks or clients "
                    "inside its on_train_begin instead of its __init__."
                ) from None
        objects["callbacks"] = cbs
    try:
        cloudpickle.dumps(objects)
    except Exception as e:
        raise InvalidArgumentError(f"The model builder cannot be carried to the worker process: {e}.") from None
    return objects, bool(cbs)


def _write_objects(run: RunDir, objects: dict[str, Any]) -> None:
    import cloudpickle

    with atomic_file(run.objects_file) as f:
        cloudpickle.dump(objects, f)


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


def _can_flex(model: Any) -> bool:
    from ._reshape import can_flex

    return can_flex(model, custom_objects_of(model))


def _fingerprint(model: Any, is_builder: bool) -> tuple[str, str]:
    """A hash of the architecture (layer names left out, so a re-created model matches)."""
    if is_builder:
        name = getattr(model, "__name__", "model")
        code = getattr(model, "__code__", None)
        blob = (code.co_code.hex() + repr(code.co_consts)) if code is not None else name
        return hashlib.sha256(blob.encode()).hexdigest(), name
    config = model.get_config()
    shapes = [list(w.shape) for w in model.weights]
    blob = json.dumps([_strip_names(config), shapes], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest(), getattr(model, "name", "model")


def _strip_names(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _strip_names(v) for k, v in obj.items() if k not in {"name", "inbound_nodes", "input_layers", "output_layers"}}
    if isinstance(obj, list):
        return [_strip_names(v) for v in obj]
    return obj


def _default_run_dir(model_name: str) -> Path:
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return Path.cwd() / DEFAULT_RUNS_DIR / f"{stamp}-{model_name}"


def _read_spec_or_refuse(run: RunDir) -> RunSpec:
    try:
        return run.read_spec()
    except Exception as e:
        raise RunDirError(
            f"{run.run_json} exists but cannot be read as a resilient run ({e}). Pass another run_dir."
        ) from None


def _lock(run: RunDir) -> int:
    run.path.mkdir(parents=True, exist_ok=True)
    fd = os.open(run.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise RunDirError(
            f"Another live process is training in {run.path}. Wait for it to finish, or pass another run_dir."
        ) from None
    return fd


def _unlock(fd: int) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _device_context() -> dict[str, Any]:
    from ._memory import GpuMemory

    out: dict[str, Any] = {"device": "cpu", "cpu_supports_bf16": _cpu_bf16()}
    gpu = GpuMemory()
    if gpu.available:
        out["device"] = "gpu"
        try:
            major, minor = gpu._nvml.nvmlDeviceGetCudaComputeCapability(gpu._handles[0])
            out["gpu_compute_capability"] = (int(major), int(minor))
        except Exception:
            pass
    return out


def _cpu_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for name in ("tensorflow", "keras", "numpy"):
        module = sys.modules.get(name)
        if module is not None:
            out[name] = str(getattr(module, "__version__", "?"))
    from . import __version__

    out["resilient"] = __version__
    return out


