"""The worker -> supervisor channel: JSON lines over a dedicated pipe (never stdout).

Every message is validated with pydantic on the supervisor side; a line that does not parse
is counted and ignored rather than trusted.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

#: Worker exit codes with a meaning of their own (any other non-zero code is a crash).
EXIT_REPORTED = 3  # error.json holds the classified exception
EXIT_PREEMPTED = 4  # SIGTERM honoured: checkpoint saved, then exit
EXIT_ORPHANED = 5  # the supervisor went away


class _Msg(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")
    t: float = Field(default_factory=time.time)


class Hello(_Msg):
    type: Literal["hello"] = "hello"
    pid: int
    epoch: int = 0
    step: int = 0
    resumed_from: int | None = None


class Heartbeat(_Msg):
    type: Literal["heartbeat"] = "heartbeat"
    phase: Literal["startup", "train", "validate", "epoch_end", "save"] = "train"
    epoch: int
    step: int
    step_seconds: float | None = None
    rss_bytes: int | None = None
    # This attempt's training steps timed so far and their wall time (batch begin to the next batch
    # begin: checkpoints, validation and epoch boundaries excluded); the supervisor's throughput.
    timed_steps: int | None = Field(None, ge=0)
    timed_seconds: float | None = Field(None, ge=0)


class CheckpointSaved(_Msg):
    type: Literal["checkpoint_saved"] = "checkpoint_saved"
    epoch: int
    step: int
    seconds: float
    bytes: int
    path: str
    reason: str = "interval"


class EpochBegin(_Msg):
    """An epoch begins in this attempt: how many steps are left in the run under the attempt's plan.

    ``steps``: the steps this epoch will run in this attempt (fewer than ``steps_per_epoch`` when it
    resumes mid-epoch); ``steps_per_epoch``: a whole epoch's steps under the plan; both None when
    the input's length is unknown. ``samples_per_step``: what one step consumes (the plan's batch size,
    or 1 for a PyDataset, which picks its own batches). The supervisor uses them to tell whether a
    probe could still be judged before the run ends.
    """

    type: Literal["epoch_begin"] = "epoch_begin"
    epoch: int
    step: int
    epochs: int | None = None
    steps: int | None = Field(None, ge=0)
    steps_per_epoch: int | None = Field(None, ge=0)
    samples_per_step: int | None = Field(None, ge=1)

    def end_step(self) -> int | None:
        """The global step at which the run ends under this plan (None: unknown)."""
        if self.epochs is None or self.steps is None or self.steps_per_epoch is None:
            return None
        return self.step + self.steps + max(0, self.epochs - self.epoch - 1) * self.steps_per_epoch


class EpochEnd(_Msg):
    type: Literal["epoch_end"] = "epoch_end"
    epoch: int
    step: int
    logs: dict[str, float] = Field(default_factory=dict)


class FaultFired(_Msg):
    type: Literal["fault"] = "fault"
    kind: str
    step: int
    key: str


class Notice(_Msg):
    """Something the worker wants journaled (e.g. a skipped damaged checkpoint)."""

    type: Literal["notice"] = "notice"
    event: str
    fields: dict[str, Any] = Field(default_factory=dict)


Message = Annotated[
    Hello | Heartbeat | CheckpointSaved | EpochBegin | EpochEnd | FaultFired | Notice, Field(discriminator="type")
]
_ADAPTER: TypeAdapter[Any] = TypeAdapter(Message)


def parse_message(line: bytes | str) -> Any:
    """One validated message, or None for a line that is not one."""
    try:
        return _ADAPTER.validate_json(line)
    except (ValidationError, ValueError):
        return None


class ChannelWriter:
    """Worker side: writes one message per ``write`` call (atomic for lines under PIPE_BUF)."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd
        self._lock = threading.Lock()

    def send(self, msg: _Msg) -> None:
        if self.fd is None:
            return
        data = (msg.model_dump_json() + "\n").encode()
        with self._lock:
            try:
                os.write(self.fd, data)
            except OSError:
                self.fd = None  # supervisor gone; the parent-death watch ends us shortly


class ChannelReader(threading.Thread):
    """Supervisor side: reads the pipe until EOF and hands each message to ``on_message``."""

    def __init__(self, fd: int, on_message: Callable[[Any], None]) -> None:
        super().__init__(name="resilient-channel", daemon=True)
        self.fd = fd
        self.on_message = on_message
        self.bad_lines = 0
        self.failed_messages = 0

    def run(self) -> None:
        buf = b""
        try:
            while True:
                chunk = os.read(self.fd, 65536)
                if not chunk:
                    break
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    if not line.strip():
                        continue
                    msg = parse_message(line)
                    if msg is None:
                        self.bad_lines += 1
                        continue
                    try:
                        self.on_message(msg)
                    except Exception:
                        # One message we could not handle must not cut the channel (that would read as a hang).
                        self.failed_messages += 1
        finally:
            os.close(self.fd)


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))
