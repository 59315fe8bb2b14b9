"""The background copy of an image folder on a slow mount to local disk (``data/local_copy.py`` says where
and how the worker uses it). Training never waits for it.

For each folder of the run on a FUSE or network file system: a complete copy already there is kept; else the
local disk's room is checked (``folder_copy_skipped`` with the reason when there is none, and a console note),
then the files are copied one by one, each under a temporary name, its size checked against the original's,
then renamed (a file already there at the right size, from an earlier partial copy, is kept). The manifest is
written last. Journaled: ``folder_copy_started`` (files, bytes, path), ``folder_copy_done`` (files, bytes,
seconds), ``folder_copy_failed`` (error), ``folder_copy_stopped`` (the run ended first; the next call goes on).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .._rundir import DIR_MODE, Journal, atomic_write_text
from ..data.folder import filesystem_of, is_slow_filesystem
from ..data.local_copy import (
    MANIFEST,
    CopyManifest,
    FolderCopyJob,
    copy_dir,
    copy_refusal,
    listing_digest,
    verify_copy,
)


class FolderCopier:
    """A daemon thread that copies the run's slow image folders to ``<run_dir>.images/``."""

    def __init__(self, run_path: Path, jobs: tuple[FolderCopyJob, ...], journal: Journal, *,
                 say: Callable[[str], None] = lambda text: None,
                 disk_usage: Callable[[str], Any] = shutil.disk_usage, mounts: str | None = None) -> None:
        self.run_path = Path(run_path)
        self.jobs = jobs
        self.journal = journal
        self.say = say
        self.disk_usage = disk_usage
        self.mounts = mounts  # the mount table's text (None: read MOUNTS); a seam for tests
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.jobs:
            self._thread = threading.Thread(target=self._run, name="resilient-folder-copy", daemon=True)
            self._thread.start()

    def close(self, timeout: float = 2.0) -> None:
        """Stop after the file in flight (bounded wait: a stalled mount may hold one read for long)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def wait(self, timeout: float) -> bool:
        """Whether every copy ended (done, skipped or failed) within ``timeout``."""
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def _run(self) -> None:
        for job in self.jobs:
            if self._stop.is_set():
                return
            try:
                self.copy(job)
            except Exception as e:  # the copy is an optimisation: training reads the original
                with contextlib.suppress(Exception):
                    self.journal.write("folder_copy_failed", role=job.role, source=job.root, error=f"{type(e).__name__}: {e}")
                    self.say(f"the local copy of the image folder {job.root} failed ({e}); the worker reads the "
                             "folder where it is")

    def copy(self, job: FolderCopyJob) -> None:
        """Copy one folder when it is on a slow mount and there is room (journaled either way)."""
        where = filesystem_of(job.root, self.mounts)
        if where is None or not is_slow_filesystem(where[1]):
            return
        dest = copy_dir(self.run_path, job.role)
        if verify_copy(dest, job.root, job.files) is None:
            self.journal.write("folder_copy_skipped", role=job.role, source=job.root, path=str(dest),
                               reason="a complete copy is already there")
            return
        sizes = []
        for rel in job.files:
            if self._stop.is_set():
                return
            sizes.append(os.stat(os.path.join(job.root, rel)).st_size)
        total = sum(sizes)
        have = sum(size for rel, size in zip(job.files, sizes) if _size_of(dest / rel) == size)
        parent = self.run_path.parent
        dest_fs = filesystem_of(str(parent), self.mounts)
        why = copy_refusal(total_bytes=total - have, free_bytes=self.disk_usage(str(parent)).free, dest=str(parent),
                           dest_fstype=None if dest_fs is None else dest_fs[1])
        if why is not None:
            self.journal.write("folder_copy_skipped", role=job.role, source=job.root, files=len(job.files),
                               bytes=total, reason=why)
            self.say(f"the image folder {job.root} is read from its {where[1]} mount, not copied: {why}")
            return
        self.journal.write("folder_copy_started", role=job.role, source=job.root, path=str(dest),
                           files=len(job.files), bytes=total, present_bytes=have)
        started = time.monotonic()
        _private_dirs(dest)
        with contextlib.suppress(FileNotFoundError):
            (dest / MANIFEST).unlink()  # a changed listing: the old manifest no longer holds
        for rel, size in zip(job.files, sizes):
            if self._stop.is_set():
                done = sum(1 for r, s in zip(job.files, sizes) if _size_of(dest / r) == s)
                self.journal.write("folder_copy_stopped", role=job.role, source=job.root, files_done=done,
                                   files=len(job.files))
                return
            _copy_file(Path(job.root) / rel, dest / rel, size)
        seconds = round(time.monotonic() - started, 3)
        manifest = CopyManifest(source=job.root, files=len(job.files), bytes=total, listing=listing_digest(job.files),
                                seconds=seconds)
        atomic_write_text(dest / MANIFEST, manifest.model_dump_json())
        self.journal.write("folder_copy_done", role=job.role, source=job.root, path=str(dest), files=len(job.files),
                           bytes=total, seconds=seconds)


def _size_of(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def _private_dirs(folder: Path) -> None:
    """``folder`` and its missing parents, 0700 whatever the umask."""
    missing = []
    probe = folder
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    for path in reversed(missing):
        path.mkdir(mode=DIR_MODE, exist_ok=True)
        os.chmod(path, DIR_MODE)


def _copy_file(src: Path, target: Path, size: int) -> None:
    """``src`` to ``target`` through a temporary name, its size checked; kept when already there at ``size``."""
    if _size_of(target) == size:
        return
    _private_dirs(target.parent)
    tmp = target.with_name(f".{target.name}.part")
    try:
        shutil.copyfile(src, tmp)
        got = tmp.stat().st_size
        if got != size:
            raise OSError(f"copied {got} bytes of {src}, which held {size} when listed: the folder changed during "
                          "the copy")
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
