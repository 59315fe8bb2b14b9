"""A real host OOM caused by caching an image folder, under a real memory cgroup, healed by drop_cache."""

from __future__ import annotations

import pytest

import resilient
from resilient._rundir import RunDir
from resilient.supervisor.memory import cgroup_support
from tests.conftest import make_data  # noqa: F401  (keeps the shared fixtures importable)
from tests.input_helpers import make_image_model, write_image_folder

pytestmark = [pytest.mark.e2e, pytest.mark.cgroup, pytest.mark.usefixtures("no_leftover_processes")]

SIZE = (384, 384)  # decoded float32: 1.7 MiB an image, about 530 MiB for the 300 images


def _peaks(run_dir, key="cgroup_peak_bytes"):
    """Per attempt, the memory its cgroup was charged at most (what the kernel enforces)."""
    return [e.get(key) for e in RunDir(run_dir).read_events() if e["event"] == "attempt_ended"]


@pytest.mark.fault("host_oom", "mid-epoch", incident="host_oom",
                   outcome="completed after a real cgroup OOM kill, healed by drop_cache",
                   lost="the steps since the last checkpoint", corrupted="no")
def test_cached_image_folder_over_the_limit_is_healed_by_drop_cache(tmp_path):
    ok, why = cgroup_support()
    if not ok:
        pytest.skip(f"memory cgroups are not writable on this machine: {why}")
    folder = write_image_folder(tmp_path / "images", classes=3, per_class=100, size=(64, 64))

    # Calibrate: what this worker needs without the cache, measured by its own cgroup.
    calib = tmp_path / "calibration"
    resilient.fit(make_image_model(), resilient.data.image_folder(folder, image_size=SIZE, validation_split=0.0,
                                                                  cache=False),
                  epochs=1, batch_size=16, seed=1, run_dir=calib, verbose=0, host_memory_limit="8GB")
    [baseline] = _peaks(calib)
    limit = baseline + (200 << 20)  # room for training, not for the 530 MiB cache

    run_dir = tmp_path / "run"
    history = resilient.fit(
        make_image_model(), resilient.data.image_folder(folder, image_size=SIZE, validation_split=0.0),
        epochs=1, batch_size=16, seed=1, run_dir=run_dir, verbose=0, host_memory_limit=limit, checkpoint_every=4,
    )
    [incident] = history.incidents
    assert incident.kind == "host_oom"
    assert incident.evidence["source"] == "cgroup" and incident.evidence["oom_kills"] >= 1
    assert incident.plan_before.cache is True and incident.plan_after.cache is False
    assert "drop_cache" in incident.action
    assert history.plan.cache is False
    assert history.epoch == [0]
    first, last = _peaks(run_dir)
    assert first is not None and first <= limit * 1.02
    assert last < limit, "the healed attempt trains within the memory limit"
    private = _peaks(run_dir, "memory_peak_bytes")[-1]
    assert private is not None and private < limit
