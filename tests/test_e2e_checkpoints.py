"""End-to-end checkpoints: asynchronous writes and the memory-pressure checkpoint before a real cgroup OOM kill."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

import resilient
from resilient._rundir import RunDir
from resilient.supervisor.memory import cgroup_support
from tests.conftest import make_data, make_model

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("no_leftover_processes")]

BATCH, EPOCHS, SEED = 32, 2, 5  # 256 samples: 8 steps an epoch, 16 in all
#: Memory held by the climbing callback, in the worker; module-level so no checkpoint pickles it.
_HELD: list[np.ndarray] = []


def events(run_dir: Path, name: str) -> list[dict]:
    return [e for e in RunDir(run_dir).read_events() if e["event"] == name]


def _cgroup_working_set() -> int:
    """This process's memory cgroup usage less its inactive file cache (what the supervisor measures)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        hid, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            root, usage, key = Path("/sys/fs/cgroup/memory") / path.lstrip("/"), "memory.usage_in_bytes", \
                "total_inactive_file"
            break
        if hid == "0" and controllers == "":
            root, usage, key = Path("/sys/fs/cgroup") / path.lstrip("/"), "memory.current", "inactive_file"
    used = int((root / usage).read_text())
    stat = dict(line.split() for line in (root / "memory.stat").read_text().splitlines())
    return used - int(stat.get(key, 0))


def climbing_memory(limit: int, marker: Path, start: int = 3, slice_share: float = 0.07, pause: float = 0.3):
    """A callback that, in the first attempt only (``marker``), makes the worker's memory climb toward
    ``limit``: at step ``start`` to 70% of it, then ``slice_share`` of it per step, each step taking
    ``pause`` seconds (a climb of about a second from 85% to the kill, as a leak or a growing cache)."""
    import keras

    class ClimbingMemory(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            step = int(self.model.optimizer.iterations.numpy())
            if step == start and not marker.exists():
                marker.write_text("climbing")
                self._take(int(0.70 * limit) - _cgroup_working_set())
            if _HELD:
                self._take(int(slice_share * limit))
                time.sleep(pause)

        @staticmethod
        def _take(nbytes: int) -> None:
            while nbytes > 0:
                chunk = np.ones(min(nbytes, 16 << 20), dtype=np.uint8)  # touched: resident
                _HELD.append(chunk)
                nbytes -= chunk.nbytes

    return ClimbingMemory()


@pytest.mark.cgroup
@pytest.mark.fault("host_oom", "mid-epoch", incident="host_oom",
                   outcome="a memory_pressure checkpoint lands before the real cgroup OOM kill; completed with "
                           "the weights of an uninterrupted run", lost="at most 2 steps", corrupted="no")
def test_a_pressure_checkpoint_before_a_real_oom_kill_leaves_at_most_two_steps_to_redo(tmp_path):
    ok, why = cgroup_support()
    if not ok:
        pytest.skip(f"memory cgroups are not writable on this machine: {why}")
    x, y = make_data()
    limit = 1500 << 20
    run_dir = tmp_path / "run"
    model = make_model(seed=SEED)
    history = resilient.fit(
        model, x, y, epochs=EPOCHS, batch_size=BATCH, seed=SEED, run_dir=run_dir, verbose=0, shuffle=False,
        callbacks=[climbing_memory(limit, tmp_path / "climbed")], host_memory_limit=limit, checkpoint_every=100,
        policy=resilient.Policy(ladders={}),  # restart with the same plan: the result must equal model.fit's
    )

    [incident] = history.incidents
    assert incident.kind == "host_oom" and incident.evidence["source"] == "cgroup", incident
    [request] = events(run_dir, "checkpoint_requested")  # once in the climb
    assert request["attempt"] == 0 and request["reason"] == "memory_pressure"
    assert request["used_bytes"] >= 0.85 * limit
    [pressure] = [e for e in events(run_dir, "checkpoint_saved") if e["reason"] == "memory_pressure"]
    assert pressure["attempt"] == 0 and pressure["background"] is False
    assert incident.checkpoint_step == pressure["step"]
    assert 0 <= incident.step - pressure["step"] <= 2, (incident.step, pressure["step"])
    assert events(run_dir, "worker_ready")[-1]["resumed_from_step"] == pressure["step"]

    assert history.epoch == [0, 1]
    ref = make_model(seed=SEED)
    ref_history = ref.fit(x, y, epochs=EPOCHS, batch_size=BATCH, shuffle=False, verbose=0)
    for got, want in zip(model.get_weights(), ref.get_weights(), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(history.history["loss"], ref_history.history["loss"], rtol=1e-5)
