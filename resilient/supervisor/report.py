"""What a person reads when the run stops: the root-cause report of a failed run, the message of a
user error, and the checkpoint the next call resumes from."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import ValidationError

from .._checkpoint import CheckpointStore
from .._incident import Incident
from .._protocol import EXIT_PREEMPTED, EXIT_REPORTED, CheckpointMeta, ErrorReport
from .._rundir import RunDir
from .._units import format_bytes


@dataclass(frozen=True)
class SavedCheckpoint:
    """The newest checkpoint of a run, as the next attempt will find it."""

    step: int
    path: str
    #: None for a manifest whose meta does not read as a CheckpointMeta (the step and path still do).
    meta: CheckpointMeta | None = None

    @property
    def epoch(self) -> int | None:
        return self.meta.epoch if self.meta is not None else None

    @property
    def offset(self) -> int | None:
        return self.meta.offset if self.meta is not None else None


def latest_checkpoint(run: RunDir) -> SavedCheckpoint | None:
    """The newest checkpoint's step, path and meta, from its manifest (payload checksums unchecked: cheap)."""
    raw = CheckpointStore(run.checkpoints).latest_meta()
    if raw is None:
        return None
    try:
        # The manifest's step is the global step; a meta that omits it (a scripted test worker) still reads.
        meta: CheckpointMeta | None = CheckpointMeta.model_validate({"global_step": raw["step"], **raw})
    except ValidationError:
        meta = None
    return SavedCheckpoint(step=int(raw["step"]), path=str(raw["path"]), meta=meta)


def saved_text(checkpoint: SavedCheckpoint | None) -> str:
    """``checkpoint at step 80``, for a console line."""
    return f"checkpoint at step {checkpoint.step}" if checkpoint else "no checkpoint yet"


def _ckpt_text(checkpoint: SavedCheckpoint | None) -> str:
    if not checkpoint:
        return "none: the run starts from the beginning"
    return f"step {checkpoint.step}, epoch {checkpoint.epoch}, sample {checkpoint.offset} at {checkpoint.path}"


def user_error_message(report: ErrorReport | None, checkpoint: SavedCheckpoint | None, run: RunDir) -> str:
    """The text of ``UserCodeError``: what was raised, why it was not retried, and the worker's traceback."""
    report = report or ErrorReport()
    return (
        f"The training code raised {report.type}: {report.message}\n"
        f"It is not a resource failure, so resilient did not retry. The run directory keeps its last "
        f"checkpoint ({_ckpt_text(checkpoint)}); fix the error and call fit again with run_dir="
        f"{str(run.path)!r} to resume.\n\nWorker traceback:\n{report.traceback}"
    )


def _memory_text(incident: Incident) -> str:
    host = format_bytes(incident.memory_peak_bytes)
    if incident.gpu_memory_peak_bytes is None:
        return host
    return f"{host}, GPU {format_bytes(incident.gpu_memory_peak_bytes)}"


def root_cause_report(incidents: list[Incident], run: RunDir, reason: str) -> str:
    """The final failure, written for a person reading it in the morning."""
    ckpt = latest_checkpoint(run)
    lines = [
        f"resilient: training failed after {len(incidents)} attempt(s): {reason}.",
        f"Run directory: {run.path}",
        f"Last checkpoint: {_ckpt_text(ckpt)}",
        "",
        f"{'attempt':>7}  {'plan':<34} {'ended by':<14} {'incident':<10} {'epoch/step':<11} {'memory peak':<12} detail",
    ]
    for inc in incidents:
        ended = inc.signal or (f"exit {inc.returncode}" if inc.returncode is not None else "?")
        if inc.returncode == EXIT_REPORTED:
            ended += " (error)"
        elif inc.returncode == EXIT_PREEMPTED:
            ended += " (SIGTERM)"
        where = f"{inc.epoch if inc.epoch is not None else '-'}/{inc.step if inc.step is not None else '-'}"
        lines.append(
            f"{inc.attempt:>7}  {inc.plan_before.describe():<34} {ended:<14} {inc.kind:<10} {where:<11} "
            f"{_memory_text(inc):<12} {inc.detail}" + (f" [device {inc.device}]" if inc.device else "")
        )
        if inc.action:
            lines.append(f"{'':>9}-> {inc.action}")
    if incidents:
        last = incidents[-1]
        counts: dict[str, int] = {}
        for inc in incidents:
            counts[inc.kind] = counts.get(inc.kind, 0) + 1
        lines += ["", "Incidents: " + ", ".join(f"{k} x{n}" for k, n in counts.items()) + "."]
        lines.append(f"Root cause: the last attempt ended with {last.kind}: {last.detail}.")
        lines.append("What to do: " + _advice(last.kind))
    lines.append(f"The journal is {run.events}; call fit again with the same run_dir to resume from the checkpoint.")
    return "\n".join(lines)


def _advice(kind: str) -> str:
    return {
        "gpu_oom": "the model does not fit on the GPU even with the policy's smallest plan; lower the batch size, "
                   "use a smaller model or input size, or add rungs to the gpu_oom ladder.",
        "host_oom": "host RAM ran out; avoid .cache() on large datasets, lower shuffle buffers, raise "
                    "host_memory_limit, or add drop_cache/shrink_buffers/halve_batch to the host_oom ladder.",
        "crash": "the worker crashed natively; see attempts/<N>/worker.log for the native stack; a library "
                 "upgrade or a smaller plan may help.",
        "killed": "something outside killed the worker with SIGKILL; check the machine's OOM log (dmesg) and "
                  "other jobs.",
        "hang": "the worker stopped making progress; raise hang_timeout if steps are legitimately slow, or check "
                "the input pipeline for deadlocks.",
        "preempted": "the worker kept being terminated; check what sends SIGTERM.",
        "nan_loss": "the loss kept diverging; lower the learning rate, leave mixed precision, or check the data.",
        "disk_full": "the run directory's file system is full; free space there (or move the run directory to a "
                     "larger disk) and call fit again with the same run_dir: it resumes from the last checkpoint, "
                     "which a failed save leaves intact.",
    }.get(kind, "see the journal and worker logs.")
