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


# ------------------------------------------------------------------------- which device ran out


OOM_ON_GPU1 = ("Graph execution error:\n\nDetected at node StatefulPartitionedCall defined at (most recent call last):\n"
               "2 root error(s) found.\n  (0) RESOURCE_EXHAUSTED:  OOM when allocating tensor with shape[64,4096] "
               "and type float on /job:localhost/replica:0/task:0/device:GPU:1 by allocator GPU_1_bfc\n"
               "\t [[{{node replica_1/sequential/dense/MatMul}}]]\nHint: If you want to see a list of allocated "
               "tensors when OOM happens, add report_tensor_allocations_upon_oom to RunOptions.")


@pytest.mark.parametrize(("message", "causes", "expected"), [
    (OOM_ON_GPU1, [], "GPU:1"),
    ("OOM when allocating tensor with shape[8] and type float on /job:localhost/replica:0/task:0/device:GPU:3 "
     "by allocator GPU_3_bfc [Op:MatMul]", [], "GPU:3"),
    ("Out of memory while trying to allocate 1.00GiB (allocator GPU_2_bfc)", [], "GPU:2"),
    ("Failed copying input tensor from /job:localhost/replica:0/task:0/device:CPU:0 to "
     "/job:localhost/replica:0/task:0/device:GPU:1", [], "CPU:0"),
    # Keras wraps the error: the device is read from the cause.
    ("Exception encountered when calling Dense.call().", [("ResourceExhaustedError", OOM_ON_GPU1)], "GPU:1"),
    ("OOM when allocating tensor with shape[32,512]", [], None),
    ("OOM when allocating tensor (rehearsed fault gpu_oom@3)", [], None),
], ids=["keras-graph-error", "eager-op", "xla-allocator", "copy-between-devices", "in-the-cause", "unnamed",
        "rehearsal-on-one-device"])
def test_the_device_named_by_a_tensorflow_error(message, causes, expected):
    from resilient._protocol import ErrorReport, ExceptionFacts
    from resilient.supervisor.classify import AttemptOutcome, classify, reported_device

    report = ErrorReport(type="ResourceExhaustedError", message=message,
                         causes=tuple(ExceptionFacts(type=t, message=m) for t, m in causes))
    assert reported_device(report) == expected
    kind, _, evidence = classify(AttemptOutcome(returncode=3, report=report))
    assert kind == "gpu_oom" and evidence.get("device") == expected


@pytest.mark.parametrize(("devices", "replicas", "count", "visible", "expected"), [
    ("auto", 4, 4, None, [(0, "GPU:0"), (1, "GPU:1"), (2, "GPU:2"), (3, "GPU:3")]),
    ("all", 2, 4, "2,3", [(2, "GPU:0"), (3, "GPU:1")]),  # TensorFlow numbers the visible GPUs from 0
    (("gpu:0", "gpu:2"), 2, 4, None, [(0, "GPU:0"), (2, "GPU:2")]),
    ("auto", 2, 4, None, [(0, "GPU:0"), (1, "GPU:1")]),  # after fewer_devices: the first two
    ("gpu:1", 1, 2, None, [(1, "GPU:1")]),
    ("cpu", 1, 2, None, []),
    ("auto", 1, 0, None, []),
    ("auto", 2, 2, "GPU-1b2c,GPU-3d4e", [(0, "nvml:0"), (1, "nvml:1")]),  # UUIDs: the NVML names
    (("gpu:0", "gpu:5"), 2, 2, None, [(0, "GPU:0")]),  # a device that is not there is not watched
])
def test_the_gpus_a_run_trains_on_in_nvml_and_tensorflow_numbering(devices, replicas, count, visible, expected):
    from resilient.supervisor.gpu import run_gpus

    assert list(run_gpus(devices, replicas, count, visible)) == expected


