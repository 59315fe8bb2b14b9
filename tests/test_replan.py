"""A degraded plan does not outlive its cause: when the resource settings change between calls, the plan is
re-derived from the requested one, keeping what was learned only where it still applies (pure; no worker)."""

from __future__ import annotations

import pytest

from resilient._plan import Plan
from resilient._replan import PlanBasis, learned_from_journal, policy_fingerprint, rederive_plan, still_applies
from resilient._rundir import RunSpec
from resilient.policy import load_policy

KB, GB = 1 << 10, 1 << 30
REQUESTED = Plan(batch_size=32)


def _changed(kind, before: Plan, after: Plan) -> dict:
    return {"event": "plan_changed", "from": before.model_dump(mode="json"), "to": after.model_dump(mode="json"),
            "reason": "degrade", "incident": kind}


def _started(basis: PlanBasis | None = None, host: int | None = None) -> dict:
    event = {"event": "run_started", "host_memory_limit": host if basis is None else basis.host_memory_limit}
    if basis is not None:
        event["plan_basis"] = basis.model_dump(mode="json")
    return event


def test_a_host_oom_degradation_is_dropped_when_the_host_limit_is_removed():
    tiny = PlanBasis(host_memory_limit=KB, device="cpu", policy="p")
    degraded = REQUESTED.replace(batch_size=16, grad_accum_steps=2)
    events = [_started(tiny), _changed("host_oom", REQUESTED, degraded),
              _changed("host_oom", degraded, degraded.replace(batch_size=1, grad_accum_steps=32))]
    now = tiny.model_copy(update={"host_memory_limit": None})
    out = rederive_plan(REQUESTED, Plan(batch_size=1, grad_accum_steps=32), learned_from_journal(events, tiny),
                        tiny, now)
    assert out.changed and out.plan == REQUESTED
    assert out.dropped == ("host_oom",)
    assert "host_memory_limit 1.0 KiB -> none" in out.message
    assert "batch=1x32" in out.message and "batch=32" in out.message


def test_a_gpu_oom_degradation_under_the_same_gpu_limit_stays_while_the_host_one_goes():
    before = PlanBasis(host_memory_limit=8 * GB, gpu_memory_limit=15 * GB, device="gpu", policy="p")
    mixed = REQUESTED.replace(precision="mixed_float16")
    halved = mixed.replace(batch_size=16, grad_accum_steps=2)
    events = [_started(before), _changed("gpu_oom", REQUESTED, mixed), _changed("host_oom", mixed, halved)]
    now = before.model_copy(update={"host_memory_limit": 16 * GB})  # a larger host limit
    out = rederive_plan(REQUESTED, halved, learned_from_journal(events, before), before, now)
    assert out.plan == mixed  # the GPU lesson kept, the host one dropped
    assert out.dropped == ("host_oom",)


def test_unchanged_settings_keep_plan_json_exactly():
    basis = PlanBasis(host_memory_limit=KB, device="cpu", policy="p")
    current = Plan(batch_size=1, grad_accum_steps=32)
    events = [_started(basis), _changed("host_oom", REQUESTED, current)]
    out = rederive_plan(REQUESTED, current, learned_from_journal(events, basis), basis, basis)
    assert not out.changed and out.plan == current and out.message == ""


