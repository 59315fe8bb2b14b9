"""Policies: which degradation steps to take after each kind of incident, and the probe's search.

``step.py`` (Step, StepContext, the registry), ``steps.py`` (the built-in steps), ``policy.py`` (Policy,
its TOML files and presets, validation), ``search.py`` (the search for the best batch size). Pure: no
TensorFlow, no Keras; the supervisor runs all of it.
"""

from .policy import (
    PRESET_DIRS,
    MemorySettings,
    Policy,
    ProbeSettings,
    RuntimeSettings,
    list_presets,
    load_policy,
    resolve_policy_path,
)
from .search import Horizon, PlanSearch, next_probe, probe_below
from .step import Step, StepContext, get_step, list_steps, register_step

__all__ = [
    "PRESET_DIRS",
    "Horizon",
    "MemorySettings",
    "PlanSearch",
    "Policy",
    "ProbeSettings",
    "RuntimeSettings",
    "Step",
    "StepContext",
    "get_step",
    "list_presets",
    "list_steps",
    "load_policy",
    "next_probe",
    "probe_below",
    "register_step",
    "resolve_policy_path",
]
