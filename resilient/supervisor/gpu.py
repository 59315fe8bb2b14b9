"""GPUs seen from the supervisor: which NVML devices a run trains on, their per-device peaks over an
attempt (and so the fullest), and the warning when the calling process holds GPU memory itself."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

from .._devices import Devices
from .._units import format_bytes

#: One NVML reading of one device: (bytes the worker holds, bytes every process uses, capacity); None where
#: NVML does not say (``memory.GpuMemory.per_device``).
Reading = tuple[int | None, int | None, int | None]


def run_gpus(devices: Devices, replicas: int, nvml_count: int,
             cuda_visible: str | None) -> tuple[tuple[int, str], ...]:
    """The GPUs a run trains on, each as (NVML index, the name TensorFlow gives it, e.g. ``"GPU:1"``).

    TensorFlow numbers the GPUs ``CUDA_VISIBLE_DEVICES`` lets it see, in that order; NVML numbers every
    GPU of the machine (the two orders agree under ``CUDA_DEVICE_ORDER=PCI_BUS_ID``, and on machines
    of one GPU model). With entries that are not indices (UUIDs, MIG instances) the mapping is unknown:
    every NVML device is then watched under its NVML name (``"nvml:3"``). Over several devices the
    first ``replicas`` are kept, as the worker keeps them after ``fewer_devices``.
    """
    if cuda_visible is None:
        visible = list(range(nvml_count))
    else:
        parts = [part.strip() for part in cuda_visible.split(",") if part.strip()]
        if not all(part.isdigit() for part in parts):
            return tuple((i, f"nvml:{i}") for i in range(nvml_count))
        visible = [int(part) for part in parts if int(part) < nvml_count]
    if isinstance(devices, tuple):
        chosen = [int(name.split(":")[1]) for name in devices if name.startswith("gpu:")]
    elif devices in ("auto", "all"):
        chosen = list(range(len(visible)))
    elif devices.startswith("gpu:"):
        chosen = [int(devices.split(":")[1])]
    else:
        chosen = []  # the CPU
    chosen = [k for k in chosen if k < len(visible)]
    if len(chosen) > 1:
        chosen = chosen[:max(1, replicas)]
    return tuple((visible[k], f"GPU:{k}") for k in chosen)


@dataclass
class DevicePeaks:
    """Per-device GPU memory over one attempt: the most the worker held on each device, and the fullest
    each device was (every process counted: a GPU shared with another job runs out sooner)."""

    names: tuple[str, ...]
    held: list[int | None] = field(default_factory=list)
    share: list[float | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.held = [None] * len(self.names)
        self.share = [None] * len(self.names)

    def add(self, readings: Sequence[Reading]) -> None:
        """One sample: a reading per device of ``names``, in that order."""
        for i, (held, used, total) in enumerate(readings[:len(self.names)]):
            if held is not None:
                self.held[i] = max(self.held[i] or 0, held)
            if used is not None and total:
                self.share[i] = max(self.share[i] or 0.0, used / total)

    def fullest(self) -> str | None:
        """The device that came closest to running out: the highest share of its capacity in use at any
        sample, else (NVML gave no capacity) the most the worker held; None with fewer than two devices
        or no reading."""
        if len(self.names) < 2:
            return None
        for figures in (self.share, self.held):
            known = [(value, i) for i, value in enumerate(figures) if value is not None]
            if known and max(known)[0] > 0:
                # On a tie the first device wins: the order of names, not of the figures' values.
                best = max(value for value, _ in known)
                return self.names[next(i for value, i in known if value == best)]
        return None

    def evidence(self) -> dict[str, object]:
        """The peaks for an incident's evidence: ``{"gpu_peaks": {"GPU:0": bytes, ...}, "gpu_share_peaks": ...}``."""
        out: dict[str, object] = {}
        if any(v is not None for v in self.held):
            out["gpu_peaks"] = dict(zip(self.names, self.held))
        if any(v is not None for v in self.share):
            out["gpu_share_peaks"] = {n: (round(v, 4) if v is not None else None) for n, v in zip(self.names, self.share)}
        return out

#: The caller holding more than this share of a GPU (or this many bytes) leaves the worker short.
SHARE_THRESHOLD = 0.25
BYTES_THRESHOLD = 2 << 30


def caller_gpu_warning(used_by_caller: int | None, device_total: int | None) -> str | None:
    """The warning text when the calling process holds too much GPU memory; None when all is well."""
    if not used_by_caller or not device_total:
        return None
    if used_by_caller < BYTES_THRESHOLD and used_by_caller < SHARE_THRESHOLD * device_total:
        return None
    share = used_by_caller / device_total
    return (
        f"This process already holds {format_bytes(used_by_caller)} of GPU memory ({share:.0%} of the device), "
        "which the training worker cannot use; TensorFlow reserves nearly all of it by default and never gives "
        "it back. Fix: import resilient before TensorFlow (it turns on memory growth), or pass a zero-argument "
        "function that builds and compiles the model instead of the model, so this process never touches the GPU."
    )


def warn_if_caller_holds_gpu(nvml: object | None = None) -> str | None:
    """Read this process's GPU memory through NVML and warn (once per call) when it is large."""
    from .memory import GpuMemory

    gpu = nvml if nvml is not None else GpuMemory()
    if not getattr(gpu, "available", False):
        return None
    used = gpu.used_by({os.getpid()})
    totals = gpu.totals()
    total = sum(t for _, t in totals) if totals else None
    text = caller_gpu_warning(used, total)
    if text:
        warnings.warn(text, ResourceWarning, stacklevel=3)
    return text
