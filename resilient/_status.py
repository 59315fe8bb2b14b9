"""``python -m resilient status RUN_DIR [--follow]``: a run's state and story, read from its directory alone.

The state comes from the journal and the run directory's lock: a run whose last call journaled
``run_finished`` is finished (``completed``, ``failed``, ``user_error``, ``interrupted``); one whose lock a
live process holds is ``running`` (its supervisor is the ``fit`` caller: pid, attempt, plan, epoch and step,
ETA from the recent step rate); one whose lock nobody holds and that never journaled its end is
``stopped`` (its process died: a SIGKILL, a lost VM or kernel). ``--follow`` tails the journal of a run
started elsewhere (another terminal, a notebook's kernel): one line per epoch, checkpoint, incident and
plan change as they happen, a refreshing progress line on a terminal, until ``run_finished`` or Ctrl-C.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import fcntl
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from ._checkpoint import CheckpointStore
from ._plan import Plan
from ._rundir import RunDir
from ._units import format_bytes
from .supervisor.report import latest_checkpoint


def summarize(path: str | Path, *, now: float | None = None, mirror_dir: str | Path | None = None) -> str:
    """A plain-text account of the run in ``path``: state, plan, attempts, incidents, checkpoint, the mirror's
    lag, outcome. With ``mirror_dir`` (fit's): what the mirror holds, and the run read from the mirror when
    ``path`` holds none (a new VM, the local run directory gone with the old one)."""
    run, gone = _open_or_mirror(path, mirror_dir)
    spec = run.read_spec()
    plan = run.read_plan() if run.plan_json.exists() else spec.initial_plan
    events = run.read_events()
    now = time.time() if now is None else now
    state = run_state(run, events, spec.epochs, now)
    header = f"run {run.path}" if gone is None else (
        f"run {run.path} (the mirror: {gone} holds no run, so this is read from the mirror_dir)")
    lines = [header, f"  state: {state.describe(now)}",
             f"  model {spec.model_name}, {spec.epochs} epochs, seed {spec.seed}",
             f"  plan in force: {plan.describe()}"]
    if plan != spec.initial_plan:
        lines.append(f"  (asked for: {spec.initial_plan.describe()})")
    ended = {e["attempt"]: e for e in events if e["event"] == "attempt_ended"}
    incidents = {e["attempt"]: e for e in events if e["event"] == "incident"}
    epochs = [e for e in events if e["event"] == "epoch_end"]
    rates = {e["attempt"]: e.get("samples_per_s") for e in events if e["event"] == "throughput_measured"}
    verdicts = {e["attempt"]: e for e in events if e["event"] in ("probe_succeeded", "probe_rejected")}
    held = {e["attempt"]: e for e in events if e["event"] in ("probe_skipped", "probe_unjudged")}
    lines.append("  attempts:")
    for e in (e for e in events if e["event"] == "attempt_started"):
        a = e["attempt"]
        end = ended.get(a, {})
        status = end.get("signal") or (f"exit {end['returncode']}" if "returncode" in end else "running or lost")
        inc = incidents.get(a)
        on = f" on {inc['device']}" if inc and inc.get("device") else ""  # several devices: the one that ran out
        what = f"{inc['kind']}{on}: {inc.get('detail', '')}" if inc else ("completed" if end.get("returncode") == 0 else "")
        if end.get("interrupted"):
            what = "interrupted (Ctrl-C)"
        if e.get("probe"):
            what = f"probe; {what}" if what else "probe"
        if rates.get(a) is not None:
            what = f"{what}; {rates[a]:.1f} samples/s" if what else f"{rates[a]:.1f} samples/s"
        peak = format_bytes(end.get("memory_peak_bytes"))
        if end.get("gpu_memory_peak_bytes") is not None:
            peak += f", GPU {format_bytes(end['gpu_memory_peak_bytes'])}"
        lines.append(f"    {a:>3}  {Plan.model_validate(e['plan']).describe():<30} {status:<14} "
                     f"peak {peak:<10} {what}")
        if inc and inc.get("action"):
            lines.append(f"         -> {inc['action']}")
        verdict = verdicts.get(a)
        if verdict:
            kept = "kept" if verdict["event"] == "probe_succeeded" else "rejected"
            lines.append(f"         -> probe {kept}: {verdict.get('reason', '')}")
        note = held.get(a)
        if note and note["event"] == "probe_skipped":
            lines.append(f"         -> probe {Plan.model_validate(note['plan']).describe()} not started: "
                         f"{note.get('reason', '')}")
        elif note:
            lines.append(f"         -> the run completed on this probe before it was judged; plan.json keeps "
                         f"{Plan.model_validate(note['working']).describe()}")
    if epochs:
        last = epochs[-1]
        logs = ", ".join(f"{k}={v:.4g}" for k, v in sorted(last.get("logs", {}).items()))
        lines.append(f"  last epoch finished: {last['epoch']} (step {last['step']}) {logs}")
    lines += _checkpoint_and_lock(run, state.holder, now)
    lines += mirror_lines(events, now, None if mirror_dir is None else RunDir(mirror_dir))
    lines += _damage_lines(run, events)
    finished = [e for e in events if e["event"] == "run_finished"]
    lines.append(f"  status: {finished[-1]['status'] if finished else f'not finished ({state.state})'}")
    return "\n".join(lines)


def _checkpoint_and_lock(run: RunDir, holder: int | None, now: float) -> list[str]:
    """The last checkpoint, with its age, and who holds the run directory's lock."""
    ckpt = latest_checkpoint(run)
    saved = (f"step {ckpt.step}, epoch {ckpt.epoch}, sample {ckpt.offset}{_age(ckpt.path, now)}" if ckpt else "none")
    return [f"  last checkpoint: {saved}", f"  lock: {_lock_text(holder)}"]


def mirror_lines(events: list[dict[str, Any]], now: float, mirror: RunDir | None = None) -> list[str]:
    """The mirror's lag from the journal (``mirror_synced``: its newest verified copy, how long ago, how many
    steps behind the newest local checkpoint), whether it is failing now (``mirror_retry``/``mirror_error``
    since), and with ``mirror``, the newest generation on the mirror itself."""
    synced = [e for e in events if e["event"] == "mirror_synced"]
    if not synced and mirror is None and not any(e["event"].startswith("mirror_") for e in events):
        return []
    saves = [e for e in events if e["event"] == "checkpoint_saved" and e.get("step") is not None]
    local = max((e["step"] for e in saves), default=None)
    lines = []
    if synced:
        last = synced[-1]
        behind = max(0, local - last["step"]) if local is not None else 0
        lag = f"{behind} step{'' if behind == 1 else 's'} behind the local checkpoint (step {local})" if behind \
            else "in sync with the local checkpoint"
        copy = f", copied {last['lag_seconds']:.1f} s after its save" if last.get("lag_seconds") is not None else ""
        lines.append(f"  mirror: step {last['step']} verified {_duration(max(0.0, now - _epoch_seconds(last['time'])))} "
                     f"ago, {lag}{copy}" + (f" ({last['path']})" if last.get("path") and mirror is None else ""))
    else:
        lines.append("  mirror: no verified copy journaled yet")
    after = events[events.index(synced[-1]) + 1:] if synced else events
    trouble = [e for e in after if e["event"] in ("mirror_retry", "mirror_error")]
    if trouble:
        first, last_err = trouble[0], trouble[-1]
        lines.append(f"  mirror failing since {_duration(max(0.0, now - _epoch_seconds(first['time'])))} ago "
                     f"({len(trouble)} failed pass{'es' if len(trouble) > 1 else ''}): {last_err.get('error', '')}")
    if mirror is not None:
        newest = _newest_generation(mirror)
        where = f"step {newest}" if newest is not None else "no checkpoint"
        lines.append(f"  on the mirror {mirror.path}: {where}")
    return lines


def _newest_generation(mirror: RunDir) -> int | None:
    """The newest generation's step by its name: the mirror renames a copy into place only once it verified."""
    try:
        for path in CheckpointStore(mirror.checkpoints).generations():
            try:
                return int(path.name.removeprefix("ckpt-"))
            except ValueError:
                continue
    except OSError:
        return None
    return None


def _damage_lines(run: RunDir, events: list[dict[str, Any]]) -> list[str]:
    """Damaged checkpoints: the generations that do not verify now, and those attempts found and skipped."""
    good, damaged = CheckpointStore(run.checkpoints).survey()
    lines = [f"  damaged checkpoint: {path.name} ({why}); a resume skips it" for path, why in damaged]
    if damaged and good is not None:
        lines.append(f"  a resume starts from: step {good.step} ({good.path.name}, verified)")
    elif damaged:
        lines.append("  no checkpoint verifies: fit refuses to resume this run; restore a copy of checkpoints/, or "
                     "delete it (or pass a new run_dir) to start over")
    seen = {path.name for path, _ in damaged}
    for e in events:
        name = Path(str(e.get("path", ""))).name
        if e["event"] == "checkpoint_corrupt" and name not in seen:
            seen.add(name)
            lines.append(f"  damaged checkpoint skipped by attempt {e.get('attempt')}: {name} ({e.get('reason', '')})")
    return lines


# ------------------------------------------------------------------------------------------ the state

#: How a call of fit ended (``run_finished``'s status), as the state line says it.
_FINISHED = {"completed": "finished: completed", "failed": "failed (the policy gave up)",
             "user_error": "failed: a bug in the user's code (UserCodeError)",
             "interrupted": "interrupted (Ctrl-C)"}
#: The step rate behind the ETA: the current attempt's journal points of the last this many seconds.
RATE_WINDOW = 300.0


@dataclass(frozen=True)
class RunState:
    """Where a run stands, from its journal and its lock."""

    state: str  # running | completed | failed | user_error | interrupted | stopped | not_started
    holder: int | None = None  # pid holding the run's lock (0: held, pid unknown); None: nobody
    pid: int | None = None  # the fit caller that journaled run_started
    attempt: int | None = None
    plan: Plan | None = None
    epoch: int | None = None  # the epoch in progress (0-based)
    epochs: int | None = None
    step: int | None = None
    eta: float | None = None  # seconds left, from the recent step rate
    rate: float | None = None  # steps per second

    def describe(self, now: float | None = None) -> str:
        """The state line: ``running (pid 4242, attempt 2, ...)``, ``finished: completed``, ..."""
        if self.state == "running":
            return "running (" + ", ".join(self.progress_parts()) + ")"
        if self.state == "stopped":
            return ("stopped: no process holds the run and it never journaled its end (killed, or its VM or kernel "
                    "went away); fit with this run_dir resumes it from the last checkpoint")
        if self.state == "not_started":
            return "not started (no run_started in the journal)"
        return _FINISHED.get(self.state, self.state)

    def progress_parts(self) -> list[str]:
        parts = [f"pid {self.pid if self.pid is not None else self.holder}"]
        if self.attempt is not None:
            parts.append(f"attempt {self.attempt}")
        if self.plan is not None:
            parts.append(f"plan {self.plan.describe()}")
        if self.epoch is not None and self.epochs:
            parts.append(f"epoch {min(self.epoch, self.epochs - 1) + 1}/{self.epochs}")
        if self.step is not None:
            parts.append(f"step {self.step}")
        if self.rate:
            parts.append(f"{self.rate:.3g} steps/s")
        parts.append(f"ETA {_duration(self.eta)}" if self.eta is not None else "ETA after a full epoch")
        return parts


def run_state(run: RunDir, events: list[dict[str, Any]], epochs: int | None, now: float) -> RunState:
    """The state of the run: finished (how), running (where, ETA) or stopped; ``now``: epoch seconds."""
    starts = [i for i, e in enumerate(events) if e["event"] == "run_started"]
    holder = lock_holder(run)
    if not starts:
        return RunState("running" if holder is not None else "not_started", holder=holder)
    call = events[starts[-1]:]  # this call of fit
    ended = [e for e in call if e["event"] == "run_finished"]
    if ended:
        return RunState(str(ended[-1].get("status", "completed")), holder=holder)
    if holder is None:
        return RunState("stopped")
    started = [i for i, e in enumerate(call) if e["event"] == "attempt_started"]
    attempt = call[started[-1]] if started else {}
    plan = Plan.model_validate(attempt["plan"]) if attempt.get("plan") else None
    step, epoch = _position(call)
    rate, eta = _eta(call, call[started[-1]:] if started else [], plan, epochs, step, now)
    return RunState("running", holder=holder, pid=call[0].get("pid"), attempt=attempt.get("attempt"), plan=plan,
                    epoch=epoch, epochs=epochs, step=step, eta=eta, rate=rate)


def _position(call: list[dict[str, Any]]) -> tuple[int | None, int | None]:
    """(global step, epoch in progress) as of the journal's last word on them."""
    step = epoch = None
    for e in call:
        if e.get("step") is None or e["event"] not in ("worker_ready", "checkpoint_saved", "epoch_end", "memory_sample"):
            continue
        if e.get("background"):
            continue  # written after the training moved on: not where it stands
        step = int(e["step"])
        if e.get("epoch") is not None:
            epoch = int(e["epoch"]) + (1 if e["event"] == "epoch_end" else 0)
    return step, epoch


def _points(attempt: list[dict[str, Any]]) -> list[tuple[float, int]]:
    """(time, step) of the attempt's journal lines after its first trained step (start-up is not the rate)."""
    points = [(_epoch_seconds(e["time"]), int(e["step"])) for e in attempt
              if e["event"] in ("checkpoint_saved", "epoch_end", "memory_sample") and e.get("step") is not None
              and not e.get("background")]
    first = points[0][1] if points else 0
    return [p for p in points if p[1] > first] or points[-1:]


def _steps_per_epoch(call: list[dict[str, Any]], plan: Plan | None) -> int | None:
    """Steps of one epoch under ``plan``: the last two consecutive epoch ends trained with it."""
    plans = {e["attempt"]: e.get("plan") for e in call if e["event"] == "attempt_started"}
    ends = [e for e in call if e["event"] == "epoch_end"
            and (plan is None or plans.get(e.get("attempt")) == plan.model_dump(mode="json"))]
    for before, after in zip(reversed(ends[:-1]), reversed(ends[1:])):
        if after["epoch"] == before["epoch"] + 1 and after["step"] > before["step"]:
            return int(after["step"]) - int(before["step"])
    return None


def _eta(call: list[dict[str, Any]], attempt: list[dict[str, Any]], plan: Plan | None, epochs: int | None,
         step: int | None, now: float) -> tuple[float | None, float | None]:
    """(steps per second of the current attempt lately, seconds left in the run); None where not measured."""
    points = _points(attempt)
    recent = [p for p in points if p[0] >= points[-1][0] - RATE_WINDOW] if points else []
    if len(recent) < 2 or recent[-1][0] <= recent[0][0] or recent[-1][1] <= recent[0][1]:
        return None, None
    rate = (recent[-1][1] - recent[0][1]) / (recent[-1][0] - recent[0][0])
    per_epoch = _steps_per_epoch(call, plan)
    last_end = next((e for e in reversed(call) if e["event"] == "epoch_end"), None)
    if per_epoch is None or last_end is None or epochs is None or step is None:
        return rate, None
    end_step = int(last_end["step"]) + max(0, epochs - int(last_end["epoch"]) - 1) * per_epoch
    left = max(0, end_step - step) / rate - max(0.0, now - recent[-1][0])
    return rate, max(0.0, left)


def lock_holder(run: RunDir) -> int | None:
    """The pid of the live process holding the run directory's lock (the ``fit`` caller; 0: held, pid
    unknown), or None when nobody holds it.

    Linux lists every flock in /proc/locks with its holder: read there, the lock is never touched, so
    a ``fit`` starting at this instant cannot find it taken by us. Elsewhere, a non-blocking shared
    flock, released at once.
    """
    try:
        st = run.lock_file.stat()
    except OSError:
        return None
    try:
        table = Path("/proc/locks").read_text()
    except OSError:
        return _probe_lock(run)
    for line in table.splitlines():
        fields = line.split()
        if len(fields) < 6 or fields[1] != "FLOCK":
            continue  # a waiter ("->"), or a POSIX lock: not fit's
        try:
            major, minor, inode = fields[5].split(":")  # device in hex, inode in decimal
            where = (int(major, 16), int(minor, 16), int(inode))
            pid = int(fields[4])
        except ValueError:
            continue
        if where == (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino):
            return max(pid, 0)
    return None


def _probe_lock(run: RunDir) -> int | None:
    try:
        fd = os.open(run.lock_file, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return 0
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _lock_text(holder: int | None) -> str:
    if holder is None:
        return "free (no live process is training in this run directory)"
    return f"held by pid {holder}" if holder else "held by a live process"


def _open_or_mirror(path: str | Path, mirror_dir: str | Path | None) -> tuple[RunDir, Path | None]:
    """The run in ``path``; when it holds none and ``mirror_dir`` does, the mirror's (with the missing path)."""
    run = RunDir(path)
    if run.exists() or mirror_dir is None:
        return _open(path), None
    mirror = RunDir(mirror_dir)
    if not mirror.exists():
        raise FileNotFoundError(f"neither {run.path} nor the mirror_dir {mirror.path} holds a resilient run (no "
                                "run.json). Expected the run_dir and mirror_dir passed to fit.")
    return mirror, run.path


def _open(path: str | Path) -> RunDir:
    run = RunDir(path)
    if not run.exists():
        raise FileNotFoundError(f"{run.path} holds no resilient run (no run.json). Expected a run_dir passed to fit.")
    return run


def _epoch_seconds(stamp: str) -> float:
    return _dt.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def _duration(seconds: float | None) -> str:
    """``42 s``, ``3 min``, ``2 h 05 min``."""
    if seconds is None:
        return "?"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    hours, minutes = divmod(int(seconds // 60), 60)
    return f"{hours} h {minutes:02d} min"


def _age(path: str, now: float) -> str:
    try:
        return f" ({_duration(max(0.0, now - Path(path).stat().st_mtime))} ago)"
    except OSError:
        return ""


# ------------------------------------------------------------------------------------------ --follow

#: ``--follow`` reads the journal this often (seconds): the run's end is seen within it, at no cost to the run.
FOLLOW_POLL = 0.5
#: Lines of the current call's story that ``--follow`` replays before it goes live (``status`` has them all).
FOLLOW_REPLAY = 20


def story_line(event: dict[str, Any], epochs: int | None) -> str | None:
    """One line for an event worth a line in ``--follow`` (None for the others: telemetry, bookkeeping)."""
    kind, e = event["event"], event
    of = f"/{epochs}" if epochs else ""
    if kind == "run_started":
        return f"{'resumed' if e.get('resumed') else 'started'} by pid {e.get('pid')}: {e.get('epochs')} epochs"
    if kind == "attempt_started":
        probe = " (probe)" if e.get("probe") else ""
        return f"attempt {e.get('attempt')} started{probe}: plan {Plan.model_validate(e['plan']).describe()}"
    if kind == "epoch_end":
        logs = ", ".join(f"{k}={v:.4g}" for k, v in sorted((e.get("logs") or {}).items()))
        return f"epoch {e['epoch'] + 1}{of} done at step {e['step']}" + (f": {logs}" if logs else "")
    if kind == "checkpoint_saved":
        reason = e.get("reason", "interval")
        if reason in ("epoch_end", "final"):  # its epoch is the one a resume starts: the next one
            return f"checkpoint at step {e.get('step')} (end of epoch {e.get('epoch')}{of}, {reason})"
        return f"checkpoint at step {e.get('step')} (epoch {e.get('epoch', 0) + 1}{of}, {reason})"
    if kind == "incident":
        where = f" at epoch {e['epoch'] + 1}" if e.get("epoch") is not None else ""
        where += f", step {e['step']}" if e.get("step") is not None else ""
        action = f" -> {e['action']}" if e.get("action") else ""
        on = f" on {e['device']}" if e.get("device") else ""
        return f"incident: {e.get('kind')}{on} in attempt {e.get('attempt')}{where}: {e.get('detail', '')}{action}"
    if kind == "plan_changed":
        to = Plan.model_validate(e["to"]).describe() if e.get("to") else "?"
        return f"plan changed to {to} ({e.get('reason', '')})"
    if kind == "mirror_synced":
        behind = f", {e['behind_steps']} steps behind" if e.get("behind_steps") else ""
        lag = f" {e['lag_seconds']:.1f} s after its save" if e.get("lag_seconds") is not None else ""
        return f"mirror: step {e.get('step')} copied and verified{lag}{behind}"
    if kind == "mirror_error":
        return f"mirror failed: {e.get('error', '')}"
    if kind == "run_finished":
        return f"run {_FINISHED.get(str(e.get('status')), str(e.get('status')))}"
    return None


class _Tail:
    """The journal's new complete lines since the last read (a line being written waits for its newline)."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.partial = path, 0, b""

    def read(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        *lines, self.partial = (self.partial + data).split(b"\n")
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line torn by a crash
        return out


class _Screen:
    """Story lines, and on a terminal one progress line redrawn in place under them (plain lines otherwise)."""

    def __init__(self, out: TextIO, tty: bool) -> None:
        self.out, self.tty, self.width = out, tty, 0

    def line(self, text: str) -> None:
        self._clear()
        self.out.write(text + "\n")
        self.out.flush()

    def progress(self, text: str) -> None:
        if not self.tty:
            return
        import shutil

        text = text[: max(20, shutil.get_terminal_size().columns - 1)]
        self.out.write("\r" + text.ljust(self.width))
        self.out.flush()
        self.width = len(text)

    def _clear(self) -> None:
        if self.tty and self.width:
            self.out.write("\r" + " " * self.width + "\r")
            self.width = 0


def follow(path: str | Path, out: TextIO, *, tty: bool | None = None, poll: float = FOLLOW_POLL,
           sleep: Callable[[float], None] = time.sleep) -> int:
    """Follow the run in ``path`` from its journal until it ends: replay this call's last story lines, then one
    line per event as it happens (and a progress line on a terminal). Returns 0 when the run completed, 1
    when it failed, was interrupted or its process died; Ctrl-C stops following (the run goes on)."""
    waiting = RunDir(path)
    while not waiting.exists() and lock_holder(waiting) is not None:
        sleep(poll)  # a fit that just took the lock writes run.json next
    run = _open(path)
    epochs = run.read_spec().epochs
    screen = _Screen(out, out.isatty() if tty is None else tty)
    tail = _Tail(run.events)
    call = _current_call(tail.read())
    screen.line(f"following {run.path}: {run_state(run, call, epochs, time.time()).describe()}")
    story = [text for text in (story_line(e, epochs) for e in call) if text]
    if len(story) > FOLLOW_REPLAY:
        screen.line(f"... {len(story) - FOLLOW_REPLAY} earlier lines (resilient status {run.path} sums them up)")
    for text in story[-FOLLOW_REPLAY:]:
        screen.line(text)
    silent = 0  # polls in a row that found nobody holding the run and no end journaled
    while True:
        finished = next((e for e in reversed(call) if e["event"] == "run_finished"), None)
        if finished is not None:
            return 0 if finished.get("status") == "completed" else 1
        state = run_state(run, call, epochs, time.time())
        silent = silent + 1 if state.state in ("stopped", "not_started") else 0
        if silent >= 2:  # twice: fit takes the lock before it journals run_started
            screen.line(f"run {state.describe()}")
            return 1
        if state.state == "running":
            screen.progress(" | ".join(state.progress_parts()))
        sleep(poll)
        for e in tail.read():
            call = [e] if e["event"] == "run_started" else [*call, e]
            text = story_line(e, epochs)
            if text:
                screen.line(text)


def _current_call(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    starts = [i for i, e in enumerate(events) if e["event"] == "run_started"]
    return events[starts[-1]:] if starts else events


def add_command(subparsers: Any) -> None:
    parser = subparsers.add_parser("status", help="summarize a run directory, or follow a live run",
                                   description=summarize.__doc__)
    parser.add_argument("run_dir", help="the run_dir passed to resilient.fit")
    parser.add_argument("--mirror-dir", metavar="MIRROR_DIR", default=None,
                        help="the mirror_dir passed to fit: show what it holds, and read the run from it when "
                             "run_dir holds none (a new VM)")
    parser.add_argument("-f", "--follow", action="store_true",
                        help="follow the run live from its journal until it ends (Ctrl-C stops following)")
    parser.set_defaults(handler=_status)


def _status(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    try:
        if args.follow:
            try:
                run, _ = _open_or_mirror(args.run_dir, args.mirror_dir)
                return follow(run.path, out)
            except KeyboardInterrupt:
                out.write("\n")
                return 130
        print(summarize(args.run_dir, mirror_dir=args.mirror_dir), file=out)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=err)
        return 2
    return 0
