"""The caller's view of a run: one live display for the whole run, fed by the worker's channel messages.

The worker never prints to the caller (its raw output goes to ``attempts/NNN/worker.log``); the
supervisor feeds a ``Display`` with what the channel says (``progress``), with each incident and
what was done about it (``incident``), and with its own notes (``note``). Three displays, chosen by
``make_display`` from Keras's ``verbose`` and where the output goes:

- ``TerminalDisplay`` (an interactive terminal, verbose=1): one progress line, redrawn in place by
  rich, that continues across restarts; incidents and notes print above it as plain sentences.
- ``NotebookDisplay`` (an IPython kernel: Jupyter, Colab, VS Code): one HTML panel updated in place
  through an IPython display handle, at most twice a second, with the incident timeline; the
  cell's output stays one panel whatever the run length.
- ``StreamDisplay`` (CI, a log file, a pipe, or verbose=2): no redraws; one line per epoch, per
  incident and per note.

What the displays draw is pure text built from a ``RunView`` (``progress_text``, ``epoch_text``,
``incident_text``, ``panel_html``), so it is tested on hand-built values. No TensorFlow here.
"""

from __future__ import annotations

import html
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from .._incident import Incident
from .._plan import Plan
from .._protocol import CheckpointSaved, EpochBegin, EpochEnd, Heartbeat, Hello

#: The notebook panel is redrawn at most this often (seconds): Colab and Jupyter throttle busy outputs.
NOTEBOOK_INTERVAL = 0.5
#: The terminal line is redrawn at most this often (seconds).
TERMINAL_INTERVAL = 0.25
#: Incidents kept in the notebook panel's timeline (the newest; the journal holds them all).
TIMELINE_MAX = 50


# ------------------------------------------------------------------------------------------ the view


@dataclass
class RunView:
    """What the display knows of the run: the newest figures from the channel and the supervisor."""

    epochs: int | None = None
    epoch: int | None = None  # 0-based, as Keras counts internally; shown 1-based like Keras's "Epoch 3/6"
    step: int | None = None  # global step
    epoch_steps: int | None = None  # a whole epoch's steps under the plan in force
    epoch_start_step: int | None = None  # the global step at which the current epoch began
    end_step: int | None = None  # the global step at which the run ends under the plan in force
    logs: dict[str, float] = field(default_factory=dict)  # the running (or last epoch's) logs
    samples_per_second: float | None = None
    seconds_per_step: float | None = None
    plan: Plan | None = None
    attempt: int | None = None
    restarts: int = 0
    host_memory: int | None = None
    host_memory_limit: int | None = None
    gpu_memory: int | None = None
    gpu_memory_limit: int | None = None
    checkpoint_step: int | None = None
    checkpoint_time: float | None = None  # time.time() of the newest checkpoint
    mirror: bool = False  # the run has a mirror_dir (mirror.py)
    mirror_step: int | None = None  # the mirror's newest verified generation
    mirror_saved_at: float | None = None  # time.time() of that generation's local save
    phase: str = "startup"
    incidents: list[str] = field(default_factory=list)  # incident sentences, oldest first
    finished: bool = False

    def eta_seconds(self) -> float | None:
        """Seconds left in the run at the measured pace (None: unknown)."""
        if self.end_step is None or self.step is None or self.seconds_per_step is None:
            return None
        return max(0, self.end_step - self.step) * self.seconds_per_step

    def update(self, msg: Any, batch_size: int | None = None) -> bool:
        """Take in one channel message; whether an epoch ended (the stream display prints a line then)."""
        if isinstance(msg, Hello):
            self.epoch, self.step = msg.epoch, msg.step
        elif isinstance(msg, EpochBegin):
            self.epoch, self.step, self.epochs = msg.epoch, msg.step, msg.epochs or self.epochs
            self.epoch_steps, self.end_step = msg.steps_per_epoch, msg.end_step()
            self.epoch_start_step = msg.step - (msg.steps_per_epoch - msg.steps) if (
                msg.steps is not None and msg.steps_per_epoch is not None) else msg.step
        elif isinstance(msg, Heartbeat):
            self.phase = msg.phase
            if msg.phase not in ("startup", "restore"):  # a start-up heartbeat's epoch and step are placeholders
                self.epoch, self.step = msg.epoch, msg.step
            if msg.logs:
                self.logs = dict(msg.logs)
            if msg.timed_steps and msg.timed_seconds:
                self.seconds_per_step = msg.timed_seconds / msg.timed_steps
                if batch_size:
                    self.samples_per_second = batch_size / self.seconds_per_step
        elif isinstance(msg, CheckpointSaved):
            self.checkpoint_step, self.checkpoint_time = msg.step, msg.t
        elif isinstance(msg, EpochEnd):
            self.epoch, self.step, self.logs = msg.epoch, msg.step, dict(msg.logs)
            return True
        return False


