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

from ._errors import RunDirError
from ._faults import Fault
from ._plan import Plan
from ._replan import PlanBasis

#: A run directory holds code (pickled callbacks and objects, a Keras model): it is private to its
#: owner whatever the umask, and resuming one that others could have written is refused.
DIR_MODE = 0o700
FILE_MODE = 0o600
#: Files whose content runs when a run resumes; their owner and mode are checked with the directory's.
_CODE_FILES = ("objects.pkl", "model.keras")


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
        os.chmod(tmp, FILE_MODE)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:  # a failed flush names no file: say which
            raise OSError(e.errno, e.strerror, str(path)) from e
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


class InputFacts(BaseModel):
    """What the policy steps may know of the inputs (``policy.StepContext``), kept so that a run can be
    resumed from its directory alone (``resilient.resume``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    resizable_input: bool = False
    source_image_size: tuple[int, int] | None = None
    batch_size_fixed: bool = False
    cacheable: bool = True
    buffered: bool = True


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
    #: The resource settings the plan was derived under (None: a run.json written by 0.1.0, whose
    #: memory limits are the fields above).
    plan_basis: PlanBasis | None = None
    #: fit's ``devices`` (``_devices.check_devices``); "auto" for a run.json written before it existed.
    devices: str | tuple[str, ...] = "auto"
    #: The inputs' facts for the policy steps, and the policy as fit named it (a preset or a file; None
    #: for a Policy object): what ``resilient.resume`` continues with. None in older run.json files.
    input_facts: InputFacts | None = None
    policy_name: str | None = None

    def basis(self) -> PlanBasis:
        """The settings of the call that wrote this spec (0.1.0: its memory limits, device and policy unknown)."""
        if self.plan_basis is not None:
            return self.plan_basis
        return PlanBasis(host_memory_limit=self.host_memory_limit_bytes, gpu_memory_limit=self.gpu_memory_limit_bytes)


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

    def create(self) -> None:
        """Create the directory (parents as the umask says; the run directory itself private)."""
        if not self.path.is_dir():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.mkdir(mode=DIR_MODE, exist_ok=True)
            os.chmod(self.path, DIR_MODE)  # mkdir's mode is masked by the umask; this is not

    def private_dir(self, path: Path) -> Path:
        """Create ``path`` inside the run directory, and any missing folder between, 0700 whatever the umask."""
        target = folder = Path(path)
        missing = []
        while not folder.is_dir() and self.path in folder.parents:
            missing.append(folder)
            folder = folder.parent
        for folder in reversed(missing):
            folder.mkdir(mode=DIR_MODE, exist_ok=True)
            os.chmod(folder, DIR_MODE)  # mkdir's mode is masked by the umask; this is not
        return target

    def check_trusted(self) -> None:
        """Refuse a run directory another user owns or others can write: resuming it would run its code."""
        me = os.getuid()
        for path in (self.path, *(self.path / name for name in _CODE_FILES), self.checkpoints, *self._checkpoint_files()):
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            problem = None
            if st.st_uid != me:
                problem = f"is owned by uid {st.st_uid}, not by you (uid {me})"
            elif st.st_mode & 0o022:
                problem = f"is writable by {'others' if st.st_mode & 0o002 else 'its group'} (mode {st.st_mode & 0o777:o})"
            if problem:
                raise RunDirError(
                    f"Refusing to resume {self.path}: {path} {problem}. A run directory is code: resuming it runs the "
                    "pickled callbacks and objects and the Keras model stored in it, so resume only your own. If you "
                    f"know who wrote it, make it yours (chown -R $(id -u) {self.path}; chmod -R go-w {self.path}) or "
                    "pass trust_run_dir=True."
                )

    def _checkpoint_files(self) -> list[Path]:
        """Every generation and its files: each holds a callbacks.pkl that a resume unpickles."""
        try:
            generations = [g for g in self.checkpoints.iterdir() if g.is_dir()]
        except OSError:
            return []
        out: list[Path] = []
        for generation in sorted(generations):
            out.append(generation)
            with contextlib.suppress(OSError):
                out.extend(sorted(generation.iterdir()))
        return out

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
        """Append one line and fsync it: the line survives a power cut once this returns."""
        return self._append({"time": utcnow(), "event": event, **fields}, sync=True)

    def note(self, event: str, **fields: Any) -> dict[str, Any]:
        """Append one line without fsync (telemetry such as ``memory_sample``): microseconds, not a disk
        round trip; a power cut may lose it, and the next ``write`` syncs it with its own line."""
        return self._append({"time": utcnow(), "event": event, **fields}, sync=False)

    def _append(self, record: dict[str, Any], sync: bool) -> dict[str, Any]:
        data = (json.dumps(record, default=_json_default, separators=(",", ":")) + "\n").encode()
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE)
            try:
                size = os.fstat(fd).st_size
                try:
                    written = 0
                    while written < len(data):
                        written += os.write(fd, data[written:])
                    if sync:
                        os.fsync(fd)
                except OSError as e:
                    # A full disk can take part of a line; cut it off, or the next line would be glued to it.
                    with contextlib.suppress(OSError):
                        os.ftruncate(fd, size)
                    raise OSError(e.errno, e.strerror, str(self.path)) from e  # os.write's error names no file
            finally:
                os.close(fd)
        return record


def _json_default(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    return repr(value)


def check_run_dir_path(value: str | os.PathLike[str], name: str = "run_dir") -> Path:
    """``value`` as an absolute path that can hold a run directory; RunDirError says what is wrong and what to do.

    Checked before anything is written: an empty string, a file, a path under a file, a path under
    /proc or /sys, and a place that cannot be written. ``name``: the argument the messages name.
    """
    text = os.fspath(value)
    if isinstance(text, bytes) or not str(text).strip():
        raise RunDirError(
            f"Invalid value for argument `{name}`. Received: {name}={value!r}. Expected a directory path "
            "(it is created if missing), or None for ./resilient_runs/<time>-<model>."
        )
    path = Path(text).expanduser().absolute()
    if path.parts[1:2] in (("proc",), ("sys",), ("dev",)):
        raise RunDirError(f"{name}={str(path)!r} is under /{path.parts[1]}, a kernel file system that cannot hold "
                          "files. Pass a directory on a disk, e.g. ./runs/my-run.")
    if path.exists() and not path.is_dir():
        raise RunDirError(f"{name}={str(path)!r} is a file, not a directory. Pass a directory path (a new one "
                          "starts a run; one that holds a run resumes it).")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise RunDirError(f"{name}={str(path)!r} lies under {str(existing)!r}, which is a file. Pass a path whose "
                          "parents are directories.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RunDirError(f"{name}={str(path)!r} cannot be written: {str(existing)!r} is read-only for this user "
                          "(permissions, or a read-only file system). Pass a directory you can write, or fix its "
                          "permissions.")
    return path
