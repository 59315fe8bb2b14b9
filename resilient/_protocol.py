"""Everything that crosses the process boundary between the supervisor and the worker.

- Exit codes with a meaning of their own (``EXIT_*``).
- The channel: JSON lines over a dedicated pipe (never stdout), one pydantic model per message;
  a line that does not parse is ignored rather than trusted.
- A waiting worker's go (``WorkerGo``): one JSON line on its stdin that names its attempt.
- The files one side writes and the other reads, as pydantic models: ``ErrorReport``
  (``attempts/NNN/error.json``), ``TrainingResult`` (``result.json``) and ``CheckpointMeta`` (the
  ``meta`` of a checkpoint's manifest). They are read with defaults for every field added after
  0.1.0, so a run directory written by an earlier release still resumes.

The worker reports facts (what was raised, where); the supervisor decides what they mean.
"""

from __future__ import annotations

import mmap
import os
import struct
import threading
import time
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

#: Worker exit codes with a meaning of their own (any other non-zero code is a crash).
EXIT_REPORTED = 3  # error.json (ErrorReport) says what was raised
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
    #: Batches of the resumed epoch the input skips before the first step (a factory re-reads them).
    skip_steps: int = Field(0, ge=0)


class Heartbeat(_Msg):
    """The worker is alive, in ``phase``: ``startup`` (sent first, before TensorFlow is imported),
    ``restore`` (TensorFlow imported: the model is built and restored next), then the training's."""

    type: Literal["heartbeat"] = "heartbeat"
    phase: Literal["startup", "restore", "train", "validate", "epoch_end", "save"] = "train"
    epoch: int
    step: int
    step_seconds: float | None = None
    # This attempt's training steps timed so far and their wall time (batch begin to the next batch
    # begin: checkpoints, validation and epoch boundaries excluded); the supervisor's throughput.
    timed_steps: int | None = Field(None, ge=0)
    timed_seconds: float | None = Field(None, ge=0)
    #: The epoch's running logs (loss and metrics so far), refreshed at most a few times a second: the
    #: caller's live display draws them (the worker runs model.fit with verbose=0 and prints nothing).
    logs: dict[str, float] | None = None


class CheckpointSaved(_Msg):
    type: Literal["checkpoint_saved"] = "checkpoint_saved"
    epoch: int
    step: int
    seconds: float
    bytes: int
    path: str
    reason: str = "interval"
    #: The training thread's pause (the copy to host memory) and the write (files, fsync, rename).
    snapshot_seconds: float | None = None
    write_seconds: float | None = None
    background: bool = False  # written off the training thread


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


class WorkerGo(BaseModel):
    """The go of a worker started ahead of its attempt (``--standby``): one JSON line on its stdin.

    Until it reads this line the worker has imported TensorFlow and Keras and nothing else: no device
    is listed, and it has not opened the run directory. What an attempt needs from its environment
    is the same for every attempt of a call, so the supervisor hands a waiting worker an attempt only
    when the environment it was spawned with is the one a fresh worker would get (``standby.py``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    run_dir: str
    attempt: int = Field(ge=0)
    plan: str | None = None  # this attempt's plan file; None: run_dir/plan.json


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
        #: The step board the supervisor was told of (``open_board``): the worker writes each step there.
        self.board: StepBoard | None = None

    def send(self, msg: _Msg) -> None:
        if self.fd is not None:
            self._write((msg.model_dump_json() + "\n").encode())

    def open_board(self) -> None:
        """Create the step board and name it to the supervisor (a ``step_board`` notice)."""
        board = StepBoard.create()
        if board is not None and self.fd is not None:
            self.send(Notice(event="step_board", fields={"fd": board.fd}))
            self.board = board

    def send_step(self, phase: str, epoch: int, step: int) -> None:
        """A ``Heartbeat`` with only the phase, epoch and step, formatted without pydantic (about 1 us):
        cheap enough to send at every step where there is no step board, so the step of a crash is exact."""
        if self.fd is not None:
            self._write(b'{"t":%.3f,"type":"heartbeat","phase":"%s","epoch":%d,"step":%d}\n'
                        % (time.time(), phase.encode(), epoch, step))

    def _write(self, data: bytes) -> None:
        with self._lock:
            try:
                os.write(self.fd, data)
            except OSError:
                self.fd = None  # supervisor gone; the parent-death watch ends us shortly


#: The phases a heartbeat names, in the order ``StepBoard`` encodes them.
PHASES: tuple[str, ...] = ("startup", "restore", "train", "validate", "epoch_end", "save")


class StepBoard:
    """The worker's phase, epoch and step, in 32 bytes of memory shared with the supervisor.

    The worker writes it at every step (a few stores, no system call) instead of sending a line per
    step over the channel; the supervisor reads it when it looks at the worker (every poll) and once
    more after the worker has exited, so the step of a crash or a kill is exact without a wake-up of
    the supervisor per step. Linux only (``memfd_create``); elsewhere the worker sends the step over
    the channel as before.

    The worker creates it and names its descriptor in a ``step_board`` notice; the supervisor maps
    the same memory through ``/proc/<pid>/fd/<fd>`` (the worker is its child), and keeps it readable
    after the worker is gone. Layout (little-endian int64): a sequence number, odd while a write is
    under way (a seqlock: a reader retries rather than read a half-written record), the epoch, the
    step, the phase's index in ``PHASES``.
    """

    SIZE = 32
    _FORMAT = "<qqqq"

    def __init__(self, fd: int, writable: bool) -> None:
        self.fd = fd
        self._mm = mmap.mmap(fd, self.SIZE, prot=mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0))
        self._seq = 0

    @classmethod
    def create(cls) -> StepBoard | None:
        """The worker's board (None where shared memory is not available: the channel carries the steps)."""
        try:
            fd = os.memfd_create("resilient-steps")  # close-on-exec: no child of the worker inherits it
        except (AttributeError, OSError):
            return None
        try:
            os.ftruncate(fd, cls.SIZE)
            return cls(fd, writable=True)
        except (OSError, ValueError):
            os.close(fd)
            return None

    @classmethod
    def open(cls, pid: int, fd: int) -> StepBoard:
        """The supervisor's view of worker ``pid``'s board (OSError when it cannot be opened)."""
        own = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            return cls(own, writable=False)
        except (OSError, ValueError) as exc:
            os.close(own)
            raise OSError(f"cannot map the step board: {exc}") from exc

    def write(self, phase: str, epoch: int, step: int) -> None:
        seq = self._seq + 1
        self._mm[0:8] = struct.pack("<q", seq)  # odd: a write is under way
        self._mm[8:32] = struct.pack("<qqq", epoch, step, PHASES.index(phase) if phase in PHASES else 2)
        self._seq = seq + 1
        self._mm[0:8] = struct.pack("<q", self._seq)

    def read(self) -> tuple[int, str, int, int] | None:
        """(sequence, phase, epoch, step) as last written; None before the first write."""
        for _ in range(100):
            seq, epoch, step, phase = struct.unpack(self._FORMAT, self._mm[0:32])
            if seq % 2 == 0 and struct.unpack("<q", self._mm[0:8])[0] == seq:
                if seq == 0:
                    return None
                return seq, PHASES[phase] if 0 <= phase < len(PHASES) else "train", epoch, step
        return None  # a writer forever mid-write: only a worker frozen at that instant

    def close(self) -> None:
        try:
            self._mm.close()
        finally:
            os.close(self.fd)