@pytest.mark.parametrize("kind, then, now, applies", [
    ("host_oom", PlanBasis(host_memory_limit=KB), PlanBasis(host_memory_limit=None), False),  # limit removed
    ("host_oom", PlanBasis(host_memory_limit=KB), PlanBasis(host_memory_limit=2 * KB), False),  # larger
    ("host_oom", PlanBasis(host_memory_limit=2 * KB), PlanBasis(host_memory_limit=KB), True),  # smaller
    ("host_oom", PlanBasis(host_memory_limit=None), PlanBasis(host_memory_limit=KB), True),  # the machine's RAM, then a limit
    ("host_oom", PlanBasis(host_memory_limit=None), PlanBasis(host_memory_limit=None), True),
    ("gpu_oom", PlanBasis(gpu_memory_limit=15 * GB, device="gpu"), PlanBasis(gpu_memory_limit=15 * GB, device="gpu"),
     True),
    ("gpu_oom", PlanBasis(gpu_memory_limit=15 * GB, device="gpu"), PlanBasis(device="gpu"), False),
    ("gpu_oom", PlanBasis(device="gpu"), PlanBasis(device="cpu"), False),  # another device
    ("gpu_oom", PlanBasis(device=None), PlanBasis(device="cpu"), True),  # unknown (0.1.0): kept
    ("gpu_oom", PlanBasis(host_memory_limit=KB), PlanBasis(host_memory_limit=None), True),  # a host change only
    ("nan_loss", PlanBasis(host_memory_limit=KB), PlanBasis(), True),
    ("nan_loss", PlanBasis(policy="a"), PlanBasis(policy="b"), False),  # another policy re-learns everything
])
def test_what_still_applies(kind, then, now, applies):
    assert still_applies(kind, then, now) is applies


def test_a_probe_the_search_kept_follows_the_oom_that_started_the_search():
    tiny = PlanBasis(host_memory_limit=KB)
    halved = REQUESTED.replace(batch_size=16, grad_accum_steps=2)
    probed = REQUESTED.replace(batch_size=24)
    events = [_started(tiny), _changed("host_oom", REQUESTED, halved),
              {**_changed(None, halved, probed), "reason": "probe kept"}]
    out = rederive_plan(REQUESTED, probed, learned_from_journal(events, tiny), tiny, PlanBasis())
    assert out.plan == REQUESTED and out.dropped == ("host_oom", "the host_oom plan search")


def test_each_change_is_judged_under_the_settings_of_the_call_it_happened_in():
    """Learned under 8 GB, relaxed under 16 GB, then 12 GB: the 8 GB lesson does not hold under 12 GB."""
    eight, sixteen, twelve = (PlanBasis(host_memory_limit=n * GB) for n in (8, 16, 12))
    halved = REQUESTED.replace(batch_size=16, grad_accum_steps=2)
    events = [_started(eight), _changed("host_oom", REQUESTED, halved), _started(sixteen),
              {**_changed(None, halved, REQUESTED), "cause": "settings_changed"}]
    learned = learned_from_journal(events, sixteen)
    assert [c.kind for c in learned] == ["host_oom"]  # a re-derivation is not a lesson
    out = rederive_plan(REQUESTED, REQUESTED, learned, sixteen, twelve)
    assert out.plan == REQUESTED and not out.changed
    four = PlanBasis(host_memory_limit=4 * GB)
    assert rederive_plan(REQUESTED, REQUESTED, learned, sixteen, four).plan == halved  # under 4 GB it holds again


def test_a_journal_of_release_0_1_0_records_only_the_host_limit_the_rest_comes_from_run_json():
    fallback = PlanBasis(host_memory_limit=KB, gpu_memory_limit=15 * GB)
    halved = REQUESTED.replace(batch_size=16, grad_accum_steps=2)
    events = [_started(host=KB), _changed("gpu_oom", REQUESTED, halved)]
    (learned,) = learned_from_journal(events, fallback)
    assert learned.basis == PlanBasis(host_memory_limit=KB, gpu_memory_limit=15 * GB)


def test_a_run_json_of_release_0_1_0_gives_its_memory_limits_as_the_basis():
    spec = {"epochs": 1, "seed": 0, "data": {"kind": "arrays", "x": "data/x.npy", "y": "data/y.npy", "samples": 4},
            "model_fingerprint": "f", "initial_plan": REQUESTED.model_dump(), "host_memory_limit_bytes": KB,
            "gpu_memory_limit_bytes": None}
    assert RunSpec.model_validate(spec).basis() == PlanBasis(host_memory_limit=KB)


def test_the_policy_fingerprint_follows_the_ladders_not_the_restart_budget():
    default = load_policy("default")
    assert policy_fingerprint(default.ladders) == policy_fingerprint(default.replace(max_restarts=1).ladders)
    assert policy_fingerprint(default.ladders) != policy_fingerprint(load_policy("conservative").ladders)
