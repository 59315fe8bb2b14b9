"""Built-in degradation steps (public): ``resilient.steps.halve_batch(min_batch=8)`` and friends.

They are defined in ``resilient.policy.steps``; see that module for what each does.
"""

from .policy.steps import (
    drop_cache,
    halve_batch,
    leave_mixed_precision,
    lower_learning_rate,
    lower_resolution,
    mixed_precision,
    shrink_buffers,
)

__all__ = [
    "drop_cache",
    "halve_batch",
    "leave_mixed_precision",
    "lower_learning_rate",
    "lower_resolution",
    "mixed_precision",
    "shrink_buffers",
]
