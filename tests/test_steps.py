"""Built-in degradation steps: behaviour, the cases where they do not apply, and parameter validation."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from resilient._errors import InvalidPolicyError
from resilient._incident import Incident
from resilient._plan import Plan
from resilient.policy.step import Step, StepContext, get_step, list_steps
from resilient.steps import (
    drop_cache,
    halve_batch,
    leave_mixed_precision,
    lower_learning_rate,
    lower_resolution,
    mixed_precision,
    shrink_buffers,
)

BUILT_IN = [
    "drop_cache",
    "halve_batch",
    "leave_mixed_precision",
    "lower_learning_rate",
    "lower_resolution",
    "mixed_precision",
    "shrink_buffers",
]


def incident(plan: Plan, kind: str = "gpu_oom") -> Incident:
    return Incident(kind=kind, attempt=0, plan_before=plan)


def apply(step: Step, plan: Plan, **context: object) -> Plan | None:
    return step.apply(plan, incident(plan), StepContext(plan, **context))


# ------------------------------------------------------------------------------------------- the basics


def test_every_builtin_step_is_registered_under_its_constructor_name():
    assert set(BUILT_IN) <= set(list_steps())
    for name in BUILT_IN:
        step = get_step(name)
        assert step.name == name
        assert type(step).__name__ == name
        assert list_steps()[name]  # a one-line summary from the docstring


def test_steps_are_frozen_and_compare_by_value():
    step = halve_batch(min_batch=8)
    assert step == halve_batch(min_batch=8)
    assert step != halve_batch(min_batch=4)
    assert hash(step) == hash(halve_batch(min_batch=8))
    with pytest.raises(ValidationError):
        step.min_batch = 2  # type: ignore[misc]


def test_str_reads_like_the_call():
    assert str(halve_batch(min_batch=8, keep_effective_batch=True)) == (
        "halve_batch(min_batch=8, keep_effective_batch=True)"
    )
    assert repr(mixed_precision()) == "mixed_precision()"
    assert str(lower_resolution(factor=0.5)) == "lower_resolution(factor=0.5, min_size=32)"
    assert halve_batch(min_batch=8).describe() == "halve_batch(min_batch=8, keep_effective_batch=False)"


def test_spec_is_what_a_policy_file_writes():
    assert drop_cache().spec() == "drop_cache"
    assert halve_batch(min_batch=8).spec() == {
        "step": "halve_batch",
        "min_batch": 8,
        "keep_effective_batch": False,
    }


def test_positional_arguments_follow_declaration_order():
    assert halve_batch(8, True) == halve_batch(min_batch=8, keep_effective_batch=True)
    with pytest.raises(InvalidPolicyError, match="at most 2"):
        halve_batch(8, True, 3)
    with pytest.raises(InvalidPolicyError, match="twice"):
        halve_batch(8, min_batch=4)


@pytest.mark.parametrize(
    ("build", "key", "received"),
    [
        (lambda: halve_batch(min_batch=0), "min_batch", "0"),
        (lambda: halve_batch(min_batch="8"), "min_batch", "'8'"),
        (lambda: halve_batch(keep_effective_batch="yes"), "keep_effective_batch", "'yes'"),
        (lambda: lower_resolution(factor=1.5), "factor", "1.5"),
        (lambda: lower_resolution(factor=0), "factor", "0"),
        (lambda: lower_resolution(min_size=0), "min_size", "0"),
        (lambda: shrink_buffers(factor=1), "factor", "1"),
        (lambda: lower_learning_rate(factor=-0.5), "factor", "-0.5"),
        (lambda: lower_learning_rate(min_scale=0), "min_scale", "0"),
        (lambda: halve_batch(min_btch=8), "min_btch", "unknown key 'min_btch' = 8"),
        (lambda: drop_cache(anything=1), "anything", "unknown key 'anything' = 1"),
    ],
)
def test_bad_parameters_raise_invalid_policy_error_with_received_and_expected(build, key, received):
    with pytest.raises(InvalidPolicyError) as info:
        build()
    message = str(info.value)
    assert "Invalid arguments for step" in message
    assert f"{key}: received {received}" in message
    assert "expected" in message
    assert "parameters are:" in message


def test_unknown_parameter_lists_the_known_ones():
    with pytest.raises(InvalidPolicyError) as info:
        halve_batch(min_btch=8)
    assert "min_batch, keep_effective_batch" in str(info.value)


def test_get_step_unknown_name_lists_names_and_suggests():
    with pytest.raises(InvalidPolicyError) as info:
        get_step("halve_bach")
    message = str(info.value)
    assert "'halve_bach'" in message
    assert "Did you mean 'halve_batch'?" in message
    for name in BUILT_IN:
        assert name in message
    assert "register_step" in message


def test_get_step_passes_parameters():
    assert get_step("halve_batch", min_batch=8) == halve_batch(min_batch=8)


def test_base_step_apply_is_abstract():
    with pytest.raises(NotImplementedError):
        Step().apply(Plan(), incident(Plan()), StepContext(Plan()))


# ---------------------------------------------------------------------------------------- halve_batch


@pytest.mark.parametrize(
    ("batch", "min_batch", "expected"),
    [(32, 1, 16), (33, 1, 16), (9, 8, 8), (16, 8, 8), (2, 1, 1), (3, 1, 1)],
)
def test_halve_batch(batch, min_batch, expected):
    assert apply(halve_batch(min_batch=min_batch), Plan(batch_size=batch)).batch_size == expected


@pytest.mark.parametrize(("batch", "min_batch"), [(8, 8), (1, 1), (4, 8)])
def test_halve_batch_does_not_apply_at_or_below_min_batch(batch, min_batch):
    assert apply(halve_batch(min_batch=min_batch), Plan(batch_size=batch)) is None


def test_halve_batch_without_keep_leaves_accumulation_alone():
    plan = apply(halve_batch(), Plan(batch_size=32, grad_accum_steps=2))
    assert (plan.batch_size, plan.grad_accum_steps) == (16, 2)


@pytest.mark.parametrize(
    ("batch", "accum", "expected"),
    [
        ((32, 1), None, (16, 2)),
        ((16, 2), None, (8, 4)),
        ((12, 2), None, (6, 4)),
        ((9, 1), None, (3, 3)),
        ((33, 1), None, (11, 3)),
        ((10, 1), None, (5, 2)),
    ],
)
def test_halve_batch_keeps_the_effective_batch(batch, accum, expected):
    before = Plan(batch_size=batch[0], grad_accum_steps=batch[1])
    after = apply(halve_batch(keep_effective_batch=True), before)
    assert (after.batch_size, after.grad_accum_steps) == expected
    assert after.effective_batch == before.effective_batch


@pytest.mark.parametrize(("batch", "min_batch"), [(7, 1), (13, 2), (12, 8), (8, 8)])
def test_halve_batch_keep_does_not_apply_without_an_exact_divisor(batch, min_batch):
    assert apply(halve_batch(min_batch=min_batch, keep_effective_batch=True), Plan(batch_size=batch)) is None


@given(
    batch=st.integers(1, 4096),
    accum=st.integers(1, 8),
    min_batch=st.integers(1, 64),
    keep=st.booleans(),
    rounds=st.integers(1, 20),
)
def test_halve_batch_never_goes_below_min_batch_and_keeps_effective_batch(
    batch, accum, min_batch, keep, rounds
):
    step = halve_batch(min_batch=min_batch, keep_effective_batch=keep)
    plan = Plan(batch_size=batch, grad_accum_steps=accum)
    for _ in range(rounds):
        new_plan = apply(step, plan)
        if new_plan is None:
            break
        assert new_plan.batch_size < plan.batch_size
        assert new_plan.batch_size >= min_batch
        assert new_plan.batch_size >= plan.batch_size // 4
        if keep:
            assert new_plan.effective_batch == plan.effective_batch
        else:
            assert new_plan.grad_accum_steps == plan.grad_accum_steps
        plan = new_plan
    assert plan.batch_size >= min(batch, min_batch)


# ------------------------------------------------------------------------------------ mixed_precision


@pytest.mark.parametrize(
    ("context", "expected"),
    [
        ({"device": "gpu", "gpu_compute_capability": (7, 5)}, "mixed_float16"),
        ({"device": "gpu", "gpu_compute_capability": (7, 0)}, "mixed_float16"),
        ({"device": "gpu", "gpu_compute_capability": (8, 0)}, "mixed_float16"),
        ({"device": "gpu", "gpu_compute_capability": (9, 0)}, "mixed_float16"),
        ({"device": "tpu"}, "mixed_bfloat16"),
        ({"device": "cpu", "cpu_supports_bf16": True}, "mixed_bfloat16"),
    ],
)
def test_mixed_precision_picks_what_the_hardware_runs(context, expected):
    assert apply(mixed_precision(), Plan(), **context).precision == expected


@pytest.mark.parametrize(
    "context",
    [
        {"device": "cpu"},
        {"device": "gpu", "gpu_compute_capability": (6, 1)},
        {"device": "gpu", "gpu_compute_capability": None},
        {"device": "gpu", "cpu_supports_bf16": True, "gpu_compute_capability": (5, 0)},
    ],
)
def test_mixed_precision_does_not_apply_on_unsuitable_hardware(context):
    assert apply(mixed_precision(), Plan(), **context) is None


@pytest.mark.parametrize("precision", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_does_not_apply_when_already_mixed(precision):
    assert apply(mixed_precision(), Plan(precision=precision), device="tpu") is None


def test_mixed_precision_is_not_retried_after_it_produced_nan():
    mixed = Plan(precision="mixed_float16")
    nan = Incident(kind="nan_loss", attempt=1, plan_before=mixed, plan_after=Plan())
    context = StepContext(Plan(), device="gpu", gpu_compute_capability=(7, 5), incidents=(nan,))
    assert mixed_precision().apply(Plan(), incident(Plan()), context) is None
    # A NaN in float32 says nothing against mixed precision.
    nan32 = Incident(kind="nan_loss", attempt=1, plan_before=Plan())
    context = StepContext(Plan(), device="gpu", gpu_compute_capability=(7, 5), incidents=(nan32,))
    assert mixed_precision().apply(Plan(), incident(Plan()), context).precision == "mixed_float16"


def test_leave_mixed_precision():
    assert apply(leave_mixed_precision(), Plan(precision="mixed_float16")).precision == "float32"
    assert apply(leave_mixed_precision(), Plan(precision="mixed_bfloat16")).precision == "float32"
    assert apply(leave_mixed_precision(), Plan()) is None


# ----------------------------------------------------------------------------------- lower_resolution


def test_lower_resolution_scales_each_side():
    plan = apply(lower_resolution(factor=0.75), Plan(image_size=(224, 160)), resizable_input=True)
    assert plan.image_size == (168, 120)


def test_lower_resolution_starts_from_the_source_size():
    plan = apply(lower_resolution(factor=0.5), Plan(), resizable_input=True, source_image_size=(128, 128))
    assert plan.image_size == (64, 64)


def test_lower_resolution_stops_at_min_size():
    step = lower_resolution(factor=0.5, min_size=64)
    plan = apply(step, Plan(image_size=(100, 300)), resizable_input=True)
    assert plan.image_size == (64, 150)
    plan = apply(step, plan, resizable_input=True)
    assert plan.image_size == (64, 75)
    plan = apply(step, plan, resizable_input=True)
    assert plan.image_size == (64, 64)
    assert apply(step, plan, resizable_input=True) is None


def test_lower_resolution_never_enlarges_a_small_image():
    assert apply(lower_resolution(min_size=32), Plan(image_size=(28, 28)), resizable_input=True) is None


def test_lower_resolution_needs_a_resizable_input_and_a_known_size():
    assert apply(lower_resolution(), Plan(image_size=(224, 224))) is None
    assert apply(lower_resolution(), Plan(image_size=(224, 224)), resizable_input=False) is None
    assert apply(lower_resolution(), Plan(), resizable_input=True) is None


# ---------------------------------------------------------------------------- pipeline-memory steps


def test_drop_cache():
    assert apply(drop_cache(), Plan(cache=True)).cache is False
    assert apply(drop_cache(), Plan(cache=False)) is None


def test_shrink_buffers_turns_pipeline_choices_into_small_values():
    plan = apply(shrink_buffers(), Plan())
    assert (plan.shuffle_buffer, plan.prefetch, plan.parallel_calls) == (1024, 1, 2)


def test_shrink_buffers_halves_and_stops_at_the_floors():
    step = shrink_buffers()
    plan = Plan(shuffle_buffer=200, prefetch=4, parallel_calls=8)
    seen = []
    while (new_plan := apply(step, plan)) is not None:
        seen.append((new_plan.shuffle_buffer, new_plan.prefetch, new_plan.parallel_calls))
        plan = new_plan
    assert seen == [(100, 2, 4), (64, 1, 2), (64, 1, 1)]


def test_shrink_buffers_never_raises_a_small_value_the_user_chose():
    plan = apply(shrink_buffers(factor=0.25), Plan(shuffle_buffer=10, prefetch=0, parallel_calls=1))
    assert plan is None


def test_shrink_buffers_factor():
    plan = apply(shrink_buffers(factor=0.25), Plan(shuffle_buffer=4096, prefetch=8, parallel_calls=8))
    assert (plan.shuffle_buffer, plan.prefetch, plan.parallel_calls) == (1024, 2, 2)


@given(
    shuffle=st.one_of(st.none(), st.integers(1, 100_000)),
    prefetch=st.one_of(st.none(), st.integers(0, 64)),
    parallel=st.one_of(st.none(), st.integers(1, 64)),
    factor=st.floats(0.05, 0.95),
)
def test_shrink_buffers_never_grows_a_knob(shuffle, prefetch, parallel, factor):
    plan = Plan(shuffle_buffer=shuffle, prefetch=prefetch, parallel_calls=parallel)
    for _ in range(1000):
        new_plan = apply(shrink_buffers(factor=factor), plan)
        if new_plan is None:
            return
        for knob in ("shuffle_buffer", "prefetch", "parallel_calls"):
            old, new = getattr(plan, knob), getattr(new_plan, knob)
            assert new is not None
            assert old is None or new <= old
        plan = new_plan
    pytest.fail("shrink_buffers kept changing the plan after 1000 rounds")


# -------------------------------------------------------------------------------- lower_learning_rate


def test_lower_learning_rate():
    plan = apply(lower_learning_rate(), Plan())
    assert plan.learning_rate_scale == 0.5
    plan = apply(lower_learning_rate(factor=0.1), plan)
    assert plan.learning_rate_scale == pytest.approx(0.05)


def test_lower_learning_rate_stops_at_min_scale():
    step = lower_learning_rate(factor=0.5, min_scale=0.2)
    plan = apply(step, Plan(learning_rate_scale=0.3))
    assert plan.learning_rate_scale == 0.2
    assert apply(step, plan) is None
    assert apply(step, Plan(learning_rate_scale=0.1)) is None  # already below: never raised


# ------------------------------------------------------------------------------------------ round trip


plans = st.builds(
    Plan,
    batch_size=st.integers(1, 10_000),
    grad_accum_steps=st.integers(1, 64),
    precision=st.sampled_from(["float32", "mixed_float16", "mixed_bfloat16"]),
    image_size=st.one_of(st.none(), st.tuples(st.integers(1, 4096), st.integers(1, 4096))),
    cache=st.booleans(),
    shuffle_buffer=st.one_of(st.none(), st.integers(1, 1_000_000)),
    prefetch=st.one_of(st.none(), st.integers(0, 64)),
    parallel_calls=st.one_of(st.none(), st.integers(1, 64)),
    learning_rate_scale=st.floats(1e-6, 10, allow_nan=False),
)
all_steps = st.sampled_from(
    [
        halve_batch(),
        halve_batch(min_batch=8, keep_effective_batch=True),
        mixed_precision(),
        lower_resolution(),
        drop_cache(),
        shrink_buffers(),
        lower_learning_rate(),
        leave_mixed_precision(),
    ]
)


@given(plan=plans, steps=st.lists(all_steps, max_size=12))
def test_degraded_plans_survive_a_json_round_trip(plan, steps):
    context = StepContext(plan, device="tpu", resizable_input=True, source_image_size=(256, 256))
    for step in steps:
        plan = step.apply(plan, incident(plan), context) or plan
        assert Plan.model_validate_json(plan.model_dump_json()) == plan


def test_halve_batch_does_not_apply_when_the_input_fixes_its_batch_size():
    from resilient._incident import Incident
    from resilient._plan import Plan
    from resilient.policy.step import StepContext
    from resilient.steps import halve_batch

    plan = Plan(batch_size=32)
    incident = Incident(kind="gpu_oom", attempt=0, plan_before=plan)
    assert halve_batch().apply(plan, incident, StepContext(plan, batch_size_fixed=True)) is None
    assert halve_batch().apply(plan, incident, StepContext(plan)).batch_size == 16


def test_cache_and_buffer_steps_do_not_apply_to_inputs_without_them():
    from resilient._incident import Incident
    from resilient._plan import Plan
    from resilient.policy.step import StepContext
    from resilient.steps import drop_cache, shrink_buffers

    plan = Plan(batch_size=32)
    incident = Incident(kind="host_oom", attempt=0, plan_before=plan)
    arrays = StepContext(plan, cacheable=False, buffered=False)
    assert drop_cache().apply(plan, incident, arrays) is None
    assert shrink_buffers().apply(plan, incident, arrays) is None
    assert drop_cache().apply(plan, incident, StepContext(plan)).cache is False


# ------------------------------------------------------------------------- halve_batch over several devices


@pytest.mark.parametrize(
    ("batch", "replicas", "min_batch", "expected"),
    [(256, 4, 1, 128), (32, 2, 1, 16), (32, 2, 16, None), (32, 2, 8, 16), (33, 2, 1, 16), (2, 2, 1, None)],
)
def test_halve_batch_halves_the_per_replica_batch(batch, replicas, min_batch, expected):
    """min_batch bounds each device's share; the global batch halves and stays a multiple of the devices."""
    plan = apply(halve_batch(min_batch=min_batch), Plan(batch_size=batch, replicas=replicas))
    assert (plan.batch_size if plan else None) == expected
    if plan is not None:
        assert plan.replicas == replicas and plan.batch_size % replicas == 0


def test_halve_batch_keep_over_devices_keeps_the_effective_batch():
    plan = apply(halve_batch(keep_effective_batch=True), Plan(batch_size=64, replicas=4))
    assert (plan.batch_size, plan.grad_accum_steps, plan.per_replica_batch) == (32, 2, 8)
    assert plan.effective_batch == 64


@given(per=st.integers(1, 512), replicas=st.integers(1, 8), accum=st.integers(1, 4),
       min_batch=st.integers(1, 32), keep=st.booleans())
def test_halve_batch_over_devices_never_goes_below_min_batch_per_device(per, replicas, accum, min_batch, keep):
    plan = Plan(batch_size=per * replicas, grad_accum_steps=accum, replicas=replicas)
    new = apply(halve_batch(min_batch=min_batch, keep_effective_batch=keep), plan)
    if new is None:
        return
    assert new.per_replica_batch >= min_batch and new.batch_size % replicas == 0
    assert new.per_replica_batch < plan.per_replica_batch
    if keep:
        assert new.effective_batch == plan.effective_batch
