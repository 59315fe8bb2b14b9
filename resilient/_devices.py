"""Which devices a run trains on: ``fit(devices=...)`` checked and counted (pure; no TensorFlow).

``"auto"`` takes every GPU the worker sees (one when there is one), the CPU when there is none;
``"all"`` every GPU, or every CPU device where there is no GPU; ``"cpu"``, ``"gpu:1"`` one device;
a list of ``"gpu:N"`` (or ``"cpu:N"``) names several. With more than one device the worker trains
under ``tf.distribute.MirroredStrategy``; the plan's ``replicas`` is their count.

Testing aid: the environment variable ``RESILIENT_LOGICAL_CPUS=N`` makes the worker split its CPU
into N logical devices (``tf.config.set_logical_device_configuration``) so that a machine without
GPUs can run ``devices=["cpu:0", "cpu:1"]`` under the strategy. It is not a speed-up.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

from ._errors import InvalidArgumentError

#: The number of logical CPU devices the worker creates (a testing aid; see the module's doc).
LOGICAL_CPUS_ENV = "RESILIENT_LOGICAL_CPUS"

Devices = str | tuple[str, ...]

_NAMED = re.compile(r"^(cpu|gpu):(\d+)$")
_EXPECTED = ('Expected "auto", "all", "cpu", a device name such as "gpu:0", or a list of device names of one '
             'kind such as ["gpu:0", "gpu:1"].')


def check_devices(value: object) -> Devices:
    """``fit``'s ``devices``, normalised (lower case; a list becomes a tuple); InvalidArgumentError otherwise."""
    received = f"Invalid value for argument `devices`. Received: devices={value!r}. "
    if isinstance(value, str):
        name = value.strip().lower()
        if name in {"auto", "all", "cpu", "gpu"} or _NAMED.match(name):
            return "gpu:0" if name == "gpu" else name
        raise InvalidArgumentError(received + _EXPECTED)
    if isinstance(value, Sequence) and not isinstance(value, (bytes, bytearray)):
        names = [v.strip().lower() if isinstance(v, str) else v for v in value]
        if not names or not all(isinstance(n, str) and _NAMED.match(n) for n in names):
            raise InvalidArgumentError(received + _EXPECTED)
        if len(set(names)) != len(names):
            raise InvalidArgumentError(received + "Expected each device once.")
        if len({n.split(":")[0] for n in names}) > 1:
            raise InvalidArgumentError(received + "Expected devices of one kind (all GPUs or all CPUs).")
        return tuple(names)
    raise InvalidArgumentError(received + _EXPECTED)


def visible_gpu_count(nvml_count: int) -> int:
    """The GPUs a worker will see: NVML counts every GPU, TensorFlow only CUDA_VISIBLE_DEVICES's."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return nvml_count
    ids = [part for part in listed.split(",") if part.strip()]
    return min(nvml_count, len(ids))


def logical_cpus() -> int:
    """The CPU devices a worker will create (1 unless the testing aid asks for more)."""
    try:
        return max(1, int(os.environ.get(LOGICAL_CPUS_ENV, "1")))
    except ValueError:
        return 1


def replica_count(devices: Devices, gpus: int) -> int:
    """How many devices ``devices`` trains on where the worker sees ``gpus`` GPUs."""
    if isinstance(devices, tuple):
        return len(devices)
    if devices == "auto":
        return max(1, gpus)
    if devices == "all":
        return gpus if gpus else logical_cpus()
    return 1
