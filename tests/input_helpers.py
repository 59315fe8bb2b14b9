"""Helpers for the input tests: tiny image folders, tiny image models, a PyDataset, a run-dir snapshot."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def write_image_folder(root: Path, classes: int = 3, per_class: int = 20, size: tuple[int, int] = (12, 10),
                       seed: int = 0) -> Path:
    """``root/class{c}/{i}.png``: small RGB PNGs whose brightness depends on the class (learnable)."""
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = (rng.random((*size, 3)) * 80 + c * 80).astype("uint8")
            tf.io.write_file(str(folder / f"{i:02d}.png"), tf.io.encode_png(image))
    return root


def make_image_model(classes: int = 3, input_shape: tuple = (None, None, 3), seed: int = 0, loss=None):
    """A tiny CNN; spatial dims None by default, so a lower_resolution step can apply."""
    import keras

    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input(input_shape),
        keras.layers.Rescaling(1 / 255),
        keras.layers.Conv2D(4, 3, activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(classes),
    ], name="tiny_cnn")
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=loss or keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def snapshot(path: Path) -> dict[str, tuple[int, int]] | None:
    """Every file under ``path`` with its size and mtime; None when ``path`` does not exist."""
    if not os.path.exists(path):
        return None
    out = {}
    for root, _dirs, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            st = os.stat(full)
            out[os.path.relpath(full, path)] = (st.st_size, st.st_mtime_ns)
    return out
