"""fit(devices=...): checked with a received/expected message, counted into the plan's replicas."""

from __future__ import annotations

import pytest

from resilient._devices import check_devices, logical_cpus, replica_count, visible_gpu_count
from resilient._errors import InvalidArgumentError
from resilient._plan import Plan


@pytest.mark.parametrize(("given", "expected"), [
    ("auto", "auto"), ("all", "all"), ("CPU", "cpu"), ("gpu", "gpu:0"), ("gpu:3", "gpu:3"),
    (["gpu:0", "gpu:1"], ("gpu:0", "gpu:1")), (("cpu:0", "cpu:1"), ("cpu:0", "cpu:1")),
])
def test_devices_are_normalised(given, expected):
    assert check_devices(given) == expected


@pytest.mark.parametrize(("given", "why"), [
    ("tpu", "Expected \"auto\""), (2, "Expected \"auto\""), ([], "Expected \"auto\""), (["gpu"], "Expected \"auto\""),
    (["gpu:0", "gpu:0"], "each device once"), (["gpu:0", "cpu:0"], "one kind"), (b"gpu:0", "Expected \"auto\""),
])
def test_bad_devices_are_refused_with_received_and_expected(given, why):
    with pytest.raises(InvalidArgumentError, match="Received: devices=") as info:
        check_devices(given)
    assert why in str(info.value)


@pytest.mark.parametrize(("devices", "gpus", "expected"), [
    ("auto", 0, 1), ("auto", 1, 1), ("auto", 4, 4), ("all", 2, 2), ("cpu", 4, 1), ("gpu:1", 4, 1),
    (("gpu:0", "gpu:1"), 8, 2),
])
def test_replica_count(devices, gpus, expected):
    assert replica_count(devices, gpus) == expected


def test_all_without_gpus_counts_the_testing_aids_logical_cpus(monkeypatch):
    monkeypatch.setenv("RESILIENT_LOGICAL_CPUS", "2")
    assert logical_cpus() == 2 and replica_count("all", 0) == 2
    monkeypatch.setenv("RESILIENT_LOGICAL_CPUS", "lots")
    assert logical_cpus() == 1


def test_cuda_visible_devices_narrows_what_nvml_counts(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert visible_gpu_count(4) == 4
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert visible_gpu_count(4) == 2
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpu_count(4) == 0


def test_the_plan_describes_the_global_batch_and_its_split():
    assert Plan(batch_size=256, replicas=4).describe().startswith("batch=256 (4x64) ")
    assert Plan(batch_size=16, grad_accum_steps=2, replicas=2).describe().startswith("batch=16x2 (2x8) ")
    assert Plan(batch_size=33, replicas=2).describe().startswith("batch=33 (over 2 devices) ")
    assert Plan(batch_size=256).describe().startswith("batch=256 float32")


def test_a_plan_and_a_run_spec_written_by_0_1_0_load_on_one_device():
    from pathlib import Path

    from resilient._rundir import RunSpec

    fixture = Path(__file__).parent / "fixtures" / "rundir_v0"
    assert "replicas" not in (fixture / "plan.json").read_text()
    assert Plan.model_validate_json((fixture / "plan.json").read_text()).replicas == 1
    assert RunSpec.model_validate_json((fixture / "run.json").read_text()).devices == "auto"


def test_fit_refuses_bad_devices_before_writing_anything(tmp_path):
    import resilient

    with pytest.raises(InvalidArgumentError, match=r"Received: devices='tpu:0'"):
        resilient.fit(lambda: None, None, epochs=1, run_dir=tmp_path / "run", devices="tpu:0")
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------ fewer_devices


def _incident(plan, kind="crash"):
    from resilient._incident import Incident

    return Incident(kind=kind, attempt=0, plan_before=plan)


@pytest.mark.parametrize(("replicas", "min_devices", "expected"), [
    (8, 1, 4), (4, 1, 2), (3, 1, 1), (2, 1, 1), (1, 1, None), (4, 3, 3), (3, 3, None), (8, 2, 4),
])
def test_fewer_devices_halves_the_device_count_keeping_the_global_batch(replicas, min_devices, expected):
    from resilient.policy.step import StepContext
    from resilient.steps import fewer_devices

    plan = Plan(batch_size=96, replicas=replicas)
    new = fewer_devices(min_devices=min_devices).apply(plan, _incident(plan), StepContext(plan))
    if expected is None:
        assert new is None
    else:
        assert new == plan.replace(replicas=expected)  # only the device count changes
        assert new.batch_size == 96 and new.effective_batch == plan.effective_batch


def test_fewer_devices_can_keep_each_devices_share_and_the_effective_batch():
    from resilient.policy.step import StepContext
    from resilient.steps import fewer_devices

    step = fewer_devices(keep_global_batch=False)
    plan = Plan(batch_size=256, replicas=4)
    new = step.apply(plan, _incident(plan, "gpu_oom"), StepContext(plan))
    assert (new.replicas, new.batch_size, new.grad_accum_steps, new.per_replica_batch) == (2, 128, 2, 64)
    assert new.describe().startswith("batch=128x2 (2x64)")
    again = step.apply(new, _incident(new, "gpu_oom"), StepContext(new))
    assert (again.replicas, again.batch_size, again.grad_accum_steps) == (1, 64, 4)
    # An effective batch the new global batch does not divide: not applicable (the next rung is tried).
    odd = Plan(batch_size=30, replicas=4)  # 4x7, two samples left over
    assert step.apply(odd, _incident(odd), StepContext(odd)) is None
    # A PyDataset batches itself: the global batch cannot shrink.
    fixed = StepContext(plan, batch_size_fixed=True)
    assert step.apply(plan, _incident(plan), fixed) is None
    assert fewer_devices().apply(plan, _incident(plan), fixed) == plan.replace(replicas=2)


def test_fewer_devices_is_named_in_policy_files_and_in_no_preset(tmp_path):
    from resilient.policy.policy import load_policy
    from resilient.policy.step import list_steps
    from resilient.steps import fewer_devices, halve_batch

    assert "fewer_devices" in list_steps()
    path = tmp_path / "p.toml"
    path.write_text('[ladders]\ncrash = ["fewer_devices"]\n'
                    'gpu_oom = [{ step = "fewer_devices", keep_global_batch = false, min_devices = 2 }, "halve_batch"]\n')
    policy = load_policy(path)
    assert policy.ladder("crash") == (fewer_devices(),)
    assert policy.ladder("gpu_oom") == (fewer_devices(keep_global_batch=False, min_devices=2), halve_batch())
    plan = Plan(batch_size=64, replicas=2)
    # min_devices=2 stops the first rung on two devices: the ladder goes on to halve_batch.
    assert policy.degrade(plan, _incident(plan, "gpu_oom"))[1] == halve_batch()
    assert policy.degrade(plan, _incident(plan, "crash")) == (plan.replace(replicas=1), fewer_devices())
    for preset in ("default", "conservative", "colab-free"):
        steps = [step.name for kind in load_policy(preset).ladders for step in load_policy(preset).ladder(kind)]
        assert "fewer_devices" not in steps, preset
    bad = tmp_path / "bad.toml"
    bad.write_text('[ladders]\ncrash = [{ step = "fewer_devices", min_devices = 0 }]\n')
    with pytest.raises(Exception, match="min_devices"):
        load_policy(bad)
