"""Failure classification: everything known about a finished attempt -> one incident kind.

Pure and deterministic, so every rule is tested on hand-built evidence. Rules, first match wins:

1. the supervisor's own decision: it killed a silent worker (``hang``) or its watchdog killed
   one over the memory budget (``host_oom``);
2. the kernel's word: the memory cgroup's ``oom_kill`` counter went up (``host_oom``);
3. the worker's error report (``ErrorReport``): ``preempted`` is the worker's own word (it honoured
   SIGTERM); what it raised is classified here from the facts (``report_kind``): ``disk_full`` for
   ``ENOSPC`` / ``EDQUOT`` or "No space left on device" / "Disk quota exceeded" anywhere in the
   exception's chain (checked first: TensorFlow reports a full disk as ``ResourceExhaustedError``),
   ``gpu_oom`` for a ``ResourceExhaustedError``, "OOM when allocating" or a CUDA/GPU "out of memory"
   anywhere in the chain, ``host_oom`` for a ``MemoryError`` in the chain, ``nan_loss`` for the
   worker's ``NanLoss``, ``user_error`` for anything else; the device a TensorFlow error names
   (``reported_device``) goes into the evidence;
4. the exit status: SIGKILL with RSS near the limit at the last sample is ``host_oom``, without
   memory evidence ``killed``; SIGTERM is ``preempted``; other signals and non-zero exits ``crash``.
"""

from __future__ import annotations

import errno as _errno
import re
import signal as _signal
from dataclasses import dataclass
from typing import Any, Literal

from .._protocol import EXIT_ORPHANED, EXIT_PREEMPTED, ErrorReport, ExceptionFacts

#: RSS at the last sample at or above this fraction of the limit counts as memory evidence.
RSS_NEAR_LIMIT = 0.9


def signal_name(returncode: int | None) -> str | None:
    """``-11`` -> ``'SIGSEGV'``; None for a normal exit."""
    if returncode is None or returncode >= 0:
        return None
    try:
        return _signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


#: What the supervisor did to a worker: killed it as silent ("hang") or over the memory budget
#: ("watchdog"), or sent it SIGTERM for a rehearsed preemption ("preempt") or to switch plans ("probe").
Intervention = Literal["hang", "watchdog", "preempt", "probe"]


@dataclass(frozen=True)
class AttemptOutcome:
    """The evidence about one finished attempt."""

    returncode: int | None
    report: ErrorReport | None = None  # the worker's error.json, if it wrote one
    decision: Intervention | None = None
    oom_kills: int = 0  # increase of the cgroup's oom_kill counter during the attempt
    last_rss: int | None = None
    memory_limit: int | None = None
    heartbeat_age: float | None = None
    completed: bool = False  # the worker wrote result.json
    #: The start-up phase the worker ended in (startup.py; None after its first trained step).
    startup_phase: str | None = None
    hang_timeout: float | None = None  # the timeout the supervisor's hang decision applied

    @property
    def signal(self) -> str | None:
        return signal_name(self.returncode)


def classify(outcome: AttemptOutcome) -> tuple[str | None, str, dict[str, Any]]:
    """``(kind, detail, evidence)``; kind None means the attempt completed the training."""
    sig = outcome.signal
    status = sig or f"exit code {outcome.returncode}"
    evidence: dict[str, Any] = {"exit": status}
    if outcome.startup_phase is not None:
        evidence["phase"] = outcome.startup_phase  # what an incident before the first step is told apart by
    report = outcome.report
    reported = report_kind(report) if report is not None else None
    if report is not None:
        evidence["report"] = reported
        device = reported_device(report)
        if device is not None:
            evidence["device"] = device

    if outcome.completed and outcome.returncode == 0:
        return None, "completed", evidence
    if outcome.decision == "hang":
        age = f"{outcome.heartbeat_age:.1f}s" if outcome.heartbeat_age is not None else "too long"
        evidence["heartbeat_age"] = outcome.heartbeat_age
        during = ""
        if outcome.hang_timeout is not None:
            evidence["timeout"] = outcome.hang_timeout
            during = f" (timeout {outcome.hang_timeout:.1f}s)"
        if outcome.startup_phase is not None:
            during = f" during start-up, phase {outcome.startup_phase}{during}"
        return "hang", f"no heartbeat for {age}{during}; the supervisor killed the worker ({status})", evidence
    if outcome.decision == "watchdog":
        evidence.update(source="watchdog", rss=outcome.last_rss, limit=outcome.memory_limit)
        return "host_oom", (
            f"resident memory {_gb(outcome.last_rss)} crossed the limit {_gb(outcome.memory_limit)}; "
            f"the watchdog killed the worker ({status})"
        ), evidence
    if outcome.oom_kills > 0:
        evidence.update(source="cgroup", oom_kills=outcome.oom_kills, limit=outcome.memory_limit)
        return "host_oom", (
            f"the kernel's OOM killer ended the worker in its memory cgroup (limit {_gb(outcome.memory_limit)}, "
            f"oom_kill +{outcome.oom_kills}, {status})"
        ), evidence
    if report is not None and reported in REPORTED_KINDS:
        evidence["source"] = "worker report"
        if reported == "preempted":
            return reported, "SIGTERM received; the worker saved a checkpoint and exited", evidence
        message = report.message.strip().splitlines()
        return reported, f"{report.type or 'error'}: {message[0] if message else ''}".strip(), evidence
    if outcome.returncode == EXIT_PREEMPTED or sig == "SIGTERM" or outcome.decision == "preempt":
        return "preempted", f"terminated ({status})", evidence
    if sig == "SIGKILL":
        if (
            outcome.last_rss is not None
            and outcome.memory_limit
            and outcome.last_rss >= RSS_NEAR_LIMIT * outcome.memory_limit
        ):
            evidence.update(source="rss", rss=outcome.last_rss, limit=outcome.memory_limit)
            return "host_oom", (
                f"SIGKILL with resident memory {_gb(outcome.last_rss)} near the limit {_gb(outcome.memory_limit)}"
            ), evidence
        return "killed", "SIGKILL with no memory evidence (killed from outside, or an OOM kill nobody recorded)", evidence
    if outcome.returncode == EXIT_ORPHANED:
        return "killed", "the worker lost its supervisor", evidence
    if sig is not None:
        return "crash", f"the worker died from {sig}", evidence
    if outcome.returncode == 0:
        return "crash", "the worker exited 0 without finishing the training", evidence
    tail = report.message if report is not None else None
    return "crash", f"the worker exited with code {outcome.returncode}" + (f": {tail}" if tail else ""), evidence


