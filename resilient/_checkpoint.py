"""The checkpoint store: atomic, checksummed generations with fall-back on load.

A checkpoint is a directory ``checkpoints/ckpt-<step>/`` holding payload files and a
``manifest.json`` that lists each file's size and SHA-256. It is written under a temporary
name, every file fsynced, then renamed into place, so a reader sees a whole checkpoint or none.
Loading verifies the checksums and falls back to the previous generation when one is damaged.

``BackgroundWriter`` runs one save at a time off the training thread (the worker's asynchronous
checkpoints): a generation is durable only once its rename is done, and a failed write is raised on
the training thread, as if the save had run there.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._errors import RunDirError
from ._rundir import DIR_MODE, FILE_MODE, fsync_dir, utcnow

MANIFEST = "manifest.json"
_PREFIX = "ckpt-"


class CorruptCheckpoint(Exception):
    """A checkpoint failed verification (missing file, size or checksum mismatch)."""


@dataclass
class Checkpoint:
    path: Path
    step: int
    meta: dict[str, Any]
    files: dict[str, dict[str, Any]] = field(default_factory=dict)

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def nbytes(self) -> int:
        return sum(int(f["bytes"]) for f in self.files.values())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class CheckpointStore:
    """Writes and reads checkpoint generations under one directory."""

    def __init__(self, root: Path, keep: int = 3) -> None:
        if keep < 2:
            raise ValueError(f"keep must be >= 2 so a damaged checkpoint has a fall-back. Received: keep={keep}")
        self.root = Path(root)
        self.keep = keep

    def save(self, step: int, meta: dict[str, Any], writer: Any) -> Checkpoint:
        """Create generation ``step``: ``writer(tmp_dir)`` writes the payload files; then commit atomically."""
        self.root.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        tmp = self.root / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir(mode=DIR_MODE)
        try:
            writer(tmp)
            files: dict[str, dict[str, Any]] = {}
            for p in sorted(tmp.iterdir()):
                os.chmod(p, FILE_MODE)
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
                files[p.name] = {"bytes": p.stat().st_size, "sha256": _sha256(p)}
            manifest = {"step": step, "created": utcnow(), "meta": meta, "files": files}
            with os.fdopen(os.open(tmp / MANIFEST, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE), "w") as f:
                json.dump(manifest, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            fsync_dir(tmp)
            final = self.root / f"{_PREFIX}{step:012d}"
            if final.exists():
                # Same step saved again (e.g. epoch end right after a step save): replace it whole.
                trash = self.root / f".old-{uuid.uuid4().hex}"
                os.replace(final, trash)
                os.replace(tmp, final)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.replace(tmp, final)
            fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._prune()
        return Checkpoint(final, step, meta, files)

    def generations(self) -> list[Path]:
        """Committed checkpoint directories, newest first."""
        if not self.root.exists():
            return []
        dirs = [p for p in self.root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX)]
        return sorted(dirs, key=lambda p: p.name, reverse=True)

    def verify(self, path: Path) -> Checkpoint:
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CorruptCheckpoint(f"{path.name}: unreadable manifest ({e})") from e
        if (
            not isinstance(manifest, dict)
            or not isinstance(manifest.get("files"), dict)
            or not isinstance(manifest.get("step"), int)
            or not all(isinstance(i, dict) and {"bytes", "sha256"} <= i.keys() for i in manifest["files"].values())
        ):
            raise CorruptCheckpoint(f"{path.name}: manifest has the wrong structure")
        for name, info in manifest["files"].items():
            p = path / name
            if not p.exists():
                raise CorruptCheckpoint(f"{path.name}: missing {name}")
            if p.stat().st_size != info["bytes"]:
                raise CorruptCheckpoint(f"{path.name}: {name} has {p.stat().st_size} bytes, manifest says {info['bytes']}")
            if _sha256(p) != info["sha256"]:
                raise CorruptCheckpoint(f"{path.name}: {name} checksum mismatch")
        return Checkpoint(path, int(manifest["step"]), manifest.get("meta", {}), manifest["files"])

    def latest(self, on_corrupt: Any = None) -> Checkpoint | None:
        """The newest checkpoint that verifies; damaged ones are reported to ``on_corrupt`` and skipped."""
        for path in self.generations():
            try:
                return self.verify(path)
            except CorruptCheckpoint as e:
                if on_corrupt is not None:
                    on_corrupt(path, str(e))
        return None

    def latest_meta(self) -> dict[str, Any] | None:
        """Manifest metadata of the newest checkpoint, without verifying payload checksums (cheap)."""
        for path in self.generations():
            try:
                manifest = json.loads((path / MANIFEST).read_text())
                return {"step": manifest["step"], **manifest.get("meta", {}), "path": str(path)}
            except (OSError, json.JSONDecodeError, KeyError):
                continue
        return None

    def newest_bytes(self) -> int:
        """Bytes on disk of the newest generation (0 before the first): what the next save needs free."""
        for path in self.generations():
            try:
                return sum(p.stat().st_size for p in path.iterdir() if p.is_file())
            except OSError:
                continue  # pruned or damaged while we looked
        return 0

    def survey(self) -> tuple[Checkpoint | None, list[tuple[Path, str]]]:
        """The newest generation that verifies, and every newer one that did not (path, why)."""
        damaged: list[tuple[Path, str]] = []
        ckpt = self.latest(on_corrupt=lambda path, why: damaged.append((path, why)))
        return ckpt, damaged

    def remove_leftovers(self) -> list[Path]:
        """Remove what interrupted saves left (``.tmp-*``, ``.old-*``); call only while no worker writes."""
        if not self.root.exists():
            return []
        removed = []
        for path in [*self.root.glob(".tmp-*"), *self.root.glob(".old-*")]:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        return removed

    def _prune(self) -> None:
        for old in self.generations()[self.keep:]:
            shutil.rmtree(old, ignore_errors=True)
        for tmp in self.root.glob(".tmp-*"):
            # Left by a worker killed mid-save; never a committed generation.
            try:
                if tmp.stat().st_mtime < _now() - 3600:
                    shutil.rmtree(tmp, ignore_errors=True)
            except OSError:
                pass


class BackgroundWriter:
    """Runs one job at a time (a checkpoint write) on a background thread; its error surfaces on the caller's.

    ``submit`` waits for the previous job first, so at most one generation is in flight and generations
    commit in order. A job's exception is kept and raised, unchanged (its errno, its traceback), by the
    next ``check``, ``wait`` or ``submit``: a write that fails in the background fails the training as a
    write on the training thread would.
    """

    def __init__(self, name: str = "resilient-checkpoint-writer") -> None:
        self.name = name
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def busy(self) -> bool:
        """Whether a job is still running."""
        return self._thread is not None and self._thread.is_alive()

    def submit(self, job: Callable[[], None]) -> None:
        """Wait for the previous job (raising its error), then start ``job`` in the background."""
        self.wait()

        def run() -> None:
            try:
                job()
            except BaseException as exc:  # raised on the training thread by the next check/wait
                self._error = exc

        self._thread = threading.Thread(target=run, name=self.name, daemon=True)
        self._thread.start()

    def check(self) -> None:
        """Raise the error of a job that failed (cheap: no waiting)."""
        error, self._error = self._error, None
        if error is not None:
            raise error

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the job in flight (at most ``timeout`` seconds) and raise its error; whether it is done."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                return False
            self._thread = None
        self.check()
        return True


def check_resumable(run_path: Path) -> Checkpoint | None:
    """Before a run resumes: the newest checkpoint that verifies, with a warning for each newer damaged one.

    A run whose generations are all damaged is refused (``RunDirError``): resuming it would silently
    start the training over from step 0 and, as new checkpoints were saved, discard what was trained.
    """
    run_path = Path(run_path)
    ckpt, damaged = CheckpointStore(run_path / "checkpoints").survey()
    if ckpt is None and damaged:
        found = "\n".join(f"  {path.name}: {why}" for path, why in damaged)
        result = run_path / "result.json"
        also = f" and {result}" if result.exists() else ""
        raise RunDirError(
            f"Refusing to resume {run_path}: it holds {len(damaged)} checkpoint generation(s) and none verifies:\n"
            f"{found}\nResuming would start the training over from step 0 and discard the run's progress. "
            f"Restore a copy of the checkpoints (a backup or mirror of {run_path / 'checkpoints'}) and call fit "
            f"again; or, to start over on purpose, delete {run_path / 'checkpoints'}{also}, or pass a new run_dir."
        )
    for path, why in damaged:
        assert ckpt is not None
        warnings.warn(f"resilient: checkpoint {path.name} in {run_path} is damaged ({why}); the run resumes from "
                      f"the older {ckpt.path.name} (step {ckpt.step}).", UserWarning, stacklevel=4)
    return ckpt


def _now() -> float:
    import time

    return time.time()
