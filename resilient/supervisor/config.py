"""How the supervisor runs a training: the policy, the restart budget, the timeouts, and the seams for tests."""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal

from .._devices import Devices
from .._rundir import RunDir
from ..data.local_copy import FolderCopyJob
from ..policy.policy import Policy, StepContext
from .telemetry import DOWNSAMPLE

if TYPE_CHECKING:
    from .display import Display


@dataclass
class SupervisorConfig:
    run: RunDir
    policy: Policy
    context: StepContext
    max_restarts: int
    hang_timeout: float | None = None  # None: calibrated from observed step times
    #: The cap of the start-up phases' hang timeouts, and the timeout of a phase not yet measured (startup.py).
    startup_timeout: float = 600.0
    host_memory_limit: int | None = None
    gpu_memory_limit: int | None = None  # per device; journaled with the memory samples
    #: fit's ``devices`` (``_devices.check_devices``): which GPUs the monitor watches one by one (gpu.run_gpus).
    devices: Devices = "auto"
    rehearse_host_oom: bool = False
    kill_grace: float = 5.0
    preempt_grace: float = 120.0
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    poll_interval: float = 0.05
    sample_interval: float = 0.25
    #: When this call's supervision began (time.monotonic), and the memory_sample rate by the run's age (telemetry.py).
    started: float = field(default_factory=time.monotonic)
    telemetry_schedule: tuple[tuple[float, float], ...] = DOWNSAMPLE
    worker_cmd: Callable[[int, int], list[str]] | None = None  # (attempt, channel_fd) -> argv; a seam for tests
    #: A warm standby worker for the next restart (standby.py): the policy's ``[runtime] standby``.
    standby: Literal["auto", "off"] = "auto"
    extra_env: dict[str, str] = field(default_factory=dict)
    stream: IO[str] | None = None  # where worker output goes; None: sys.stdout at write time
    sleep: Callable[[float], None] = time.sleep
    disk_usage: Callable[[str], Any] = shutil.disk_usage  # free space of the run's file system; a seam for tests
    echo: bool = True
    #: The caller's view of the run (display.py), fed with progress, incidents and notes; None: the
    #: supervisor's notes and decisions as ``resilient: ...`` lines on ``stream`` (unless echo is off).
    display: Display | None = None
    #: Where verified copies of the run go (mirror.py); None: no mirror. ``mirror_copy`` copies one file
    #: (None: mirror.copy_file), a seam for tests that slow or break the mirror.
    mirror_dir: Path | None = None
    mirror_keep: int = 2
    mirror_flush_timeout: float = 30.0
    mirror_copy: Callable[[Path, Path], None] | None = None
    #: The run's image folders: copied to local disk in the background when on a slow mount (folder_copy.py).
    image_folders: tuple[FolderCopyJob, ...] = ()

    def say(self, text: str) -> None:
        """A note for the caller: to the display, or one ``resilient: ...`` line on the stream (unless echo is
        off); a closed stream is not an error."""
        if self.display is not None:
            self.display.note(text)
            return
        if not self.echo:
            return
        write_quietly(self.stream, f"resilient: {text}\n")


def write_quietly(stream: IO[str] | None, text: str) -> None:
    """Write and flush ``text`` to ``stream`` (None: sys.stdout at write time), ignoring a closed stream."""
    target = stream or sys.stdout
    try:
        target.write(text)
        target.flush()
    except (OSError, ValueError):
        pass
