"""Fault rehearsal: ``"gpu_oom@40,hang@120"`` parsed into specs, each firing once per run."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

#: ``save_kill`` is met at the first checkpoint save at or after its step, not at the step itself:
#: the worker SIGKILLs itself halfway through writing the generation (see ``worker.faults``).
FaultKind = Literal["gpu_oom", "host_oom", "segfault", "abort", "sigkill", "hang", "preempt", "nan", "save_kill"]
FAULT_KINDS: tuple[str, ...] = get_args(FaultKind)


class Fault(BaseModel):
    """One rehearsed fault: ``kind`` met at global training step ``step``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: FaultKind
    step: int = Field(ge=0)

    @property
    def key(self) -> str:
        return f"{self.kind}@{self.step}"


def parse_faults(spec: str | Iterable[str] | None) -> tuple[Fault, ...]:
    """Parse ``"gpu_oom@40,hang@120"`` or ``["gpu_oom@40", ...]`` into faults sorted by step."""
    if spec is None:
        return ()
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    faults: list[Fault] = []
    for raw in items:
        text = str(raw).strip()
        if not text:
            continue
        kind, sep, step = text.partition("@")
        kind = kind.strip()
        if not sep or kind not in FAULT_KINDS or not re.fullmatch(r"[0-9]+", step.strip()):
            raise ValueError(
                f"Invalid value for argument `faults`. Received: {text!r}. Expected 'kind@step' with kind one of "
                f"{', '.join(FAULT_KINDS)} and step a non-negative integer, e.g. faults='gpu_oom@40,hang@120'."
            )
        faults.append(Fault(kind=kind, step=int(step)))  # type: ignore[arg-type]
    keys = [f.key for f in faults]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise ValueError(f"Invalid value for argument `faults`. Received duplicates: {dupes}. Each fault fires once.")
    return tuple(sorted(faults, key=lambda f: (f.step, f.kind)))


class FiredFaults:
    """The set of faults that already fired, persisted in the run directory before each one fires."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def load(self) -> set[str]:
        try:
            return set(json.loads(self.path.read_text()))
        except FileNotFoundError:
            return set()

    def record(self, fault: Fault) -> None:
        """Durably add ``fault`` (write, fsync, rename) so it never fires again, even after SIGKILL."""
        fired = self.load() | {fault.key}
        from ._rundir import atomic_write_text

        atomic_write_text(self.path, json.dumps(sorted(fired)))
