"""What the report shows, read from the run directory alone (journal, run.json, plan.json, result.json,
checkpoint manifests, attempts/NNN/) into plain data. No plotting and no HTML here, so this part is tested
on hand-written journals and works without matplotlib.

The journal grows by additions only (events and fields are added, never removed), so every reader below
takes what is there and tolerates what is missing: a run written by 0.1.0, a run still going, a run whose
session died, and journals with or without ``memory_sample`` events.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .._checkpoint import MANIFEST, CheckpointStore
from .._plan import Plan
from .._rundir import RunDir, RunSpec

#: Keys of a ``memory_sample`` that are not memory (everything else numeric under a memory-like name is drawn).
_NOT_MEMORY = {"time", "event", "attempt", "pid", "step", "epoch", "index", "device", "devices", "seconds",
               "interval", "interval_s", "count", "samples", "every", "every_s", "period_s"}
#: Leaf names (after the last ``.``) that hold bytes even without a ``_bytes`` suffix.
_MEMORY_WORDS = ("rss", "uss", "pss", "usage", "used", "limit", "total", "peak", "current", "max", "memory")
#: Lines of a worker log shown under an incident (the whole log is a file in the run directory).
LOG_TAIL_LINES = 12


@dataclass(frozen=True)
class Point:
    """One value of a per-epoch metric at the end of ``epoch`` (global ``step``: None if unknown)."""

    epoch: int
    step: int | None
    value: float


@dataclass(frozen=True)
class Mark:
    """Something to draw as a vertical line: an incident or a plan change, at its step and time."""

    kind: str  # "incident" or "plan"
    label: str
    step: int | None
    epoch: int | None
    seconds: float | None


@dataclass(frozen=True)
class Attempt:
    """One row of the attempts table."""

    attempt: int
    plan: str
    probe: bool
    started: float | None
    ended: float | None
    exit: str
    host_peak: int | None
    gpu_peak: int | None
    cgroup_peak: int | None
    resumed_from: int | None
    outcome: str
    steps_lost: int | None
    log: str | None


@dataclass(frozen=True)
class IncidentView:
    """One incident with its evidence, the action taken, and the tail of the attempt's log."""

    kind: str
    attempt: int | None
    epoch: int | None
    step: int | None
    seconds: float | None
    detail: str
    evidence: dict[str, Any]
    action: str
    plan_before: str | None
    plan_after: str | None
    checkpoint_step: int | None
    steps_lost: int | None
    exit: str
    host_peak: int | None
    gpu_peak: int | None
    error: str | None
    log: str | None
    log_tail: list[str]


@dataclass(frozen=True)
class SavedCheckpoint:
    """One ``checkpoint_saved`` event (``on_disk``: that generation is still in checkpoints/)."""

    seconds: float | None
    attempt: int | None
    epoch: int | None
    step: int
    reason: str
    nbytes: int | None
    write_seconds: float | None
    on_disk: bool


@dataclass(frozen=True)
class Series:
    """A memory series over time (seconds since the run started, bytes); ``limit`` series are drawn dashed."""

    name: str
    points: list[tuple[float, float]]
    limit: bool = False
    gpu: bool = False


@dataclass
class RunRecord:
    """Everything the report draws and tabulates."""

    path: Path
    spec: RunSpec | None
    plan: Plan | None
    status: str
    started: _dt.datetime | None
    duration: float | None
    curves: dict[str, list[Point]]
    marks: list[Mark]
    attempts: list[Attempt]
    incidents: list[IncidentView]
    checkpoints: list[SavedCheckpoint]
    generations: list[dict[str, Any]]
    memory: list[Series]
    memory_source: str
    #: (time, step) the training reached, per attempt: the progress line of the checkpoint timeline.
    progress: dict[int, list[tuple[float, int]]] = field(default_factory=dict)