# ------------------------------------------------------------------------------------------ the texts


def _number(value: float) -> str:
    return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.3e}"


def _duration(seconds: float) -> str:
    total = round(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f}"


def _memory(used: int | None, limit: int | None, label: str) -> str | None:
    if used is None:
        return None
    return f"{label} {_gb(used)}/{_gb(limit)} GB" if limit else f"{label} {_gb(used)} GB"


def _epoch_label(view: RunView) -> str:
    if view.epoch is None:
        return "starting"
    if view.epochs:  # after the last epoch the worker counts one more (its final save): still the last one
        return f"epoch {min(view.epoch, view.epochs - 1) + 1}/{view.epochs}"
    return f"epoch {view.epoch + 1}"


def _step_label(view: RunView) -> str | None:
    if view.step is None:
        return None
    if view.epoch_steps and view.epoch_start_step is not None:
        return f"step {view.step - view.epoch_start_step}/{view.epoch_steps}"
    return f"step {view.step}"


def _logs_text(logs: dict[str, float]) -> str | None:
    return " ".join(f"{k} {_number(v)}" for k, v in logs.items()) or None


def _figures(view: RunView, step: str | None) -> list[str | None]:
    """What every line shows: epoch, step, logs, throughput, ETA for the run, plan, restarts."""
    eta = view.eta_seconds()
    return [_epoch_label(view), step, _logs_text(view.logs),
            f"{view.samples_per_second:,.0f} samples/s" if view.samples_per_second else None,
            f"ETA {_duration(eta)}" if eta is not None else None,
            view.plan.describe() if view.plan is not None else None, f"restarts {view.restarts}"]


def progress_text(view: RunView, now: float | None = None) -> str:
    """The one progress line: the figures, then memory against the limits and the checkpoint's age."""
    now = time.time() if now is None else now
    parts = _figures(view, _step_label(view))
    parts.append(_memory(view.host_memory, view.host_memory_limit, "RAM"))
    parts.append(_memory(view.gpu_memory, view.gpu_memory_limit, "GPU"))
    if view.checkpoint_time is not None:
        parts.append(f"checkpoint {_duration(max(0.0, now - view.checkpoint_time))} ago")
    parts.append(mirror_text(view, now))
    return " | ".join(p for p in parts if p)


def mirror_text(view: RunView, now: float | None = None) -> str | None:
    """The mirror's lag: ``mirror step 72 in sync``, or ``mirror step 60, 12 steps / 0:35 behind``, the time
    being the training the mirror lacks (since the local save of its newest copy); None without a mirror."""
    if not view.mirror:
        return None
    if view.mirror_step is None:
        return "mirror: no copy yet"
    newest = view.checkpoint_step if view.checkpoint_step is not None else view.mirror_step
    behind = max(0, newest - view.mirror_step)
    if behind == 0:
        return f"mirror step {view.mirror_step} in sync"
    now = time.time() if now is None else now
    age = f" / {_duration(max(0.0, now - view.mirror_saved_at))}" if view.mirror_saved_at is not None else ""
    return f"mirror step {view.mirror_step}, {behind} step{'' if behind == 1 else 's'}{age} behind"


def epoch_text(view: RunView) -> str:
    """The stream display's line at an epoch's end (the global step: epochs of a run may differ in length)."""
    return " | ".join(p for p in _figures(view, f"step {view.step}" if view.step is not None else None) if p)


_WHAT = {
    "gpu_oom": "GPU out of memory",
    "host_oom": "Host memory ran out",
    "killed": "The worker was killed (SIGKILL) with no memory evidence",
    "hang": "The worker hung",
    "preempted": "The worker was preempted (SIGTERM) and saved a checkpoint",
    "nan_loss": "The loss became NaN",
    "disk_full": "The disk is full",
}


