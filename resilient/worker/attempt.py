"""The worker: one training attempt in a fresh process (``python -m resilient.worker.attempt``).

It restores the latest checkpoint, builds model and data for the current Plan, and runs
``model.fit`` one epoch per call (so a resumed epoch can be shorter) with a single CallbackList
that user callbacks see as one uninterrupted training. It reports over the channel and never
decides what happens after a failure: it writes what it knows to ``error.json`` and exits.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from .._faults import Fault, FiredFaults
from .._plan import Plan
from .._protocol import (
    EXIT_ORPHANED,
    EXIT_PREEMPTED,
    EXIT_REPORTED,
    ChannelWriter,
    CheckpointSaved,
    EpochBegin,
    EpochEnd,
    FaultFired,
    Heartbeat,
    Hello,
    Notice,
)
from .._rundir import RunDir, RunSpec, atomic_write_text

_PR_SET_PDEATHSIG = 1


class Preempted(BaseException):
    """Raised inside fit after the SIGTERM checkpoint was saved; unwinds to a clean exit."""


class NanLoss(Exception):
    """The training loss became NaN or infinite."""


class _State:
    """Process-wide flags touched by signal handlers."""

    sigterm = threading.Event()


# --------------------------------------------------------------------------- process setup


def _setup_process(supervisor_pid: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != supervisor_pid:  # the supervisor died before PDEATHSIG was armed
        os._exit(EXIT_ORPHANED)
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")  # if the machine runs out of RAM, the kernel takes us, not the notebook
    except OSError:
        pass

    def watch_parent() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != supervisor_pid:
                os._exit(EXIT_ORPHANED)

    threading.Thread(target=watch_parent, name="resilient-parent-watch", daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: _State.sigterm.set())
    import faulthandler

    faulthandler.enable()  # a segfault still leaves a Python stack in worker.log


def _configure_tf(spec: RunSpec) -> Any:
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        try:
            if spec.gpu_memory_limit_bytes:
                mb = max(1, spec.gpu_memory_limit_bytes // (1 << 20))
                tf.config.set_logical_device_configuration(gpu, [tf.config.LogicalDeviceConfiguration(memory_limit=mb)])
            else:
                tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:
            pass  # already initialized by user code imported earlier; keep its settings
    return tf


# --------------------------------------------------------------------------- model


def load_objects(run: RunDir) -> dict[str, Any]:
    if not run.objects_file.exists():
        return {}
    import cloudpickle

    with open(run.objects_file, "rb") as f:
        return cloudpickle.load(f)


def build_model(run: RunDir, spec: RunSpec, plan: Plan, objects: dict[str, Any]) -> Any:
    """The model for ``plan``: loaded (or built), put under the plan's precision, compiled."""
    import warnings

    import keras

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
    import keras

    from .reshape import with_flexible_input

    config = model.get_config()
    if flexible_input:
        config = with_flexible_input(config)
    _set_dtype_policies(config, plan.precision)
    compile_config = model.get_compile_config()
    optimizer_config = keras.optimizers.serialize(_inner_optimizer(model.optimizer))
    optimizer_config["config"]["gradient_accumulation_steps"] = plan.grad_accum_steps if plan.grad_accum_steps > 1 else None
    with keras.saving.custom_object_scope(custom), _as_loaded():
        new = model.__class__.from_config(config)
        if not new.built and model.get_build_config():
            new.build_from_config(model.get_build_config())
        new.set_weights(model.get_weights())
        optimizer = keras.optimizers.deserialize(optimizer_config)
        if plan.grad_accum_steps > 1:
            schedule = getattr(optimizer, "_learning_rate", None)
            if isinstance(schedule, keras.optimizers.schedules.LearningRateSchedule):
                optimizer._learning_rate = per_update_schedule(schedule, plan.grad_accum_steps)
        compile_config = dict(compile_config or {})
        compile_config["optimizer"] = optimizer
        new.compile(**{k: _deserialize_compile_arg(k, v) for k, v in compile_config.items()})
    return new


def _as_loaded() -> Any:
    """Deserialize as ``build_model`` loads (``safe_mode=False``): a Lambda layer's function rebuilds too."""
    from keras.src.saving.serialization_lib import SafeModeScope

    return SafeModeScope(False)


def per_update_schedule(schedule: Any, accum: int) -> Any:
    """``schedule`` evaluated per optimizer update rather than per micro-batch.

    Keras evaluates a schedule at the micro-step counter when gradients are accumulated, so without
    this a ``halve_batch(keep_effective_batch=True)`` would run the schedule ``accum`` times faster.
    """
    import keras

    class PerUpdate(keras.optimizers.schedules.LearningRateSchedule):
        def __call__(self, step: Any) -> Any:
            return schedule(keras.ops.floor_divide(step, accum))

        def get_config(self) -> dict[str, Any]:
            return {"schedule": keras.saving.serialize_keras_object(schedule), "accum": accum}

    return PerUpdate()


