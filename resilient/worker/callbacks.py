"""The worker's Keras callbacks, around the user's: ``[Head, NanWatch, *user callbacks, Tail]``.

- ``Head`` (first): step accounting, checkpoints, preemption, rehearsed faults, heartbeats.
- ``NanWatch``: notices a non-finite loss off the training thread.
- ``Tail`` (last): the epoch's last step, history, the epoch-end checkpoint; it runs after the
  user's callbacks so the checkpoint holds what they did to the epoch (EarlyStopping's decision).
- ``ContinuingCallbackList``: the list ``model.fit`` gets. The worker trains an attempt's epochs in
  one fit call (or, for a dataset factory, one call per epoch: the list makes those calls look like
  one training to the user's callbacks); it sets each epoch's steps as the epoch begins.

They keep no training state of their own beyond the step in flight: the ``Attempt`` owns it.
Only the worker imports this module (it imports Keras).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import keras

from .attempt import Preempted

if TYPE_CHECKING:
    from .attempt import Attempt


#: The running logs go to the caller's display at most this often (seconds).
LOGS_INTERVAL = 0.4


class Head(keras.callbacks.Callback):
    """First callback: step accounting, checkpoints, preemption, faults and heartbeats.

    Everything per step happens in ``on_train_batch_begin``: when step N+1 begins, step N is done,
    so that is where it is counted and, when due, checkpointed. No hook here reads the step's logs,
    so Keras keeps dispatching batch-end work asynchronously and the training loop never waits on
    us (a batch-end hook would force a device sync every step). Steps per call follow Keras's
    batch indices, so ``steps_per_execution > 1`` is counted right.
    """

    def __init__(self, attempt: Attempt) -> None:
        super().__init__()
        self.attempt = attempt
        self.t0: float | None = None
        self.begun: int | None = None  # batch index of the step in flight this epoch
        self.epoch_steps = 0

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        steps = (self.params or {}).get("steps")
        self.begun, self.t0 = None, None
        self.epoch_steps = int(steps or 0)
        self.attempt.begin_epoch(self.model, epoch, steps)

    def finish_steps(self, upto: int, timed: bool = True) -> None:
        """Account for the steps from the one in flight up to batch index ``upto`` (exclusive).

        ``timed``: the time since the step began was all training (not so at an epoch's end,
        which follows validation), so it counts toward the throughput the supervisor reads.
        """
        if self.begun is None:
            return
        done = max(0, upto - self.begun)
        seconds = None if self.t0 is None else time.monotonic() - self.t0
        self.begun = None
        self.attempt.count_steps(done, seconds, timed=timed)

    def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
        if self.begun is not None:
            self.finish_steps(batch)
            self.attempt.between_steps(self.model)
        self.attempt.faults.at(self.attempt.global_step, self.model)
        self.attempt.beat("train")
        self.begun, self.t0 = batch, time.monotonic()

    def on_test_begin(self, logs: Any = None) -> None:
        # The validation is about to reset the metric variables it shares with training.
        self.attempt.keep_training_metrics(self.model)

    def on_test_batch_begin(self, batch: int, logs: Any = None) -> None:
        self.attempt.beat("validate")

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        if self.attempt.train_metric_values is None:  # no validation: taken before a callback could evaluate
            self.attempt.keep_training_metrics(self.model)
        # What model.fit passes to on_train_end: the epoch's logs before callbacks add to them
        # (ReduceLROnPlateau adds learning_rate).
        self.attempt.last_logs = {k: float(v) for k, v in (logs or {}).items()}


class NanWatch(keras.callbacks.Callback):
    """Checks each step's loss off the training thread (Keras dispatches it asynchronously)."""

    async_safe = True

    def __init__(self, attempt: Attempt) -> None:
        super().__init__()
        self.attempt = attempt
        self.logs_taken = 0.0

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        self._take_logs(logs)
        loss = (logs or {}).get("loss")
        if loss is None or self.attempt.nan_seen is not None:
            return
        value = float(loss)
        if not math.isfinite(value):
            self.attempt.nan_seen = (self.attempt.global_step, value)

    def _take_logs(self, logs: Any) -> None:
        """The running logs for the caller's display, at most every ``LOGS_INTERVAL`` seconds (here, off the
        training thread, reading them costs the training nothing)."""
        now = time.monotonic()
        if not logs or now - self.logs_taken < LOGS_INTERVAL:
            return
        self.logs_taken = now
        try:
            values = {str(k): float(v) for k, v in list(logs.items())[:16]}
        except (TypeError, ValueError):
            return  # a metric that is not a scalar: the display shows the epoch's logs at its end
        # JSON has no NaN: a non-finite value would spoil the whole heartbeat (the NaN watch reports it).
        self.attempt.running_logs = {k: v for k, v in values.items() if math.isfinite(v)}


class Tail(keras.callbacks.Callback):
    """Last callback: the epoch's last step, history, the epoch-end checkpoint."""

    def __init__(self, attempt: Attempt, head: Head) -> None:
        super().__init__()
        self.attempt = attempt
        self.head = head

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        self.head.finish_steps(self.head.epoch_steps, timed=False)
        self.attempt.end_epoch(self.model, epoch, {k: float(v) for k, v in (logs or {}).items()})
        if self.attempt.sigterm.is_set():
            self.attempt.finish_writes(timeout=None)  # the epoch's checkpoint is on disk before the exit
            raise Preempted()


class ContinuingCallbackList(keras.callbacks.CallbackList):
    """The worker's fit calls, seen by user callbacks as one training.

    ``model.fit`` calls ``on_train_begin`` and ``on_train_end`` once per call; both are silenced.
    ``begin_training`` runs the real begin once per process, then gives the user's callbacks their
    saved state; ``end_training`` the real end, once the whole training ends.

    ``epoch_begins(epoch) -> steps``: when set, called as each epoch begins, before any callback; the
    epoch's steps become ``params["steps"]`` (a resumed epoch has fewer). In one fit call over epochs
    of different lengths, Keras bounds every epoch by the longest; a batch it begins at or past the
    epoch's steps ends the epoch here (``StopIteration``, which Keras's epoch iterator takes as the end
    of the data) before any callback sees it. Letting Keras find the end itself would cost a call of
    the train function on an exhausted iterator, which still advances the optimizer's step count.
    """

    def __init__(self, callbacks: list[Any], *, resume_states: list[tuple[Any, dict[str, Any]]] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(callbacks, **kwargs)
        self._resume_states = list(resume_states or [])
        self.epoch_begins: Callable[[int], int | None] | None = None

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        if self.epoch_begins is not None:
            steps = self.epoch_begins(epoch)
            self.set_params({**(self.params or {}), "steps": steps})
        super().on_epoch_begin(epoch, logs)

    def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
        steps = (self.params or {}).get("steps")
        if steps is not None and batch >= steps:
            raise StopIteration  # past the epoch's end: no step may run here
        super().on_train_batch_begin(batch, logs)

    def on_train_begin(self, logs: Any = None) -> None:
        pass

    def on_train_end(self, logs: Any = None) -> None:
        pass

    def begin_training(self) -> None:
        super().on_train_begin()
        for cb, state in self._resume_states:
            cb.__dict__.update(state)

    def end_training(self, logs: Any = None) -> None:
        super().on_train_end(logs)