def parse_time(value: Any) -> _dt.datetime | None:
    """A journal ``time`` (ISO 8601 UTC, ``Z`` suffix) as an aware datetime; None if it does not parse."""
    if not isinstance(value, str):
        return None
    try:
        moment = _dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=_dt.timezone.utc)


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _plan_text(raw: Any) -> str | None:
    if raw is None:
        return None
    try:
        return Plan.model_validate(raw).describe()
    except ValidationError:
        return str(raw)


def read_run(path: str | Path) -> RunRecord:
    """The record of the run in ``path``; FileNotFoundError (with what to pass instead) if it holds none."""
    run = RunDir(path)
    if not run.exists():
        raise FileNotFoundError(
            f"{run.path} holds no resilient run (no run.json). Expected the run_dir passed to resilient.fit "
            "(it holds run.json, events.jsonl and checkpoints/)."
        )
    try:
        spec: RunSpec | None = run.read_spec()
    except (ValidationError, ValueError):
        spec = None  # a run.json from another release: the journal still tells the story
    try:
        plan: Plan | None = run.read_plan()
    except (OSError, ValidationError, ValueError):
        plan = spec.initial_plan if spec else None
    events = [e for e in run.read_events() if isinstance(e, dict) and isinstance(e.get("event"), str)]
    times = [t for t in (parse_time(e.get("time")) for e in events) if t is not None]
    started = times[0] if times else None

    def seconds(event: dict[str, Any]) -> float | None:
        moment = parse_time(event.get("time"))
        return (moment - started).total_seconds() if moment and started else None

    finished = [e for e in events if e["event"] == "run_finished"]
    incidents = _incidents(run, events, seconds)
    sampled = any(e["event"] == "memory_sample" for e in events)
    memory = _memory_samples(events, seconds) if sampled else _memory_peaks(events, seconds)
    memory += _asked_limits(spec, memory)
    return RunRecord(
        path=run.path, spec=spec, plan=plan,
        status=str(finished[-1].get("status", "finished")) if finished else "not finished (running, or its session died)",
        started=started, duration=(times[-1] - started).total_seconds() if started else None,
        curves=_curves(run, events), marks=_marks(events, incidents, seconds),
        attempts=_attempts(run, events, seconds), incidents=incidents,
        checkpoints=_checkpoints(run, events, seconds), generations=_generations(run),
        memory=memory, memory_source="samples" if sampled else ("attempt peaks" if memory else "none"),
        progress=_progress(events, seconds),
    )


def _curves(run: RunDir, events: list[dict[str, Any]]) -> dict[str, list[Point]]:
    """Per-epoch metrics: from ``epoch_end`` events (the last report of an epoch wins: an epoch trained again
    after a restart replaces its first try); else from result.json or the newest checkpoint's history."""
    by_epoch: dict[int, tuple[int | None, dict[str, Any]]] = {}
    for e in events:
        if e["event"] == "epoch_end" and _int(e.get("epoch")) is not None and isinstance(e.get("logs"), dict):
            by_epoch[e["epoch"]] = (_int(e.get("step")), e["logs"])
    if not by_epoch:
        history, epochs, steps = _stored_history(run)
        for i, epoch in enumerate(epochs):
            logs = {name: values[i] for name, values in history.items() if i < len(values)}
            by_epoch[epoch] = ((epoch + 1) * steps if steps else None, logs)
    curves: dict[str, list[Point]] = {}
    for epoch in sorted(by_epoch):
        step, logs = by_epoch[epoch]
        for name, value in logs.items():
            number = _number(value)
            if number is not None:
                curves.setdefault(str(name), []).append(Point(epoch, step, number))
    return curves


def _stored_history(run: RunDir) -> tuple[dict[str, list[Any]], list[int], int | None]:
    """(history, epochs, steps per epoch) from result.json, else from the newest checkpoint's manifest."""
    for read in (lambda: json.loads(run.result_json.read_text()), lambda: _newest_meta(run)):
        try:
            data = read()
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and isinstance(data.get("history"), dict):
            history = {k: v for k, v in data["history"].items() if isinstance(v, list)}
            epochs = data.get("epochs_done") or list(range(max((len(v) for v in history.values()), default=0)))
            return history, [e for e in epochs if isinstance(e, int)], _int(data.get("steps"))
    return {}, [], None


