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
                _take(_HELD, int(0.70 * limit) - _cgroup_working_set())
            if _HELD:
                _take(_HELD, int(slice_share * limit))
                time.sleep(pause)

    return ClimbingMemory()


def _take(held: list[np.ndarray], nbytes: int) -> None:
    """Hold ``nbytes`` more in ``held``, resident. The callbacks pass the ``_HELD`` they carried into the worker
    (a copy of their own: the list this module's function would see there is another)."""
    while nbytes > 0:
        chunk = np.ones(min(nbytes, 16 << 20), dtype=np.uint8)  # touched: resident
        held.append(chunk)
        nbytes -= chunk.nbytes


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
    # On crossing 85%, then again as the climb halves the headroom left.
    requests = events(run_dir, "checkpoint_requested")
    assert [r["trigger"] for r in requests][:1] == ["first_crossing"], requests
    assert all(r["attempt"] == 0 and r["reason"] == "memory_pressure" for r in requests)
    assert requests[0]["used_bytes"] >= 0.85 * limit
    pressure = [e for e in events(run_dir, "checkpoint_saved") if e["reason"] == "memory_pressure"][-1]
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


def stalling_memory(limit: int, marker: Path, start: int = 3, stall: int = 6, pause: float = 0.6):
    """A callback that, in the first attempt only (``marker``), holds the worker's memory at 88% of ``limit``
    from step ``start`` for ``stall`` steps of ``pause`` seconds each, then jumps past the limit (a spike: a
    validation, a larger batch, the epoch's end) at the step after."""
    import keras

    class StallingMemory(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            step = int(self.model.optimizer.iterations.numpy())
            if step == start and not marker.exists():
                marker.write_text("stalling")
                _take(_HELD, int(0.88 * limit) - _cgroup_working_set())
            if _HELD:
                time.sleep(pause)
                if step == start + stall:
                    _take(_HELD, int(0.2 * limit))

    return StallingMemory()


@pytest.mark.cgroup
@pytest.mark.fault("host_oom", "mid-epoch", incident="host_oom",
                   outcome="memory stalls above the mark: memory_pressure checkpoints at an interval; the spike's "
                           "real cgroup OOM kill redoes at most 2 steps", lost="at most 2 steps", corrupted="no")
def test_pressure_checkpoints_while_memory_sits_above_the_mark_leave_at_most_two_steps_to_a_spike(tmp_path):
    ok, why = cgroup_support()
    if not ok:
        pytest.skip(f"memory cgroups are not writable on this machine: {why}")
    x, y = make_data()
    limit = 1500 << 20
    run_dir = tmp_path / "run"
    # Steps of 0.6 s: a pressure checkpoint's cost (10x it spaces the interval's requests) may reach 0.12 s.
    start, stall = 3, 6
    # One epoch of 16 steps: no epoch-end checkpoint falls in the stall.
    history = resilient.fit(
        make_model(seed=SEED), x, y, epochs=1, batch_size=16, seed=SEED, run_dir=run_dir, verbose=0,
        callbacks=[stalling_memory(limit, tmp_path / "stalled", start, stall)], host_memory_limit=limit,
        checkpoint_every=100, policy=resilient.Policy(ladders={}, memory={"pressure_interval": 0.5}),
    )

    [incident] = history.incidents
    assert incident.kind == "host_oom" and incident.evidence["source"] == "cgroup", incident
    assert incident.step >= start + stall - 1, incident  # killed by the jump, not in the stall
    saved = [e for e in events(run_dir, "checkpoint_saved") if e["reason"] == "memory_pressure" and e["attempt"] == 0]
    assert incident.checkpoint_step == saved[-1]["step"]
    assert 0 <= incident.step - saved[-1]["step"] <= 2, (incident.step, [e["step"] for e in saved])
    requests = events(run_dir, "checkpoint_requested")
    assert [r["trigger"] for r in requests][:1] == ["first_crossing"], requests
    assert "interval" in {r["trigger"] for r in requests}, requests  # the stall's checkpoints
    assert events(run_dir, "worker_ready")[-1]["resumed_from_step"] == saved[-1]["step"]
    assert history.epoch == [0]
