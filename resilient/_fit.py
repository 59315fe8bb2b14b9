"""``resilient.fit``: the drop-in for ``model.fit`` that survives the worker's death."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import fcntl
import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ._carry import ProvenModel, custom_objects_of, prove_carriable
from ._checkpoint import check_resumable
from ._devices import Devices, check_devices, replica_count, visible_gpu_count
from ._errors import InvalidArgumentError, RunDirError
from ._faults import Fault, parse_faults
from ._history import History
from ._plan import Plan
from ._replan import PlanBasis, Rederived, learned_from_journal, policy_fingerprint, rederive_plan
from ._rundir import FILE_MODE, InputFacts, Journal, RunDir, RunSpec, atomic_file, atomic_path, check_run_dir_path
from ._units import parse_duration, parse_size
from .data.checks import ModelFacts
from .data.dispatch import prepare_inputs

if TYPE_CHECKING:  # imported where used: the policy and the supervisor load only when fit runs
    from .data.inputs import Inputs
    from .policy import Policy
    from .supervisor.loop import RunResult
    from .supervisor.standby import WaitingWorker

DEFAULT_RUNS_DIR = "resilient_runs"


def fit(
    model: Any,
    x: Any = None,
    y: Any = None,
    *,
    batch_size: int | None = None,
    epochs: int = 1,
    verbose: Literal["auto", 0, 1, 2] | int | str = "auto",
    callbacks: Sequence[Any] | None = None,
    validation_split: float = 0.0,
    validation_data: Any = None,
    shuffle: bool = True,
    class_weight: dict[int, float] | None = None,
    sample_weight: Any = None,
    initial_epoch: int = 0,
    steps_per_epoch: int | None = None,
    validation_steps: int | None = None,
    validation_batch_size: int | None = None,
    validation_freq: int | Sequence[int] = 1,
    seed: int | None = None,
    run_dir: str | os.PathLike[str] | None = None,
    mirror_dir: str | os.PathLike[str] | None = None,
    policy: Any = "default",
    max_restarts: int | None = None,
    checkpoint_every: Literal["auto"] | int | str = "auto",
    hang_timeout: Literal["auto"] | float | str = "auto",
    host_memory_limit: str | int | None = None,
    gpu_memory_limit: str | int | None = None,
    faults: str | Sequence[str] | None = None,
    trust_run_dir: bool = False,
    devices: str | Sequence[str] = "auto",
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
        validation_data: ``(x_val, y_val)`` or ``(x_val, y_val, val_sample_weight)`` arrays, an image
            folder (used whole), a factory or a PyDataset. An image folder passed as ``x`` holds out
            its own (``image_folder(..., validation_split=...)``).
        batch_size, epochs, verbose, callbacks, shuffle: as for ``model.fit``. ``batch_size=None``
            means 32 (for arrays with ``steps_per_epoch``: ``ceil(samples / steps_per_epoch)``).
            ``shuffle`` (True or False) orders the samples (the batches, for a PyDataset) by
            ``(seed, epoch)``; a factory orders its own.
        validation_split: as for ``model.fit``, NumPy arrays only: the last fraction of ``x``, ``y``
            and ``sample_weight``, before shuffling, validates; ``validation_data`` overrides it.
        class_weight: ``{class index: weight}``, as for ``model.fit``, for every input kind (a class
            left out weighs 1.0); not together with sample weights.
        sample_weight: as for ``model.fit``, NumPy arrays only (a dataset yields its own
            ``(x, y, sample_weight)``); stored beside ``x`` and ``y`` and resumed exactly.
        initial_epoch: as for ``model.fit``: the first epoch trained; ``History.epoch`` starts there.
        steps_per_epoch: as for ``model.fit`` for arrays and image folders: epochs continue through
            the data, as Keras's iterator does; refused for a factory or a PyDataset (make them yield
            one epoch's batches).
        validation_steps, validation_batch_size, validation_freq: as for ``model.fit``
            (``validation_freq``: an int, or a list of 1-based epochs).
        seed: makes shuffling and initialisation reproducible; chosen and recorded when None, so a
            resumed run continues the same sample order either way.
        run_dir: where checkpoints, the plan and the journal live. If it holds a run, fit resumes it; a
            finished one returns its result at once (a larger ``epochs`` trains on).
            Default: ``./resilient_runs/<time>-<model name>``. Created private (0700, files 0600).
        mirror_dir: a second home for the run on storage that outlives the machine, e.g. a Google Drive
            folder on Colab. Keep ``run_dir`` on fast local disk: a background thread copies each checkpoint
            (verified there by size and SHA-256), the journal and the run's files to ``mirror_dir``, keeps the
            newest 2 checkpoints, retries when the mount errors, and never makes training wait. When
            ``run_dir`` is empty or older than the mirror (a new VM), the run is first restored from the
            mirror's newest verified checkpoint.
        policy: a preset name (``"default"``, ``"colab-free"``, ``"conservative"``), a TOML file, or a
            ``resilient.Policy``.
        max_restarts: restarts allowed in this call; None takes the policy's value.
        checkpoint_every: ``"auto"``, a number of steps, or a duration such as ``"5min"``. At a step
            boundary the worker copies the training state to host memory (the training's only pause) and a
            background thread writes it; the next checkpoint waits for that write. ``"auto"`` saves every
            ``max(100 x snapshot, 100 x the write's CPU time / cores, 2 x the write)`` seconds of the last
            save, clamped to [5 s, 300 s]: the pause and the write's processor time stay under 1% of the
            training time. Checkpoints are also written at every epoch end, on SIGTERM (before the
            worker exits), at the end, and when the worker's memory nears its limit (the policy's
            ``[memory]`` section), so an OOM kill that follows loses almost nothing.
        hang_timeout: ``"auto"`` (calibrated from observed step times) or seconds / a duration. It also
            bounds the start-up phases (import, restore, first step) from below once they were measured.
        host_memory_limit: a RAM budget for the worker such as ``"12.7GB"``, enforced by a memory
            cgroup where the machine allows it, by a watchdog otherwise.
        gpu_memory_limit: caps TensorFlow's GPU memory in the worker (e.g. ``"15GB"`` to emulate a T4), on
            each GPU it trains on.
        faults: fault rehearsal, e.g. ``"gpu_oom@40,segfault@90"``; each fires once per run. Kinds:
            ``gpu_oom``, ``host_oom``, ``segfault``, ``abort``, ``sigkill``, ``hang``, ``preempt``,
            ``nan``, and ``save_kill`` (SIGKILL halfway through the first checkpoint write at or after
            its step: the previous generation stays valid and the run resumes from it).
        trust_run_dir: resume a run directory even if another user owns it or others can write it.
            A run directory is code (its pickled callbacks and objects and its Keras model run when it
            resumes), so by default such a directory is refused; pass True only if you know who wrote it.
        devices: ``"auto"`` (every GPU the worker sees, the CPU when there is none), ``"all"`` (every GPU,
            or every CPU device), ``"cpu"``, one device such as ``"gpu:1"``, or a list such as
            ``["gpu:0", "gpu:1"]``. Over several devices the worker trains under
            ``tf.distribute.MirroredStrategy``: ``batch_size`` stays the global batch, split between them.
            A run may resume on another number of devices.

    Returns:
        A History with ``history``, ``epoch``, ``params``, ``model``, ``incidents``, ``plan`` and ``run_dir``.

    Raises:
        InvalidArgumentError: an argument is wrong; nothing was started or written.
        UserCodeError: the training code raised an ordinary exception (not retried).
        TrainingFailedError: restarts ran out; the message is a root-cause report.

    Example:
        >>> history = resilient.fit(model, x, y, epochs=10, batch_size=64, validation_split=0.1,
        ...                         run_dir="/content/drive/MyDrive/runs/cifar", policy="colab-free")
    """
    # The phases run in this order so that a refused call touches nothing on disk: every argument is
    # checked and the inputs are proven carriable before the run directory is created or locked.
    args = _validate(
        model, callbacks=callbacks, batch_size=batch_size, epochs=epochs, verbose=verbose,
        validation_split=validation_split, shuffle=shuffle, class_weight=class_weight, initial_epoch=initial_epoch,
        steps_per_epoch=steps_per_epoch, validation_steps=validation_steps,
        validation_batch_size=validation_batch_size, validation_freq=validation_freq, policy=policy,
        max_restarts=max_restarts, checkpoint_every=checkpoint_every, hang_timeout=hang_timeout,
        host_memory_limit=host_memory_limit, gpu_memory_limit=gpu_memory_limit, faults=faults, run_dir=run_dir,
        trust_run_dir=trust_run_dir, devices=devices, mirror_dir=mirror_dir,
    )
    # The worker's interpreter and TensorFlow import run while the inputs are proven and the run is stored;
    # it reads nothing until the supervisor's go names its attempt (supervisor/standby.py).
    early = _start_worker_early()
    try:
        prepared = _prepare(args, x, y, validation_data=validation_data, sample_weight=sample_weight,
                            validation_split=validation_split, steps_per_epoch=steps_per_epoch,
                            validation_batch_size=validation_batch_size, seed=seed)
        target = _open_run(args, prepared)
        return _run_locked(args, prepared, target, early)
    finally:
        if early is not None:
            early.kill()  # refused, failed, or the run was finished already; nothing once an attempt took it


