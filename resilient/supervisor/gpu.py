"""The caller's GPU: warn when the calling process already holds a large share of GPU memory."""

from __future__ import annotations

import os
import warnings

from .._units import format_bytes

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
