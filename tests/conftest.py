"""Shared fixtures: tiny real Keras models and data, and a guard against leftover processes."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import psutil
import pytest


def make_data(n: int = 256, features: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype("float32")
    y = (x[:, : features // 2].sum(axis=1) > x[:, features // 2 :].sum(axis=1)).astype("int32")
    return x, y


def make_model(features: int = 8, seed: int = 0, metrics: bool = True):
    import keras

    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [keras.Input((features,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(2)], name="tiny"
    )
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"] if metrics else None,
    )
    return model


@pytest.fixture
def open_umask():
    """umask 000 for the test: what resilient writes must be private whatever the caller's umask."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def no_leftover_processes():
    """Fails the test if it leaves a child process (a worker) running."""
    yield
    me = psutil.Process()
    deadline = 10.0
    import time

    end = time.monotonic() + deadline
    while time.monotonic() < end:
        alive = [p for p in me.children(recursive=True) if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return
        time.sleep(0.1)
    for p in alive:
        p.kill()
    pytest.fail(f"processes left behind: {[(p.pid, p.cmdline()[:4]) for p in alive]}")


@pytest.fixture
def tiny_disk(tmp_path):
    """``tiny_disk(size) -> Path``: a real file system of ``size`` (tmpfs, e.g. "4m") that can fill up; skipped,
    with the reason, where mounting is not permitted (it needs root or CAP_SYS_ADMIN)."""
    import subprocess

    mounted: list[str] = []

    def mount(size: str):
        point = tmp_path / f"disk{len(mounted)}"
        point.mkdir()
        out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(point)],
                             capture_output=True, text=True)
        if out.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs to fill up ({out.stderr.strip() or out.returncode}); needs root")
        mounted.append(str(point))
        return point

    yield mount
    for point in reversed(mounted):
        subprocess.run(["umount", "-l", point], capture_output=True)