# ---------------------------------------------------------------------------- the phases of fit


@dataclasses.dataclass(frozen=True)
class _Args:
    """fit's arguments once checked (``_validate``): nothing has been written yet."""

    model: Any
    is_builder: bool  # ``model`` is a zero-argument callable that builds the model
    callbacks: Sequence[Any] | None
    batch_size: int | None  # as given; ``_prepare`` settles model.fit's default
    epochs: int
    verbose: Any  # as given: History.params reports it as model.fit does
    verbose_level: int
    shuffle: bool
    fit_args: dict[str, Any]  # the model.fit arguments the run spec stores (``_fit_args``)
    policy: Policy
    max_restarts: int
    checkpoint_every_steps: int | None
    checkpoint_every_seconds: float | None
    hang_timeout: float | None
    host_memory_limit: int | None
    devices: Devices  # checked and normalised (``_devices.check_devices``)
    gpu_memory_limit: int | None
    faults: tuple[Fault, ...]
    run_dir: Path | None  # checked (``check_run_dir_path``); None: the default under ./resilient_runs
    trust_run_dir: bool
    mirror_dir: Path | None = None  # checked as run_dir is; None: no mirror
    policy_name: str | None = None  # the policy as a preset name or a file path (None: a Policy object)


@dataclasses.dataclass(frozen=True)
class _Prepared:
    """The checked inputs and what the worker needs carried, proven loadable (``_prepare``)."""

    inputs: Inputs
    facts: ModelFacts
    initial_plan: Plan
    objects: dict[str, Any]  # what objects.pkl holds
    proven: ProvenModel
    has_callbacks: bool
    seed: int  # as given or chosen; a resumed run keeps its own (``_Target.seed``)
    fingerprint: str
    model_name: str
    flexible: bool  # a fixed-size image model that rebuilds with a flexible input


