"""The run's incidents and plan changes, written beside the caller's own TensorBoard logs."""

from __future__ import annotations

import json
import os
from typing import Any

from .._plan import Plan
from .._rundir import RunDir, atomic_write_text


def log_to_tensorboard(run: RunDir, callbacks: list[Any], plan: Plan, step: int) -> None:
    """Add the run's incidents and plan changes to each TensorBoard callback's log directory.

    Written under ``<log_dir>/resilient`` as text (one entry per incident) and scalars (batch size,
    effective batch, incident count), each at the global step where it happened; every incident
    is written once, whichever attempt gets to it first.
    """
    import keras

    boards = [cb for cb in callbacks if isinstance(cb, keras.callbacks.TensorBoard)]
    if not boards:
        return
    import tensorflow as tf

    marker = run.path / "tensorboard_logged.json"
    try:
        logged = set(json.loads(marker.read_text()))
    except (OSError, ValueError):
        logged = set()
    incidents = [e for e in run.read_events() if e.get("event") == "incident"]
    new = [e for e in incidents if f"{e.get('attempt')}:{e.get('kind')}" not in logged]
    for board in boards:
        with tf.summary.create_file_writer(os.path.join(board.log_dir, "resilient")).as_default():
            for i, e in enumerate(incidents):
                if e not in new:
                    continue
                at = int(e.get("step") or 0)
                after = e.get("plan_after") or {}
                text = (f"**{e['kind']}** (attempt {e['attempt']}, epoch {e.get('epoch')}, step {at}): "
                        f"{e.get('detail', '')}  \naction: {e.get('action', '')}")
                tf.summary.text("resilient/incidents", text, step=at)
                tf.summary.scalar("resilient/incident_count", i + 1, step=at)
                if after:
                    tf.summary.scalar("resilient/batch_size", after.get("batch_size", 0), step=at)
            tf.summary.scalar("resilient/batch_size", plan.batch_size, step=step)
            tf.summary.scalar("resilient/effective_batch", plan.effective_batch, step=step)
            tf.summary.text("resilient/plan", plan.describe(), step=step)
    logged |= {f"{e.get('attempt')}:{e.get('kind')}" for e in new}
    atomic_write_text(marker, json.dumps(sorted(logged)))
