"""Built-in degradation steps: small frozen objects, each registered under its own name.

Use them in Python (``resilient.steps.halve_batch(min_batch=8)``) or by name in a policy file
(``{ step = "halve_batch", min_batch = 8 }``). Each returns a new Plan, or None when it cannot change
anything useful here, so the policy tries the next rung.

Memory steps (``gpu_oom``, ``host_oom``): halve_batch, mixed_precision, lower_resolution, drop_cache,
shrink_buffers. Numerical steps (``nan_loss``): leave_mixed_precision, lower_learning_rate.
Device step (in no preset; add it where a device may be shared or faulty): fewer_devices.
"""

from __future__ import annotations

import math

from pydantic import Field

from .._incident import Incident
from .._plan import Plan
from .step import Step, StepContext, register_step

__all__ = [
    "drop_cache",
    "fewer_devices",
    "halve_batch",
    "leave_mixed_precision",
    "lower_learning_rate",
    "lower_resolution",
    "mixed_precision",
    "shrink_buffers",
]

#: What shrink_buffers sets when the pipeline was left to choose (None).
SHUFFLE_BUFFER_FROM_AUTO = 1024
PREFETCH_FROM_AUTO = 1
PARALLEL_CALLS_FROM_AUTO = 2
#: shrink_buffers never goes below these (and never raises a smaller value the user chose).
MIN_SHUFFLE_BUFFER = 64
MIN_PREFETCH = 1
MIN_PARALLEL_CALLS = 1


def _shrink(value: int | None, *, from_auto: int, factor: float, minimum: int) -> int | None:
    """``value`` times ``factor``, floored at ``minimum``, never larger; None (auto) becomes ``from_auto``."""
    if value is None:
        return from_auto
    return min(value, max(minimum, int(value * factor)))


