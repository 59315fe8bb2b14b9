"""Fault rehearsal in the worker: each fault of the run met once, at its step, through the real mechanism.

``resilient._faults`` parses the specs and remembers which fired; this module makes them happen: a
real ``ResourceExhaustedError``, a real SIGSEGV, a real allocation until the memory limit kills us,
a real SIGKILL in the middle of a checkpoint write (``save_kill``, met by the save, not the step).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from .._faults import Fault, FiredFaults
from .._protocol import ChannelWriter, FaultFired


class FaultSchedule:
    """The run's faults, fired at their global step unless an earlier attempt already met them."""

    def __init__(self, faults: tuple[Fault, ...], fired: FiredFaults, channel: ChannelWriter,
                 sigterm: threading.Event) -> None:
        self.faults = faults
        self.fired = fired
        self.channel = channel
        self.sigterm = sigterm
        self._steps = {f.step for f in faults if f.kind != "save_kill"}
        self._save_kills = [f for f in faults if f.kind == "save_kill"]
        #: Called before a fault fires: the attempt waits there for a checkpoint write in flight, so what a
        #: rehearsed fault loses does not depend on how fast the disk was (``save_kill`` aims at the write).
        self.settle: Callable[[], None] | None = None

    def at(self, step: int, model: Any) -> None:
        """Meet every fault due at ``step`` that has not fired yet (recorded first: it never fires twice)."""
        if step not in self._steps:
            return  # the common case: one set lookup per step
        fired = self.fired.load()
        for fault in self.faults:
            if fault.step == step and fault.kind != "save_kill" and fault.key not in fired:
                if self.settle is not None:
                    self.settle()
                self._fire(fault, step)
                inject(fault, model, self.sigterm)

    def during_save(self, step: int) -> Callable[[], None] | None:
        """What a checkpoint save at ``step`` calls halfway through its write: a due ``save_kill``, or None.

        A ``save_kill`` is due at the first save at or after its step; called between payload
        files, it leaves a generation half written (before the commit rename) and the process dead.
        """
        if not self._save_kills:
            return None  # the common case
        fired = self.fired.load()
        due = [f for f in self._save_kills if f.step <= step and f.key not in fired]
        if not due:
            return None

        def kill() -> None:
            self._fire(due[0], step)
            sys.stdout.flush()
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)

        return kill

    def _fire(self, fault: Fault, step: int) -> None:
        """Record ``fault`` as fired (durably, first: it never fires twice), then tell the supervisor."""
        self.fired.record(fault)
        self.channel.send(FaultFired(kind=fault.kind, step=step, key=fault.key))


def _on_last_replica() -> str:
    """Under several devices, where a rehearsed OOM happens: on the last replica's device, named as
    TensorFlow names it in a real OOM ("on /job:localhost/replica:0/task:0/device:GPU:1"); "" on one."""
    import tensorflow as tf

    try:
        devices = tf.distribute.get_strategy().extended.worker_devices
    except Exception:  # a strategy without the attribute: the message names no device
        return ""
    return f" on {devices[-1]}" if len(devices) > 1 else ""


def inject(fault: Fault, model: Any, sigterm: threading.Event) -> None:
    """Meet ``fault`` through the real mechanism (``sigterm``: set when the supervisor's SIGTERM arrives)."""
    kind = fault.kind
    sys.stdout.flush()
    sys.stderr.flush()
    if kind == "gpu_oom":
        import tensorflow as tf

        raise tf.errors.ResourceExhaustedError(
            None, None, f"OOM when allocating tensor{_on_last_replica()} (rehearsed fault {fault.key})"
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
        # The supervisor sends SIGTERM on this fault's message; wait for it, bounded. Polled, not
        # sigterm.wait(): the handler sets the event on this same thread, inside whatever it interrupts.
        deadline = time.monotonic() + 30
        while not sigterm.is_set() and time.monotonic() < deadline:
            time.sleep(0.01)
    elif kind == "nan":
        import numpy as np

        # Every trainable variable, not only the first: an activation after a poisoned layer may
        # turn NaN into a number (ReLU's max(NaN, 0) is 0 on some CPUs), so the loss would stay
        # finite. With the output layer poisoned too, the loss is NaN on any hardware.
        for var in model.trainable_variables:
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
