"""The seeded chaos run (bench/chaos.py) with a fixed seed: 20 faults, and the run ends as a clean one.

Faults of every non-degrading kind (segfault, abort, sigkill, hang, preempt, save_kill) at seeded
random steps of a small model's 80-step run; the final weights (1e-6), the History and
``optimizer.iterations`` must equal a clean run's, and every drawn fault must fire exactly once.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import chaos

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("no_leftover_processes")]

SEED, FAULTS = 2, 20


def test_the_draw_is_seeded_and_holds_every_kind():
    faults = chaos.draw_faults(SEED, FAULTS, 80)
    assert faults == chaos.draw_faults(SEED, FAULTS, 80)
    assert len({f.split("@")[1] for f in faults}) == FAULTS  # distinct steps
    assert {f.split("@")[0] for f in faults} == set(chaos.KINDS)


def test_twenty_faults_end_with_the_clean_runs_weights_history_and_iterations(tmp_path, capsys):
    t0 = time.monotonic()
    out = chaos.chaos(SEED, FAULTS, tmp_path)
    with capsys.disabled():
        print(f"\nchaos: {FAULTS} faults ({', '.join(out['faults'])}) in {time.monotonic() - t0:.0f} s "
              f"(clean {out['seconds'][0]:.0f} s, chaos {out['seconds'][1]:.0f} s); "
              f"max |weight difference| {out['max_weight_diff']:.3g}")
    assert len(out["faults"]) == FAULTS
    assert sorted(out["fired"]) == sorted(out["faults"]), "every drawn fault fires exactly once"
    assert len(out["incidents"]) >= FAULTS
    assert out["max_weight_diff"] <= 1e-6
    assert out["same_history"]
    assert out["iterations"][0] == out["iterations"][1] == 80
    assert out["ok"]
