"""The demo behind ``resilient demo`` and ``examples/demo.py``: a small CNN on scikit-learn's digits.

The worker meets a GPU out-of-memory error, a segfault, a hang and a preemption on the way;
resilient classifies each one, degrades the plan where the policy says so, resumes from the last
checkpoint, and the training finishes with the accuracy it would have had anyway. Needs
scikit-learn (the ``demo`` extra); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from typing import Any

DEFAULT_FAULTS = "gpu_oom@30,segfault@75,preempt@100,hang@120"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", default=None, help="where the run lives (default: a fresh temporary folder)")
    parser.add_argument("--faults", default=DEFAULT_FAULTS, help=f"rehearsed faults (default: {DEFAULT_FAULTS})")
    parser.add_argument("--epochs", type=int, default=6)


def _import_keras_quietly() -> Any:
    """TensorFlow's C++ runtime logs its start-up lines to stderr before any setting can silence them;
    this demo's output is resilient's story, so they go to /dev/null (an import error still raises)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        import keras
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    return keras


def build_model() -> Any:
    keras = _import_keras_quietly()
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(10),
        ],
        name="digits_cnn",
    )
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def digits() -> tuple[Any, Any, Any, Any]:
    """scikit-learn's 1797 8x8 handwritten digits, shuffled once: 1500 to train, the rest to validate."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError("the demo needs scikit-learn: pip install 'resilient[demo]'") from None
    import numpy as np

    data = load_digits()
    x = (data.images / 16.0).astype("float32")[..., None]
    y = data.target.astype("int32")
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    return x[:1500], y[:1500], x[1500:], y[1500:]


def run(args: argparse.Namespace) -> int:
    """Train through the rehearsed faults and tell the story; 0 when the run finished and learned."""
    import resilient

    x_train, y_train, x_val, y_val = digits()
    run_dir = args.run_dir or os.path.join(tempfile.mkdtemp(prefix="resilient-demo-"), "digits")
    if args.run_dir is None:
        shutil.rmtree(run_dir, ignore_errors=True)
    print(f"Training a small CNN on {len(x_train)} handwritten digits; rehearsed faults: {args.faults}\n")
    start = time.monotonic()
    model = build_model()
    history = resilient.fit(
        model, x_train, y_train, epochs=args.epochs, batch_size=64, seed=0, validation_data=(x_val, y_val),
        run_dir=run_dir, faults=args.faults, hang_timeout=10, checkpoint_every=10,
    )
    elapsed = time.monotonic() - start
    _, accuracy = model.evaluate(x_val, y_val, verbose=0)

    print("\n" + "=" * 78)
    print(f"Training completed: {len(history.epoch)} of {args.epochs} epochs in {elapsed:.0f}s.")
    print(f"It survived {len(history.incidents)} failure(s); each attempt resumed from its last checkpoint:")
    for inc in history.incidents:
        where = f"epoch {inc.epoch + 1}, step {inc.step}"  # 1-based, as Keras and the display count
        ended = inc.signal or {3: "an exception in training", 4: "SIGTERM, checkpoint saved"}.get(
            inc.returncode, f"exit code {inc.returncode}")
        print(f"  - attempt {inc.attempt}: {inc.kind} at {where} ({ended}); "
              f"resumed from the checkpoint at step {inc.checkpoint_step}; {inc.action}")
    print(f"Plan at the end: {history.plan.describe()}")
    print(f"Validation accuracy of the trained model in this process: {accuracy:.3f}")
    print(f"Everything (checkpoints, journal, worker logs) is in {history.run_dir}")
    ok = len(history.epoch) == args.epochs and accuracy > 0.8
    print("Healed and finished." if ok else "The run finished but did not learn as expected.")
    return 0 if ok else 1