@dataclasses.dataclass(frozen=True)
class _Target:
    """The run directory this call trains in (``_open_run``), not yet locked or written."""

    run: RunDir
    resuming: bool
    seed: int
    versions: dict[str, str]
    device: dict[str, Any]  # the step context's device facts (``_device_context``)
    basis: PlanBasis  # the resource settings this call derives the plan under


def _validate(model: Any, *, callbacks: Sequence[Any] | None, batch_size: Any, epochs: Any, verbose: Any,
              validation_split: Any, shuffle: Any, class_weight: Any, initial_epoch: Any, steps_per_epoch: Any,
              validation_steps: Any, validation_batch_size: Any, validation_freq: Any, policy: Any,
              max_restarts: Any, checkpoint_every: Any, hang_timeout: Any, host_memory_limit: Any,
              gpu_memory_limit: Any, faults: Any, run_dir: Any, trust_run_dir: Any, devices: Any,
              mirror_dir: Any = None) -> _Args:
    """Check every argument that needs neither the inputs nor the disk, in the order users meet them."""
    from .policy import load_policy

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
    _check_callbacks(callbacks)
    if batch_size is not None:
        _check_int("batch_size", batch_size, minimum=1)
    _check_int("epochs", epochs, minimum=0)
    fit_args = _fit_args(validation_split=validation_split, shuffle=shuffle, class_weight=class_weight,
                         initial_epoch=initial_epoch, steps_per_epoch=steps_per_epoch,
                         validation_steps=validation_steps, validation_batch_size=validation_batch_size,
                         validation_freq=validation_freq)
    verbose_level = _verbose(verbose)
    loaded_policy = load_policy(policy)  # InvalidPolicyError before anything is written
    if max_restarts is not None:
        _check_int("max_restarts", max_restarts, minimum=0)
    every_steps, every_seconds = _checkpoint_every(checkpoint_every)
    hang = _hang_timeout(hang_timeout)
    host_limit = _size("host_memory_limit", host_memory_limit)
    gpu_limit = _size("gpu_memory_limit", gpu_memory_limit)
    fault_specs = _faults(faults)
    checked_devices = check_devices(devices)
    if not isinstance(trust_run_dir, (bool, np.bool_)):
        raise InvalidArgumentError(f"Invalid value for argument `trust_run_dir`. Received: trust_run_dir={trust_run_dir!r}. "
                                   "Expected True or False.")
    run_path = None if run_dir is None else check_run_dir_path(run_dir)  # RunDirError names the path
    mirror_path = None if mirror_dir is None else check_run_dir_path(mirror_dir, name="mirror_dir")
    if mirror_path is not None and run_path is not None and mirror_path == run_path:
        raise RunDirError(f"mirror_dir={str(mirror_path)!r} is run_dir itself. Pass a folder on other storage "
                          "(e.g. Google Drive) as mirror_dir and keep run_dir on local disk.")
    return _Args(
        model=model, is_builder=is_builder, callbacks=callbacks, batch_size=batch_size, epochs=epochs,
        verbose=verbose, verbose_level=verbose_level, shuffle=bool(shuffle), fit_args=fit_args,
        policy=loaded_policy, max_restarts=loaded_policy.max_restarts if max_restarts is None else max_restarts,
        checkpoint_every_steps=every_steps, checkpoint_every_seconds=every_seconds, hang_timeout=hang,
        host_memory_limit=host_limit, gpu_memory_limit=gpu_limit, faults=fault_specs, run_dir=run_path,
        trust_run_dir=bool(trust_run_dir), devices=checked_devices, mirror_dir=mirror_path,
        policy_name=_policy_name(policy),
    )