#: Kinds a worker's error report can establish; any other (a newer worker's word) falls through to the exit status.
REPORTED_KINDS = frozenset({"gpu_oom", "host_oom", "nan_loss", "disk_full", "preempted", "user_error"})

#: errno values of a full file system: no space left, or the user's quota spent.
DISK_FULL_ERRNOS = frozenset({_errno.ENOSPC, _errno.EDQUOT})
#: Their texts, for errors that carry only a message (TensorFlow's, or an errno lost in re-raising).
DISK_FULL_TEXTS = ("No space left on device", "Disk quota exceeded")


def report_kind(report: ErrorReport) -> str | None:
    """The incident kind of the worker's report: its own ``kind`` when set (only ``preempted`` from
    this release on; every kind in a report written by 0.1.0 or by a worker that still classifies),
    else classified from what was raised. None: the report names neither (no exception)."""
    if report.kind is not None:
        return report.kind
    if report.type is None:
        return None
    if report.type == "NanLoss":  # resilient.worker's own exception for a diverged loss
        return "nan_loss"
    # A full disk anywhere in the chain decides first: TensorFlow maps ENOSPC to ResourceExhaustedError.
    if any(is_disk_full(facts.errno, facts.message) for facts in report.chain):
        return "disk_full"
    # The outermost exception that names a memory failure decides: Keras and tf.data wrap
    # ResourceExhaustedError and MemoryError in errors of their own.
    for facts in report.chain:
        kind = _memory_kind(facts)
        if kind is not None:
            return kind
    return "user_error"


#: Where TensorFlow's errors name a device: "... on /job:localhost/replica:0/task:0/device:GPU:1 by allocator
#: GPU_1_bfc" (an OOM), or only the allocator, or a device path elsewhere in the text; in that order of trust.
_DEVICE_PATTERNS = (
    re.compile(r"\bon (?:/job:[^/\s]+)?(?:/replica:\d+)?(?:/task:\d+)?/device:([A-Za-z_]+):(\d+)"),
    re.compile(r"\ballocator ([A-Za-z]+)_(\d+)_bfc\b"),
    re.compile(r"/device:([A-Za-z_]+):(\d+)"),
)


def reported_device(report: ErrorReport) -> str | None:
    """The device the worker's error names, as TensorFlow numbers it (``"GPU:1"``); None when it names none."""
    texts = [facts.message for facts in report.chain]
    for pattern in _DEVICE_PATTERNS:
        for text in texts:
            found = pattern.search(text or "")
            if found:
                return f"{found.group(1).upper()}:{found.group(2)}"
    return None


def is_disk_full(errno: int | None, message: str = "") -> bool:
    """An error's errno or text says the file system is full or over quota."""
    return errno in DISK_FULL_ERRNOS or any(text in message for text in DISK_FULL_TEXTS)


def _memory_kind(facts: ExceptionFacts) -> str | None:
    # numpy's _ArrayMemoryError reports its class name as MemoryError.
    if facts.type == "MemoryError":
        return "host_oom"
    text = facts.message
    if facts.type == "ResourceExhaustedError" or "OOM when allocating" in text:
        return "gpu_oom"
    if "out of memory" in text.lower() and ("CUDA" in text or "GPU" in text):
        return "gpu_oom"
    return None


def _gb(n: int | None) -> str:
    from .._units import format_bytes

    return format_bytes(n)
