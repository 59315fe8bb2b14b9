"""The public face: a sorted ``__all__`` of names that say they live in ``resilient``, and an import
boundary that keeps TensorFlow out of the caller's side of the process boundary."""

from __future__ import annotations

import subprocess
import sys
import types

import resilient

EXPECTED = [
    "DiskFullError", "History", "Incident", "InvalidArgumentError", "InvalidPolicyError", "Plan", "Policy", "ResilientError",
    "RunDirError", "Step", "StepContext", "TrainingFailedError", "UserCodeError", "data", "fit", "load_policy",
    "register_step", "resume", "steps",
]

INTERNAL = {"policy", "supervisor", "worker"}


def test_all_is_sorted_complete_and_guarded():
    assert resilient.__all__ == sorted(resilient.__all__)
    assert resilient.__all__ == EXPECTED, "a change to the public surface must be deliberate: update EXPECTED"
    # Besides __all__, only the internal subpackages (the two sides of the process boundary and the
    # policies) may show up, as modules.
    extra = {n for n in dir(resilient) if not n.startswith("_")} - set(EXPECTED)
    assert extra <= INTERNAL, f"public names outside __all__: {sorted(extra - INTERNAL)}"
    assert all(isinstance(getattr(resilient, n), types.ModuleType) for n in extra)


def test_exported_names_report_the_package_as_their_module():
    for name in resilient.__all__:
        obj = getattr(resilient, name)
        if isinstance(obj, types.ModuleType):
            assert obj.__name__ == f"resilient.{name}"
        else:
            assert obj.__module__ == "resilient", f"resilient.{name}.__module__ == {obj.__module__!r}"


def test_step_is_public_so_users_can_subclass_it():
    class Noop(resilient.Step):
        def apply(self, plan, incident, context):
            return None

    assert issubclass(Noop, resilient.Step)
    assert "resilient.TrainingFailedError" in repr(resilient.TrainingFailedError)


def test_the_caller_side_never_imports_tensorflow_or_keras():
    """The supervisor, the policies, the public face and the worker modules fit uses (state, reshape) load
    without TensorFlow (a fresh interpreter)."""
    code = (
        "import sys, resilient, resilient.supervisor.loop, resilient.supervisor.classify, resilient.policy, "
        "resilient.policy.step, resilient.policy.steps, resilient.policy.policy, resilient.policy.search, "
        "resilient.steps, resilient._status, resilient._cli, resilient._report, resilient._report.record, "
        "resilient._report.figures, resilient._report.page, resilient.worker.state, resilient.worker.reshape\n"
        "import resilient.data.dispatch, resilient.data.base, resilient.data.checks, resilient.data.arrays, "
        "resilient.data.folder, resilient.data.factory, resilient.data.pydataset\n"
        "import resilient.supervisor.config, resilient.supervisor.decide, resilient.supervisor.process, "
        "resilient.supervisor.report, resilient.supervisor.memory, resilient._replan, resilient._devices, "
        "resilient.supervisor.startup, resilient.supervisor.telemetry, resilient.supervisor.display, "
        "resilient.supervisor.mirror, resilient.supervisor.standby\n"
        "resilient.load_policy('default')\n"
        "bad = sorted(m for m in ('tensorflow', 'keras') if m in sys.modules)\n"
        "print('IMPORTED', bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "IMPORTED []" in out.stdout, out.stdout + out.stderr
