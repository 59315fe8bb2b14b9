"""The run directory: the only state that outlives a process or a VM.

Layout::

    run_dir/
      run.json          RunSpec: what was asked (validated on both sides of the process boundary)
      plan.json         the plan in force; a new VM resumes with it
      events.jsonl      the journal, one JSON object a line
      checkpoints/      atomic, verified generations (see _checkpoint.py)
      model.keras       the model as handed to fit (architecture, compile config, initial weights)
      objects.pkl       custom objects and callbacks, carried by value (cloudpickle)
      data/             inputs stored once (NumPy arrays are memory-mapped by the worker)
      attempts/N/       per attempt: worker.log, error.json
      faults_fired.json rehearsed faults that already fired
      result.json       written by the worker when training completed
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ._faults import Fault
from ._plan import Plan


def utcnow() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; on success it is synced and renamed over
    ``path``, so readers see the old or the new file, never a mix; on failure it is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}-{threading.get_ident()}{path.suffix}")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_file(path: Path, mode: Literal["w", "wb"] = "wb") -> Iterator[IO[Any]]:
    """``open(path, mode)`` that replaces ``path`` atomically when the block ends (``atomic_path``)."""
    with atomic_path(path) as tmp, open(tmp, mode) as f:
        yield f


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so readers see the old or the new content, never a mix."""
    with atomic_file(path, "w") as f:
        f.write(text)


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class ArraysData(BaseModel):
    """NumPy arrays stored once under ``data/`` and memory-mapped by the worker."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["arrays"] = "arrays"
    x: str
    y: str | None
    samples: int
    val_x: str | None = None
    val_y: str | None = None
    image_axes: tuple[int, int] | None = Field(
        None, description="Axes of (height, width) in one sample when x holds images (resizable)."
    )
    sample_weight: str | None = Field(None, description="fit's sample_weight, stored beside x and y.")
    val_sample_weight: str | None = Field(None, description="The validation data's sample weights.")


class ObjectData(BaseModel):
    """An input carried by value: a dataset factory or a PyDataset (key into objects.pkl)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["factory", "pydataset", "image_folder"]
    key: str
    val_key: str | None = None
    samples: int | None = None


class RunSpec(BaseModel):
    """What fit() was asked to do; written once as run.json and read by every worker."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: int = 1
    created: str = Field(default_factory=utcnow)
    epochs: int = Field(ge=0)
    seed: int
    shuffle: bool = True
    verbose: int = 1
    data: ArraysData | ObjectData = Field(discriminator="kind")
    model_fingerprint: str
    model_name: str = "model"
    model_builder: bool = False
    checkpoint_every_steps: int | None = None
    checkpoint_every_seconds: float | None = None
    faults: tuple[Fault, ...] = ()
    gpu_memory_limit_bytes: int | None = None
    host_memory_limit_bytes: int | None = None
    initial_plan: Plan
    has_callbacks: bool = False
    flexible_input: bool = Field(
        False, description="The model's fixed image input may be rebuilt to take another size (lower_resolution)."
    )
    versions: dict[str, str] = Field(default_factory=dict)
    # model.fit's own arguments beyond the basics (defaults: model.fit's, so an older run.json loads).
    initial_epoch: int = Field(0, ge=0)
    steps_per_epoch: int | None = Field(None, ge=1)
    validation_steps: int | None = Field(None, ge=1)
    validation_batch_size: int | None = Field(None, ge=1)
    validation_freq: int | tuple[int, ...] = 1
    class_weight: dict[int, float] | None = None


class RunDir:
    """Paths and small helpers over one run directory."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).absolute()

    run_json = property(lambda self: self.path / "run.json")
    plan_json = property(lambda self: self.path / "plan.json")
    events = property(lambda self: self.path / "events.jsonl")
    checkpoints = property(lambda self: self.path / "checkpoints")
    model_file = property(lambda self: self.path / "model.keras")
    objects_file = property(lambda self: self.path / "objects.pkl")
    data_dir = property(lambda self: self.path / "data")
    faults_fired = property(lambda self: self.path / "faults_fired.json")
    result_json = property(lambda self: self.path / "result.json")
    lock_file = property(lambda self: self.path / ".lock")

    def attempt_dir(self, attempt: int) -> Path:
        return self.path / "attempts" / f"{attempt:03d}"

    def exists(self) -> bool:
        return self.run_json.exists()

    def read_spec(self) -> RunSpec:
        return RunSpec.model_validate_json(self.run_json.read_text())

    def write_spec(self, spec: RunSpec) -> None:
        atomic_write_text(self.run_json, spec.model_dump_json(indent=2))

    def read_plan(self) -> Plan:
        return Plan.model_validate_json(self.plan_json.read_text())

    def write_plan(self, plan: Plan) -> None:
        atomic_write_text(self.plan_json, plan.model_dump_json(indent=2))

    def read_events(self) -> list[dict[str, Any]]:
        try:
            lines = self.events.read_text().splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line torn by a crash mid-write; the rest of the journal is intact
        return out


class Journal:
    """Appends events to ``events.jsonl``: one JSON object a line, each with ``time`` and ``event``."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    def write(self, event: str, **fields: Any) -> dict[str, Any]:
        record = {"time": utcnow(), "event": event, **fields}
        line = json.dumps(record, default=_json_default, separators=(",", ":")) + "\n"
        with self._lock, open(self.path, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        return record


def _json_default(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    return repr(value)
