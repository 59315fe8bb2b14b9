"""Memory evidence and enforcement: memory cgroups (v1 or v2), psutil sampling, NVML.

``MemoryCgroup.create`` makes a child group of the caller's own memory cgroup with a hard
limit, so the kernel's real OOM killer enforces the budget on the worker alone and the
group's ``oom_kill`` counter tells us afterwards that it did. Where cgroups are not writable
the supervisor falls back to a psutil watchdog (see loop.py).

``PressureWatch`` decides when memory is running short enough to ask the worker for a checkpoint
(on crossing the mark, again as memory climbs on toward the limit, and at an interval while it stays
above the mark); process.py samples and signals.

A group is named ``resilient-<pid of the supervisor>-<random>``. A supervisor killed with SIGKILL
cannot remove its group; the next supervisor to start reaps it (``reap_stale_cgroups``).
"""

from __future__ import annotations

import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import psutil

_V1_ROOT = Path("/sys/fs/cgroup/memory")
_V2_ROOT = Path("/sys/fs/cgroup")


def _own_cgroup_lines() -> list[tuple[str, str, str]]:
    try:
        text = Path("/proc/self/cgroup").read_text()
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            out.append((parts[0], parts[1], parts[2]))
    return out


def _v1_parent() -> Path | None:
    for _, controllers, path in _own_cgroup_lines():
        if "memory" in controllers.split(","):
            parent = _V1_ROOT / path.lstrip("/")
            if (parent / "memory.limit_in_bytes").exists():
                return parent
    return None


def _v2_parent() -> Path | None:
    if not (_V2_ROOT / "cgroup.controllers").exists():
        return None
    for hid, controllers, path in _own_cgroup_lines():
        if hid == "0" and controllers == "":
            parent = _V2_ROOT / path.lstrip("/")
            try:
                if "memory" in (parent / "cgroup.controllers").read_text().split():
                    return parent
            except OSError:
                return None
    return None


@dataclass
class MemoryCgroup:
    """A memory cgroup holding one worker, with a hard limit in bytes."""

    path: Path
    version: int
    limit: int

    @classmethod
    def create(cls, limit: int, name: str | None = None) -> MemoryCgroup:
        """Create a child group with ``limit``; raises OSError (with the reason) where that is impossible."""
        name = name or f"resilient-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        v1 = _v1_parent()
        if v1 is not None:
            path = v1 / name
            path.mkdir()
            try:
                (path / "memory.limit_in_bytes").write_text(str(limit))
                swap = path / "memory.memsw.limit_in_bytes"
                if swap.exists():
                    try:
                        swap.write_text(str(limit))  # no escaping the budget into swap
                    except OSError:
                        pass
            except OSError:
                path.rmdir()
                raise
            return cls(path, 1, limit)
        v2 = _v2_parent()
        if v2 is not None:
            path = v2 / name
            try:
                subtree = (v2 / "cgroup.subtree_control").read_text().split()
                if "memory" not in subtree:
                    (v2 / "cgroup.subtree_control").write_text("+memory")
            except OSError as e:
                raise OSError(f"cgroup v2 at {v2} does not delegate the memory controller ({e})") from e
            path.mkdir()
            try:
                (path / "memory.max").write_text(str(limit))
                if (path / "memory.swap.max").exists():
                    (path / "memory.swap.max").write_text("0")
            except OSError:
                path.rmdir()
                raise
            return cls(path, 2, limit)
        raise OSError("no writable memory cgroup (neither v1 /sys/fs/cgroup/memory nor v2 with the memory controller)")

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def set_limit(self, limit: int) -> None:
        name = "memory.limit_in_bytes" if self.version == 1 else "memory.max"
        if self.version == 1:
            swap = self.path / "memory.memsw.limit_in_bytes"
            # memsw must stay >= limit: lower limit first, raise memsw after; the reverse when raising.
            if limit < self.limit:
                (self.path / name).write_text(str(limit))
                if swap.exists():
                    try:
                        swap.write_text(str(limit))
                    except OSError:
                        pass
            else:
                if swap.exists():
                    try:
                        swap.write_text(str(limit))
                    except OSError:
                        pass
                (self.path / name).write_text(str(limit))
        else:
            (self.path / name).write_text(str(limit))
        self.limit = limit

    def oom_kills(self) -> int:
        """The kernel's count of OOM kills in this group."""
        name = "memory.oom_control" if self.version == 1 else "memory.events"
        try:
            for line in (self.path / name).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except OSError:
            pass
        return 0

    def usage(self) -> int | None:
        name = "memory.usage_in_bytes" if self.version == 1 else "memory.current"
        try:
            return int((self.path / name).read_text())
        except (OSError, ValueError):
            return None

    def working_set(self) -> int | None:
        """The group's usage less its inactive file cache (what the kernel cannot simply drop before an OOM kill)."""
        usage = self.usage()
        if usage is None:
            return None
        key = "total_inactive_file" if self.version == 1 else "inactive_file"
        try:
            for line in (self.path / "memory.stat").read_text().splitlines():
                name, _, value = line.partition(" ")
                if name == key:
                    return max(0, usage - int(value))
        except (OSError, ValueError):
            pass
        return usage

    def peak(self) -> int | None:
        name = "memory.max_usage_in_bytes" if self.version == 1 else "memory.peak"
        try:
            return int((self.path / name).read_text())
        except (OSError, ValueError):
            return None

    def remove(self) -> None:
        """Remove the group (its processes must be gone); retried briefly while the kernel releases it."""
        import time

        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.05)


