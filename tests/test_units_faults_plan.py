"""Sizes, durations, fault specs and the Plan: parsing, validation messages and round trips."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from resilient._faults import FAULT_KINDS, Fault, FiredFaults, parse_faults
from resilient._plan import Plan
from resilient._units import format_bytes, parse_duration, parse_size

# ------------------------------------------------------------------------------------------ parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("12.7GB", 12_700_000_000),
        ("512MiB", 512 * 2**20),
        ("1KiB", 1024),
        ("1k", 1000),
        ("2 gb", 2 * 10**9),
        (" 3TB ", 3 * 10**12),
        ("1.5GiB", 3 * 2**29),
        (".5MB", 500_000),
        ("100", 100),
        ("100b", 100),
    ],
)
def test_parse_size_strings(text, expected):
    assert parse_size(text) == expected


def test_parse_size_numbers_are_bytes():
    assert parse_size(1024) == 1024
    assert parse_size(1.5e9) == 1_500_000_000


@pytest.mark.parametrize("bad", ["", "abc", "12XB", "-5GB", "0GB", "GB", "1.2.3GB", "5 G B"])
def test_parse_size_rejects_bad_strings_with_received_and_expected(bad):
    with pytest.raises(ValueError) as info:
        parse_size(bad, name="host_memory_limit")
    message = str(info.value)
    assert "Invalid value for `host_memory_limit`" in message
    assert f"Received: host_memory_limit={bad!r}" in message
    assert "Expected a positive size" in message
    assert "12.7GB" in message


@pytest.mark.parametrize("bad", [0, -1, -2.5])
def test_parse_size_rejects_non_positive_numbers(bad):
    with pytest.raises(ValueError, match=r"Received: size=.*Expected a positive size"):
        parse_size(bad)


@pytest.mark.parametrize("bad", [True, False])
def test_parse_size_rejects_bools(bad):
    with pytest.raises(ValueError, match=rf"Received: size={bad}\. Expected bytes"):
        parse_size(bad)


# -------------------------------------------------------------------------------------- parse_duration


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("5min", 300.0),
        ("90s", 90.0),
        ("1h", 3600.0),
        ("1.5h", 5400.0),
        ("2 minutes", 120.0),
        ("10", 10.0),
        ("0.25sec", 0.25),
        ("3HOURS", 10800.0),
    ],
)
def test_parse_duration_strings(text, expected):
    assert parse_duration(text) == pytest.approx(expected)


def test_parse_duration_numbers_are_seconds():
    assert parse_duration(30) == 30.0
    assert isinstance(parse_duration(30), float)
    assert parse_duration(0.5) == 0.5


@pytest.mark.parametrize("bad", ["", "soon", "5 fortnights", "-1s", "0s", "1d", "min"])
def test_parse_duration_rejects_bad_strings_with_received_and_expected(bad):
    with pytest.raises(ValueError) as info:
        parse_duration(bad, name="hang_timeout")
    message = str(info.value)
    assert f"Received: hang_timeout={bad!r}" in message
    assert "Expected a positive duration" in message
    assert "'5min'" in message


@pytest.mark.parametrize("bad", [0, -3, True])
def test_parse_duration_rejects_non_positive_numbers_and_bools(bad):
    with pytest.raises(ValueError, match=r"Invalid value for `duration`"):
        parse_duration(bad)


def test_parse_duration_rejects_nan():
    with pytest.raises(ValueError, match="Expected"):
        parse_duration(math.nan)


@pytest.mark.parametrize("tiny", [0.5, "0.5B"])
def test_parse_size_rejects_less_than_one_byte(tiny):
    with pytest.raises(ValueError, match="at least 1 byte"):
        parse_size(tiny)


# ---------------------------------------------------------------------------------------- format_bytes


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (None, "n/a"),
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (150 * 2**20, "150.0 MiB"),
        (int(12.7 * 2**30), "12.7 GiB"),
        (5 * 2**40, "5.0 TiB"),
        (2**50, "1024.0 TiB"),
    ],
)
def test_format_bytes(n, text):
    assert format_bytes(n) == text


# ---------------------------------------------------------------------------------------- parse_faults


def test_parse_faults_string():
    faults = parse_faults("gpu_oom@40,hang@120")
    assert faults == (Fault(kind="gpu_oom", step=40), Fault(kind="hang", step=120))
    assert [f.key for f in faults] == ["gpu_oom@40", "hang@120"]


def test_parse_faults_list_and_whitespace():
    assert parse_faults([" segfault@3 ", "preempt@0"]) == (Fault(kind="preempt", step=0), Fault(kind="segfault", step=3))


def test_parse_faults_sorted_by_step_then_kind():
    faults = parse_faults("sigkill@9,abort@2,nan@9,host_oom@2")
    assert [f.key for f in faults] == ["abort@2", "host_oom@2", "nan@9", "sigkill@9"]


@pytest.mark.parametrize("spec", [None, "", " , ", []])
def test_parse_faults_empty(spec):
    assert parse_faults(spec) == ()


def test_every_fault_kind_parses():
    faults = parse_faults([f"{kind}@{i}" for i, kind in enumerate(FAULT_KINDS)])
    assert {f.kind for f in faults} == set(FAULT_KINDS)


def test_parse_faults_rejects_duplicates():
    with pytest.raises(ValueError) as info:
        parse_faults("gpu_oom@4,hang@5,gpu_oom@4")
    message = str(info.value)
    assert "duplicates" in message
    assert "gpu_oom@4" in message
    assert "hang@5" not in message


def test_same_kind_at_different_steps_is_not_a_duplicate():
    assert len(parse_faults("gpu_oom@4,gpu_oom@5")) == 2


@pytest.mark.parametrize("bad", ["oom@4", "gpu_oom", "gpu_oom@", "gpu_oom@x", "gpu_oom@-1", "gpu_oom@1.5", "@4"])
def test_parse_faults_rejects_bad_entries_naming_received_and_expected(bad):
    with pytest.raises(ValueError) as info:
        parse_faults(f"hang@1,{bad}")
    message = str(info.value)
    assert "Invalid value for argument `faults`" in message
    assert f"Received: {bad!r}" in message
    assert "Expected 'kind@step'" in message
    for kind in FAULT_KINDS:
        assert kind in message
    assert "non-negative integer" in message


def test_fault_is_frozen_and_validated():
    fault = Fault(kind="hang", step=3)
    with pytest.raises(ValidationError):
        fault.step = 4  # type: ignore[misc]
    with pytest.raises(ValidationError):
        Fault(kind="hang", step=-1)
    with pytest.raises(ValidationError):
        Fault(kind="meteor", step=1)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------- FiredFaults


def test_fired_faults_start_empty(tmp_path):
    assert FiredFaults(tmp_path / "faults_fired.json").load() == set()


def test_fired_faults_persist_across_instances(tmp_path):
    path = tmp_path / "faults_fired.json"
    FiredFaults(path).record(Fault(kind="gpu_oom", step=40))
    FiredFaults(path).record(Fault(kind="hang", step=120))
    FiredFaults(path).record(Fault(kind="gpu_oom", step=40))  # idempotent
    assert FiredFaults(path).load() == {"gpu_oom@40", "hang@120"}
    assert json.loads(path.read_text()) == ["gpu_oom@40", "hang@120"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["faults_fired.json"]  # no temp file left


# ------------------------------------------------------------------------------------------------ Plan


def test_plan_defaults():
    plan = Plan()
    assert plan.batch_size == 32
    assert plan.grad_accum_steps == 1
    assert plan.precision == "float32"
    assert plan.image_size is None
    assert plan.effective_batch == 32


@pytest.mark.parametrize("field", ["batch_size", "grad_accum_steps"])
@pytest.mark.parametrize("value", [0, -4])
def test_plan_counts_must_be_at_least_one(field, value):
    with pytest.raises(ValidationError) as info:
        Plan(**{field: value})
    assert field in str(info.value)
    assert "greater than or equal to 1" in str(info.value)


def test_plan_batch_size_one_is_valid():
    assert Plan(batch_size=1).batch_size == 1


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, None), (64, (64, 64)), ((32, 48), (32, 48)), ([32, 48], (32, 48))],
)
def test_plan_image_size_forms(value, expected):
    assert Plan(image_size=value).image_size == expected


@pytest.mark.parametrize("bad", [(0, 5), (5, -1), (1, 2, 3), "big", [64]])
def test_plan_image_size_rejects_bad_values(bad):
    with pytest.raises(ValidationError) as info:
        Plan(image_size=bad)
    assert "image_size" in str(info.value)


@pytest.mark.parametrize("bad", [0, -3])
def test_plan_image_size_rejects_non_positive_int(bad):
    with pytest.raises(ValidationError):
        Plan(image_size=bad)


def test_plan_rejects_unknown_precision():
    with pytest.raises(ValidationError, match="precision"):
        Plan(precision="float8")  # type: ignore[arg-type]


def test_plan_forbids_extra_fields():
    with pytest.raises(ValidationError) as info:
        Plan(batch=16)  # type: ignore[call-arg]
    assert "batch" in str(info.value)
    assert "Extra inputs are not permitted" in str(info.value)
    with pytest.raises(ValidationError):
        Plan.model_validate_json('{"batch_size": 8, "turbo": true}')


def test_plan_is_frozen_and_hashable():
    plan = Plan()
    with pytest.raises(ValidationError):
        plan.batch_size = 8  # type: ignore[misc]
    assert hash(plan) == hash(Plan())
    assert {plan, Plan()} == {plan}


def test_plan_replace_returns_a_validated_copy():
    plan = Plan(batch_size=32)
    smaller = plan.replace(batch_size=16, grad_accum_steps=2)
    assert (smaller.batch_size, smaller.grad_accum_steps, smaller.effective_batch) == (16, 2, 32)
    assert plan.batch_size == 32  # the original is untouched
    assert plan.replace(image_size=96).image_size == (96, 96)
    with pytest.raises(ValidationError):
        plan.replace(batch_size=0)
    with pytest.raises(ValidationError):
        plan.replace(nonsense=1)


def test_plan_diff():
    a = Plan(batch_size=32)
    b = a.replace(batch_size=16, precision="mixed_float16")
    assert a.diff(a) == {}
    assert a.diff(b) == {"batch_size": (32, 16), "precision": ("float32", "mixed_float16")}
    assert b.diff(a) == {"batch_size": (16, 32), "precision": ("mixed_float16", "float32")}


def test_plan_describe():
    assert Plan(batch_size=32).describe() == "batch=32 float32 cache"
    full = Plan(
        batch_size=16, grad_accum_steps=2, precision="mixed_float16", image_size=(96, 128), cache=False,
        shuffle_buffer=256, prefetch=1, parallel_calls=2, learning_rate_scale=0.5,
    )
    assert full.describe() == (
        "batch=16x2 mixed_float16 image=96x128 no-cache shuffle_buffer=256 prefetch=1 parallel_calls=2 lr_scale=0.5"
    )


plans = st.builds(
    Plan,
    batch_size=st.integers(1, 4096),
    grad_accum_steps=st.integers(1, 64),
    precision=st.sampled_from(["float32", "mixed_float16", "mixed_bfloat16"]),
    image_size=st.none() | st.tuples(st.integers(1, 4096), st.integers(1, 4096)),
    cache=st.booleans(),
    shuffle_buffer=st.none() | st.integers(1, 10**6),
    prefetch=st.none() | st.integers(0, 64),
    parallel_calls=st.none() | st.integers(1, 64),
    learning_rate_scale=st.floats(min_value=1e-6, max_value=1e3, allow_nan=False, allow_infinity=False),
)


@given(plans)
def test_plan_json_round_trip(plan):
    text = plan.model_dump_json()
    again = Plan.model_validate_json(text)
    assert again == plan
    assert again.diff(plan) == {}
    assert Plan.model_validate(json.loads(text)) == plan
    assert plan.replace() == plan
    assert again.describe() == plan.describe()


@given(plans, plans)
def test_plan_diff_names_exactly_the_changed_fields(a, b):
    diff = a.diff(b)
    assert (diff == {}) == (a == b)
    assert a.replace(**{name: theirs for name, (_, theirs) in diff.items()}) == b
