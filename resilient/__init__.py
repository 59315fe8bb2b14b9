"""resilient: a self-healing training runtime for Keras.

``resilient.fit(model, x, y, ...)`` trains like ``model.fit`` in a supervised worker process,
classifies whatever kills it, and restarts it from the last checkpoint with a degraded plan.
"""

import os as _os

# The calling process must not reserve the whole GPU: imported before TensorFlow, this makes
# TensorFlow grow GPU memory on demand in this process and in every worker.
_os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")

from . import steps  # noqa: E402
from ._errors import (  # noqa: E402
    InvalidArgumentError,
    InvalidPolicyError,
    ResilientError,
    RunDirError,
    TrainingFailedError,
    UserCodeError,
)
from ._fit import fit  # noqa: E402
from ._history import History  # noqa: E402
from ._incident import Incident  # noqa: E402
from ._plan import Plan  # noqa: E402
from ._policy import Policy, StepContext, load_policy, register_step  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "History",
    "Incident",
    "InvalidArgumentError",
    "InvalidPolicyError",
    "Plan",
    "Policy",
    "ResilientError",
    "RunDirError",
    "StepContext",
    "TrainingFailedError",
    "UserCodeError",
    "fit",
    "load_policy",
    "register_step",
    "steps",
]