#: What made ``PressureWatch`` ask: memory crossed the mark, climbed further, or stayed above it a while.
PressureTrigger = Literal["first_crossing", "further_climb", "interval"]

#: A further-climb request waits at least this many times the last pressure checkpoint's cost after the
#: previous request: in the last stretch before a kill the worker may spend up to half its time saving.
CLIMB_SAVE_FACTOR = 1.0
#: An interval request waits at least this many times that cost: a worker sitting under the kill saves
#: often, but spends at most a tenth of its time saving.
INTERVAL_SAVE_FACTOR = 10.0


@dataclass
class PressureWatch:
    """Whether memory is short enough to ask the worker for a checkpoint now.

    With a limit L, on ``used``:

    - ``first_crossing``: ``used`` reaches ``threshold`` x L;
    - ``further_climb``: after a request at usage u, ``used`` reaches u + (L - r - u) / 2, r the memory
      a save itself needs (each request halves the headroom left for a save, so the newest checkpoint
      stays close to a kill by a climb; at or past L - r, every look asks);
    - ``interval``: ``interval`` seconds after the last request, still above the threshold (a worker
      sitting just under the kill, which a spike may end, keeps saving);

    and the climb is over (re-armed) once ``used`` falls under ``rearm`` x L. Without a limit, the same
    on the machine's ``available`` memory: first below ``margin``, then each time what is available
    beyond r halves since the last request, then every ``interval``; re-armed once twice ``margin`` is
    available again.

    A repeat (climb or interval) needs steps trained since the last request (``step`` advanced: a
    checkpoint at the same step saves nothing new) and time since it: ``CLIMB_SAVE_FACTOR`` x
    ``save_seconds`` (the last pressure checkpoint's cost) for a climb, the larger of ``interval`` and
    ``INTERVAL_SAVE_FACTOR`` x ``save_seconds`` for an interval, so the worker does not spend its time saving.
    """

    threshold: float = 0.85
    rearm: float = 0.75
    margin: int = 1 << 30
    interval: float = 30.0
    #: Usage (with a limit) or available memory (without) at the last request of this climb; None: armed.
    mark: int | None = None
    last_time: float = 0.0
    last_step: int | None = None

    @property
    def armed(self) -> bool:
        """No request yet in this climb."""
        return self.mark is None

    def high(self, used: int | None, limit: int | None, available: int | None) -> bool:
        """Memory is above the mark (the monitor then looks more often)."""
        if limit is not None:
            return used is not None and used >= self.threshold * limit
        return available is not None and available < self.margin

    def observe(self, used: int | None, limit: int | None, available: int | None, *, now: float = 0.0,
                step: int | None = None, save_seconds: float = 0.0, reserve: int = 0) -> PressureTrigger | None:
        """One sample at ``now`` (seconds, monotonic) with the worker at ``step``: what asks for a
        checkpoint now, or None. ``reserve``: the memory a save itself needs, kept out of the headroom
        that a climb halves (so the last saves before a kill still fit)."""
        if limit is not None:
            if used is None:
                return None
            level, rearmed = used, used < self.rearm * limit
            # Headroom halved since the last request: used >= u + (L - reserve - u) / 2.
            climbed = self.mark is not None and 2 * used >= self.mark + limit - reserve
        else:
            if available is None:
                return None
            level, rearmed = available, available >= 2 * self.margin
            climbed = self.mark is not None and 2 * (available - reserve) <= self.mark - reserve
        if rearmed:
            self.mark, self.last_step = None, None
            return None
        if not self.high(used, limit, available):
            return None
        if self.mark is None:
            trigger: PressureTrigger = "first_crossing"
            self.mark = level
        else:
            if step is not None and self.last_step is not None and step <= self.last_step:
                return None  # nothing trained since the last request: it is still pending or saved nothing new
            since = now - self.last_time
            if climbed and since >= CLIMB_SAVE_FACTOR * save_seconds:
                trigger = "further_climb"
            elif since >= max(self.interval, INTERVAL_SAVE_FACTOR * save_seconds):
                trigger = "interval"
            else:
                return None
            # The mark only moves toward the limit: a dip and a rise within one climb ask no more often.
            self.mark = max(self.mark, level) if limit is not None else min(self.mark, level)
        self.last_time, self.last_step = now, step
        return trigger


