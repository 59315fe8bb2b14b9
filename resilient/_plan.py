"""The Plan: every knob a degradation step may turn, frozen and JSON-serialisable."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Precision = Literal["float32", "mixed_float16", "mixed_bfloat16"]


class Plan(BaseModel):
    """How one attempt trains: batch, precision, resolution and input-pipeline settings.

    A plan is immutable; degradation steps return a new one (``plan.replace(...)``).
    JSON is its wire format between the supervisor, the worker and the run directory.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    batch_size: int = Field(32, ge=1, description="Samples per micro-batch.")
    grad_accum_steps: int = Field(
        1, ge=1, description="Micro-batches per optimizer update (keeps the effective batch)."
    )
    precision: Precision = "float32"
    image_size: tuple[int, int] | None = Field(
        None, description="(height, width) the pipeline resizes images to; None keeps the source size."
    )
    cache: bool = Field(True, description="Whether the input pipeline may cache decoded data.")
    shuffle_buffer: int | None = Field(
        None, ge=1, description="Shuffle buffer for streamed inputs; None lets the pipeline choose."
    )
    prefetch: int | None = Field(
        None, ge=0, description="Batches to prefetch; None means tf.data AUTOTUNE."
    )
    parallel_calls: int | None = Field(
        None, ge=1, description="Parallel map calls in the pipeline; None means AUTOTUNE."
    )
    learning_rate_scale: float = Field(
        1.0, gt=0, description="Multiplier applied to the optimizer's learning rate."
    )
    replicas: int = Field(
        1, ge=1, description="Devices the batch is split over (MirroredStrategy); batch_size stays the global batch."
    )

    @field_validator("image_size", mode="before")
    @classmethod
    def _check_image_size(cls, value: object) -> object:
        if value is None:
            return None
        if isinstance(value, int) and not isinstance(value, bool):
            value = (value, value)
        if isinstance(value, (list, tuple)) and len(value) == 2:
            if all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value):
                return (int(value[0]), int(value[1]))
        raise ValueError(
            f"Invalid value for `image_size`. Received: image_size={value!r}. "
            "Expected (height, width) of positive integers, a single positive int, or None."
        )

    @property
    def effective_batch(self) -> int:
        """Samples that contribute to one optimizer update."""
        return self.batch_size * self.grad_accum_steps

    @property
    def per_replica_batch(self) -> int:
        """Samples each device takes of one micro-batch (the global batch split evenly; at least 1)."""
        return max(1, self.batch_size // self.replicas)

    def replace(self, **changes: object) -> Plan:
        """Return a validated copy with ``changes`` applied."""
        data = self.model_dump()
        data.update(changes)
        return Plan.model_validate(data)

    def diff(self, other: Plan) -> dict[str, tuple[object, object]]:
        """Fields that differ between ``self`` and ``other``, as ``{name: (self, other)}``."""
        mine, theirs = self.model_dump(), other.model_dump()
        return {k: (mine[k], theirs[k]) for k in mine if mine[k] != theirs[k]}

    def describe(self) -> str:
        """A short human-readable summary, e.g. ``batch=16x2 float32 cache``, ``batch=256 (4x64) float32 cache``."""
        batch = f"batch={self.batch_size}" + (f"x{self.grad_accum_steps}" if self.grad_accum_steps > 1 else "")
        if self.replicas > 1:
            # The global batch first (what Keras calls batch_size), then how the devices share it.
            split = self.batch_size % self.replicas == 0
            batch += f" ({self.replicas}x{self.per_replica_batch})" if split else f" (over {self.replicas} devices)"
        parts = [batch]
        parts.append(self.precision)
        if self.image_size is not None:
            parts.append(f"image={self.image_size[0]}x{self.image_size[1]}")
        parts.append("cache" if self.cache else "no-cache")
        if self.shuffle_buffer is not None:
            parts.append(f"shuffle_buffer={self.shuffle_buffer}")
        if self.prefetch is not None:
            parts.append(f"prefetch={self.prefetch}")
        if self.parallel_calls is not None:
            parts.append(f"parallel_calls={self.parallel_calls}")
        if self.learning_rate_scale != 1.0:
            parts.append(f"lr_scale={self.learning_rate_scale:g}")
        return " ".join(parts)