def _prepare(args: _Args, x: Any, y: Any, *, validation_data: Any, sample_weight: Any, validation_split: Any,
             steps_per_epoch: Any, validation_batch_size: Any, seed: Any) -> _Prepared:
    """Check the inputs against the model and prove that the worker can load all it is carried."""
    model = None if args.is_builder else args.model
    facts = ModelFacts(model)
    batch_size = default_batch_size(x, args.batch_size, steps_per_epoch, validation_split, validation_data)
    initial_plan = Plan(batch_size=batch_size, replicas=_replicas(args.devices))
    inputs = prepare_inputs(x, y, validation_data, model=model, plan=initial_plan,
                            sample_weight=sample_weight, validation_split=validation_split,
                            class_weight=args.fit_args["class_weight"], steps_per_epoch=steps_per_epoch,
                            validation_batch_size=validation_batch_size)
    objects, has_callbacks = _carry_objects(args.model if args.is_builder else None, args.callbacks)
    if model is not None:
        objects.update(_model_objects(model))
    objects.update(inputs.objects)
    proven = prove_carriable(model, objects)  # refuses what the worker could not load
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
    _check_int("seed", seed, minimum=0)
    fingerprint, model_name = _fingerprint(args.model, args.is_builder)
    # A fixed-size image model that rebuilds with a flexible input lets lower_resolution apply.
    flexible = bool(inputs.source_image_size is not None and model is not None
                    and not inputs.resizable_input(facts) and _can_flex(model))
    return _Prepared(inputs=inputs, facts=facts, initial_plan=initial_plan, objects=objects, proven=proven,
                     has_callbacks=has_callbacks, seed=seed, fingerprint=fingerprint, model_name=model_name,
                     flexible=flexible)


def _model_objects(model: Any) -> dict[str, Any]:
    """What a model passed as an object carries besides its file: custom objects, Dropout's RNG state."""
    # Whether they can be carried is proven with everything else (prove_carriable), naming the one that cannot.
    # Keras does not save a layer's random state (Dropout's seed generator) with the model; the
    # worker starts from the caller's, so the run draws the same masks as model.fit would.
    return {"custom_objects": custom_objects_of(model), "initial_rng": _seed_generator_states(model)}


def _open_run(args: _Args, prepared: _Prepared) -> _Target:
    """The run directory, and whether this call resumes the run in it: refused if it is another's, if
    others could have written it, or if what it holds is damaged; checked before anything is printed
    or written."""
    # The default (under the current directory) is checked as a given run_dir is: a read-only cwd is named.
    run = RunDir(args.run_dir or check_run_dir_path(_default_run_dir(prepared.model_name)))
    if args.mirror_dir is not None:  # a new VM: an empty or older run_dir first takes the mirror's newest run
        from .supervisor.mirror import restore_from_mirror

        restore_from_mirror(run, args.mirror_dir, trust=args.trust_run_dir,
                            check=lambda mirror: _check_mirror(run, mirror, prepared),
                            say=(lambda text: print(f"resilient: {text}", flush=True)) if args.verbose_level else None)
    versions = _versions()
    seed = prepared.seed
    resuming = run.exists()
    if resuming:
        if not args.trust_run_dir:
            run.check_trusted()  # before anything in it is read: resuming runs its code
        old = _read_spec_or_refuse(run)
        if old.model_fingerprint != prepared.fingerprint:
            raise RunDirError(
                f"The run directory {run.path} belongs to another model (fingerprint {old.model_fingerprint[:12]}, "
                f"this model {prepared.fingerprint[:12]}). Pass a new run_dir, or the same model architecture to "
                "resume."
            )
        _check_stored_plan(run)
        if not args.is_builder:
            _check_stored_model(run)
        prepared.inputs.check_resume(run, old)
        check_resumable(run.path)  # refuses a run whose every checkpoint is damaged; warns of each damaged one
        seed = old.seed
    device = _device_context()
    basis = PlanBasis(host_memory_limit=args.host_memory_limit, gpu_memory_limit=args.gpu_memory_limit,
                      device=device["device"], policy=policy_fingerprint(args.policy.ladders))
    return _Target(run=run, resuming=resuming, seed=seed, versions=versions, device=device, basis=basis)


