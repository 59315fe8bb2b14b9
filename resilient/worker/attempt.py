"""One training attempt: restore the latest checkpoint, build model and data for the plan, train, report.

One ``model.fit`` call trains all the epochs of an attempt, over one dataset whose content each epoch
sets as it begins (``data.base.EpochStream``), so a resumed epoch is shorter and no epoch boundary pays
for a new fit call's set-up. A dataset factory is made again in Python per epoch: there the worker calls
``model.fit`` once per epoch (journaled: ``fit_call`` with ``mode="per_epoch"`` and why). User callbacks
see one uninterrupted training either way (``callbacks.ContinuingCallbackList``).
The attempt owns the training's progress (epoch, step, history); the callbacks move it forward and
``state`` writes it into checkpoints. It reports over the channel and never decides what happens
after a failure: an exception unwinds to ``__main__``, which writes it down and exits.

Keras is imported lazily (in ``run_training``), so ``__main__`` can arm the process and send its
first heartbeat before TensorFlow's import takes seconds.
"""

from __future__ import annotations

import math
import os
import threading
import time
from pathlib import Path
from typing import Any

from .._checkpoint import BackgroundWriter, CheckpointStore
from .._faults import FiredFaults
from .._plan import Plan
from .._protocol import (
    ChannelWriter,
    CheckpointMeta,
    CheckpointSaved,
    EpochBegin,
    EpochEnd,
    Heartbeat,
    Hello,
    Notice,
    TrainingResult,
)
from .._rundir import RunDir, RunSpec
from . import state
from .faults import FaultSchedule

#: Saves written on the training thread whatever the cadence: the worker exits or reports right after them
#: (``preempted``, ``final``), or memory may run out before a background write would end (``memory_pressure``).
SYNC_REASONS = frozenset({"preempted", "final", "memory_pressure"})
#: ``checkpoint_every="auto"``: the training thread's share of a checkpoint (its snapshot) stays under this
#: fraction of the training time, and so does the background write's processor time per core.
AUTO_COST = 0.01
#: ``checkpoint_every="auto"``: never more often than this (seconds), never less often.
AUTO_FLOOR = 5.0
AUTO_CEILING = 300.0


def auto_interval(snapshot_seconds: float | None, write_seconds: float | None = None,
                  write_cpu_seconds: float | None = None, cpus: int = 1) -> float:
    """Seconds between ``checkpoint_every="auto"`` checkpoints, from the last save's measured costs.

    ``max(snapshot / 1%, write CPU / cpus / 1%, 2 x write)``, clamped to [5 s, 300 s]: the snapshot
    (the training thread's pause) and the background write's processor time stay under 1% of the
    training time, and a write ends well before the next snapshot would wait for it. Before the first
    save is measured: the floor.
    """
    interval = max((snapshot_seconds or 0.0) / AUTO_COST, (write_cpu_seconds or 0.0) / max(1, cpus) / AUTO_COST,
                   2.0 * (write_seconds or 0.0))
    return min(max(interval, AUTO_FLOOR), AUTO_CEILING)

#: Set to "1" in the worker's environment: one ``model.fit`` call per epoch for every input kind (as
#: before one call trained all the epochs of an attempt); for measurement, and as a way out.
PER_EPOCH_ENV = "RESILIENT_FIT_PER_EPOCH"


class Preempted(BaseException):
    """Raised inside fit after the SIGTERM checkpoint was saved; unwinds to a clean exit."""


class NanLoss(Exception):
    """The training loss became NaN or infinite."""


