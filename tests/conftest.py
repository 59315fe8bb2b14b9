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