def _start_worker_early() -> WaitingWorker | None:
    """A worker for the first attempt, started now and waiting for its go; None where it cannot be spawned."""
    from .supervisor.process import worker_env
    from .supervisor.standby import WaitingWorker

    try:
        return WaitingWorker.spawn(worker_env({}), kind="early")
    except OSError:
        return None  # the supervisor starts a fresh worker, and says why if that fails too


def _run_locked(args: _Args, prepared: _Prepared, target: _Target, early: WaitingWorker | None = None) -> History:
    """Under the run directory's lock: return a finished run's result, or store the run and supervise it."""
    from .supervisor.gpu import warn_if_caller_holds_gpu

    warn_if_caller_holds_gpu()
    run = target.run
    lock = _lock(run)
    params = {"verbose": args.verbose, "epochs": args.epochs}  # History.params, as model.fit's (steps from the worker)
    try:
        # Read under the lock: another process may be finishing this very run.
        finished = _finished_result(run, args.epochs) if target.resuming else None
        if finished is not None:
            if args.verbose_level:
                print(f"resilient: the run in {run.path} is already complete ({_trained_text(finished)}); returning "
                      "its result. Pass a larger epochs= to train on, or a new run_dir to start over.", flush=True)
            return _trained_history(run, args.model, args.is_builder, args.callbacks, finished, [],
                                    run.read_plan(), params)
        _store_run(args, prepared, target)
        result = _supervise(args, prepared, target, early)
    finally:
        _unlock(lock)

    done = {**_read_result(run), "history": result.history, "epochs_done": result.epochs_done}
    return _trained_history(run, args.model, args.is_builder, args.callbacks, done, result.incidents, result.plan,
                            params)


def _store_run(args: _Args, prepared: _Prepared, target: _Target) -> None:
    """Write the run directory: first the data, then the spec that points at it; then plan and journal."""
    run, resuming, plan = target.run, target.resuming, prepared.initial_plan
    replanned = _rederived_plan(run, plan, target.basis) if resuming and run.plan_json.exists() else None
    data = prepared.inputs.write(run, target.seed)
    spec = RunSpec(
        epochs=args.epochs, seed=target.seed, shuffle=args.shuffle, verbose=args.verbose_level, data=data,
        model_fingerprint=prepared.fingerprint, model_name=prepared.model_name, model_builder=args.is_builder,
        checkpoint_every_steps=args.checkpoint_every_steps, checkpoint_every_seconds=args.checkpoint_every_seconds,
        faults=args.faults, gpu_memory_limit_bytes=args.gpu_memory_limit,
        host_memory_limit_bytes=args.host_memory_limit, initial_plan=plan, has_callbacks=prepared.has_callbacks,
        versions=target.versions, flexible_input=prepared.flexible, plan_basis=target.basis,
        devices=args.devices, input_facts=_input_facts(prepared), policy_name=args.policy_name, **args.fit_args,
    )
    if not args.is_builder and not (resuming and run.model_file.exists()):
        with atomic_path(run.model_file) as tmp:
            prepared.proven.write_model(tmp)  # the file saved and loaded back by prove_carriable
    _write_objects(run, prepared.objects)
    run.write_spec(spec)
    if replanned is None:
        run.write_plan(plan)
    elif replanned.changed:
        run.write_plan(replanned.plan)
    devices_from = run.read_plan() if resuming else plan
    if devices_from.replicas != plan.replicas:
        # This call's devices: the global batch (and the rest of the plan) carries over to them.
        run.write_plan(devices_from.replace(replicas=plan.replicas))
    journal = Journal(run.events)
    journal.write(
        "run_started", run_dir=str(run.path), resumed=resuming, epochs=args.epochs, seed=target.seed,
        faults=[f.key for f in args.faults], host_memory_limit=args.host_memory_limit, pid=os.getpid(),
        plan_basis=target.basis,
    )
    if args.verbose_level:
        print(f"resilient: {'resuming' if resuming else 'starting'} run in {run.path}", flush=True)
    if replanned is not None and replanned.changed:
        journal.write("plan_changed", **{"from": replanned.previous.model_dump(mode="json"),
                                         "to": replanned.plan.model_dump(mode="json"), "reason": replanned.message,
                                         "incident": None, "cause": "settings_changed",
                                         "dropped": list(replanned.dropped)})
        if args.verbose_level:
            print(f"resilient: {replanned.message}", flush=True)
    if devices_from.replicas != plan.replicas:
        journal.write("plan_changed", **{"from": devices_from.model_dump(mode="json"),
                                         "to": run.read_plan().model_dump(mode="json"),
                                         "reason": f"devices: {devices_from.replicas} -> {plan.replicas} replicas, "
                                                   "the global batch kept", "incident": None,
                                         "cause": "settings_changed", "dropped": []})