class Attempt:
    """Everything one worker process does, in order: restore, build, train, report."""

    def __init__(self, run: RunDir, attempt: int, channel: ChannelWriter, plan_file: str | None = None,
                 sigterm: threading.Event | None = None, pressure: threading.Event | None = None) -> None:
        self.run = run
        self.attempt = attempt
        self.channel = channel
        #: Set by the SIGTERM handler: save a checkpoint at the next optimizer update and exit.
        self.sigterm = sigterm if sigterm is not None else threading.Event()
        #: Set by the SIGUSR1 handler (the supervisor saw memory pressure): save a checkpoint at the next update.
        self.pressure = pressure if pressure is not None else threading.Event()
        self.spec = run.read_spec()
        # The supervisor hands each attempt its plan (a probe may differ from the settled plan.json).
        self.plan = Plan.model_validate_json(Path(plan_file).read_text()) if plan_file else run.read_plan()
        self.faults = FaultSchedule(self.spec.faults, FiredFaults(run.faults_fired), channel, self.sigterm)
        self.store = CheckpointStore(run.checkpoints)
        self.writer = BackgroundWriter()  # asynchronous checkpoint writes, one at a time
        self.faults.settle = self.finish_writes
        # Progress: what a checkpoint's meta records (a checkpoint's values override these).
        self.epoch = self.spec.initial_epoch  # fit's initial_epoch
        self.offset = 0  # samples into the current epoch
        self.global_step = 0
        self.history: dict[str, list[float]] = {}
        self.epochs_done: list[int] = []
        self.stopped = False  # a callback stopped the training before its last epoch
        self.last_logs: dict[str, float] | None = None
        self.lr_scale_saved = 1.0
        # Restored from a checkpoint, handed on once.
        self.callback_states: list[dict[str, Any]] | None = None
        self.metric_values: list[Any] | None = None
        # The training metrics' state of the finished epoch, taken when its validation began (Keras
        # shares metric objects between training and evaluation); what an epoch-end checkpoint stores.
        self.train_metric_values: list[Any] | None = None
        self.steps_per_epoch: int | None = None  # a whole epoch's steps, as in History.params
        self.window_pos = 0  # micro-steps into the current gradient-accumulation window
        self.samples_per_step = self.plan.batch_size
        self.user_callbacks: list[Any] = []
        self.nan_seen: tuple[int, float] | None = None  # (step, loss) noticed by the NaN watch
        #: The epoch's running logs, taken by the NaN watch a few times a second; the next heartbeat sends them.
        self.running_logs: dict[str, float] | None = None
        # Timing: heartbeats, throughput and the checkpoint interval.
        self.started = time.monotonic()
        self.first_step_reported = False
        self.last_save_time = time.monotonic()
        self.last_save_seconds = 0.0  # the training thread's part of the last save
        self.last_snapshot_seconds: float | None = None
        self.last_write_seconds: float | None = None  # set by the writer thread
        self.last_write_cpu_seconds: float | None = None
        self.last_beat = 0.0
        self.last_beat_step = -1  # the step the channel last heard
        self.step_seconds: float | None = None
        self.timed_steps = 0
        self.timed_seconds = 0.0

    # ------------------------------------------------------------------------------- the training

    def run_training(self) -> None:
        """Train to the end of the run (or to a callback's stop), then save the final checkpoint and result."""
        from ..data.dispatch import make_source
        from .devices import strategy_scope

        _configure_tf(self.spec)
        # Everything under the strategy's scope: the model's and the optimizer's variables, and the
        # metrics Keras builds at the first step, are all mirrored over the devices.
        with strategy_scope(self._devices()):
            model, objects = self._prepare()
            source = make_source(self.spec, self.run, objects)
            for fields in source.folder_reads:  # a local copy of an image folder, or why not (local_copy.py)
                self.channel.send(Notice(event="folder_read", fields=fields))
            self.samples_per_step = source.samples_per_step(self.plan)  # a PyDataset counts batches
            callbacks = self._callback_list(model)
            if not self._train(model, source, callbacks):
                self._begin_without_epochs(callbacks, source)
            callbacks.end_training(self.last_logs)
            self.save_checkpoint(model, "final")
        state.write_result(self.run, TrainingResult(
            history=self.history, epochs_done=self.epochs_done, global_step=self.global_step, attempt=self.attempt,
            stopped_early=bool(self.stopped and self.epoch < self.spec.epochs), steps=self.steps_per_epoch))

    def _prepare(self) -> tuple[Any, dict[str, Any]]:
        """The model built for the plan and restored; then the hello."""
        import keras

        self.beat("restore", force=True)  # the supervisor times the start-up phases (import, restore)
        from .model import build_model
        from .tensorboard import log_to_tensorboard

        keras.utils.set_random_seed(self.spec.seed)
        objects = _load_objects(self.run)
        model = build_model(self.run, self.spec, self.plan, objects)
        self.user_callbacks = list(objects.get("callbacks", []))
        resumed_from = self.restore_checkpoint(model)
        if resumed_from is None and objects.get("initial_rng") is not None:
            state.restore_seed_generator_states(model, objects["initial_rng"])
        self._apply_lr_scale(model)
        try:
            log_to_tensorboard(self.run, self.user_callbacks, self.plan, self.global_step)
        except Exception as exc:  # logging must never stop the training
            self.channel.send(Notice(event="tensorboard_log_failed", fields={"error": repr(exc)}))
        self.channel.send(Hello(pid=os.getpid(), epoch=self.epoch, step=self.global_step, resumed_from=resumed_from,
                                skip_steps=self.offset // max(1, self.plan.batch_size)))
        return model, objects

    def _devices(self) -> list[str]:
        """The devices this attempt trains on; the supervisor hears them (and a replica count the plan does not expect)."""
        from .devices import resolve

        names = resolve(self.spec.devices)
        if 1 <= self.plan.replicas < len(names):
            names = names[:self.plan.replicas]  # fewer_devices: the first of the run's devices
        self.channel.send(Notice(event="devices", fields={"devices": names, "replicas": len(names),
                                                          "plan_replicas": self.plan.replicas}))
        return names

    def _callback_list(self, model: Any) -> Any:
        from .callbacks import ContinuingCallbackList, Head, NanWatch, Tail

        head = Head(self)
        resume = list(zip(self.user_callbacks, self.callback_states)) if self.callback_states is not None else None
        # No Keras progress bar: the caller's display draws the run from the channel (the user's callbacks
        # still see params["verbose"] as given to fit).
        return ContinuingCallbackList(
            [head, NanWatch(self), *self.user_callbacks, Tail(self, head)], resume_states=resume, add_history=True,
            add_progbar=False, model=model, verbose=self.spec.verbose, epochs=self.spec.epochs, steps=None,
        )

    def _train(self, model: Any, source: Any, callbacks: Any) -> bool:
        """Train the epochs left: one ``model.fit`` call for them all, or one per epoch where the input kind
        cannot give one dataset for every epoch (``Source.epochs``: a dataset factory); whether any epoch ran."""
        if self.epoch >= self.spec.epochs or self.stopped:
            return False
        forced = os.environ.get(PER_EPOCH_ENV) == "1"
        stream = None if forced else source.epochs(self.plan)
        val = source.validation(self.plan)
        if stream is None:
            why = f"{PER_EPOCH_ENV}=1" if forced else (
                f"{self.spec.data.kind} input: its dataset is made in Python for each epoch")
            self._train_per_epoch(model, source, callbacks, val, why)
        else:
            self._train_all_epochs(model, source, stream, callbacks, val)
        return True

    def _train_all_epochs(self, model: Any, source: Any, stream: Any, callbacks: Any, val: Any) -> None:
        """One ``model.fit`` call for every epoch left, over ``stream`` (each epoch's data set as it begins)."""
        import warnings

        from ..data.base import claim_steps

        def epoch_begins(epoch: int) -> int:
            if epoch != self.epoch:
                raise RuntimeError(f"model.fit began epoch {epoch}; the attempt is at epoch {self.epoch}")
            steps = stream.begin(epoch, self.offset)
            self.steps_per_epoch = steps + self.offset // self.samples_per_step
            return steps

        first = epoch_begins(self.epoch)
        self._build_metrics(model, source)
        # Keras bounds every epoch by the dataset's cardinality: claim the longest epoch's steps (a
        # shorter one, the resumed epoch, ends when its data does).
        longest = max([first, *(stream.steps(e) for e in range(self.epoch + 1, self.spec.epochs))])
        callbacks.set_params({"verbose": self.spec.verbose, "epochs": self.spec.epochs, "steps": first})
        callbacks.begin_training()
        callbacks.epoch_begins = epoch_begins
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Your input ran out of data")
            self._fit(model, claim_steps(stream.dataset, max(1, longest)), callbacks, val, epochs=self.spec.epochs,
                      mode="all_epochs")

    def _train_per_epoch(self, model: Any, source: Any, callbacks: Any, val: Any, why: str) -> None:
        """One ``model.fit`` call per epoch left, each over the epoch's dataset made anew."""
        started = False
        while self.epoch < self.spec.epochs and not self.stopped:
            ds, steps = source.epoch(self.plan, self.epoch, self.offset)
            self.steps_per_epoch = None if steps is None else steps + self.offset // self.samples_per_step
            self._build_metrics(model, source)
            callbacks.set_params({"verbose": self.spec.verbose, "epochs": self.spec.epochs, "steps": steps})
            if not started:
                callbacks.begin_training()
                started = True
            self._fit(model, ds, callbacks, val, epochs=self.epoch + 1, mode="per_epoch", why=why)
            if model.stop_training:
                break  # EarlyStopping or the like: the training ends as model.fit's would

    def _build_metrics(self, model: Any, source: Any) -> None:
        """Before a resumed epoch: build the compiled metrics, so that its running metrics can be restored."""
        if self.metric_values is not None and len(model.metrics_variables) != len(self.metric_values):
            # Compiled metrics are built lazily at the first traced step; build them now so the
            # resumed epoch's running metrics can be restored before that step.
            # Peek through a fresh dataset: iterating the epoch's own would advance a factory's
            # reshuffle_each_iteration state, and the epoch would no longer be the same.
            model._symbolic_build(data_batch=next(iter(source.epoch(self.plan, self.epoch, self.offset)[0])))

    def _fit(self, model: Any, ds: Any, callbacks: Any, val: Any, *, epochs: int, mode: str,
             why: str | None = None) -> None:
        """``model.fit`` from the attempt's epoch up to ``epochs``; each call journaled (``fit_call``)."""
        fields: dict[str, Any] = {"initial_epoch": self.epoch, "epochs": epochs, "mode": mode}
        if why is not None:
            fields["why"] = why
        self.channel.send(Notice(event="fit_call", fields=fields))
        model.fit(ds, epochs=epochs, initial_epoch=self.epoch, callbacks=callbacks,
                  validation_data=val, verbose=0, shuffle=False, **validation_args(self.spec))

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
        lr = getattr(state.inner_optimizer(model.optimizer), "_learning_rate", None)
        if ratio != 1.0 and hasattr(lr, "assign"):
            lr.assign(float(lr.numpy()) * ratio)

    # ------------------------------------------------------------------------------- called by the callbacks

    def begin_epoch(self, model: Any, epoch: int, steps: int | None) -> None:
        """An epoch begins: its running metrics continue from the checkpoint when it resumes mid-epoch."""
        self.train_metric_values = None
        if self.metric_values is not None:
            for var, value in zip(model.metrics_variables, self.metric_values):
                var.assign(value)
            self.metric_values = None
        self.channel.send(self._epoch_begin(epoch, steps))
        self.beat("train", force=True)

    def count_steps(self, done: int, seconds: float | None, *, timed: bool) -> None:
        """``done`` steps finished in ``seconds`` (``timed``: all of it training, the supervisor's throughput)."""
        if seconds is not None and done:
            dt = seconds / done
            self.step_seconds = dt if self.step_seconds is None else max(dt, 0.9 * self.step_seconds)
            if timed:
                self.timed_steps += done
                self.timed_seconds += seconds
        self.check_nan()
        self.global_step += done
        self.window_pos = (self.window_pos + done) % self.plan.grad_accum_steps
        self.offset += done * self.samples_per_step
        if not self.first_step_reported and done:
            self.first_step_reported = True
            self.channel.send(Notice(event="first_step", fields={
                "epoch": self.epoch, "step": self.global_step,
                "seconds_since_start": round(time.monotonic() - self.started, 3)}))

    def between_steps(self, model: Any) -> None:
        """After a counted step: honour a SIGTERM or a memory-pressure request, or save a checkpoint when one is due."""
        self.writer.check()  # a background write that failed fails the training here, as one on this thread would
        if self.sigterm.is_set() and not self.window_pos:
            # At an optimizer update: a window cut short could not continue under another plan.
            # (Finishing one takes fewer than grad_accum_steps steps.)
            self.save_checkpoint(model, "preempted")
            raise Preempted()
        if self.pressure.is_set() and not self.window_pos:
            self.pressure.clear()
            self.save_checkpoint(model, "memory_pressure")
        elif self.checkpoint_due():
            self.save_checkpoint(model, "interval")

    def keep_training_metrics(self, model: Any) -> None:
        """Take the training metrics' state before a validation resets the variables it shares."""
        import numpy as np

        self.train_metric_values = [np.asarray(v.numpy()) for v in model.metrics_variables]

    def end_epoch(self, model: Any, epoch: int, logs: dict[str, float]) -> None:
        """The epoch is done (after the user's callbacks): record it and save the epoch-end checkpoint."""
        for key, value in logs.items():
            self.history.setdefault(key, []).append(value)
        self.epochs_done.append(epoch)
        self.epoch = epoch + 1
        self.offset = 0
        self.stopped = bool(model.stop_training and self.epoch < self.spec.epochs)
        self.channel.send(EpochEnd(epoch=epoch, step=self.global_step, logs=logs))
        self.save_checkpoint(model, "epoch_end")

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

    def beat(self, phase: str, force: bool = False) -> None:
        now = time.monotonic()
        board = self.channel.board
        if board is not None:  # the exact step, at every step, without a message (StepBoard)
            board.write(phase, self.epoch, self.global_step)
        if force or now - self.last_beat >= 0.25:
            self.last_beat = now
            logs, self.running_logs = self.running_logs, None
            self.channel.send(Heartbeat(phase=phase, epoch=self.epoch, step=self.global_step,  # type: ignore[arg-type]
                                        step_seconds=self.step_seconds, timed_steps=self.timed_steps,
                                        timed_seconds=self.timed_seconds, logs=logs))
        elif board is None and self.global_step != self.last_beat_step:
            # Between the throttled heartbeats, the step alone (no timing, so the supervisor's step-time
            # and throughput figures are unchanged): an incident's step is then exact, not the last heartbeat's.
            self.channel.send_step(phase, self.epoch, self.global_step)
        self.last_beat_step = self.global_step

    def _epoch_begin(self, epoch: int, steps: int | None) -> EpochBegin:
        """How much of the run is left under this attempt's plan (the supervisor's probe horizon)."""
        per_step = max(1, self.samples_per_step)
        known = steps is not None
        return EpochBegin(epoch=epoch, step=self.global_step, epochs=self.spec.epochs,
                          steps=int(steps) if known else None,
                          steps_per_epoch=int(steps) + self.offset // per_step if known else None,
                          samples_per_step=per_step)

    # ------------------------------------------------------------------------------- checkpoints

    def checkpoint_due(self) -> bool:
        if self.window_pos:
            return False  # mid accumulation window: wait for the optimizer update
        if self.spec.checkpoint_every_steps is not None:
            return self.global_step % self.spec.checkpoint_every_steps == 0
        elapsed = time.monotonic() - self.last_save_time
        if self.spec.checkpoint_every_seconds is not None:
            return elapsed >= self.spec.checkpoint_every_seconds
        return elapsed >= auto_interval(self.last_snapshot_seconds, self.last_write_seconds,
                                        self.last_write_cpu_seconds, _cpus())

    def save_checkpoint(self, model: Any, reason: str) -> None:
        """Snapshot the training state to host memory, then write it: in the background (``interval``,
        ``epoch_end``) or here (``SYNC_REASONS``, and any save once SIGTERM came). ``CheckpointSaved``
        goes out once the generation is renamed into place, so the supervisor never counts on one that
        is not on disk."""
        self.check_nan(model)  # a diverged state is never saved: the last checkpoint stays good
        self.beat("save", force=True)
        t0 = time.monotonic()
        self.writer.wait()  # one generation in flight: the previous write ends first (its error is raised here)
        t1 = time.monotonic()
        meta = CheckpointMeta(
            epoch=self.epoch, offset=self.offset, global_step=self.global_step, epochs_done=self.epochs_done,
            history=self.history, plan=self.plan.model_dump(mode="json"), attempt=self.attempt, reason=reason,
            lr_scale=self.plan.learning_rate_scale, weight_paths=[w.path for w in model.weights],
            stopped=self.stopped, last_logs=self.last_logs,
        )
        metrics = self.train_metric_values
        if metrics is None:
            import numpy as np

            metrics = [np.asarray(v.numpy()) for v in model.metrics_variables]
        snap = state.snapshot(model, meta, metrics, self.user_callbacks)
        snapshot_seconds = self.last_snapshot_seconds = time.monotonic() - t1
        midway = self.faults.during_save(self.global_step)
        background = reason not in SYNC_REASONS and not self.sigterm.is_set()

        def write() -> None:
            w0, c0 = time.monotonic(), time.thread_time()
            ckpt = state.write(self.store, snap, midway)
            self.last_write_seconds = time.monotonic() - w0
            self.last_write_cpu_seconds = time.thread_time() - c0
            self.channel.send(CheckpointSaved(
                epoch=meta.epoch, step=meta.global_step, seconds=snapshot_seconds + self.last_write_seconds,
                bytes=ckpt.nbytes, path=str(ckpt.path), reason=reason, snapshot_seconds=snapshot_seconds,
                write_seconds=self.last_write_seconds, background=background))

        if background:
            self.writer.submit(write)
        else:
            write()
            if self.channel.board is not None:  # the save is over, as its CheckpointSaved tells the supervisor
                self.channel.board.write("train", self.epoch, self.global_step)
        self.last_save_seconds = time.monotonic() - t0
        self.last_save_time = time.monotonic()

    def finish_writes(self, timeout: float = 60.0) -> None:
        """Wait (at most ``timeout`` seconds) for a background write in flight, and raise its error."""
        self.writer.wait(timeout)

    def restore_checkpoint(self, model: Any) -> int | None:
        """Load the newest checkpoint that verifies into ``model`` and take up its progress; its step."""

        def on_corrupt(path: Path, why: str) -> None:
            self.channel.send(Notice(event="checkpoint_corrupt", fields={"path": str(path), "reason": why}))

        ckpt = self.store.latest(on_corrupt=on_corrupt)
        if ckpt is None:
            return None
        restored = state.restore(ckpt, model, self.plan.batch_size)
        accum = self.plan.grad_accum_steps
        iterations = int(state.inner_optimizer(model.optimizer)._iterations.numpy())
        self.window_pos = iterations % accum if accum > 1 else 0
        if restored.skipped:
            self.channel.send(Notice(event="optimizer_state_skipped", fields={"keys": restored.skipped[:20]}))
        self.metric_values = restored.metric_values
        self.callback_states = restored.callback_states
        meta = restored.meta
        self.epoch, self.offset, self.global_step = meta.epoch, meta.offset, meta.global_step
        self.history = {k: list(v) for k, v in meta.history.items()}
        self.epochs_done = list(meta.epochs_done)
        self.lr_scale_saved = meta.lr_scale
        self.stopped = meta.stopped
        self.last_logs = meta.last_logs  # on_train_end gets them, as model.fit's callbacks do
        return restored.step


def _cpus() -> int:
    """Processors this process may run on (its affinity, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def validation_args(spec: RunSpec) -> dict[str, Any]:
    """fit's validation_steps and validation_freq, for the worker's one-epoch fit calls.

    Each call trains epoch ``e`` as ``initial_epoch=e``, and Keras counts ``validation_freq`` in
    absolute epochs and restarts the validation data for every evaluation, so both mean what they
    mean in one model.fit call.
    """
    freq = spec.validation_freq
    return {"validation_steps": spec.validation_steps,
            "validation_freq": list(freq) if isinstance(freq, tuple) else freq}


def _configure_tf(spec: RunSpec) -> None:
    """The run's devices chosen; GPU memory: capped at the run's limit on each GPU, or grown on demand
    (never all of it reserved up front). Before TensorFlow initialises its devices."""
    import tensorflow as tf

    from .devices import configure

    configure(spec.devices)
    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            if spec.gpu_memory_limit_bytes:
                mb = max(1, spec.gpu_memory_limit_bytes // (1 << 20))
                tf.config.set_logical_device_configuration(gpu, [tf.config.LogicalDeviceConfiguration(memory_limit=mb)])
            else:
                tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:
            pass  # already initialized by user code imported earlier; keep its settings


def _load_objects(run: RunDir) -> dict[str, Any]:
    """What ``fit`` carried over from the caller (builder, callbacks, custom objects, data), unpickled."""
    if not run.objects_file.exists():
        return {}
    import cloudpickle

    with open(run.objects_file, "rb") as f:
        return cloudpickle.load(f)