class ChannelReader(threading.Thread):
    """Supervisor side: reads the pipe until EOF and hands each message to ``on_message``."""

    def __init__(self, fd: int, on_message: Callable[[Any], None]) -> None:
        super().__init__(name="resilient-channel", daemon=True)
        self.fd = fd
        self.on_message = on_message
        self.bad_lines = 0

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
                        pass
        finally:
            os.close(self.fd)


# ---------------------------------------------------------------------------------------------- files


class _File(BaseModel):
    # Unknown keys are ignored: a newer worker's file still reads in an older supervisor, and back.
    model_config = ConfigDict(frozen=True, extra="ignore")


class ExceptionFacts(_File):
    """One exception of a chain: its class name, message and, for an ``OSError``, its errno."""

    type: str
    message: str = ""
    errno: int | None = None

    @classmethod
    def of(cls, exc: BaseException) -> ExceptionFacts:
        errno = getattr(exc, "errno", None)
        return cls(type=type(exc).__name__, message=str(exc), errno=errno if isinstance(errno, int) else None)


class ErrorReport(_File):
    """What the worker knew when its attempt ended on an exception (``attempts/NNN/error.json``).

    ``kind`` is set only where the worker is the one who knows: ``preempted`` (it honoured SIGTERM).
    Everything else is classified by the supervisor from ``type``, ``message`` and ``causes``.
    """

    kind: str | None = None
    type: str | None = None
    message: str = ""
    errno: int | None = None
    traceback: str = ""
    epoch: int | None = None
    step: int | None = None
    #: The exception's ``__cause__`` / ``__context__`` chain, innermost last.
    causes: tuple[ExceptionFacts, ...] = ()

    @classmethod
    def of(cls, exc: BaseException | None, *, kind: str | None = None, epoch: int | None = None,
           step: int | None = None) -> ErrorReport:
        if exc is None:
            return cls(kind=kind, epoch=epoch, step=step)
        import traceback

        causes: list[ExceptionFacts] = []
        seen = {id(exc)}
        inner = exc.__cause__ or exc.__context__
        while inner is not None and id(inner) not in seen and len(causes) < 16:
            seen.add(id(inner))
            causes.append(ExceptionFacts.of(inner))
            inner = inner.__cause__ or inner.__context__
        top = ExceptionFacts.of(exc)
        return cls(kind=kind, type=top.type, message=top.message, errno=top.errno, epoch=epoch, step=step,
                   traceback="".join(traceback.format_exception(exc)), causes=tuple(causes))

    @property
    def chain(self) -> tuple[ExceptionFacts, ...]:
        """The raised exception followed by its causes."""
        if self.type is None:
            return self.causes
        return (ExceptionFacts(type=self.type, message=self.message, errno=self.errno), *self.causes)


class TrainingResult(_File):
    """What a completed training hands back (``result.json``, written by the worker at the end)."""

    history: dict[str, list[float]]
    epochs_done: list[int]
    global_step: int = 0  # fit reads only history, epochs_done, stopped_early and steps
    attempt: int | None = None
    stopped_early: bool = False
    #: Steps per epoch under the final plan (History.params["steps"]); absent before 0.2.
    steps: int | None = None


class CheckpointMeta(_File):
    """Where the training stood when a checkpoint was taken (the ``meta`` of its manifest)."""

    epoch: int
    #: Samples into ``epoch`` (0: at an epoch boundary, where the epoch's metrics start fresh).
    offset: int
    global_step: int
    epochs_done: list[int] = Field(default_factory=list)
    history: dict[str, list[float]] = Field(default_factory=dict)
    plan: dict[str, Any] | None = None
    attempt: int | None = None
    reason: str | None = None
    lr_scale: float = 1.0
    weight_paths: list[str] = Field(default_factory=list)
    #: A callback (EarlyStopping) ended the training before its last epoch.
    stopped: bool = False
    #: The last epoch's logs, for on_train_end after a resume.
    last_logs: dict[str, float] | None = None
