"""resilient: a self-healing training runtime for Keras.

``resilient.fit(model, x, y, ...)`` trains like ``model.fit`` in a supervised worker process,
classifies whatever kills it, and restarts it from the last checkpoint with a degraded plan.
"""

import os as _os

# The calling process must not reserve the whole GPU: imported before TensorFlow, this makes
# TensorFlow grow GPU memory on demand in this process and in every worker.
_os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")

from . import data, steps
from ._errors import (
    DiskFullError,
    InvalidArgumentError,
    InvalidPolicyError,
    ResilientError,
    RunDirError,
    TrainingFailedError,
    UserCodeError,
)
from ._fit import fit
from ._history import History
from ._incident import Incident
from ._plan import Plan
from ._resume import resume
from .policy import Policy, Step, StepContext, load_policy, register_step

__version__ = "0.1.0"

__all__ = [
    "DiskFullError",
    "History",
    "Incident",
    "InvalidArgumentError",
    "InvalidPolicyError",
    "Plan",
    "Policy",
    "ResilientError",
    "RunDirError",
    "Step",
    "StepContext",
    "TrainingFailedError",
    "UserCodeError",
    "data",
    "fit",
    "load_policy",
    "register_step",
    "resume",
    "steps",
]

# Public names say where users find them: tracebacks read ``resilient.TrainingFailedError``, not the
# private module that happens to define it.
for _name in __all__:
    _obj = globals()[_name]
    if isinstance(_obj, type) or (callable(_obj) and not isinstance(_obj, type(_os))):
        _obj.__module__ = __name__
del _name, _obj