def available_memory() -> int:
    """Bytes the machine can still give without swapping (psutil's ``available``)."""
    return int(psutil.virtual_memory().available)


#: The names this module gives its groups (``create`` and ``cgroup_support``), with the creator's pid.
_OWN_NAME = re.compile(r"^resilient-(?:probe-)?(\d+)-[0-9a-f]+$")


def _parents() -> list[Path]:
    return [p for p in (_v1_parent(), _v2_parent()) if p is not None]


def reap_stale_cgroups() -> list[Path]:
    """Remove the memory cgroups this package created for supervisors that are gone (killed with
    SIGKILL before they could remove them); a group whose creator lives, or that still holds a
    process, is left alone. Returns the groups removed."""
    removed = []
    for parent in _parents():
        try:
            children = list(parent.iterdir())
        except OSError:
            continue
        for path in children:
            match = _OWN_NAME.match(path.name)
            if match is None or not path.is_dir() or psutil.pid_exists(int(match.group(1))):
                continue
            try:
                if (path / "cgroup.procs").read_text().strip():
                    continue  # a worker outlived its supervisor; the group goes once it is gone
                path.rmdir()
            except OSError:
                continue  # removed meanwhile, or the kernel still releases it: the next start retries
            removed.append(path)
    return removed


def cgroup_support() -> tuple[bool, str]:
    """Whether a memory cgroup can be created here, and why not when it cannot."""
    try:
        group = MemoryCgroup.create(1 << 30, name=f"resilient-probe-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    except OSError as e:
        return False, str(e)
    group.remove()
    return True, f"cgroup v{group.version}"


def _private(info: object) -> int:
    rss = int(getattr(info, "rss", 0))
    shared = int(getattr(info, "shared", 0) or 0)  # file-backed resident pages (Linux)
    return max(0, rss - shared)


def tree_rss(pid: int) -> int | None:
    """Private resident memory of ``pid`` and its children, in bytes (None when it is gone).

    File-backed pages (memory-mapped training data, shared libraries) are left out: the kernel
    reclaims them before it kills anyone, so counting them would blame a memory-mapped dataset
    for memory the worker does not really hold.
    """
    try:
        proc = psutil.Process(pid)
        total = _private(proc.memory_info())
        for child in proc.children(recursive=True):
            try:
                total += _private(child.memory_info())
            except psutil.Error:
                pass
        return total
    except psutil.Error:
        return None


class GpuMemory:
    """Per-process GPU memory through NVML, when a GPU and pynvml are present."""

    def __init__(self) -> None:
        self.available = False
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            self.available = bool(self._handles)
        except Exception:  # no driver, no GPU, or no pynvml: GPU evidence is simply absent
            self._handles = []

    @property
    def count(self) -> int:
        """The GPUs NVML sees (every GPU of the machine, whatever CUDA_VISIBLE_DEVICES says)."""
        return len(self._handles)

    def used_by(self, pids: set[int]) -> int | None:
        """GPU bytes held by ``pids`` across devices."""
        if not self.available:
            return None
        total = 0
        for h in self._handles:
            try:
                procs = self._nvml.nvmlDeviceGetComputeRunningProcesses(h)
            except Exception:
                continue
            for p in procs:
                if p.pid in pids and p.usedGpuMemory is not None:
                    total += int(p.usedGpuMemory)
        return total

    def per_device(self, pids: set[int]) -> list[tuple[int | None, int | None, int | None]]:
        """(bytes held by ``pids``, bytes used by every process, capacity) for each device; None where NVML
        does not say (some drivers hide per-process usage)."""
        out: list[tuple[int | None, int | None, int | None]] = []
        for h in self._handles:
            held: int | None = None
            try:
                for p in self._nvml.nvmlDeviceGetComputeRunningProcesses(h):
                    if p.pid in pids and p.usedGpuMemory is not None:
                        held = (held or 0) + int(p.usedGpuMemory)
                held = held or 0
            except Exception:
                pass
            try:
                info = self._nvml.nvmlDeviceGetMemoryInfo(h)
                used, total = int(info.used), int(info.total)
            except Exception:
                used = total = None
            out.append((held, used, total))
        return out

    def totals(self) -> list[tuple[int, int]]:
        """(used, total) bytes per device."""
        out = []
        for h in self._handles:
            try:
                info = self._nvml.nvmlDeviceGetMemoryInfo(h)
                out.append((int(info.used), int(info.total)))
            except Exception:
                continue
        return out
