"""Memory telemetry: the monitor's memory samples, journaled as ``memory_sample`` events, fewer as the run gets long.

The monitor samples every ``sample_interval`` (0.25 s); the journal gets one line per *journal interval*,
which grows with the time since the supervisor started (``DOWNSAMPLE``):

    first 10 minutes      one line a second
    up to 2 hours         one line every 10 s
    after that            one line a minute

so a 12-hour run journals 600 + 660 + 600 = 1,860 lines (about 0.5 MB). No spike is lost between two
lines: each line carries the maximum of every sample taken since the previous one (``MemorySample.max``).
An attempt's first sample is journaled at once and its last when it ends, so even a short attempt has
its start and its peak. Lines are appended without fsync (``Journal.note``): a power cut may lose a few
seconds of telemetry, and the monitor loop never waits on the disk for it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

#: (the run's age in seconds up to which, the journal interval in seconds), in order.
DOWNSAMPLE: tuple[tuple[float, float], ...] = ((600.0, 1.0), (7200.0, 10.0), (math.inf, 60.0))


def journal_interval(elapsed: float, schedule: tuple[tuple[float, float], ...] = DOWNSAMPLE) -> float:
    """Seconds between two ``memory_sample`` lines when the run is ``elapsed`` seconds old."""
    for until, interval in schedule:
        if elapsed < until:
            return interval
    return schedule[-1][1]


def _max(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else max(a, b)


def _max_each(a: tuple[int | None, ...], b: tuple[int | None, ...]) -> tuple[int | None, ...]:
    if len(a) != len(b):  # a device appeared or vanished from NVML: the newer reading wins
        return b
    return tuple(_max(x, y) for x, y in zip(a, b))


@dataclass(frozen=True)
class MemorySample:
    """One look at the worker's memory (bytes; None: not measured). GPU tuples hold one entry per device."""

    rss: int | None = None  # private RSS of the worker's process tree
    cgroup: int | None = None  # the memory cgroup's usage (page cache included)
    gpu: tuple[int | None, ...] = ()  # the worker's share of each device
    gpu_device: tuple[int | None, ...] = ()  # each device's used memory, every process included
    gpu_total: tuple[int | None, ...] = ()  # each device's capacity

    def max(self, other: MemorySample) -> MemorySample:
        """The larger of the two readings, field by field (the peak over both)."""
        return MemorySample(_max(self.rss, other.rss), _max(self.cgroup, other.cgroup),
                            _max_each(self.gpu, other.gpu), _max_each(self.gpu_device, other.gpu_device),
                            _max_each(self.gpu_total, other.gpu_total))

    def fields(self, host_limit: int | None, mechanism: str | None, gpu_limit: int | None) -> dict[str, Any]:
        """The ``memory_sample`` fields (GPU fields only where NVML measured something)."""
        out: dict[str, Any] = {"rss_bytes": self.rss, "cgroup_bytes": self.cgroup, "host_limit_bytes": host_limit,
                               "limit_mechanism": mechanism}
        if self.gpu or self.gpu_device:
            out.update(gpu_bytes=list(self.gpu), gpu_used_bytes=sum(g or 0 for g in self.gpu),
                       gpu_device_bytes=list(self.gpu_device), gpu_total_bytes=list(self.gpu_total),
                       gpu_limit_bytes=gpu_limit)
        return out


class MemoryTelemetry:
    """Collects one attempt's samples and says when one is due for the journal (times: ``time.monotonic``)."""

    def __init__(self, origin: float, schedule: tuple[tuple[float, float], ...] = DOWNSAMPLE) -> None:
        self.origin = origin  # when the supervisor started: the run's age counts from here
        self.schedule = schedule
        self._pending: MemorySample | None = None
        self._due = -math.inf  # the attempt's first sample is journaled at once

    def add(self, sample: MemorySample, now: float) -> MemorySample | None:
        """Take one sample; returns the peak since the last journaled one when a line is due, else None."""
        self._pending = sample if self._pending is None else self._pending.max(sample)
        if now < self._due:
            return None
        self._due = now + journal_interval(now - self.origin, self.schedule)
        return self.flush()

    def flush(self) -> MemorySample | None:
        """The peak of the samples not yet journaled (None: there are none)."""
        pending, self._pending = self._pending, None
        return pending