def _deserialize_compile_arg(key: str, value: Any) -> Any:
    import keras

    if key in {"loss", "metrics", "weighted_metrics", "loss_weights"} and value is not None:
        return keras.saving.deserialize_keras_object(value) if isinstance(value, dict) else _deser_nested(value)
    return value


def _deser_nested(value: Any) -> Any:
    import keras

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
            name = config["config"].get("name", "")
            if name in {"float32", "mixed_float16", "mixed_bfloat16"}:
                config["config"]["name"] = precision
        for v in config.values():
            _set_dtype_policies(v, precision)
    elif isinstance(config, list):
        for v in config:
            _set_dtype_policies(v, precision)


def _inner_optimizer(opt: Any) -> Any:
    return getattr(opt, "inner_optimizer", opt)


# --------------------------------------------------------------------------- state by meaning


def _slot_keys(model: Any, optimizer: Any) -> dict[int, str]:
    """Optimizer variables keyed by meaning: ``slot:<index of the model variable>:<slot name>``.

    Keras names a slot after its model variable's path (``dense_kernel_momentum``); reading that
    back as (variable index, slot kind) identifies the state of one model variable whatever the
    layer names in this process, the optimizer's wrapping (LossScaleOptimizer) or its variable count.
    Variables that belong to no model variable (``learning_rate``) keep their own name.
    """
    prefixes = sorted(((v.path.replace("/", "_") + "_", i) for i, v in enumerate(model.trainable_variables)),
                      key=lambda p: -len(p[0]))
    keys = {}
    for ov in optimizer.variables:
        last = ov.path.rsplit("/", 1)[-1]
        for prefix, index in prefixes:
            if last.startswith(prefix):
                keys[id(ov)] = f"slot:{index}:{last[len(prefix):]}"
                break
        else:
            keys[id(ov)] = f"slot:{last}"
    return keys


