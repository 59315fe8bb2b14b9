"""The search for the best batch size after an OOM (resilient.policy.search): pure."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resilient._plan import Plan
from resilient.policy.policy import Policy, ProbeSettings, load_policy
from resilient.policy.search import (
    HEARTBEAT_SLACK_SECONDS,
    Horizon,
    PlanSearch,
    can_judge,
    probe_below,
    steps_to_judge,
)


def P(batch: int, accum: int = 1, **fields) -> Plan:
    return Plan(batch_size=batch, grad_accum_steps=accum, **fields)


def search(failed: Plan, working: Plan, **settings) -> PlanSearch:
    s = PlanSearch(ProbeSettings(**{"stable_steps": 10, **settings}))
    s.degraded(failed, working)
    return s


# ------------------------------------------------------------------------------------------ probe_below


def test_probe_below_halves_and_keeps_the_effective_batch():
    assert probe_below(P(64, 4), None, min_batch=8) == P(32, 8)
    assert probe_below(P(64), None, min_batch=8) == P(32, 2)


def test_probe_below_keeps_the_other_knobs():
    working = P(32, 2, precision="mixed_float16", image_size=(96, 96), learning_rate_scale=0.5)
    probe = probe_below(working, None, min_batch=1)
    assert probe.diff(working).keys() == {"batch_size", "grad_accum_steps"}


def test_probe_below_respects_min_batch():
    assert probe_below(P(16, 4), None, min_batch=8) == P(8, 8)
    assert probe_below(P(8, 8), None, min_batch=8) is None
    assert probe_below(P(12, 2), None, min_batch=8) is None  # 6 < 8


def test_probe_below_bisects_toward_a_slower_lower_bound():
    assert probe_below(P(64, 4), P(16, 16), min_batch=1) == P(32, 8)
    assert probe_below(P(48, 2), P(24, 4), min_batch=1) == P(32, 3)  # the divisor of 96 nearest 36


@pytest.mark.parametrize(("working", "below"), [(P(16, 4), P(8, 8)), (P(9, 1), P(8, 1)), (P(64, 1), P(63, 1))])
def test_probe_below_stops_when_nothing_lies_between(working, below):
    assert probe_below(working, below, min_batch=1) is None


def test_probe_below_needs_an_exact_divisor():
    assert probe_below(P(7), None, min_batch=1) == P(1, 7)  # 7 is prime: only 1 divides it below 3
    assert probe_below(P(7), None, min_batch=2) is None


@given(batch=st.integers(1, 1024), accum=st.integers(1, 16), below=st.integers(0, 1024), floor=st.integers(1, 64))
def test_probe_below_lands_strictly_below_and_keeps_the_math(batch, accum, below, floor):
    working = P(batch, accum)
    lower = P(below) if 0 < below < batch else None
    probe = probe_below(working, lower, min_batch=floor)
    if probe is None:
        return
    assert probe.batch_size < batch and probe.batch_size >= floor
    assert lower is None or probe.batch_size > lower.batch_size
    assert probe.effective_batch == working.effective_batch


# ---------------------------------------------------------------------------------------- PlanSearch


def test_inactive_until_an_oom_degradation():
    s = PlanSearch(ProbeSettings())
    assert not s.active
    assert s.stable(P(32), 100.0).switch_to is None


def test_disabled_settings_never_probe():
    s = search(P(64), P(32), enabled=False)
    assert not s.active
    assert s.stable(P(32), 100.0).switch_to is None


def test_first_stable_point_bisects_up():
    s = search(P(32), P(16))
    verdict = s.stable(P(16), 100.0)
    assert verdict.switch_to == P(24) and s.probing == P(24) and s.probes == 1
    assert s.working_rate == 100.0


def test_a_larger_probe_that_is_not_slower_is_kept_and_the_search_goes_on():
    s = search(P(32), P(16))
    s.stable(P(16), 100.0)
    verdict = s.stable(P(24), 98.0)  # within min_gain: the larger batch is closer to what was asked
    assert verdict.settle == P(24)
    assert [name for name, _ in verdict.events] == ["probe_succeeded"]
    assert s.working == P(24) and s.below == P(16)
    assert verdict.switch_to == P(28)


def test_a_larger_probe_that_is_clearly_slower_is_rejected():
    s = search(P(32), P(16), max_probes=1)
    s.stable(P(16), 100.0)
    verdict = s.stable(P(24), 90.0)
    assert verdict.settle is None
    (name, fields), = verdict.events
    assert name == "probe_rejected" and fields["samples_per_s"] == 90.0 and fields["working_samples_per_s"] == 100.0
    assert "slower" in fields["reason"]
    assert verdict.switch_to == P(16) and fields["back_to"] == P(16).model_dump(mode="json")
    assert s.above == P(24) and s.working == P(16)


def test_a_rejected_probe_goes_straight_to_the_next_candidate():
    s = search(P(64), P(32, 2))
    s.stable(P(32, 2), 100.0)
    assert s.probing == P(16, 4)  # nothing divides 64 between 32 and 64: try down
    verdict = s.stable(P(16, 4), 100.0)  # not 5% faster
    assert verdict.switch_to is None or verdict.switch_to != P(16, 4)
    assert s.below == P(16, 4)
    assert verdict.switch_to == P(32, 2), "nothing left between 16 and 32 that divides 64: back"


def test_a_faster_smaller_probe_is_kept_and_bounds_from_above():
    s = search(P(128, 2), P(64, 4))  # 256 and 128x2 ran out of memory
    s.stable(P(64, 4), 185.0)
    assert s.probing == P(32, 8)
    verdict = s.stable(P(32, 8), 240.0)
    assert verdict.settle == P(32, 8) and s.above == P(64, 4)
    assert verdict.switch_to == P(16, 16), "still faster going down: keep going"
    verdict = s.stable(P(16, 16), 230.0)
    assert verdict.switch_to == P(32, 8) and s.working == P(32, 8)
    assert s.probes == 2


def test_largest_objective_keeps_any_larger_probe_and_never_goes_down():
    s = search(P(64), P(32, 2), objective="largest")
    verdict = s.stable(P(32, 2), 100.0)
    assert verdict.switch_to is None, "no divisor of 64 between 32 and 64, and no probing down"
    s = search(P(32), P(16), objective="largest")
    s.stable(P(16), 100.0)
    verdict = s.stable(P(24), 10.0)
    assert verdict.settle == P(24)


def test_without_a_measurement_only_larger_probes_are_kept():
    s = search(P(32), P(16))
    s.stable(P(16), None)
    assert s.probing == P(24)
    assert s.stable(P(24), None).settle == P(24)
    s = search(P(64), P(32, 2))
    assert s.stable(P(32, 2), None).switch_to is None, "no measurement, no probing down"


def test_a_probe_that_runs_out_of_memory_bounds_from_above():
    s = search(P(32), P(16))
    s.stable(P(16), 100.0)
    assert s.probe_oom(P(24)) == P(16)
    assert s.above == P(24) and s.probing is None
    assert s.stable(P(16), 100.0).switch_to == P(20)


def test_max_probes_bounds_the_restarts():
    s = search(P(1024), P(16), max_probes=2)
    s.stable(P(16), 100.0)
    s.stable(s.probing, 200.0)
    verdict = s.stable(s.probing, 300.0)
    assert verdict.settle is not None and verdict.switch_to is None
    assert s.probes == 2


def test_a_cancelled_probe_is_not_counted():
    s = search(P(32), P(16))
    s.stable(P(16), 100.0)
    s.cancel()
    assert s.probing is None and s.probes == 0


def test_a_probe_that_trains_to_the_end_unjudged_is_not_settled():
    s = search(P(32), P(16))
    s.stable(P(16), 100.0)
    assert s.finished(P(24)) is True, "the run ended on the probe before it was judged"
    assert s.working == P(16) and s.probing is None


def test_a_run_that_ends_on_the_working_plan_ended_on_no_probe():
    s = search(P(32), P(16))
    s.stable(P(16), 100.0)
    assert s.finished(P(16)) is False
    assert s.working == P(16) and s.probing is None


def test_a_new_oom_restarts_the_bounds_but_not_the_probe_count():
    s = search(P(32), P(16))
    s.stable(P(16), 100.0)
    s.degraded(P(16), P(8))
    assert (s.working, s.above, s.below, s.probing, s.working_rate) == (P(8), P(16), None, None, None)
    assert s.probes == 1


def test_default_presets_search_for_throughput():
    assert Policy().probe.objective == "throughput"
    assert load_policy("default").probe.objective == "throughput"
    assert not load_policy("conservative").probe.enabled


@pytest.mark.parametrize("bad", [{"objective": "fastest"}, {"min_gain": -0.1}, {"min_batch": 0}])
def test_probe_settings_are_validated(bad):
    with pytest.raises(Exception, match="probe"):
        Policy(probe=bad)


def test_warmup_is_a_small_part_of_the_stable_stretch():
    assert ProbeSettings(stable_steps=200).warmup_steps() == 20
    assert ProbeSettings(stable_steps=40).warmup_steps() == 10
    assert ProbeSettings(stable_steps=1).warmup_steps() == 1


# ------------------------------------------------------------------------- the search on simulated hardware


def simulate(search: PlanSearch, start: Plan, fits, rate) -> tuple[Plan, int]:
    """Drive the search as the supervisor does; returns the plan it ends on and the restarts it took."""
    plan, restarts = start, 0
    for _ in range(100):
        if search.probing == plan and not fits(plan.batch_size):
            plan, restarts = search.probe_oom(plan), restarts + 1
            continue
        verdict = search.stable(plan, rate(plan.batch_size))
        if verdict.switch_to is None:
            return plan, restarts
        plan, restarts = verdict.switch_to, restarts + 1
    raise AssertionError("the search never settled")


@settings(max_examples=200, deadline=None)
@given(
    requested_log2=st.integers(3, 10),
    limit=st.integers(1, 1024),
    peak=st.integers(1, 1024),
    max_probes=st.integers(0, 6),
)
def test_the_search_ends_on_a_plan_that_fits_and_is_no_slower(requested_log2, limit, peak, max_probes):
    # Memory: a batch fits up to `limit`. Throughput per sample: unimodal with its best at `peak`.
    requested = 2 ** requested_log2
    fits = lambda b: b <= limit  # noqa: E731
    rate = lambda b: 1000.0 / (1.0 + abs(b - peak) / max(peak, 1))  # noqa: E731
    working, failed = P(requested), None
    while working.batch_size > 1 and not fits(working.batch_size):  # halving with accumulation
        failed, working = working, P(working.batch_size // 2, working.grad_accum_steps * 2)
    if failed is None:
        return  # the request fits: nothing to search
    s = PlanSearch(ProbeSettings(stable_steps=10, max_probes=max_probes, min_batch=1))
    s.degraded(failed, working)
    end, restarts = simulate(s, working, fits, rate)
    assert fits(end.batch_size)
    assert end.effective_batch == requested, "the effective batch never changes"
    assert rate(end.batch_size) >= rate(working.batch_size) * (1 - s.settings.min_gain) - 1e-9
    assert restarts <= 2 * max_probes
    assert s.probes <= max_probes


def test_a_plan_changed_by_another_rung_becomes_the_working_plan_with_its_knobs():
    s = search(P(32), P(16))
    verdict = s.stable(P(16, learning_rate_scale=0.5), 100.0)  # a nan_loss rung lowered the LR
    assert s.working == P(16, learning_rate_scale=0.5)
    assert verdict.switch_to == P(24, learning_rate_scale=0.5), "the probe keeps the new learning rate"


def test_a_plan_that_crossed_the_upper_bound_ends_the_search():
    s = search(P(32), P(16))
    assert s.stable(P(64), 100.0).switch_to is None
    assert not s.active


# ------------------------------------------------------------------ a probe must be judged before the run ends


def test_steps_to_judge_is_stable_steps_without_a_measured_step_time():
    settings = ProbeSettings(stable_steps=10, measure_seconds=5.0)
    assert steps_to_judge(settings, None) == 10
    assert steps_to_judge(settings, 0.0) == 10


def test_steps_to_judge_covers_the_warm_up_and_the_measurement():
    settings = ProbeSettings(stable_steps=10, measure_seconds=2.0)  # warm-up: 2 steps
    # 2 s of measurement (and the heartbeat slack) at 0.1 s a step: 25 steps, after the warm-up.
    assert steps_to_judge(settings, 0.1) == 2 + round((2.0 + HEARTBEAT_SLACK_SECONDS) / 0.1)
    assert steps_to_judge(settings, 10.0) == 10, "slow steps: stable_steps is the longer wait"


def test_a_horizon_is_counted_in_the_probes_steps():
    horizon = Horizon(steps_left=100, step_seconds=0.2)
    up = horizon.seen_from(P(16), P(32))
    assert (up.steps_left, up.step_seconds) == (50, pytest.approx(0.4))
    down = horizon.seen_from(P(16, 2), P(8, 4))
    assert (down.steps_left, down.step_seconds) == (200, pytest.approx(0.1))
    assert Horizon(steps_left=100, step_seconds=0.2, per_batch=False).seen_from(P(16), P(32)).steps_left == 100
    assert Horizon(steps_left=101).seen_from(P(16), P(24)).steps_left == 67, "partial steps do not count"


def test_can_judge_holds_back_a_probe_with_too_few_steps_left():
    settings = ProbeSettings(stable_steps=10, measure_seconds=1.0)  # warm-up 2
    # At batch 16, 0.05 s a step; a probe at 32 would take 0.1 s a step: 2 + 15 = 17 of its steps.
    assert steps_to_judge(settings, 0.1) == 17
    assert can_judge(settings, P(16), P(32), Horizon(steps_left=34, step_seconds=0.05)) is None
    why = can_judge(settings, P(16), P(32), Horizon(steps_left=32, step_seconds=0.05))
    assert why is not None and why.startswith("16 steps left in the run, fewer than the 17")
    assert can_judge(settings, P(16), P(32), None) is None, "an unknown horizon never holds a probe back"


def test_no_probe_starts_that_could_not_be_judged_before_the_end():
    s = search(P(32), P(16), stable_steps=10, measure_seconds=0.0)
    verdict = s.stable(P(16), 100.0, Horizon(steps_left=15))  # 10 steps at 24; it needs stable_steps, 10
    assert verdict.switch_to == P(24), "just enough"
    s = search(P(32), P(16), stable_steps=10, measure_seconds=0.0)
    verdict = s.stable(P(16), 100.0, Horizon(steps_left=14))  # 9 steps at 24
    assert verdict.switch_to is None and s.probing is None and s.probes == 0
    (name, fields), = verdict.events
    assert name == "probe_skipped"
    assert (fields["plan"]["batch_size"], fields["working"]["batch_size"]) == (24, 16)
    assert (fields["steps_left"], fields["steps_needed"]) == (9, 10)
    assert "9 steps left" in fields["reason"]
    assert verdict.message.startswith("not probing batch=24") and "the run finishes on batch=16" in verdict.message


def test_a_kept_probe_near_the_end_stays_and_the_next_one_is_skipped():
    s = search(P(32), P(16), stable_steps=10, measure_seconds=0.0)
    s.stable(P(16), 100.0, Horizon(steps_left=1000))
    verdict = s.stable(P(24), 100.0, Horizon(steps_left=5))
    assert verdict.settle == P(24) and verdict.switch_to is None
    assert [name for name, _ in verdict.events] == ["probe_succeeded", "probe_skipped"]
    assert s.working == P(24) and s.probing is None and s.probes == 1


def test_a_rejected_probe_near_the_end_goes_back_without_another_probe():
    s = search(P(32), P(16), stable_steps=10, measure_seconds=0.0)
    s.stable(P(16), 100.0, Horizon(steps_left=1000))
    verdict = s.stable(P(24), 50.0, Horizon(steps_left=5))
    assert verdict.switch_to == P(16), "a rejected probe is left: the run finishes on the working plan"
    assert [name for name, _ in verdict.events] == ["probe_rejected", "probe_skipped"]
    assert verdict.events[0][1]["back_to"] == P(16).model_dump(mode="json")
    assert verdict.message.endswith("; back to batch=16 float32 cache")
    assert "the run finishes on" not in verdict.message
