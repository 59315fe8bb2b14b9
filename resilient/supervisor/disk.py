"""A full disk: how much space the run needs, whether it has it, and what the person is told.

A checkpoint is written as a new generation before the oldest is pruned, so the next save needs
about one checkpoint's bytes free, plus room for the journal, logs and reports (``DISK_MARGIN``).
After a ``disk_full`` incident the supervisor measures the run directory's file system
(``DiskSpace``); ``decide`` stops the run while the space is short instead of restarting into the
same failure, and restarts once it came back.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._units import format_bytes
from .classify import is_disk_full

#: Room beyond one checkpoint that a restarted attempt writes: journal lines, worker.log, error.json, plan.json.
DISK_MARGIN = 16 << 20

#: ``shutil.disk_usage``'s signature: a path -> an object with ``free`` (a seam for tests).
DiskUsage = Callable[[str], Any]


@dataclass(frozen=True)
class DiskSpace:
    """Free space on the file system of ``path`` (mounted at ``mount``) against what the run needs."""

    path: str
    mount: str
    free: int | None  # None: could not be measured
    checkpoint_bytes: int  # the newest checkpoint's size (0 before the first)

    @property
    def needed(self) -> int:
        return self.checkpoint_bytes + DISK_MARGIN

    @property
    def short(self) -> bool:
        """Too little space for another checkpoint: restarting would meet the same failure."""
        return self.free is not None and self.free < self.needed

    def text(self) -> str:
        """``12.0 KiB free on /mnt/runs (the file system of run_dir /mnt/runs/a); a checkpoint needs ...``."""
        where = f"on {self.mount}" + (f" (the file system of run_dir {self.path})" if self.mount != self.path else "")
        ckpt = (f"the next checkpoint needs about {format_bytes(self.checkpoint_bytes)} plus "
                f"{format_bytes(DISK_MARGIN)} for logs" if self.checkpoint_bytes else
                f"the run needs at least {format_bytes(DISK_MARGIN)} for its first checkpoint and logs")
        return f"{format_bytes(self.free)} free {where}; {ckpt}"

    def advice(self) -> str:
        """What to do, with the figures."""
        return (f"free at least {format_bytes(max(0, self.needed - (self.free or 0)))} on {self.mount} (delete files, "
                f"or move the run directory to a larger disk), then call fit again with run_dir={self.path!r}: it "
                "resumes from the last checkpoint. The older checkpoints are intact.")


def measure(run_path: Path, checkpoint_bytes: int, disk_usage: DiskUsage = shutil.disk_usage) -> DiskSpace:
    """The free space of ``run_path``'s file system now (``free`` None when it cannot be measured)."""
    try:
        free: int | None = int(disk_usage(str(run_path)).free)
    except OSError:
        free = None
    return DiskSpace(path=str(run_path), mount=str(mount_point(run_path)), free=free,
                     checkpoint_bytes=checkpoint_bytes)


def mount_point(path: Path) -> Path:
    """The mount point of the file system that holds ``path``."""
    path = Path(path).absolute()
    while not os.path.ismount(path) and path.parent != path:
        path = path.parent
    return path


def is_disk_full_error(exc: BaseException) -> bool:
    """An ``OSError`` that says the disk is full (ENOSPC, EDQUOT, or their text)."""
    return isinstance(exc, OSError) and is_disk_full(exc.errno, str(exc))


def own_write_text(exc: OSError, space: DiskSpace) -> str:
    """The stop of a run whose supervisor could not write to its own run directory."""
    target = f" writing {exc.filename}" if exc.filename else ""
    return (f"resilient: the run stopped: the disk is full ({exc.strerror or exc}{target}).\n"
            f"Run directory: {space.path}\n{space.text()}.\n"
            f"What to do: {space.advice()}")