def optimizer_state(model: Any) -> dict[str, Any]:
    """Optimizer variables keyed by meaning (slot name per model variable), not by position."""
    import numpy as np

    opt = model.optimizer
    inner = _inner_optimizer(opt)
    out: dict[str, Any] = {}
    keys = _slot_keys(model, inner)
    for v in inner.variables:
        if v is inner._iterations:
            continue
        out[keys[id(v)]] = np.asarray(v.numpy())
    accum = inner.gradient_accumulation_steps or 1
    micro = int(inner._iterations.numpy())
    out["meta:iterations"] = np.asarray(micro // accum, dtype=np.int64)  # optimizer updates
    out["meta:micro_steps"] = np.asarray(micro % accum, dtype=np.int64)  # into an accumulation window
    out["meta:accum"] = np.asarray(accum, dtype=np.int64)
    if opt is not inner:
        for v in opt.variables:
            if v.path.endswith("dynamic_scale") or v.path.endswith("step_counter"):
                out["lso:" + v.path.rsplit("/", 1)[-1]] = np.asarray(v.numpy())
    return out


def carry_window(saved_accum: int, saved_micro: int, saved_batch: int | None, accum: int,
                 batch: int | None) -> tuple[int, float] | None:
    """Where a partly accumulated window continues under another micro-batch: (micro steps, scale).

    Keras accumulates the sum of per-micro-batch mean gradients and divides by the accumulation
    steps at the update, so ``m`` micro-steps of ``b`` samples hold ``m * b`` samples' worth. Under
    micro-batch ``b'`` with the same effective batch, that is ``m * b / b'`` micro-steps with the
    accumulators scaled by ``b / b'``: the update that ends the window is the one the old plan would
    have made. None when it does not map exactly (the window is then dropped).
    """
    if saved_micro == 0:
        return 0, 1.0
    if saved_accum == accum and (saved_batch is None or batch is None or saved_batch == batch):
        return saved_micro, 1.0
    if saved_batch is None or batch is None or saved_accum * saved_batch != accum * batch:
        return None
    samples = saved_micro * saved_batch
    if samples % batch or not 0 < samples // batch < accum:
        return None
    return samples // batch, saved_batch / batch


def restore_optimizer_state(model: Any, state: dict[str, Any], saved_batch: int | None = None,
                            batch: int | None = None) -> list[str]:
    """Assign saved state to the (possibly rebuilt) optimizer by meaning; returns keys not restored.

    ``iterations`` keeps counting optimizer updates across a change of gradient accumulation. A
    partly accumulated window (an epoch-end checkpoint can fall inside one) continues under a new
    micro-batch when it maps exactly (``carry_window``) and is dropped otherwise.
    """
    opt = model.optimizer
    inner = _inner_optimizer(opt)
    if not inner.built:
        opt.build(model.trainable_variables)
    accum = inner.gradient_accumulation_steps or 1
    window = carry_window(int(state.get("meta:accum", 1)), int(state.get("meta:micro_steps", 0)), saved_batch,
                          accum, batch)
    micro, scale = window if window is not None else (0, 0.0)
    known = set()
    keys = _slot_keys(model, inner)
    for v in inner.variables:
        if v is inner._iterations:
            continue
        key = keys[id(v)]
        known.add(key)
        if key.endswith("gradient_accumulator"):
            if key in state and tuple(state[key].shape) == tuple(v.shape) and micro:
                v.assign(state[key] * scale)
            continue  # otherwise a fresh window (zeros)
        if key in state and tuple(state[key].shape) == tuple(v.shape):
            v.assign(state[key])
    skipped = [k for k in state if k.startswith("slot:") and k not in known]
    if "meta:iterations" in state:
        inner._iterations.assign(int(state["meta:iterations"]) * accum + micro)
    if opt is not inner:
        for v in opt.variables:
            name = "lso:" + v.path.rsplit("/", 1)[-1]
            if name in state:
                v.assign(state[name])
    return skipped


def seed_generator_states(model: Any) -> list[Any]:
    import numpy as np

    return [np.asarray(sg.state.numpy()) for sg in _seed_generators(model)]


def restore_seed_generator_states(model: Any, states: list[Any]) -> None:
    """Assign saved seed-generator states (Dropout's random state); a count that differs is left alone."""
    generators = _seed_generators(model)
    if len(generators) != len(states):
        return
    for sg, value in zip(generators, states):
        if tuple(sg.state.shape) == tuple(value.shape):
            sg.state.assign(value)


def _seed_generators(model: Any) -> list[Any]:
    out = []
    for layer in model._flatten_layers(include_self=True):
        out.extend(getattr(layer, "_seed_generators", []) or [])
    return out


# --------------------------------------------------------------------------- callbacks


def callback_state(cb: Any) -> dict[str, Any]:
    """The picklable part of a callback's ``__dict__`` (its model and params excluded)."""
    import cloudpickle

    out = {}
    for key, value in vars(cb).items():
        if key in {"model", "_model", "params", "_chief_worker_only", "_supports_tf_logs"}:
            continue
        try:
            cloudpickle.dumps(value)
        except Exception:
            continue  # file writers, locks: rebuilt by the callback itself
        out[key] = value
    return out


# --------------------------------------------------------------------------- the attempt


class Attempt:
    """Everything one worker process does, in order: restore, build, train, report."""

    def __init__(self, run: RunDir, attempt: int, channel: ChannelWriter, plan_file: str | None = None) -> None:
        self.run = run
        self.attempt = attempt
        self.channel = channel
        self.spec = run.read_spec()
        # The supervisor hands each attempt its plan (a probe may differ from the settled plan.json).
        self.plan = Plan.model_validate_json(Path(plan_file).read_text()) if plan_file else run.read_plan()
        self.fired = FiredFaults(run.faults_fired)
        self._fault_steps = {f.step for f in self.spec.faults}
        self.epoch = self.spec.initial_epoch  # fit's initial_epoch; a checkpoint's epoch overrides it
        self.offset = 0  # samples into the current epoch
        self.global_step = 0
        self.history: dict[str, list[float]] = {}
        self.epochs_done: list[int] = []
        self.callback_states: list[dict[str, Any]] | None = None
        self.metric_values: list[Any] | None = None
        # The training metrics' state of the finished epoch, taken when its validation began (Keras
        # shares metric objects between training and evaluation); what an epoch-end checkpoint stores.
        self.train_metric_values: list[Any] | None = None
        self.stopped = False  # a callback stopped the training before its last epoch
        self.steps_per_epoch: int | None = None  # a whole epoch's steps, as in History.params
        self.last_logs: dict[str, float] | None = None
        self.lr_scale_saved = 1.0
        self.last_save_time = time.monotonic()
        self.last_save_seconds = 0.0
        self.last_beat = 0.0
        self.step_seconds: float | None = None
        self.timed_steps = 0
        self.window_pos = 0  # micro-steps into the current gradient-accumulation window
        self.timed_seconds = 0.0
        self.samples_per_step = self.plan.batch_size
        self.started = time.monotonic()
        self.first_step_reported = False
        self.nan_seen: tuple[int, float] | None = None  # (step, loss) noticed by the NaN watch
        self.user_callbacks: list[Any] = []

    # -- checkpoint

    def check_nan(self, model: Any = None) -> None:
        """Raise NanLoss for a non-finite loss seen by the watch or, with ``model``, in the running loss."""
        if self.nan_seen is None and model is not None:
            tracker = getattr(model, "_loss_tracker", None)
            if tracker is not None:
                value = float(tracker.result())
                if not math.isfinite(value):
                    self.nan_seen = (max(0, self.global_step - 1), value)  # the last step counted
        if self.nan_seen is not None:
            step, value = self.nan_seen
            raise NanLoss(f"loss became {value} at global step {step} (epoch {self.epoch})")

    def save_checkpoint(self, model: Any, reason: str) -> None:
        import cloudpickle
        import numpy as np

        from .._checkpoint import CheckpointStore

        self.check_nan(model)  # a diverged state is never saved: the last checkpoint stays good

        self.beat("save", force=True)
        t0 = time.monotonic()
        opt_state = optimizer_state(model)
        meta = {
            "epoch": self.epoch,
            "offset": self.offset,
            "global_step": self.global_step,
            "epochs_done": self.epochs_done,
            "history": self.history,
            "plan": self.plan.model_dump(mode="json"),
            "attempt": self.attempt,
            "reason": reason,
            "lr_scale": self.plan.learning_rate_scale,
            "weight_paths": [w.path for w in model.weights],
            "stopped": self.stopped,
            "last_logs": self.last_logs,
        }
        metric_values = self.train_metric_values
        if metric_values is None:
            metric_values = [np.asarray(v.numpy()) for v in model.metrics_variables]

        def write(tmp: Path) -> None:
            np.savez(tmp / "weights.npz", *[np.asarray(w.numpy()) for w in model.weights])
            np.savez(tmp / "optimizer.npz", **opt_state)
            np.savez(tmp / "metrics.npz", *metric_values)
            np.savez(tmp / "rng.npz", *seed_generator_states(model))
            with open(tmp / "callbacks.pkl", "wb") as f:
                cloudpickle.dump([callback_state(cb) for cb in self.user_callbacks], f)

        ckpt = CheckpointStore(self.run.checkpoints).save(self.global_step, meta, write)
        seconds = time.monotonic() - t0
        self.last_save_seconds = seconds
        self.last_save_time = time.monotonic()
        self.channel.send(
            CheckpointSaved(epoch=self.epoch, step=self.global_step, seconds=seconds, bytes=ckpt.nbytes,
                            path=str(ckpt.path), reason=reason)
        )

    def restore_checkpoint(self, model: Any) -> int | None:
        import cloudpickle
        import numpy as np

        from .._checkpoint import CheckpointStore

        def on_corrupt(path: Path, why: str) -> None:
            self.channel.send(Notice(event="checkpoint_corrupt", fields={"path": str(path), "reason": why}))

        ckpt = CheckpointStore(self.run.checkpoints).latest(on_corrupt=on_corrupt)
        if ckpt is None:
            return None
        meta = ckpt.meta
        with np.load(ckpt.file("weights.npz")) as z:
            weights = [z[f"arr_{i}"] for i in range(len(z.files))]
        if len(weights) != len(model.weights):
            raise RuntimeError(
                f"Checkpoint {ckpt.path} holds {len(weights)} weights; the model has {len(model.weights)}."
            )
        for var, value in zip(model.weights, weights):
            var.assign(value)
        with np.load(ckpt.file("optimizer.npz")) as z:
            opt_state = {k: z[k] for k in z.files}
        saved_batch = (meta.get("plan") or {}).get("batch_size")
        skipped = restore_optimizer_state(model, opt_state, saved_batch=saved_batch, batch=self.plan.batch_size)
        accum = self.plan.grad_accum_steps
        self.window_pos = int(_inner_optimizer(model.optimizer)._iterations.numpy()) % accum if accum > 1 else 0
        if skipped:
            self.channel.send(Notice(event="optimizer_state_skipped", fields={"keys": skipped[:20]}))
        if int(meta["offset"]) > 0:
            # Only a resume inside an epoch continues its running metrics; at an epoch boundary the
            # next epoch starts them fresh, as Keras resets metrics at each epoch begin.
            with np.load(ckpt.file("metrics.npz")) as z:
                self.metric_values = [z[f"arr_{i}"] for i in range(len(z.files))]
        with np.load(ckpt.file("rng.npz")) as z:
            states = [z[f"arr_{i}"] for i in range(len(z.files))]
        restore_seed_generator_states(model, states)
        with open(ckpt.file("callbacks.pkl"), "rb") as f:
            self.callback_states = cloudpickle.load(f)
        self.epoch = int(meta["epoch"])
        self.offset = int(meta["offset"])
        self.global_step = int(meta["global_step"])
        self.history = {k: list(v) for k, v in meta["history"].items()}
        self.epochs_done = list(meta["epochs_done"])
        self.lr_scale_saved = float(meta.get("lr_scale", 1.0))
        self.stopped = bool(meta.get("stopped", False))
        self.last_logs = meta.get("last_logs")  # on_train_end gets them, as model.fit's callbacks do
        return ckpt.step

    # -- channel

    def beat(self, phase: str, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self.last_beat >= 0.25:
            self.last_beat = now
            self.channel.send(Heartbeat(phase=phase, epoch=self.epoch, step=self.global_step,  # type: ignore[arg-type]
                                        step_seconds=self.step_seconds, timed_steps=self.timed_steps,
                                        timed_seconds=self.timed_seconds))

    # -- faults

    def fire_due_faults(self, model: Any) -> None:
        if self.global_step not in self._fault_steps:
            return  # the common case: one set lookup per step
        fired = self.fired.load()
        for fault in self.spec.faults:
            if fault.step == self.global_step and fault.key not in fired:
                self.fired.record(fault)
                self.channel.send(FaultFired(kind=fault.kind, step=self.global_step, key=fault.key))
                _inject(fault, model, self)

    # -- main

    def run_training(self) -> None:
        tf = _configure_tf(self.spec)
        import keras

        keras.utils.set_random_seed(self.spec.seed)
        objects = load_objects(self.run)
        model = build_model(self.run, self.spec, self.plan, objects)
        self.user_callbacks = list(objects.get("callbacks", []))
        resumed_from = self.restore_checkpoint(model)
        if resumed_from is None and objects.get("initial_rng") is not None:
            restore_seed_generator_states(model, objects["initial_rng"])
        self._apply_lr_scale(model)
        try:
            log_to_tensorboard(self.run, self.user_callbacks, self.plan, self.global_step)
        except Exception as exc:  # logging must never stop the training
            self.channel.send(Notice(event="tensorboard_log_failed", fields={"error": repr(exc)}))
        self.channel.send(Hello(pid=os.getpid(), epoch=self.epoch, step=self.global_step, resumed_from=resumed_from))

        from ..data.dispatch import make_source

        source = make_source(self.spec, self.run, objects)
        self.samples_per_step = source.samples_per_step(self.plan)  # a PyDataset counts batches
        val = source.validation(self.plan)
        self._configure_checkpointing()
        verbose = self.spec.verbose
        head = _Head(self, model)
        tail = _Tail(self, model, head)
        callbacks = keras.callbacks.CallbackList(
            [head, _NanWatch(self), *self.user_callbacks, tail], add_history=True, add_progbar=verbose != 0, model=model,
            verbose=verbose, epochs=self.spec.epochs, steps=None,
        )
        callbacks = _ContinuingCallbackList.wrap(callbacks, self)
        started = False
        while self.epoch < self.spec.epochs and not self.stopped:
            ds, steps = source.epoch(self.plan, self.epoch, self.offset)
            self.steps_per_epoch = None if steps is None else steps + self.offset // self.samples_per_step
            if self.metric_values is not None and len(model.metrics_variables) != len(self.metric_values):
                # Compiled metrics are built lazily at the first traced step; build them now so the
                # resumed epoch's running metrics can be restored before that step.
                # Peek through a fresh dataset: iterating the epoch's own would advance a factory's
                # reshuffle_each_iteration state, and the epoch would no longer be the same.
                model._symbolic_build(data_batch=next(iter(source.epoch(self.plan, self.epoch, self.offset)[0])))
            callbacks.set_params({"verbose": verbose, "epochs": self.spec.epochs, "steps": steps})
            if not started:
                callbacks.begin_training()
                started = True
            model.fit(ds, epochs=self.epoch + 1, initial_epoch=self.epoch, callbacks=callbacks,
                      validation_data=val, verbose=verbose, shuffle=False, **validation_args(self.spec))
            if model.stop_training:
                break  # EarlyStopping or the like: the training ends as model.fit's would
        if not started:
            self._begin_without_epochs(callbacks, source)
        callbacks.end_training(self.last_logs)
        del tf
        self.save_checkpoint(model, "final")
        atomic_write_text(self.run.result_json, json.dumps({
            "history": self.history, "epochs_done": self.epochs_done, "global_step": self.global_step,
            "attempt": self.attempt, "stopped_early": bool(self.stopped and self.epoch < self.spec.epochs),
            "steps": self.steps_per_epoch,
        }))

    def _begin_without_epochs(self, callbacks: Any, source: Any) -> None:
        """Nothing left to train (a finished run, ``epochs=0``): still a training begin and end, as model.fit."""
        try:
            self.steps_per_epoch = source.epoch(self.plan, self.epoch, 0)[1]
        except Exception:  # only History.params["steps"] depends on it
            self.steps_per_epoch = None
        callbacks.set_params({"verbose": self.spec.verbose, "epochs": self.spec.epochs, "steps": self.steps_per_epoch})
        callbacks.begin_training()

    def _apply_lr_scale(self, model: Any) -> None:
        ratio = self.plan.learning_rate_scale / self.lr_scale_saved
        inner = _inner_optimizer(model.optimizer)
        lr = getattr(inner, "_learning_rate", None)
        if ratio != 1.0 and hasattr(lr, "assign"):
            lr.assign(float(lr.numpy()) * ratio)

    def _configure_checkpointing(self) -> None:
        self.every_steps = self.spec.checkpoint_every_steps
        self.every_seconds = self.spec.checkpoint_every_seconds

    def checkpoint_due(self) -> bool:
        if self.window_pos:
            return False  # mid accumulation window: wait for the optimizer update
        if self.every_steps is not None:
            return self.global_step % self.every_steps == 0
        elapsed = time.monotonic() - self.last_save_time
        if self.every_seconds is not None:
            return elapsed >= self.every_seconds
        # "auto": saving costs under 2% of training time, and never more than 5 minutes go unsaved.
        interval = max(50.0 * self.last_save_seconds, 30.0)
        return elapsed >= min(interval, 300.0)


class _Head:
    """First callback: step accounting, checkpoints, preemption, faults and heartbeats.

    Everything per step happens in ``on_train_batch_begin``: when step N+1 begins, step N is done,
    so that is where it is counted and, when due, checkpointed. No hook here reads the step's logs,
    so Keras keeps dispatching batch-end work asynchronously and the training loop never waits on
    us (a batch-end hook would force a device sync every step). Steps per call follow Keras's
    batch indices, so ``steps_per_execution > 1`` is counted right.
    """

    def __new__(cls, attempt: Attempt, model: Any) -> Any:
        import keras

        class Head(keras.callbacks.Callback):
            def __init__(self) -> None:
                super().__init__()
                self.t0: float | None = None
                self.begun: int | None = None  # batch index of the step in flight this epoch
                self.epoch_steps = 0

            def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
                attempt.train_metric_values = None
                if attempt.metric_values is not None:
                    # Resuming mid-epoch: the epoch's running metrics continue from the checkpoint.
                    for var, value in zip(model.metrics_variables, attempt.metric_values):
                        var.assign(value)
                    attempt.metric_values = None
                self.begun, self.t0 = None, None
                self.epoch_steps = int((self.params or {}).get("steps") or 0)
                attempt.channel.send(_epoch_begin(attempt, epoch, (self.params or {}).get("steps")))
                attempt.beat("train", force=True)

            def finish_steps(self, upto: int, timed: bool = True) -> None:
                """Account for the steps from the one in flight up to batch index ``upto`` (exclusive).

                ``timed``: the time since the step began was all training (not so at an epoch's end,
                which follows validation), so it counts toward the throughput the supervisor reads.
                """
                if self.begun is None:
                    return
                done = max(0, upto - self.begun)
                self.begun = None
                now = time.monotonic()
                if self.t0 is not None and done:
                    dt = (now - self.t0) / done
                    attempt.step_seconds = dt if attempt.step_seconds is None else max(dt, 0.9 * attempt.step_seconds)
                    if timed:
                        attempt.timed_steps += done
                        attempt.timed_seconds += now - self.t0
                attempt.check_nan()
                attempt.global_step += done
                attempt.window_pos = (attempt.window_pos + done) % attempt.plan.grad_accum_steps
                attempt.offset += done * attempt.samples_per_step
                if not attempt.first_step_reported and done:
                    attempt.first_step_reported = True
                    attempt.channel.send(Notice(event="first_step", fields={
                        "epoch": attempt.epoch, "step": attempt.global_step,
                        "seconds_since_start": round(time.monotonic() - attempt.started, 3)}))

            def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
                if self.begun is not None:
                    self.finish_steps(batch)
                    if _State.sigterm.is_set() and not attempt.window_pos:
                        # At an optimizer update: a window cut short could not continue under
                        # another plan. (Finishing one takes fewer than grad_accum_steps steps.)
                        attempt.save_checkpoint(model, "preempted")
                        raise Preempted()
                    if attempt.checkpoint_due():
                        attempt.save_checkpoint(model, "interval")
                attempt.fire_due_faults(model)
                attempt.beat("train")
                self.begun, self.t0 = batch, time.monotonic()

            def on_test_begin(self, logs: Any = None) -> None:
                # The validation is about to reset the metric variables it shares with training.
                import numpy as np

                attempt.train_metric_values = [np.asarray(v.numpy()) for v in model.metrics_variables]

            def on_test_batch_begin(self, batch: int, logs: Any = None) -> None:
                attempt.beat("validate")

            def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
                if attempt.train_metric_values is None:  # no validation: taken before a callback could evaluate
                    self.on_test_begin()
                # What model.fit passes to on_train_end: the epoch's logs before callbacks add to them
                # (ReduceLROnPlateau adds learning_rate).
                attempt.last_logs = {k: float(v) for k, v in (logs or {}).items()}

        return Head()


class _NanWatch:
    """Checks each step's loss off the training thread (Keras dispatches it asynchronously)."""

    def __new__(cls, attempt: Attempt) -> Any:
        import keras

        class NanWatch(keras.callbacks.Callback):
            async_safe = True

            def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
                loss = (logs or {}).get("loss")
                if loss is None or attempt.nan_seen is not None:
                    return
                value = float(loss)
                if not math.isfinite(value):
                    attempt.nan_seen = (attempt.global_step, value)

        return NanWatch()


class _Tail:
    """Last callback: the epoch's last step, history, the epoch-end checkpoint."""

    def __new__(cls, attempt: Attempt, model: Any, head: Any) -> Any:
        import keras

        class Tail(keras.callbacks.Callback):
            def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
                head.finish_steps(head.epoch_steps, timed=False)
                logs = {k: float(v) for k, v in (logs or {}).items()}
                for key, value in logs.items():
                    attempt.history.setdefault(key, []).append(value)
                attempt.epochs_done.append(epoch)
                attempt.epoch = epoch + 1
                attempt.offset = 0
                attempt.stopped = bool(model.stop_training and attempt.epoch < attempt.spec.epochs)
                attempt.channel.send(EpochEnd(epoch=epoch, step=attempt.global_step, logs=logs))
                attempt.save_checkpoint(model, "epoch_end")
                if _State.sigterm.is_set():
                    raise Preempted()

        return Tail()


def _epoch_begin(attempt: Attempt, epoch: int, steps: Any) -> EpochBegin:
    """How much of the run is left under this attempt's plan (the supervisor's probe horizon)."""
    per_step = max(1, attempt.samples_per_step)
    known = steps is not None
    return EpochBegin(epoch=epoch, step=attempt.global_step, epochs=attempt.spec.epochs,
                      steps=int(steps) if known else None,
                      steps_per_epoch=int(steps) + attempt.offset // per_step if known else None,
                      samples_per_step=per_step)


class _ContinuingCallbackList:
    """Makes per-epoch fit calls look like one training to user callbacks.

    ``on_train_begin`` runs once per process, followed by restoring the callbacks' saved state;
    ``on_train_end`` runs once, when the whole training ends.
    """

    @staticmethod
    def wrap(cbl: Any, attempt: Attempt) -> Any:
        class Continuing(cbl.__class__):
            def on_train_begin(self, logs: Any = None) -> None:
                pass

            def on_train_end(self, logs: Any = None) -> None:
                pass

            def begin_training(self) -> None:
                super().on_train_begin()
                if attempt.callback_states is not None:
                    for cb, state in zip(attempt.user_callbacks, attempt.callback_states):
                        cb.__dict__.update(state)

            def end_training(self, logs: Any = None) -> None:
                super().on_train_end(logs)

        cbl.__class__ = Continuing
        return cbl


def validation_args(spec: RunSpec) -> dict[str, Any]:
    """fit's validation_steps and validation_freq, for the worker's one-epoch fit calls.

    Each call trains epoch ``e`` as ``initial_epoch=e``, and Keras counts ``validation_freq`` in
    absolute epochs and restarts the validation data for every evaluation, so both mean what they
    mean in one model.fit call.
    """
    freq = spec.validation_freq
    return {"validation_steps": spec.validation_steps,
            "validation_freq": list(freq) if isinstance(freq, tuple) else freq}


# --------------------------------------------------------------------------- TensorBoard


def log_to_tensorboard(run: RunDir, callbacks: list[Any], plan: Plan, step: int) -> None:
    """Add the run's incidents and plan changes to each TensorBoard callback's log directory.

    Written under ``<log_dir>/resilient`` as text (one entry per incident) and scalars (batch size,
    effective batch, incident count), each at the global step where it happened; every incident
    is written once, whichever attempt gets to it first.
    """
    import keras

    boards = [cb for cb in callbacks if isinstance(cb, keras.callbacks.TensorBoard)]
    if not boards:
        return
    import tensorflow as tf

    marker = run.path / "tensorboard_logged.json"
    try:
        logged = set(json.loads(marker.read_text()))
    except (OSError, ValueError):
        logged = set()
    incidents = [e for e in run.read_events() if e.get("event") == "incident"]
    new = [e for e in incidents if f"{e.get('attempt')}:{e.get('kind')}" not in logged]
    for board in boards:
        with tf.summary.create_file_writer(os.path.join(board.log_dir, "resilient")).as_default():
            for i, e in enumerate(incidents):
                if e not in new:
                    continue
                at = int(e.get("step") or 0)
                after = e.get("plan_after") or {}
                text = (f"**{e['kind']}** (attempt {e['attempt']}, epoch {e.get('epoch')}, step {at}): "
                        f"{e.get('detail', '')}  \naction: {e.get('action', '')}")
                tf.summary.text("resilient/incidents", text, step=at)
                tf.summary.scalar("resilient/incident_count", i + 1, step=at)
                if after:
                    tf.summary.scalar("resilient/batch_size", after.get("batch_size", 0), step=at)
            tf.summary.scalar("resilient/batch_size", plan.batch_size, step=step)
            tf.summary.scalar("resilient/effective_batch", plan.effective_batch, step=step)
            tf.summary.text("resilient/plan", plan.describe(), step=step)
    logged |= {f"{e.get('attempt')}:{e.get('kind')}" for e in new}
    atomic_write_text(marker, json.dumps(sorted(logged)))


# --------------------------------------------------------------------------- faults


def _inject(fault: Fault, model: Any, attempt: Attempt) -> None:
    """Meet ``fault`` through the real mechanism."""
    kind = fault.kind
    sys.stdout.flush()
    sys.stderr.flush()
    if kind == "gpu_oom":
        import tensorflow as tf

        raise tf.errors.ResourceExhaustedError(
            None, None, f"OOM when allocating tensor (rehearsed fault {fault.key})"
        )
    if kind == "host_oom":
        _eat_memory()
    elif kind == "segfault":
        ctypes.string_at(0)
    elif kind == "abort":
        os.abort()
    elif kind == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == "hang":
        while True:
            time.sleep(3600)
    elif kind == "preempt":
        # The supervisor sends SIGTERM on this fault's message; wait for it, bounded.
        deadline = time.monotonic() + 30
        while not _State.sigterm.is_set() and time.monotonic() < deadline:
            time.sleep(0.01)
    elif kind == "nan":
        var = model.trainable_variables[0]
        import numpy as np

        var.assign(np.full(var.shape, np.nan, dtype=var.dtype))


def _eat_memory() -> None:
    """Allocate and touch memory until the memory limit kills us (bounded; MemoryError past the bound)."""
    import numpy as np
    import psutil

    time.sleep(0.5)  # let the supervisor arm a rehearsal limit when the run has none
    chunks = []
    bound = psutil.virtual_memory().available - (1 << 30)
    total = 0
    while total < bound:
        chunks.append(np.ones(32 << 20, dtype=np.uint8))
        total += 32 << 20
        time.sleep(0.002)
    raise MemoryError(f"allocated {total} bytes without reaching a memory limit")


# --------------------------------------------------------------------------- entry point


def classify_exception(exc: BaseException) -> str:
    """The incident kind the worker reports for an exception."""
    if isinstance(exc, NanLoss):
        return "nan_loss"
    if isinstance(exc, MemoryError):
        return "host_oom"
    name = type(exc).__name__
    text = str(exc)
    if name == "ResourceExhaustedError" or "OOM when allocating" in text or "out of memory" in text.lower():
        if "CUDA" in text or "GPU" in text or "OOM when allocating" in text or name == "ResourceExhaustedError":
            return "gpu_oom"
    cause = exc.__cause__ or exc.__context__
    if cause is not None and cause is not exc:
        inner = classify_exception(cause)
        if inner in {"gpu_oom", "host_oom"}:
            return inner
    return "user_error"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m resilient.worker.attempt")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--attempt", type=int, required=True)
    parser.add_argument("--channel-fd", type=int, default=None)
    parser.add_argument("--supervisor-pid", type=int, required=True)
    parser.add_argument("--plan", default=None, help="this attempt's plan (JSON); default: run_dir/plan.json")
    args = parser.parse_args(argv)
    _setup_process(args.supervisor_pid)
    channel = ChannelWriter(args.channel_fd)
    run = RunDir(args.run_dir)
    attempt_dir = run.attempt_dir(args.attempt)
    attempt_dir.mkdir(parents=True, exist_ok=True)
    channel.send(Heartbeat(phase="startup", epoch=0, step=0))
    attempt: Attempt | None = None
    try:
        attempt = Attempt(run, args.attempt, channel, plan_file=args.plan)
        attempt.run_training()
    except Preempted:
        _write_report(attempt_dir, "preempted", None, attempt)
        return EXIT_PREEMPTED
    except BaseException as exc:
        if isinstance(exc, SystemExit) and exc.code in (0, None):
            raise
        _write_report(attempt_dir, classify_exception(exc), exc, attempt)
        traceback.print_exc()
        return EXIT_REPORTED
    return 0


def _write_report(attempt_dir: Path, kind: str, exc: BaseException | None, attempt: Attempt | None) -> None:
    report = {
        "kind": kind,
        "type": type(exc).__name__ if exc else None,
        "message": str(exc) if exc else "",
        "traceback": "".join(traceback.format_exception(exc)) if exc else "",
        "epoch": attempt.epoch if attempt else None,
        "step": attempt.global_step if attempt else None,
    }
    atomic_write_text(attempt_dir / "error.json", json.dumps(report))


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: TensorFlow's can hang or crash after a failed step.
    os._exit(code)
