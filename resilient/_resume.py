"""``resilient.resume(run_dir)`` and ``resilient resume RUN_DIR``: continue a run from its directory alone.

Everything a run needs is in its directory (run.json, the stored model and data, the carried
objects, plan.json, the checkpoints), so a run can be continued without the program that started
it: on a new VM after the old one went away, from a terminal while the notebook that started it is
gone. It continues exactly as ``fit`` with the same arguments would: the same plan, the same data
order, from the newest verified checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from ._errors import InvalidArgumentError, RunDirError
from ._history import History
from ._rundir import InputFacts, Journal, RunDir, RunSpec, check_run_dir_path


def resume(
    run_dir: str | os.PathLike[str],
    *,
    policy: Any = None,
    max_restarts: int | None = None,
    hang_timeout: Literal["auto"] | float | str = "auto",
    verbose: Literal["auto", 0, 1, 2] | int | str = "auto",
    mirror_dir: str | os.PathLike[str] | None = None,
    trust_run_dir: bool = False,
) -> History:
    """Continue the run in ``run_dir`` to its end, with nothing but the directory.

    Args:
        run_dir: a run directory written by ``resilient.fit``. A finished run returns its result at once.
        policy: a preset name, a TOML file or a ``resilient.Policy``; None continues with the policy
            the run was started with when fit named it (a preset or a file), else ``"default"``.
        max_restarts: restarts allowed in this call; None takes the policy's value.
        hang_timeout: as for ``fit``.
        verbose: as for ``fit`` (the run's own setting when ``"auto"``).
        mirror_dir: as for ``fit``: where an empty or older ``run_dir`` is first restored from, and where
            this call keeps copying to.
        trust_run_dir: as for ``fit``: resume a directory another user owns or others can write.

    Returns:
        A History as ``fit`` returns it; ``history.model`` is the trained model, loaded from the run.

    Raises:
        RunDirError: ``run_dir`` holds no run, or a damaged one; nothing was written.
        UserCodeError, TrainingFailedError: as for ``fit``.
    """
    from . import _fit

    run = RunDir(check_run_dir_path(run_dir))
    mirror = None if mirror_dir is None else check_run_dir_path(mirror_dir, name="mirror_dir")
    if mirror is not None and mirror == run.path:
        raise RunDirError(f"mirror_dir={str(mirror)!r} is run_dir itself. Pass a folder on other storage as "
                          "mirror_dir.")
    if not isinstance(trust_run_dir, bool):
        raise InvalidArgumentError(f"Invalid value for argument `trust_run_dir`. Received: {trust_run_dir!r}. "
                                   "Expected True or False.")
    if mirror is not None:
        from .supervisor.mirror import restore_from_mirror

        restore_from_mirror(run, mirror, trust=trust_run_dir, say=lambda text: print(f"resilient: {text}", flush=True))
    if not run.run_json.exists():
        raise RunDirError(
            f"No run to resume in {run.path}: it has no run.json. resume continues a run that resilient.fit "
            "started there (pass that run_dir, or mirror_dir= to restore it from its mirror)."
        )
    if not trust_run_dir:
        run.check_trusted()  # before anything in it is read: resuming runs its code
    spec = _fit._read_spec_or_refuse(run)
    _fit._check_stored_plan(run)
    if not spec.model_builder:
        _fit._check_stored_model(run)
    loaded_policy, policy_note = _policy(policy, spec)
    if max_restarts is not None:
        _fit._check_int("max_restarts", max_restarts, minimum=0)
    hang = _fit._hang_timeout(hang_timeout)
    level = spec.verbose if verbose == "auto" else _fit._verbose(verbose)

    lock = _fit._lock(run)
    params = {"verbose": verbose if verbose != "auto" else spec.verbose, "epochs": spec.epochs}
    try:
        finished = _fit._finished_result(run, spec.epochs)
        if finished is not None:
            if level:
                print(f"resilient: the run in {run.path} is already complete ({_fit._trained_text(finished)}).",
                      flush=True)
            return _history(run, spec, finished, [], run.read_plan(), params)
        from ._checkpoint import check_resumable

        check_resumable(run.path)
        Journal(run.events).write("run_started", run_dir=str(run.path), resumed=True, epochs=spec.epochs,
                                  seed=spec.seed, faults=[f.key for f in spec.faults],
                                  host_memory_limit=spec.host_memory_limit_bytes, pid=os.getpid(),
                                  plan_basis=spec.basis(), via="resume")
        if level:
            print(f"resilient: resuming run in {run.path}" + (f" ({policy_note})" if policy_note else ""), flush=True)
        result = _supervise(run, spec, loaded_policy, max_restarts, hang, level, mirror)
    finally:
        _fit._unlock(lock)
    done = {**_fit._read_result(run), "history": result.history, "epochs_done": result.epochs_done}
    return _history(run, spec, done, result.incidents, result.plan, params)


def _policy(policy: Any, spec: RunSpec) -> tuple[Any, str]:
    from .policy import load_policy

    if policy is not None:
        return load_policy(policy), ""
    if spec.policy_name is not None:
        return load_policy(spec.policy_name), ""
    return load_policy("default"), ("the run was started with a Policy object, which a run directory does not hold; "
                                    "continuing with the 'default' preset (pass policy= to choose)")


def _supervise(run: RunDir, spec: RunSpec, policy: Any, max_restarts: int | None, hang: float | None, level: int,
               mirror: Path | None) -> Any:
    from . import _fit
    from .data.folder import stored_folder_copy_jobs
    from .policy import StepContext
    from .supervisor.display import make_display
    from .supervisor.loop import Supervisor, SupervisorConfig

    facts = spec.input_facts or _facts_of_older_spec(spec)
    context = StepContext(requested_plan=spec.initial_plan, **facts.model_dump(), **_fit._device_context())
    host, gpu = spec.host_memory_limit_bytes, spec.gpu_memory_limit_bytes
    supervisor = Supervisor(SupervisorConfig(
        run=run, policy=policy, context=context,
        max_restarts=policy.max_restarts if max_restarts is None else max_restarts, hang_timeout=hang,
        host_memory_limit=host, gpu_memory_limit=gpu, mirror_dir=mirror, devices=spec.devices,
        rehearse_host_oom=any(f.kind == "host_oom" for f in spec.faults), echo=level != 0,
        display=make_display(level, host_limit=host, gpu_limit=gpu), image_folders=stored_folder_copy_jobs(run, spec),
    ))
    return supervisor.run()


def _facts_of_older_spec(spec: RunSpec) -> InputFacts:
    """A run.json written before the inputs' facts were kept: what its data kind tells."""
    kind = spec.data.kind
    return InputFacts(resizable_input=spec.flexible_input, batch_size_fixed=kind == "pydataset",
                      cacheable=kind != "arrays", buffered=kind != "arrays")


def _history(run: RunDir, spec: RunSpec, result: dict[str, Any], incidents: list[Any], plan: Any,
             params: dict[str, Any]) -> History:
    """The History of a resumed run; its model is loaded from the run directory when first asked for."""
    params = {**params, "steps": result.get("steps")}
    history = History(result["history"], result["epochs_done"], incidents, plan, run.path,
                      loader=lambda: _load_model(run, spec))
    history.params = params
    return history


def _load_model(run: RunDir, spec: RunSpec) -> Any:
    """The trained model: the stored model (or the carried builder's) with the newest checkpoint loaded."""
    from .worker.attempt import _load_objects
    from .worker.state import load_into

    objects = _load_objects(run)
    if spec.model_builder:
        model = objects["builder"]()
    else:
        import warnings

        import keras

        with warnings.catch_warnings(), keras.saving.custom_object_scope(objects.get("custom_objects") or {}):
            # The stored model's optimizer was saved unbuilt; the checkpoint brings its state.
            warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
            model = keras.saving.load_model(run.model_file, compile=True, safe_mode=False)  # as the worker loads it
    load_into(model, run)
    return model