def _rederived_plan(run: RunDir, requested: Plan, basis: PlanBasis) -> Rederived:
    """The plan a resumed run continues with (``_replan``): plan.json, unless the resource settings
    changed since the last call; then the requested plan with what was learned that still applies."""
    last = run.read_spec().basis()
    learned = learned_from_journal(run.read_events(), fallback=last)
    return rederive_plan(requested, run.read_plan(), learned, last, basis)


def _supervise(args: _Args, prepared: _Prepared, target: _Target, early: WaitingWorker | None = None) -> RunResult:
    """Run the supervisor to the end of the run; it raises UserCodeError or TrainingFailedError."""
    from .data.folder import folder_copy_jobs
    from .policy import StepContext
    from .supervisor.display import make_display
    from .supervisor.loop import Supervisor, SupervisorConfig

    facts = _input_facts(prepared)
    context = StepContext(requested_plan=prepared.initial_plan, **facts.model_dump(), **target.device)
    supervisor = Supervisor(SupervisorConfig(
        run=target.run, policy=args.policy, context=context, max_restarts=args.max_restarts,
        hang_timeout=args.hang_timeout, host_memory_limit=args.host_memory_limit,
        gpu_memory_limit=args.gpu_memory_limit, mirror_dir=args.mirror_dir, devices=args.devices,
        rehearse_host_oom=any(f.kind == "host_oom" for f in args.faults), echo=args.verbose_level != 0,
        # verbose as Keras means it: 0 silent, 1 live (a terminal line, a notebook panel), 2 a line per epoch.
        display=make_display(args.verbose_level, host_limit=args.host_memory_limit, gpu_limit=args.gpu_memory_limit),
        standby=args.policy.runtime.standby, image_folders=folder_copy_jobs(prepared.inputs),
    ), early_worker=early)
    return supervisor.run()


def _input_facts(prepared: _Prepared) -> InputFacts:
    """What the policy steps know of the inputs (stored in run.json for ``resume``)."""
    inputs = prepared.inputs
    return InputFacts(
        resizable_input=inputs.resizable_input(prepared.facts) or prepared.flexible,
        source_image_size=inputs.source_image_size, batch_size_fixed=inputs.kind == "pydataset",
        cacheable=inputs.kind != "arrays", buffered=inputs.kind != "arrays",
    )


def _policy_name(policy: Any) -> str | None:
    """fit's ``policy`` as resume can load it again: a preset name or a file's absolute path."""
    if isinstance(policy, os.PathLike):
        policy = os.fspath(policy)
    if not isinstance(policy, str):
        return None
    if os.sep in policy or policy.endswith(".toml"):  # a file, as load_policy tells them apart
        return str(Path(policy).expanduser().absolute())
    return policy


# ---------------------------------------------------------------------------- after training


def _read_result(run: RunDir) -> dict[str, Any]:
    """The worker's result.json as a dict ({} when absent or unreadable); fields added later have defaults."""
    from .worker.state import read_result

    result = read_result(run)
    return {} if result is None else result.model_dump()


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
    from .worker.state import load_callbacks_into, load_into

    params = {**params, "steps": result.get("steps")}
    if not is_builder:
        load_into(model, run)
    loader = None if not is_builder else (lambda: _load_trained(run, model))
    history = History(result["history"], result["epochs_done"], incidents, plan, run.path,
                      model=None if is_builder else model, loader=loader)
    history.params = params
    load_callbacks_into(callbacks, run, model=None if is_builder else model, params=params)
    return history


def _seed_generator_states(model: Any) -> list[Any]:
    from .worker.state import seed_generator_states

    return seed_generator_states(model)


def _load_trained(run: RunDir, builder: Callable[[], Any]) -> Any:
    from .worker.state import load_into

    model = builder()
    load_into(model, run)
    return model


# ---------------------------------------------------------------------------- validation helpers