def _what(incident: Incident) -> str:
    if incident.kind == "crash":
        how = incident.signal or (f"exit code {incident.returncode}" if incident.returncode is not None else "")
        return f"The worker crashed ({how})" if how else "The worker crashed"
    if incident.kind == "user_error":
        raised = str(incident.evidence.get("type") or "") or incident.detail.split(":", 1)[0]
        return f"The training code raised {raised}" if raised else "The training code raised an error"
    if incident.kind == "hang" and incident.evidence.get("heartbeat_age") is not None:
        return f"The worker hung (no heartbeat for {float(incident.evidence['heartbeat_age']):.0f} s)"
    return _WHAT.get(incident.kind, incident.kind)


def _peak(incident: Incident, host_limit: int | None, gpu_limit: int | None) -> str:
    if incident.kind == "gpu_oom" and incident.gpu_memory_peak_bytes:
        of = f" of {_gb(gpu_limit)}" if gpu_limit else ""
        return f" (peak {_gb(incident.gpu_memory_peak_bytes)}{of} GB)"
    if incident.kind == "host_oom" and incident.memory_peak_bytes:
        of = f" of {_gb(host_limit)}" if host_limit else ""
        return f" (peak {_gb(incident.memory_peak_bytes)}{of} GB)"
    return ""


def _changes(before: Plan, after: Plan) -> str:
    """What a plan change turned, e.g. ``batch 64x2 (was 128)``."""
    def batch(p: Plan) -> str:
        return f"{p.batch_size}" + (f"x{p.grad_accum_steps}" if p.grad_accum_steps > 1 else "")

    parts = []
    if (before.batch_size, before.grad_accum_steps) != (after.batch_size, after.grad_accum_steps):
        parts.append(f"batch {batch(after)} (was {batch(before)})")
    if before.precision != after.precision:
        parts.append(f"{after.precision} precision (was {before.precision})")
    if before.image_size != after.image_size and after.image_size is not None:
        was = f"{before.image_size[0]}x{before.image_size[1]}" if before.image_size else "full size"
        parts.append(f"images {after.image_size[0]}x{after.image_size[1]} (was {was})")
    if before.cache and not after.cache:
        parts.append("no dataset cache")
    if before.replicas != after.replicas:
        parts.append(f"{after.replicas} device{'s' if after.replicas > 1 else ''} (was {before.replicas})")
    if not parts:
        parts.append(f"plan {after.describe()} (was {before.describe()})")
    return " and ".join(parts)


def incident_text(incident: Incident, *, outcome: str = "restart", log: str | Path | None = None,
                  seconds_per_step: float | None = None, host_limit: int | None = None,
                  gpu_limit: int | None = None) -> str:
    """One plain sentence for an incident: what happened, where, what was done, what it cost, the log.

    ``outcome``: ``restart`` (the next attempt starts) or ``give_up`` (the run stops here).
    """
    where = ""
    if incident.step is not None:
        epoch = f"epoch {incident.epoch + 1}, " if incident.epoch is not None else ""
        where = f" at {epoch}step {incident.step}"
    on = f" on {incident.device}" if incident.device else ""
    text = f"{_what(incident)}{on}{where}{_peak(incident, host_limit, gpu_limit)}."
    resume = f"step {incident.checkpoint_step}" if incident.checkpoint_step is not None else "the beginning"
    if incident.kind == "user_error":
        text += " Not retried: fix the error and call fit again to resume."
    elif outcome == "give_up":
        text += f" Giving up ({incident.action or 'no restarts left'})."
    elif incident.plan_changed and incident.plan_after is not None:
        text += f" Restarting from {resume} with {_changes(incident.plan_before, incident.plan_after)}."
    else:
        text += f" Restarting from {resume} with the same plan."
    if outcome != "give_up" and incident.kind != "user_error" and incident.step is not None:
        lost = max(0, incident.step - (incident.checkpoint_step or 0))
        seconds = seconds_per_step * lost if seconds_per_step else 0.0
        cost = f" ({seconds:.1f} s)" if 0.05 <= seconds < 1 else f" ({seconds:.0f} s)" if seconds >= 1 else ""
        text += f" Lost {lost} step{'' if lost == 1 else 's'}{cost}."
    if log is not None:
        text += f" Log: {log}"
    return text


