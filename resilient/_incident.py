"""Incidents: one classified failure of a worker attempt, with its evidence."""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

from ._plan import Plan

IncidentKind = Literal[
    "gpu_oom", "host_oom", "crash", "killed", "hang", "preempted", "nan_loss", "disk_full", "user_error"
]
INCIDENT_KINDS: tuple[str, ...] = get_args(IncidentKind)
#: Kinds a policy may hold a ladder for (``user_error`` always ends the run).
RETRYABLE_KINDS: tuple[str, ...] = tuple(k for k in INCIDENT_KINDS if k != "user_error")


class Incident(BaseModel):
    """What ended one attempt, why we think so, and what was done about it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: IncidentKind
    attempt: int = Field(ge=0)
    epoch: int | None = None
    step: int | None = Field(None, description="Global training step of the last heartbeat.")
    detail: str = ""
    evidence: dict[str, Any] = Field(default_factory=dict)
    returncode: int | None = None
    signal: str | None = None
    memory_peak_bytes: int | None = None
    #: The worker's peak GPU memory (NVML, sampled with the host memory); None without a GPU.
    gpu_memory_peak_bytes: int | None = None
    #: Runs over several devices: the device that ran out, as TensorFlow names it ("GPU:1"), from the worker's
    #: error; or, for a GPU OOM whose error names none, the fullest GPU at NVML's samples. None on one device
    #: and in journals written before it existed.
    device: str | None = None
    checkpoint_step: int | None = Field(None, description="Step of the checkpoint the next attempt resumes from.")
    action: str = ""
    plan_before: Plan
    plan_after: Plan | None = None

    @property
    def plan_changed(self) -> bool:
        return self.plan_after is not None and self.plan_after != self.plan_before