def _fit_args(*, validation_split: Any, shuffle: Any, class_weight: Any, initial_epoch: Any, steps_per_epoch: Any,
              validation_steps: Any, validation_batch_size: Any, validation_freq: Any) -> dict[str, Any]:
    """model.fit's arguments that the run spec stores, checked; refused values say what to pass."""
    if isinstance(validation_split, bool) or not isinstance(validation_split, (int, float, np.integer, np.floating)) \
            or not 0.0 <= float(validation_split) < 1.0:
        raise InvalidArgumentError(
            f"Invalid value for argument `validation_split`. Received: validation_split={validation_split!r}. "
            "Expected a float in [0, 1): the fraction of x and y (their last samples) held out for validation."
        )
    if not isinstance(shuffle, (bool, np.bool_)):
        raise InvalidArgumentError(
            f"Invalid value for argument `shuffle`. Received: shuffle={shuffle!r}. Expected True or False: "
            "resilient shuffles whole samples by (seed, epoch), so that a resumed epoch continues the same order "
            "(shuffle='batch' is not offered; pass shuffle=True)."
        )
    _check_int("initial_epoch", initial_epoch, minimum=0)
    for name, value in (("steps_per_epoch", steps_per_epoch), ("validation_steps", validation_steps),
                        ("validation_batch_size", validation_batch_size)):
        if value is not None:
            _check_int(name, value, minimum=1)
    return {
        "initial_epoch": int(initial_epoch),
        "steps_per_epoch": None if steps_per_epoch is None else int(steps_per_epoch),
        "validation_steps": None if validation_steps is None else int(validation_steps),
        "validation_batch_size": None if validation_batch_size is None else int(validation_batch_size),
        "validation_freq": _validation_freq(validation_freq),
        "class_weight": _class_weight(class_weight),
    }


def _validation_freq(value: Any) -> int | tuple[int, ...]:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1:
        return int(value)
    if isinstance(value, (list, tuple)) and value and all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1 for v in value):
        return tuple(int(v) for v in value)
    raise InvalidArgumentError(
        f"Invalid value for argument `validation_freq`. Received: validation_freq={value!r}. Expected an integer "
        ">= 1 (validate every that many epochs) or a non-empty list of epochs (1-based) after which to validate, "
        "e.g. [1, 5, 10]."
    )


def _class_weight(value: Any) -> dict[int, float] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not value:
        raise InvalidArgumentError(
            f"Invalid value for argument `class_weight`. Received: class_weight={value!r}. Expected a non-empty "
            "dict mapping class indices to weights, e.g. {0: 1.0, 1: 5.0}."
        )
    out: dict[int, float] = {}
    for key, weight in value.items():
        if isinstance(key, bool) or not isinstance(key, (int, np.integer)) or key < 0:
            raise InvalidArgumentError(
                f"Invalid value for argument `class_weight`. Received: a key {key!r} ({type(key).__name__}). Expected "
                "class indices: integers >= 0 (the label values, or the one-hot positions), e.g. {0: 1.0, 1: 5.0}."
            )
        if isinstance(weight, bool) or not isinstance(weight, (int, float, np.integer, np.floating)) \
                or not np.isfinite(weight):
            raise InvalidArgumentError(
                f"Invalid value for argument `class_weight`. Received: class_weight[{key!r}]={weight!r}. Expected a "
                "finite number (the weight of that class's samples in the loss)."
            )
        out[int(key)] = float(weight)
    return out