def panel_html(view: RunView, now: float | None = None) -> str:
    """The notebook panel: the progress line, a bar for the run, and the incident timeline (newest last)."""
    done = None
    if view.end_step and view.step is not None:
        done = min(1.0, view.step / view.end_step) if view.end_step else None
    bar = ""
    if done is not None:
        bar = (f'<div style="background:#ddd;height:6px;width:100%;margin:4px 0">'
               f'<div style="background:{"#2a7" if not view.incidents else "#e90"};height:6px;'
               f'width:{done * 100:.1f}%"></div></div>')
    state = "finished" if view.finished else "training"
    items = "".join(f"<li>{html.escape(text)}</li>" for text in view.incidents[-TIMELINE_MAX:])
    timeline = (f'<div style="margin-top:4px"><b>Incidents ({len(view.incidents)})</b>'
                f'<ol style="margin:2px 0 0 0">{items}</ol></div>') if view.incidents else ""
    return (f'<div class="resilient-panel" style="font-family:monospace;font-size:12px;line-height:1.4">'
            f"<b>resilient</b> ({state}): {html.escape(progress_text(view, now))}{bar}{timeline}</div>")


# ------------------------------------------------------------------------------------------ displays


class Display:
    """The interface the supervisor feeds; this base draws nothing and says notes as ``resilient:`` lines."""

    def __init__(self, stream: IO[str] | None = None, *, host_limit: int | None = None,
                 gpu_limit: int | None = None) -> None:
        self.stream = stream
        self.view = RunView(host_memory_limit=host_limit, gpu_memory_limit=gpu_limit)
        self._lock = threading.Lock()  # progress arrives on the channel's reader thread
        self._write_lock = threading.Lock()  # an epoch's line (that thread) and an incident's (ours) never mix

    # What the supervisor calls.

    def attempt_started(self, attempt: int, plan: Plan) -> None:
        with self._lock:
            self.view.attempt, self.view.plan = attempt, plan
        self.refresh()

    def progress(self, msg: Any, *, host_memory: int | None = None, gpu_memory: int | None = None) -> None:
        """A channel message (any thread), with the memory figures sampled last."""
        with self._lock:
            plan = self.view.plan
            epoch_ended = self.view.update(msg, plan.batch_size if plan is not None else None)
            if host_memory is not None:
                self.view.host_memory = host_memory
            if gpu_memory is not None:
                self.view.gpu_memory = gpu_memory
            line = epoch_text(self.view) if epoch_ended else None
        if line is not None:
            self.epoch_ended(line)

    def mirror(self, step: int | None, saved_at: float | None) -> None:
        """The mirror's newest verified copy (from the mirror's thread): its step and its local save's time."""
        with self._lock:
            self.view.mirror, self.view.mirror_step, self.view.mirror_saved_at = True, step, saved_at
        self.changed()

    def changed(self) -> None:
        """The view changed off the supervisor's thread: the live displays redraw at their next tick."""

    def incident(self, incident: Incident, *, outcome: str, log: str | Path | None = None) -> None:
        with self._lock:
            self.view.restarts += outcome != "give_up"
            text = incident_text(incident, outcome=outcome, log=log, seconds_per_step=self.view.seconds_per_step,
                                 host_limit=self.view.host_memory_limit, gpu_limit=self.view.gpu_memory_limit)
            self.view.incidents.append(text)
        self.say(text)

    def note(self, text: str) -> None:
        self.say(f"resilient: {text}")

    def tick(self) -> None:
        """Called often from the supervisor's thread: redraw when due."""

    def close(self) -> None:
        """The run ended (any way): the last drawing stays."""
        with self._lock:
            self.view.finished = True

    # What the displays draw with.

    def epoch_ended(self, line: str) -> None:
        """An epoch ended (``line``: its summary): the stream display prints it."""

    def refresh(self) -> None:
        """Redraw now (the live displays)."""

    def say(self, text: str) -> None:
        from .config import write_quietly

        with self._write_lock:
            write_quietly(self.stream, text + "\n")


class StreamDisplay(Display):
    """A non-interactive stream (CI, a log file, a pipe) or verbose=2: one line per epoch, incident and note."""

    def epoch_ended(self, line: str) -> None:
        self.say(line)


