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

from ._errors import InvalidArgumentError, InvalidPolicyError, RunDirError
from ._faults import parse_faults
from ._history import History
from ._plan import Plan
from ._rundir import ArraysData, Journal, RunDir, RunSpec
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
    validation_data: tuple[Any, Any] | None = None,
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
        x, y: NumPy arrays, as for ``model.fit``.
        batch_size, epochs, verbose, callbacks, validation_data, shuffle: as for ``model.fit``.
        seed: makes shuffling and initialisation reproducible; chosen and recorded when None, so a
            resumed run continues the same sample order either way.
        run_dir: where checkpoints, the plan and the journal live. If it holds a run, fit resumes it.
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
        A History with ``history``, ``epoch``, ``incidents``, ``plan`` and ``run_dir``.

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
    try:
        loaded_policy = load_policy(policy)
    except InvalidPolicyError:
        raise
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
    x_arr, y_arr = _arrays(x, y)
    val = _validation(validation_data, x_arr, y_arr)
    if not is_builder:
        _check_shapes(model, x_arr)
    objects, has_callbacks = _carry_objects(model if is_builder else None, callbacks)
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
    _check_int("seed", seed, minimum=0)

    fingerprint, model_name = _fingerprint(model, is_builder)
    run = RunDir(run_dir if run_dir is not None else _default_run_dir(model_name))
    initial_plan = Plan(batch_size=batch_size)
    image_axes = (0, 1) if x_arr.ndim == 4 else None
    versions = _versions()

    resuming = run.exists()
    if resuming:
        old = _read_spec_or_refuse(run)
        if old.model_fingerprint != fingerprint:
            raise RunDirError(
                f"The run directory {run.path} belongs to another model (fingerprint {old.model_fingerprint[:12]}, "
                f"this model {fingerprint[:12]}). Pass a new run_dir, or the same model architecture to resume."
            )
        _check_stored_arrays(run, x_arr, y_arr)
        seed = old.seed

    from ._gpu import warn_if_caller_holds_gpu

    warn_if_caller_holds_gpu()
    lock = _lock(run)
    try:
        # ---- write the run directory (first the data, then the spec that points at it)
        data_dir = run.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        _store_array(data_dir / "x.npy", x_arr)
        _store_array(data_dir / "y.npy", y_arr)
        if val is not None:
            _store_array(data_dir / "val_x.npy", val[0])
            _store_array(data_dir / "val_y.npy", val[1])
        data = ArraysData(
            x="data/x.npy", y="data/y.npy", samples=int(x_arr.shape[0]),
            val_x="data/val_x.npy" if val is not None else None, val_y="data/val_y.npy" if val is not None else None,
            image_axes=image_axes,
        )
        spec = RunSpec(
            epochs=epochs, seed=seed, shuffle=bool(shuffle), verbose=verbose_level, data=data,
            model_fingerprint=fingerprint, model_name=model_name, model_builder=is_builder,
            checkpoint_every_steps=every_steps, checkpoint_every_seconds=every_seconds, faults=fault_specs,
            gpu_memory_limit_bytes=gpu_limit, host_memory_limit_bytes=host_limit, initial_plan=initial_plan,
            has_callbacks=has_callbacks, versions=versions,
        )
        if not is_builder and not (resuming and run.model_file.exists()):
            tmp = run.path / ".model.tmp.keras"
            model.save(tmp)
            os.replace(tmp, run.model_file)
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
            requested_plan=initial_plan, resizable_input=_resizable(model, x_arr, is_builder),
            source_image_size=(int(x_arr.shape[1]), int(x_arr.shape[2])) if image_axes else None,
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

    if not is_builder:
        load_into(model, run)
    loader = None if not is_builder else (lambda: _load_trained(run, model))
    return History(result.history, result.epochs_done, result.incidents, result.plan, run.path,
                   model=None if is_builder else model, loader=loader)


# ---------------------------------------------------------------------------- after training


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