def default_batch_size(x: Any, batch_size: int | None, steps_per_epoch: int | None, validation_split: float,
                       validation_data: Any) -> int:
    """model.fit's batch size: as given, else for arrays ``ceil(samples / steps_per_epoch)`` or 32."""
    if batch_size is not None:
        return int(batch_size)
    if steps_per_epoch is None:
        return 32
    if not (isinstance(x, (list, tuple)) or hasattr(x, "__array__")):
        return 32  # not arrays: a factory batches by plan.batch_size; prepare_inputs checks the rest
    n = len(x)
    if validation_split and validation_data is None:
        n = int(np.floor(n * (1.0 - float(validation_split))))
    return max(1, -(-n // int(steps_per_epoch)))


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


def _check_callbacks(callbacks: Any) -> None:
    """``callbacks``: None or a list of callbacks (each is checked when they are carried)."""
    if callbacks is None:
        return
    if isinstance(callbacks, (str, bytes, dict)) or not isinstance(callbacks, Iterable):
        raise InvalidArgumentError(
            f"Invalid value for argument `callbacks`. Received: callbacks={callbacks!r} ({type(callbacks).__name__}). "
            "Expected a list of keras.callbacks.Callback instances, e.g. callbacks=[keras.callbacks.EarlyStopping()]."
        )


def _faults(value: Any) -> tuple[Fault, ...]:
    """``faults``: None, ``"kind@step,..."`` or a list of such strings."""
    if value is not None and (isinstance(value, (bytes, dict)) or not isinstance(value, (str, Iterable))):
        raise InvalidArgumentError(
            f"Invalid value for argument `faults`. Received: faults={value!r} ({type(value).__name__}). Expected a "
            "string such as 'gpu_oom@40,segfault@90', a list of such 'kind@step' strings, or None."
        )
    try:
        return parse_faults(value)
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


def _can_flex(model: Any) -> bool:
    from .worker.reshape import can_flex

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


def _check_mirror(run: RunDir, mirror: RunDir, prepared: _Prepared) -> None:
    """Before anything is restored from the mirror (or copied to it): the mirror must hold this run, the
    call's model and data, and the local run's seed where run_dir holds a run."""
    untouched = f"Nothing was restored; {run.path} is untouched."
    try:
        spec = mirror.read_spec()
    except Exception as e:
        raise RunDirError(
            f"The mirror_dir {mirror.path} holds a run.json that cannot be read as a resilient run ({_reason(e)}). "
            f"{untouched} Pass the mirror_dir this run was mirrored to, or an empty folder for a new mirror."
        ) from None
    if spec.model_fingerprint != prepared.fingerprint:
        raise RunDirError(
            f"The mirror_dir {mirror.path} holds the run of another model (fingerprint {spec.model_fingerprint[:12]}, "
            f"this model {prepared.fingerprint[:12]}). {untouched} Pass this model's mirror_dir, or a new folder "
            "as mirror_dir to start a new run."
        )
    try:
        prepared.inputs.check_resume(mirror, spec)
    except RunDirError as e:
        raise RunDirError(f"The mirror_dir holds a run on other data: {e} {untouched}") from None
    if run.exists():
        local = _read_spec_or_refuse(run)
        if (local.model_fingerprint, local.seed) != (spec.model_fingerprint, spec.seed):
            raise RunDirError(
                f"run_dir {run.path} and mirror_dir {mirror.path} hold different runs (seed {local.seed} and "
                f"{spec.seed}; fingerprint {local.model_fingerprint[:12]} and {spec.model_fingerprint[:12]}). "
                f"{untouched} Pass the mirror_dir this run was mirrored to, or a new folder as mirror_dir."
            )


def _read_spec_or_refuse(run: RunDir) -> RunSpec:
    try:
        return run.read_spec()
    except Exception as e:
        raise RunDirError(
            f"{run.run_json} exists but cannot be read as a resilient run ({_reason(e)}): it is damaged, or not "
            "resilient's. Pass another run_dir (a run cannot resume without its run.json)."
        ) from None


def _check_stored_plan(run: RunDir) -> None:
    """plan.json, if present, must read as a Plan: the supervisor starts from it."""
    if not run.plan_json.exists():
        return
    try:
        run.read_plan()
    except (OSError, ValueError) as e:
        raise RunDirError(
            f"{run.plan_json} is damaged: it does not read as a plan ({_reason(e)}). It holds the plan in force "
            "(batch size, precision...); delete it and call fit again to resume with the requested plan (the "
            "checkpoints are kept), or pass a new run_dir."
        ) from None


def _check_stored_model(run: RunDir) -> None:
    """model.keras, if present, must be a whole Keras archive: the worker builds the model from it."""
    import zipfile

    path = run.model_file
    if not path.exists():
        return
    try:
        with zipfile.ZipFile(path) as archive:  # reads the central directory at the end: a cut file fails here
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile) as e:
        names, problem = [], f"not a complete Keras archive ({e}; {path.stat().st_size} bytes)"
    else:
        problem = "a zip archive without config.json"
    if "config.json" not in names:
        raise RunDirError(
            f"{path} is damaged: {problem}. It holds the model as first handed to fit (the checkpoints hold the "
            "trained weights); delete it and call fit again with the same model to store it afresh, or pass a new "
            "run_dir."
        )


def _reason(error: BaseException) -> str:
    """Why a stored file did not read, in a line (pydantic's first error, not its whole report)."""
    from pydantic import ValidationError

    if isinstance(error, ValidationError) and error.errors():
        first = error.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ()))
        return f"{where + ': ' if where else ''}{first.get('msg', '')}"
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _lock(run: RunDir) -> int:
    run.create()  # 0700 whatever the umask: the directory will hold code
    fd = os.open(run.lock_file, os.O_RDWR | os.O_CREAT, FILE_MODE)
    with contextlib.suppress(OSError):
        os.fchmod(fd, FILE_MODE)  # a lock file left by 0.1.0 (0644) too
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
    from .supervisor.memory import GpuMemory

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


def _replicas(devices: Devices) -> int:
    """The devices the worker will train on (GPUs counted by NVML where CUDA_VISIBLE_DEVICES lets it see them)."""
    from .supervisor.memory import GpuMemory

    if devices not in {"auto", "all"}:
        return replica_count(devices, 0)  # named devices: their count, no GPU query
    return replica_count(devices, visible_gpu_count(len(GpuMemory()._handles)))


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