class TerminalDisplay(Display):
    """An interactive terminal: one rich progress line redrawn in place; sentences print above it.

    rich rather than tqdm: rich's ``Live`` keeps one renderable at the bottom while ``console.print``
    writes lines above it (tqdm's ``write`` does the same for a bar, but its line is a bar with a
    fixed layout, and this line is mostly text: figures, plan, memory, checkpoint age); rich also
    degrades by itself on a dumb terminal, and Jupyter's own integration is not used here (the
    notebook gets its HTML panel).
    """

    def __init__(self, stream: IO[str] | None = None, **kwargs: Any) -> None:
        super().__init__(stream, **kwargs)
        from rich.console import Console
        from rich.live import Live
        from rich.text import Text

        self._text = Text
        self.console = Console(file=stream or sys.stdout, highlight=False, soft_wrap=False)
        self.live = Live(Text(""), console=self.console, auto_refresh=False, transient=False,
                         redirect_stdout=False, redirect_stderr=False)
        self._last = 0.0
        self._started = False

    def refresh(self) -> None:
        with self._lock:
            line = progress_text(self.view)
        if not self._started:
            self.live.start()
            self._started = True
        self.live.update(self._text(line, overflow="ellipsis", no_wrap=True), refresh=True)
        self._last = time.monotonic()

    def tick(self) -> None:
        if time.monotonic() - self._last >= TERMINAL_INTERVAL:
            self.refresh()

    def say(self, text: str) -> None:
        self.console.print(self._text(text), soft_wrap=True)

    def close(self) -> None:
        super().close()
        if self._started:
            self.refresh()
            self.live.stop()
            self._started = False


class NotebookDisplay(Display):
    """An IPython kernel: one HTML panel, updated in place through a display handle at most twice a second."""

    def __init__(self, stream: IO[str] | None = None, *, publish: Callable[..., Any] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(stream, **kwargs)
        self._publish = publish
        self._handle: Any = None
        self._last = 0.0
        self._dirty = False

    def _html(self) -> Any:
        from IPython.display import HTML

        with self._lock:
            return HTML(panel_html(self.view))

    def refresh(self) -> None:
        # Drawn from the supervisor's thread only (tick, attempt_started, incident, close): ipykernel routes a
        # display message to the cell of the thread that sends it.
        if self._handle is None:
            from IPython.display import display

            self._handle = (self._publish or display)(self._html(), display_id=True)
        else:
            self._handle.update(self._html())
        self._last, self._dirty = time.monotonic(), False

    def progress(self, msg: Any, **kwargs: Any) -> None:
        super().progress(msg, **kwargs)
        self._dirty = True

    def changed(self) -> None:
        self._dirty = True

    def tick(self) -> None:
        if self._dirty and time.monotonic() - self._last >= NOTEBOOK_INTERVAL:
            self.refresh()

    def say(self, text: str) -> None:
        self._dirty = True  # incidents live in the panel's timeline; notes are in the journal

    def incident(self, incident: Incident, **kwargs: Any) -> None:
        super().incident(incident, **kwargs)
        self.refresh()

    def close(self) -> None:
        super().close()
        self.refresh()


def in_notebook() -> bool:
    """Whether this process is an IPython kernel (Jupyter, Colab, VS Code), not a terminal IPython."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    try:
        shell = ipython.get_ipython()
    except Exception:
        return False
    return shell is not None and getattr(shell, "kernel", None) is not None


def keras_verbosity(verbose: Any) -> int:
    """Keras's meaning of ``verbose``: "auto" is 1 (Keras takes 2 only under a ParameterServerStrategy)."""
    return 1 if verbose == "auto" else int(verbose)


def make_display(verbose: Any, stream: IO[str] | None = None, *, host_limit: int | None = None,
                 gpu_limit: int | None = None) -> Display | None:
    """The display for ``verbose`` (Keras's meaning) and the output: None for 0 (silent); for 1 the live one
    (a notebook panel, a terminal line) or, on a stream that cannot redraw, lines; for 2 lines."""
    level = keras_verbosity(verbose)
    if level == 0:
        return None
    kwargs: dict[str, Any] = {"host_limit": host_limit, "gpu_limit": gpu_limit}
    target = stream or sys.stdout
    if level == 1 and in_notebook():
        return NotebookDisplay(stream, **kwargs)
    if level == 1 and _isatty(target):
        return TerminalDisplay(stream, **kwargs)
    return StreamDisplay(stream, **kwargs)


def _isatty(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
