"""The caller-GPU warning, decided on fake NVML readings."""

from __future__ import annotations

import os

import pytest

from resilient.supervisor.gpu import caller_gpu_warning, warn_if_caller_holds_gpu

GiB = 1 << 30


@pytest.mark.parametrize(
    ("used", "total", "warns"),
    [
        (None, 16 * GiB, False),
        (0, 16 * GiB, False),
        (300 << 20, 16 * GiB, False),  # a CUDA context: fine
        (int(1.5 * GiB), 16 * GiB, False),
        (3 * GiB, 16 * GiB, True),  # over the absolute threshold
        (int(1.5 * GiB), 4 * GiB, True),  # over a quarter of a small card
        (15 * GiB, 16 * GiB, True),  # TensorFlow's default reservation
        (5 * GiB, None, False),
    ],
)
def test_decision(used, total, warns):
    assert (caller_gpu_warning(used, total) is not None) == warns


def test_text_gives_the_figure_and_both_fixes():
    text = caller_gpu_warning(15 * GiB, 16 * GiB)
    assert "15.0 GiB" in text and "94%" in text
    assert "import resilient before TensorFlow" in text
    assert "function that builds and compiles the model" in text


class FakeNvml:
    available = True

    def __init__(self, by_pid, total):
        self.by_pid, self.total = by_pid, total

    def used_by(self, pids):
        return sum(self.by_pid.get(p, 0) for p in pids)

    def totals(self):
        return [(0, self.total)]


def test_warns_with_a_fake_nvml_reading_for_this_process():
    with pytest.warns(ResourceWarning, match="already holds 14.0 GiB"):
        warn_if_caller_holds_gpu(FakeNvml({os.getpid(): 14 * GiB}, 16 * GiB))


def test_other_processes_memory_is_not_ours(recwarn):
    assert warn_if_caller_holds_gpu(FakeNvml({os.getpid() + 1: 14 * GiB}, 16 * GiB)) is None
    assert not [w for w in recwarn if issubclass(w.category, ResourceWarning)]


def test_no_gpu_no_warning():
    class NoGpu:
        available = False

    assert warn_if_caller_holds_gpu(NoGpu()) is None
