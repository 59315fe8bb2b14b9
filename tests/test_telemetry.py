"""The memory telemetry's rule, on hand-built times: the journal interval by the run's age, and peaks kept."""

from __future__ import annotations

import itertools
import math

from resilient.supervisor.telemetry import DOWNSAMPLE, MemorySample, MemoryTelemetry, journal_interval


def test_the_journal_interval_grows_with_the_run_age():
    assert journal_interval(0) == 1.0
    assert journal_interval(599.9) == 1.0
    assert journal_interval(600) == 10.0
    assert journal_interval(7199) == 10.0
    assert journal_interval(7200) == 60.0
    assert journal_interval(12 * 3600) == 60.0


def _lines(seconds: float, step: float = 0.25, origin: float = 0.0) -> list[float]:
    """The times at which a line is journaled when the monitor samples every ``step`` seconds."""
    telemetry = MemoryTelemetry(origin)
    times = []
    for i in range(int(seconds / step)):
        now = origin + i * step
        if telemetry.add(MemorySample(rss=1), now) is not None:
            times.append(now)
    return times


def test_one_line_a_second_at_first_then_fewer():
    times = _lines(3 * 3600)
    first = [t for t in times if t < 600]
    middle = [t for t in times if 600 <= t < 7200]
    late = [t for t in times if t >= 7200]
    assert len(first) == 600 and first[:3] == [0.0, 1.0, 2.0]
    assert 655 <= len(middle) <= 661
    assert 59 <= len(late) <= 61
    gaps = {round(b - a, 2) for a, b in itertools.pairwise(late)}
    assert gaps == {60.0}


def test_a_twelve_hour_run_journals_under_two_thousand_lines():
    assert len(_lines(12 * 3600, step=0.5)) < 2000


def test_each_line_carries_the_peak_since_the_previous_line():
    telemetry = MemoryTelemetry(origin=0.0)
    assert telemetry.add(MemorySample(rss=10, gpu=(5, 7)), 0.0) == MemorySample(rss=10, gpu=(5, 7))
    assert telemetry.add(MemorySample(rss=90, cgroup=100, gpu=(9, 1)), 0.25) is None  # the spike between lines
    assert telemetry.add(MemorySample(rss=20, cgroup=50, gpu=(3, 2)), 0.5) is None
    line = telemetry.add(MemorySample(rss=30, cgroup=60, gpu=(4, 3)), 1.0)
    assert line == MemorySample(rss=90, cgroup=100, gpu=(9, 3))
    assert telemetry.add(MemorySample(rss=5), 1.25) is None
    assert telemetry.flush() == MemorySample(rss=5)  # the attempt's end: what is left
    assert telemetry.flush() is None


def test_a_late_attempt_starts_at_the_coarse_rate_with_its_first_sample_at_once():
    telemetry = MemoryTelemetry(origin=0.0)
    assert telemetry.add(MemorySample(rss=1), 8000.0) is not None
    assert telemetry.add(MemorySample(rss=1), 8030.0) is None
    assert telemetry.add(MemorySample(rss=1), 8060.0) is not None


def test_the_fields_name_the_limit_and_leave_gpu_out_without_nvml():
    fields = MemorySample(rss=1, cgroup=2).fields(host_limit=3, mechanism="cgroup", gpu_limit=None)
    assert fields == {"rss_bytes": 1, "cgroup_bytes": 2, "host_limit_bytes": 3, "limit_mechanism": "cgroup"}
    gpu = MemorySample(rss=1, gpu=(4, None), gpu_device=(5, 6), gpu_total=(8, 8)).fields(None, None, 7)
    assert gpu["gpu_bytes"] == [4, None] and gpu["gpu_used_bytes"] == 4
    assert (gpu["gpu_device_bytes"], gpu["gpu_total_bytes"], gpu["gpu_limit_bytes"]) == ([5, 6], [8, 8], 7)
    assert DOWNSAMPLE[-1][0] == math.inf