def test_per_device_peaks_name_the_fullest_device():
    from resilient.supervisor.gpu import DevicePeaks

    GiB = 1 << 30
    peaks = DevicePeaks(("GPU:0", "GPU:1", "GPU:2"))
    assert peaks.fullest() is None and peaks.evidence() == {}
    peaks.add([(2 * GiB, 2 * GiB, 16 * GiB), (3 * GiB, 3 * GiB, 16 * GiB), (1 * GiB, 1 * GiB, 16 * GiB)])
    peaks.add([(1 * GiB, 1 * GiB, 16 * GiB), (6 * GiB, 6 * GiB, 16 * GiB), (None, None, None)])  # a peak each
    assert peaks.held == [2 * GiB, 6 * GiB, 1 * GiB]
    assert peaks.fullest() == "GPU:1"
    # Another job fills GPU:2: the worker holds little there, but that device is the one that runs out.
    peaks.add([(1 * GiB, 1 * GiB, 16 * GiB), (1 * GiB, 1 * GiB, 16 * GiB), (1 * GiB, 15 * GiB, 16 * GiB)])
    assert peaks.fullest() == "GPU:2"
    assert peaks.evidence()["gpu_peaks"] == {"GPU:0": 2 * GiB, "GPU:1": 6 * GiB, "GPU:2": GiB}
    assert peaks.evidence()["gpu_share_peaks"]["GPU:2"] == 0.9375
    # Drivers that hide the capacity: what the worker held decides; one device names none.
    blind = DevicePeaks(("GPU:0", "GPU:1"))
    blind.add([(4 * GiB, None, None), (2 * GiB, None, None)])
    assert blind.fullest() == "GPU:0"
    one = DevicePeaks(("GPU:0",))
    one.add([(4 * GiB, 4 * GiB, 16 * GiB)])
    assert one.fullest() is None


def test_an_incident_journaled_before_the_device_field_loads():
    from resilient._incident import Incident

    old = {"kind": "gpu_oom", "attempt": 0, "plan_before": {"batch_size": 32}, "detail": "OOM"}
    assert Incident.model_validate(old).device is None
    new = Incident(kind="gpu_oom", attempt=0, plan_before=Plan(batch_size=32, replicas=2), device="GPU:1")
    assert Incident.model_validate_json(new.model_dump_json()).device == "GPU:1"


def test_the_gpu_check_script_skips_cleanly_without_a_gpu():
    """bench/gpu_check.py on a machine (or with CUDA_VISIBLE_DEVICES) that shows no GPU: SKIP and exit 0."""
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(root)}
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(root / "bench" / "gpu_check.py")], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("SKIP  gpu_check: "), done.stdout
    assert "run it where NVIDIA GPUs are visible" in done.stdout
    assert "PASS" not in done.stdout and "MISS" not in done.stdout
    assert time.monotonic() - started < 60  # the skip decides before any training (and before TensorFlow here)


def test_the_texts_a_person_reads_name_the_device_and_the_new_device_count():
    from resilient._incident import Incident
    from resilient._status import story_line
    from resilient.supervisor.decide import incident_entry
    from resilient.supervisor.display import incident_text

    two = Plan(batch_size=64, replicas=2)
    incident = Incident(kind="gpu_oom", attempt=0, epoch=1, step=40, detail="ResourceExhaustedError: OOM",
                        plan_before=two, plan_after=two.replace(replicas=1), device="GPU:1", checkpoint_step=38,
                        action="degrade: fewer_devices()")
    text = incident_text(incident)
    assert text.startswith("GPU out of memory on GPU:1 at epoch 2, step 40."), text
    assert "1 device (was 2)" in text, text
    _, fields = incident_entry(incident)
    assert fields["device"] == "GPU:1"
    line = story_line({"event": "incident", **fields}, epochs=2)
    assert line.startswith("incident: gpu_oom on GPU:1 in attempt 0 at epoch 2, step 40"), line
    one = incident.model_copy(update={"device": None})
    assert " on " not in incident_text(one).split(".")[0]
    assert story_line({"event": "incident", **incident_entry(one)[1]}, epochs=2).startswith("incident: gpu_oom in")
