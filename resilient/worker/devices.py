"""The devices an attempt trains on, and the distribution strategy over them (worker only).

One device: TensorFlow's default placement, as before ``devices=`` existed (a single named device
hides the others first). Several: ``tf.distribute.MirroredStrategy`` over them; the model is built,
loaded, compiled and restored inside its scope so that every variable is mirrored. Checkpoints stay
replica-independent (``state`` reads each mirrored variable as one array), so a run resumes on
another number of devices.
"""

from __future__ import annotations

import contextlib
from typing import Any

from .._devices import LOGICAL_CPUS_ENV, Devices, logical_cpus


def configure(devices: Devices) -> None:
    """Before TensorFlow initialises: the testing aid's logical CPUs, and a single named device alone."""
    import tensorflow as tf

    cpus = logical_cpus()
    if cpus > 1:
        try:
            tf.config.set_logical_device_configuration(
                tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * cpus)
        except RuntimeError:
            pass  # TensorFlow already initialised by user code: keep its devices
    single = devices if isinstance(devices, str) else None
    try:
        if single == "cpu" or (single or "").startswith("cpu:"):
            tf.config.set_visible_devices([], "GPU")
        elif single is not None and single.startswith("gpu:"):
            gpus = tf.config.list_physical_devices("GPU")
            index = int(single.split(":")[1])
            if index >= len(gpus):
                raise ValueError(f"devices={single!r}, but this worker sees {len(gpus)} GPU(s).")
            tf.config.set_visible_devices([gpus[index]], "GPU")
    except RuntimeError:
        pass  # already initialised: the default placement stays


def resolve(devices: Devices) -> list[str]:
    """The TensorFlow device names ``devices`` means on this worker (after ``configure``)."""
    import tensorflow as tf

    gpus = [d.name for d in tf.config.list_logical_devices("GPU")]
    cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
    if devices == "auto":
        return gpus or cpus[:1]
    if devices == "all":
        return gpus or cpus
    if isinstance(devices, str):
        return (gpus or cpus)[:1]  # the one device configure() left visible
    seen = {"cpu": cpus, "gpu": gpus}
    out = []
    for name in devices:
        kind, index = name.split(":")
        if int(index) >= len(seen[kind]):
            hint = f" (set {LOGICAL_CPUS_ENV} to test several CPU devices)" if kind == "cpu" else ""
            raise ValueError(f"devices={list(devices)!r}, but this worker sees {len(seen[kind])} {kind.upper()} "
                             f"device(s){hint}.")
        out.append(seen[kind][int(index)])
    return out


def strategy_scope(names: list[str]) -> Any:
    """The scope the model is built and trained in: MirroredStrategy's over several devices, else none."""
    if len(names) < 2:
        return contextlib.nullcontext()
    import tensorflow as tf

    return tf.distribute.MirroredStrategy(names).scope()