def _newest_meta(run: RunDir) -> dict[str, Any]:
    meta = CheckpointStore(run.checkpoints).latest_meta()
    if meta is None:
        raise ValueError("no checkpoint")
    return meta


def _log_of(run: RunDir, attempt: int | None, named: Any = None) -> Path | None:
    """The attempt's log file: the one its incident names, else ``attempts/NNN/*.log``."""
    if isinstance(named, str) and named:
        path = Path(named) if Path(named).is_absolute() else run.path / named
        if path.is_file():
            return path
    if attempt is None:
        return None
    logs = sorted(run.attempt_dir(attempt).glob("*.log"))
    return logs[0] if logs else None


def _relative(run: RunDir, path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        return str(path.relative_to(run.path))
    except ValueError:
        return str(path)


def _exit_text(event: dict[str, Any] | None) -> str:
    if event is None:
        return "running or lost"
    if event.get("interrupted"):
        return "interrupted (Ctrl-C)"
    if event.get("signal"):
        return str(event["signal"])
    code = event.get("returncode")
    return f"exit {code}" if code is not None else "not started"


def _steps_lost(incident: dict[str, Any]) -> int | None:
    step, saved = _int(incident.get("step")), _int(incident.get("checkpoint_step"))
    if step is None:
        return None
    return max(step - (saved or 0), 0)


def _incidents(run: RunDir, events: list[dict[str, Any]], seconds: Any) -> list[IncidentView]:
    ended = {e.get("attempt"): e for e in events if e["event"] == "attempt_ended"}
    views = []
    for e in (e for e in events if e["event"] == "incident"):
        attempt = _int(e.get("attempt"))
        log = _log_of(run, attempt, e.get("log") or e.get("log_file"))
        views.append(IncidentView(
            kind=str(e.get("kind", "?")), attempt=attempt, epoch=_int(e.get("epoch")), step=_int(e.get("step")),
            seconds=seconds(e), detail=str(e.get("detail", "")),
            evidence=e["evidence"] if isinstance(e.get("evidence"), dict) else {},
            action=str(e.get("action", "")), plan_before=_plan_text(e.get("plan_before")),
            plan_after=_plan_text(e.get("plan_after")), checkpoint_step=_int(e.get("checkpoint_step")),
            steps_lost=_steps_lost(e), exit=_exit_text(ended.get(attempt)),
            host_peak=_int(e.get("memory_peak_bytes")), gpu_peak=_int(e.get("gpu_memory_peak_bytes")),
            error=_error_line(run, attempt), log=_relative(run, log), log_tail=_tail(log),
        ))
    return views


def _error_line(run: RunDir, attempt: int | None) -> str | None:
    """``Type: message`` from the attempt's error.json (the worker's own report), if it wrote one."""
    if attempt is None:
        return None
    try:
        report = json.loads((run.attempt_dir(attempt) / "error.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(report, dict):
        return None
    return ": ".join(str(report[k]) for k in ("type", "message") if report.get(k)) or None


def _tail(path: Path | None) -> list[str]:
    if path is None:
        return []
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(f.tell() - 64 * 1024, 0))  # a log may be large; its end is what explains the incident
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return []
    return [line[:400] for line in lines[-LOG_TAIL_LINES:]]


def _marks(events: list[dict[str, Any]], incidents: list[IncidentView], seconds: Any) -> list[Mark]:
    """Incidents at their step; a plan change at the step training had reached when it was decided (an
    incident's own step; for a kept probe, the last step journaled before it)."""
    marks = [Mark("incident", i.kind, i.step, i.epoch, i.seconds) for i in incidents]
    step = epoch = None
    for e in events:
        if e["event"] == "plan_changed":
            marks.append(Mark("plan", f"plan: {_plan_text(e.get('to')) or '?'}", step, epoch, seconds(e)))
        elif _int(e.get("step")) is not None and e["event"] not in ("worker_ready",):
            step, epoch = e["step"], _int(e.get("epoch"))
    return marks


def _attempts(run: RunDir, events: list[dict[str, Any]], seconds: Any) -> list[Attempt]:
    ended = {e.get("attempt"): e for e in events if e["event"] == "attempt_ended"}
    incident = {e.get("attempt"): e for e in events if e["event"] == "incident"}
    ready = {e.get("attempt"): e for e in events if e["event"] == "worker_ready"}
    rows = []
    for e in (e for e in events if e["event"] == "attempt_started"):
        a = _int(e.get("attempt"))
        end, inc = ended.get(a), incident.get(a)
        if inc is not None:
            outcome = str(inc.get("kind", "?"))
        elif end is not None and end.get("returncode") == 0:
            outcome = "completed"
        else:
            outcome = "interrupted" if end is not None and end.get("interrupted") else ""
        rows.append(Attempt(
            attempt=a if a is not None else len(rows), plan=_plan_text(e.get("plan")) or "?", probe=bool(e.get("probe")),
            started=seconds(e), ended=seconds(end) if end else None, exit=_exit_text(end),
            host_peak=_int((end or {}).get("memory_peak_bytes")), gpu_peak=_int((end or {}).get("gpu_memory_peak_bytes")),
            cgroup_peak=_int((end or {}).get("cgroup_peak_bytes")),
            resumed_from=_int(ready[a].get("resumed_from_step")) if a in ready else None,
            outcome=outcome, steps_lost=_steps_lost(inc) if inc else None,
            log=_relative(run, _log_of(run, a, (inc or {}).get("log"))),
        ))
    return rows


def _checkpoints(run: RunDir, events: list[dict[str, Any]], seconds: Any) -> list[SavedCheckpoint]:
    on_disk = {p.name for p in CheckpointStore(run.checkpoints).generations()}
    saved = []
    for e in (e for e in events if e["event"] == "checkpoint_saved"):
        step = _int(e.get("step"))
        if step is None:
            continue
        saved.append(SavedCheckpoint(
            seconds=seconds(e), attempt=_int(e.get("attempt")), epoch=_int(e.get("epoch")), step=step,
            reason=str(e.get("reason", "")), nbytes=_int(e.get("bytes")), write_seconds=_number(e.get("seconds")),
            on_disk=Path(str(e.get("path", ""))).name in on_disk,
        ))
    return saved


def _generations(run: RunDir) -> list[dict[str, Any]]:
    """The generations in checkpoints/ now, newest first, from their manifests; ``damaged`` says why one
    does not verify (the checksums are read: the report is run once, after the fact)."""
    store = CheckpointStore(run.checkpoints)
    _, damaged = store.survey()
    why = {path.name: reason for path, reason in damaged}
    out = []
    for path in store.generations():
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except (OSError, ValueError):
            manifest = {}
        manifest = manifest if isinstance(manifest, dict) else {}
        meta = manifest.get("meta") if isinstance(manifest.get("meta"), dict) else {}
        files = manifest.get("files") if isinstance(manifest.get("files"), dict) else {}
        out.append({"name": path.name, "step": _int(manifest.get("step")), "epoch": _int(meta.get("epoch")),
                    "created": str(manifest.get("created", "")), "plan": _plan_text(meta.get("plan")),
                    "bytes": sum(_int(f.get("bytes")) or 0 for f in files.values() if isinstance(f, dict)),
                    "damaged": why.get(path.name)})
    return out


def _flatten(value: Any, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested ``memory_sample`` as dotted names (``gpu.0.used_bytes``)."""
    if isinstance(value, dict):
        out: dict[str, float] = {}
        for key, item in value.items():
            if str(key) not in _NOT_MEMORY:
                out.update(_flatten(item, f"{prefix}{key}."))
        return out
    if isinstance(value, list):
        out = {}
        for i, item in enumerate(value):
            label = item.get("index", item.get("device", i)) if isinstance(item, dict) else i
            out.update(_flatten(item, f"{prefix}{label}."))
        return out
    number = _number(value)
    return {prefix.rstrip("."): number} if number is not None else {}


def _is_memory(name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1].lower()
    return leaf.endswith("bytes") or any(word in leaf for word in _MEMORY_WORDS)


def _memory_samples(events: list[dict[str, Any]], seconds: Any) -> list[Series]:
    """Series from ``memory_sample`` events, whatever their exact shape: every numeric field with a memory-like
    name, nested ones named by their path; a name with ``limit`` or ``total`` is a limit (drawn dashed)."""
    series: dict[str, list[tuple[float, float]]] = {}
    attempt = None
    for e in (e for e in events if e["event"] == "memory_sample"):
        moment = seconds(e)
        if moment is None:
            continue
        if e.get("attempt") != attempt and attempt is not None:
            for points in series.values():  # a NaN breaks the line: the gap between two workers is the restart
                points.append((moment, float("nan")))
        attempt = e.get("attempt")
        for name, value in _flatten(e).items():
            if _is_memory(name):
                series.setdefault(name, []).append((moment, value))
    return [Series(name, points, limit=any(w in name.lower() for w in ("limit", "total")), gpu="gpu" in name.lower())
            for name, points in series.items()]


def _memory_peaks(events: list[dict[str, Any]], seconds: Any) -> list[Series]:
    """Without samples: each attempt's peaks (``attempt_ended``) held over the attempt's span, and the limits
    the run was given (``run_started``), so an incident's memory still shows against its limit."""
    started = {e.get("attempt"): seconds(e) for e in events if e["event"] == "attempt_started"}
    series: dict[str, list[tuple[float, float]]] = {}
    for e in (e for e in events if e["event"] == "attempt_ended"):
        begin, end = started.get(e.get("attempt")), seconds(e)
        if begin is None or end is None:
            continue
        for key, name in (("memory_peak_bytes", "host peak (worker RSS)"), ("cgroup_peak_bytes", "host peak (cgroup)"),
                          ("gpu_memory_peak_bytes", "GPU peak")):
            value = _number(e.get(key))
            if value is not None:
                # A NaN breaks the line between attempts: the gap is the restart.
                series.setdefault(name, []).extend([(begin, value), (end, value), (end, float("nan"))])
    return [Series(name, points, gpu=name.startswith("GPU")) for name, points in series.items()]


def _asked_limits(spec: RunSpec | None, memory: list[Series]) -> list[Series]:
    """The limits fit was given (run.json), across the drawn span, for a side whose series carry none."""
    span = [p[0] for s in memory for p in s.points]
    if spec is None or not span:
        return []
    out = []
    for value, name, gpu in ((spec.host_memory_limit_bytes, "host_memory_limit (asked)", False),
                             (spec.gpu_memory_limit_bytes, "gpu_memory_limit (asked, per device)", True)):
        drawn = any(s.gpu == gpu for s in memory if not s.limit)
        if value is not None and drawn and not any(s.limit and s.gpu == gpu for s in memory):
            out.append(Series(name, [(min(span), float(value)), (max(span), float(value))], limit=True, gpu=gpu))
    return out


def _progress(events: list[dict[str, Any]], seconds: Any) -> dict[int, list[tuple[float, int]]]:
    """The steps each attempt reached over time (resume point, checkpoints, epoch ends, its incident)."""
    lines: dict[int, list[tuple[float, int]]] = {}
    for e in events:
        attempt, step, moment = _int(e.get("attempt")), _int(e.get("step")), seconds(e)
        if e["event"] in ("worker_ready", "first_step", "checkpoint_saved", "epoch_end", "incident", "progress") \
                and attempt is not None and step is not None and moment is not None:
            lines.setdefault(attempt, []).append((moment, step))
    return lines
