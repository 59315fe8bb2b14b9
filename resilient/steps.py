"""Built-in degradation steps (public): ``resilient.steps.halve_batch(min_batch=8)`` and friends.

They are defined in ``resilient.policy.steps``; see that module for what each does. This module
re-exports exactly that module's ``__all__``, so the list of built-ins is written once.
"""

from .policy.steps import *  # noqa: F403
from .policy.steps import __all__  # noqa: F401