def _arrays(x: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    if x is None:
        raise InvalidArgumentError("Missing argument `x`. Expected NumPy arrays x and y, as for model.fit.")
    if _is_tf_dataset(x):
        raise InvalidArgumentError(
            "Received a tf.data.Dataset for `x`. A dataset object cannot be carried to the worker process "
            "faithfully. Wrap its construction in a function of the plan instead:\n"
            "    def make_dataset(plan):\n"
            "        return build_my_dataset().batch(plan.batch_size)\n"
            "    resilient.fit(model, make_dataset, ...)"
        )
    if callable(x):
        raise InvalidArgumentError(
            "Dataset factories (a callable x) are not supported by this version; pass NumPy arrays x and y."
        )
    try:
        x_arr = np.asarray(x)
    except Exception as e:
        raise InvalidArgumentError(f"Invalid value for argument `x`: cannot convert {type(x).__name__} to an array ({e}).") from None
    if y is None:
        raise InvalidArgumentError("Missing argument `y`. Expected labels for x, as for model.fit.")
    y_arr = np.asarray(y)
    if x_arr.ndim == 0 or x_arr.dtype == object:
        raise InvalidArgumentError(f"Invalid value for argument `x`. Received an array of shape {x_arr.shape} and dtype {x_arr.dtype}. Expected a numeric array with samples on the first axis.")
    if y_arr.dtype == object:
        raise InvalidArgumentError(f"Invalid value for argument `y`. Received dtype {y_arr.dtype}. Expected a numeric array.")
    if len(x_arr) != len(y_arr):
        raise InvalidArgumentError(
            f"x and y have different numbers of samples. Received: x.shape={x_arr.shape}, y.shape={y_arr.shape}. "
            "Expected the same length on the first axis."
        )
    if len(x_arr) == 0:
        raise InvalidArgumentError("Received empty arrays for x and y. Expected at least one sample.")
    return x_arr, y_arr


def _is_tf_dataset(obj: Any) -> bool:
    if "tensorflow" not in sys.modules:
        return False
    import tensorflow as tf

    return isinstance(obj, tf.data.Dataset)


def _validation(validation_data: Any, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    if validation_data is None:
        return None
    if not isinstance(validation_data, (tuple, list)) or len(validation_data) != 2:
        raise InvalidArgumentError(
            f"Invalid value for argument `validation_data`. Received: {type(validation_data).__name__}. "
            "Expected a tuple (x_val, y_val) of NumPy arrays."
        )
    vx, vy = np.asarray(validation_data[0]), np.asarray(validation_data[1])
    if len(vx) != len(vy) or len(vx) == 0:
        raise InvalidArgumentError(
            f"validation_data has mismatched or empty arrays: x_val.shape={vx.shape}, y_val.shape={vy.shape}."
        )
    if vx.shape[1:] != x.shape[1:] or vy.shape[1:] != y.shape[1:]:
        raise InvalidArgumentError(
            f"validation_data does not match the training data. Received: x_val.shape={vx.shape}, "
            f"y_val.shape={vy.shape}; training x.shape={x.shape}, y.shape={y.shape}. Expected the same sample shapes."
        )
    return vx, vy


def _check_shapes(model: Any, x: np.ndarray) -> None:
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        return  # a subclassed model not yet built: its first step will tell
    if not inputs or len(inputs) != 1:
        return
    expected = tuple(inputs[0].shape[1:])
    got = tuple(x.shape[1:])
    if len(expected) != len(got) or any(e is not None and e != g for e, g in zip(expected, got)):
        raise InvalidArgumentError(
            f"x does not fit the model's input. Received: x.shape={x.shape}. Expected samples of shape "
            f"{expected} (model.inputs[0].shape={tuple(inputs[0].shape)})."
        )


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

    tmp = run.path / ".objects.tmp"
    with open(tmp, "wb") as f:
        cloudpickle.dump(objects, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, run.objects_file)


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


def _check_stored_arrays(run: RunDir, x: np.ndarray, y: np.ndarray) -> None:
    for name, arr in (("x", x), ("y", y)):
        path = run.data_dir / f"{name}.npy"
        if not path.exists():
            continue
        stored = np.load(path, mmap_mode="r")
        if stored.shape != arr.shape or stored.dtype != arr.dtype:
            raise RunDirError(
                f"The run directory {run.path} was trained on {name} of shape {stored.shape} and dtype {stored.dtype}; "
                f"this call passes shape {arr.shape} and dtype {arr.dtype}. Pass the same data to resume, or a new run_dir."
            )


def _store_array(path: Path, arr: np.ndarray) -> None:
    if path.exists():
        stored = np.load(path, mmap_mode="r")
        if stored.shape == arr.shape and stored.dtype == arr.dtype:
            return  # stored once; a resume reuses it
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(arr))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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


def _resizable(model: Any, x: np.ndarray, is_builder: bool) -> bool:
    if x.ndim != 4 or is_builder:
        return False
    try:
        shape = tuple(model.inputs[0].shape)
    except (AttributeError, ValueError, IndexError):
        return False
    return shape[1] is None and shape[2] is None


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