@register_step("halve_batch")
class halve_batch(Step):
    """Halve the batch size, never below ``min_batch``.

    Under several devices (``plan.replicas``) the per-device batch halves and ``min_batch`` bounds
    it: the global batch halves too and stays a multiple of the device count, so each device still
    takes an equal share.
    With ``keep_effective_batch``, ``grad_accum_steps`` grows so that batch * accumulation stays the
    effective batch of the plan before: the optimizer sees the same number of samples per update.
    The math is still not identical: BatchNorm statistics see the smaller micro-batch. (Learning-rate
    schedules that count steps are the worker's concern.) When no batch size between a quarter and
    a half of the current one divides the effective batch exactly, the step does not apply.
    """

    min_batch: int = Field(1, ge=1)
    keep_effective_batch: bool = False

    def apply(self, plan: Plan, incident: Incident, context: StepContext) -> Plan | None:
        if context.batch_size_fixed:
            return None  # the input batches itself (PyDataset): a smaller plan batch would change nothing
        replicas = plan.replicas
        per = plan.per_replica_batch
        target = max(self.min_batch, per // 2)
        if target >= per:
            return None
        if not self.keep_effective_batch:
            return plan.replace(batch_size=target * replicas)
        effective = plan.effective_batch
        lowest = max(self.min_batch, math.ceil(per / 4))
        for candidate in range(target, lowest - 1, -1):
            if effective % (candidate * replicas) == 0:
                return plan.replace(batch_size=candidate * replicas, grad_accum_steps=effective // (candidate * replicas))
        return None


@register_step("mixed_precision")
class mixed_precision(Step):
    """Switch float32 training to mixed precision where the hardware supports it.

    GPUs with compute capability >= 7.0 get ``mixed_float16`` (tensor cores; the worker wraps the
    optimizer in a loss-scale optimizer); TPUs, and CPUs with bfloat16 support, get ``mixed_bfloat16``.
    On GPUs we use float16 even on cc >= 8.0, where bfloat16 would also run: it is what DESIGN.md
    promises and what Keras documents for GPUs. Does not apply when the plan is already mixed, when the
    hardware does not suit (older GPU, unknown compute capability, CPU without bfloat16), or when an
    earlier ``nan_loss`` incident of this run happened under mixed precision.
    """

    def apply(self, plan: Plan, incident: Incident, context: StepContext) -> Plan | None:
        if plan.precision != "float32":
            return None
        if any(
            past.kind == "nan_loss" and past.plan_before.precision != "float32" for past in context.incidents
        ):
            return None
        if context.device == "gpu":
            capability = context.gpu_compute_capability
            if capability is None or tuple(capability) < (7, 0):
                return None
            return plan.replace(precision="mixed_float16")
        if context.device == "tpu" or (context.device == "cpu" and context.cpu_supports_bf16):
            return plan.replace(precision="mixed_bfloat16")
        return None


@register_step("lower_resolution")
class lower_resolution(Step):
    """Scale the input images by ``factor`` per side, never below ``min_size`` (nor above the current size).

    Applies only when resilient builds the image pipeline and the model accepts another input size
    (``context.resizable_input``), and the current size is known (the plan's, else the source's).
    """

    factor: float = Field(0.75, gt=0, lt=1)
    min_size: int = Field(32, ge=1)

    def apply(self, plan: Plan, incident: Incident, context: StepContext) -> Plan | None:
        if not context.resizable_input:
            return None
        size = plan.image_size or context.source_image_size
        if size is None:
            return None
        new_size = tuple(min(side, max(self.min_size, round(side * self.factor))) for side in size)
        if new_size == tuple(size):
            return None
        return plan.replace(image_size=new_size)


@register_step("drop_cache")
class drop_cache(Step):
    """Stop caching decoded data in the input pipeline."""

    def apply(self, plan: Plan, incident: Incident, context: StepContext) -> Plan | None:
        if not context.cacheable:
            return None  # the input has no cache to drop (NumPy arrays): a restart would change nothing
        return plan.replace(cache=False) if plan.cache else None


@register_step("shrink_buffers")
class shrink_buffers(Step):
    """Shrink the input pipeline's shuffle buffer, prefetch depth and parallel map calls by ``factor``.

    A knob left to the pipeline (None, AUTOTUNE) becomes a small fixed value: shuffle buffer 1024,
    prefetch 1, parallel calls 2 (AUTOTUNE may run one call per core, each holding an element).
    Floors: shuffle buffer 64, prefetch 1, parallel calls 1; a smaller value the user chose is kept.
    Does not apply when every knob is at its floor.
    """

    factor: float = Field(0.5, gt=0, lt=1)

    def apply(self, plan: Plan, incident: Incident, context: StepContext) -> Plan | None:
        if not context.buffered:
            return None  # the input has no buffers to shrink (NumPy arrays)
        new_plan = plan.replace(
            shuffle_buffer=_shrink(
                plan.shuffle_buffer,
                from_auto=SHUFFLE_BUFFER_FROM_AUTO,
                factor=self.factor,
                minimum=MIN_SHUFFLE_BUFFER,
            ),
            prefetch=_shrink(
                plan.prefetch, from_auto=PREFETCH_FROM_AUTO, factor=self.factor, minimum=MIN_PREFETCH
            ),
            parallel_calls=_shrink(
                plan.parallel_calls,
                from_auto=PARALLEL_CALLS_FROM_AUTO,
                factor=self.factor,
                minimum=MIN_PARALLEL_CALLS,
            ),
        )
        return new_plan if new_plan != plan else None


@register_step("lower_learning_rate")
class lower_learning_rate(Step):
    """Multiply the learning rate by ``factor``, never below ``min_scale`` times the one asked for."""

    factor: float = Field(0.5, gt=0, lt=1)
    min_scale: float = Field(1e-3, gt=0, le=1)

    def apply(self, plan: Plan, incident: Incident, context: StepContext) -> Plan | None:
        scale = plan.learning_rate_scale
        new_scale = min(scale, max(self.min_scale, scale * self.factor))
        return plan.replace(learning_rate_scale=new_scale) if new_scale != scale else None


@register_step("leave_mixed_precision")
class leave_mixed_precision(Step):
    """Go back to float32 from mixed precision (float16 overflow is a common cause of NaN losses)."""

    def apply(self, plan: Plan, incident: Incident, context: StepContext) -> Plan | None:
        return plan.replace(precision="float32") if plan.precision != "float32" else None


@register_step("fewer_devices")
class fewer_devices(Step):
    """Train on half as many devices (the first half of the run's), never fewer than ``min_devices``.

    For a device shared with another job, or one that fails: put it in the ``gpu_oom`` or ``crash``
    ladder (no preset has it). With ``keep_global_batch`` (the default) ``batch_size`` stays, so each
    remaining device takes a larger share and the training computes what it computed, up to the
    order of the float reduction; after a GPU OOM that share may not fit, so a later rung (or
    ``keep_global_batch=False``) should shrink it. With ``keep_global_batch=False`` each device keeps
    its share: the global batch shrinks with the device count and ``grad_accum_steps`` grows so each
    update still sees the same samples (not applicable when the effective batch is not a multiple of
    the new global batch, or when the input batches itself). Does not apply on one device.
    """

    min_devices: int = Field(1, ge=1)
    keep_global_batch: bool = True

    def apply(self, plan: Plan, incident: Incident, context: StepContext) -> Plan | None:
        if plan.replicas <= self.min_devices:
            return None
        replicas = max(self.min_devices, plan.replicas // 2)
        if self.keep_global_batch:
            return plan.replace(replicas=replicas)
        if context.batch_size_fixed:
            return None  # a PyDataset's batch cannot shrink: each device's share would grow regardless
        batch = plan.per_replica_batch * replicas
        if plan.effective_batch % batch:
            return None
        return plan.replace(replicas=replicas, batch_size=batch, grad_accum_steps=plan.effective_batch // batch)
