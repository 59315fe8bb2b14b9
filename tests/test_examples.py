"""The examples run as documented."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.e2e
def test_custom_step_example_runs(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "custom_step.py")], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "nan_loss at step 20: degrade: cool_down(factor=0.1)" in proc.stdout
