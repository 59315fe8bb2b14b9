"""Policies: construction, the ladder walk, presets, TOML files and their errors, custom steps, probing."""

from __future__ import annotations

import dataclasses
import io
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from resilient._cli import main
from resilient._errors import InvalidPolicyError
from resilient._incident import RETRYABLE_KINDS, Incident
from resilient._plan import Plan
from resilient.policy.policy import (
    MemorySettings,
    Policy,
    ProbeSettings,
    list_presets,
    load_policy,
    resolve_policy_path,
)
from resilient.policy.search import next_probe
from resilient.policy.step import Step, StepContext, get_step, list_steps, register_step
from resilient.steps import (
    drop_cache,
    halve_batch,
    leave_mixed_precision,
    lower_learning_rate,
    lower_resolution,
    mixed_precision,
    shrink_buffers,
)

REPO = Path(__file__).resolve().parent.parent
PRESETS = ["colab-free", "conservative", "default"]
GPU = {"device": "gpu", "gpu_compute_capability": (7, 5)}


def oom(plan: Plan, kind: str = "gpu_oom") -> Incident:
    return Incident(kind=kind, attempt=0, plan_before=plan)


def write(tmp_path: Path, text: str, name: str = "policy.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def load_error(tmp_path: Path, text: str, name: str = "policy.toml") -> str:
    path = write(tmp_path, text, name)
    with pytest.raises(InvalidPolicyError) as info:
        load_policy(path)
    return str(info.value)


# -------------------------------------------------------------------------------------- construction


def test_defaults():
    policy = Policy()
    assert policy.description == ""
    assert policy.max_restarts == 10
    assert policy.probe == ProbeSettings(enabled=True, stable_steps=200, max_probes=3)
    assert set(policy.ladders) == set(RETRYABLE_KINDS)
    assert all(ladder == () for ladder in policy.ladders.values())


def test_ladder_entries_may_be_names_tables_steps_classes_or_a_lone_entry():
    policy = Policy(
        ladders={
            "gpu_oom": [
                "mixed_precision",
                {"step": "halve_batch", "min_batch": 8},
                lower_resolution(factor=0.5),
            ],
            "host_oom": drop_cache,
            "nan_loss": "leave_mixed_precision",
        }
    )
    assert policy.ladders["gpu_oom"] == (
        mixed_precision(),
        halve_batch(min_batch=8),
        lower_resolution(factor=0.5),
    )
    assert policy.ladders["host_oom"] == (drop_cache(),)
    assert policy.ladders["nan_loss"] == (leave_mixed_precision(),)
    assert policy.ladders["crash"] == ()


def test_kinds_left_out_get_an_empty_ladder():
    policy = Policy(ladders={"gpu_oom": [halve_batch(min_batch=8)]})
    for kind in RETRYABLE_KINDS:
        if kind != "gpu_oom":
            assert policy.ladder(kind) == ()
    assert policy.ladder("user_error") == ()


def test_policy_is_frozen_and_compares_by_value():
    policy = Policy(ladders={"gpu_oom": ["halve_batch"]})
    assert policy == Policy(ladders={"gpu_oom": [halve_batch()]})
    with pytest.raises(ValidationError):
        policy.max_restarts = 3  # type: ignore[misc]


def test_replace_validates():
    policy = Policy(ladders={"gpu_oom": ["halve_batch"]})
    assert policy.replace(max_restarts=3).max_restarts == 3
    assert policy.replace(max_restarts=3).ladders == policy.ladders
    with pytest.raises(InvalidPolicyError, match="max_restarts"):
        policy.replace(max_restarts=-1)


def test_dump_is_a_policy_file_and_loads_back():
    policy = load_policy("default")
    data = policy.model_dump(mode="json")
    assert data["ladders"]["host_oom"][0] == "drop_cache"
    assert Policy(**data) == policy


def test_describe_lists_every_kind():
    text = Policy(description="mine", ladders={"gpu_oom": [halve_batch(min_batch=8)]}).describe()
    assert "mine" in text
    assert "gpu_oom" in text and "halve_batch(min_batch=8, keep_effective_batch=False)" in text
    for kind in RETRYABLE_KINDS:
        assert kind in text
    assert "(restart with the same plan)" in text
    assert "probe: disabled" in Policy(probe={"enabled": False}).describe()


@pytest.mark.parametrize(
    ("data", "key", "fragment"),
    [
        ({"max_restarts": -1}, "max_restarts", "received -1"),
        ({"max_restarts": "ten"}, "max_restarts", "a valid integer"),
        ({"description": 3}, "description", "a valid string"),
        ({"probe": {"stable_steps": 0}}, "probe.stable_steps", "greater than or equal to 1"),
        ({"probe": {"enabled": "no"}}, "probe.enabled", "a valid boolean"),
        ({"probe": {"every": 3}}, "probe.every", "enabled, stable_steps, max_probes"),
        ({"retries": 3}, "retries", "description, max_restarts, ladders, probe"),
        ({"ladders": {"oom": []}}, "ladders.oom", "gpu_oom, host_oom"),
        ({"ladders": {"user_error": []}}, "ladders.user_error", "always ends the run"),
        ({"ladders": ["halve_batch"]}, "ladders", "a table mapping incident kinds"),
        ({"ladders": {"gpu_oom": ["halve"]}}, "ladders.gpu_oom[0]", "Did you mean 'halve_batch'?"),
        ({"ladders": {"gpu_oom": [3]}}, "ladders.gpu_oom[0]", "a step name"),
        ({"ladders": {"gpu_oom": [{"min_batch": 8}]}}, "ladders.gpu_oom[0]", "`step` key"),
        (
            {"ladders": {"gpu_oom": ["drop_cache", {"step": "halve_batch", "min_batch": 0}]}},
            "ladders.gpu_oom[1].min_batch",
            "received 0",
        ),
    ],
)
def test_python_construction_errors_name_the_key(data, key, fragment):
    with pytest.raises(InvalidPolicyError) as info:
        Policy(**data)
    message = str(info.value)
    assert f"{key}: received" in message
    assert "expected" in message
    assert fragment in message


def test_several_problems_are_reported_together():
    with pytest.raises(InvalidPolicyError) as info:
        Policy(max_restarts=-1, ladders={"gpu_oom": [{"step": "halve_batch", "min_batch": 0, "kep": True}]})
    message = str(info.value)
    assert "max_restarts: received -1" in message
    assert "ladders.gpu_oom[0].min_batch: received 0" in message
    assert "ladders.gpu_oom[0].kep: received unknown key 'kep'" in message


# ---------------------------------------------------------------------------------------- the ladder


def test_degrade_takes_the_first_rung_that_changes_the_plan():
    policy = Policy(ladders={"gpu_oom": ["mixed_precision", {"step": "halve_batch", "min_batch": 8}]})
    plan = Plan(batch_size=32)
    context = StepContext(plan, **GPU)
    walk = []
    while (result := policy.degrade(plan, oom(plan), context)) is not None:
        plan, step = result
        walk.append((step.name, plan.precision, plan.batch_size))
    assert walk == [
        ("mixed_precision", "mixed_float16", 32),
        ("halve_batch", "mixed_float16", 16),
        ("halve_batch", "mixed_float16", 8),
    ]


def test_degrade_skips_rungs_that_do_not_apply():
    policy = Policy(ladders={"gpu_oom": ["mixed_precision", "lower_resolution", "halve_batch"]})
    plan, step = policy.degrade(Plan(batch_size=32), oom(Plan()), StepContext(Plan()))  # cpu, not resizable
    assert step == halve_batch()
    assert plan.batch_size == 16


def test_degrade_returns_none_for_an_empty_or_exhausted_ladder():
    policy = Policy(ladders={"gpu_oom": [{"step": "halve_batch", "min_batch": 8}]})
    assert policy.degrade(Plan(batch_size=8), oom(Plan()), StepContext(Plan())) is None
    assert policy.degrade(Plan(), oom(Plan(), "crash"), StepContext(Plan())) is None
    assert policy.degrade(Plan(), oom(Plan(), "user_error"), StepContext(Plan())) is None


def test_degrade_uses_the_incident_kind():
    policy = Policy(ladders={"gpu_oom": ["halve_batch"], "host_oom": ["drop_cache"]})
    plan, step = policy.degrade(Plan(), oom(Plan(), "host_oom"))
    assert (step.name, plan.cache, plan.batch_size) == ("drop_cache", False, 32)


def test_degrade_ignores_a_step_that_returns_the_same_plan():
    @register_step("test_identity_step")
    def identity(plan, incident, context):
        return plan

    policy = Policy(ladders={"gpu_oom": ["test_identity_step", "drop_cache"]})
    assert policy.degrade(Plan(), oom(Plan()))[1] == drop_cache()


def test_degrade_rejects_a_step_that_returns_something_else():
    @register_step("test_bad_return_step")
    def bad(plan, incident, context):
        return {"batch_size": 4}

    with pytest.raises(TypeError, match=r"test_bad_return_step.*Expected a Plan or None"):
        Policy(ladders={"gpu_oom": ["test_bad_return_step"]}).degrade(Plan(), oom(Plan()))


def test_an_exception_in_a_step_names_the_step():
    @register_step("test_raising_step")
    def boom(plan, incident, context):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError) as info:
        Policy(ladders={"gpu_oom": ["test_raising_step"]}).degrade(Plan(), oom(Plan()))
    assert any(
        "test_raising_step" in note for note in getattr(info.value, "__notes__", ["test_raising_step"])
    )


def test_supervisor_can_replace_the_incidents_in_a_context():
    context = StepContext(Plan(), **GPU)
    updated = dataclasses.replace(context, incidents=(oom(Plan()),))
    assert updated.incidents[0].kind == "gpu_oom"
    assert updated.gpu_compute_capability == (7, 5)


MEMORY_STEPS = [
    halve_batch(),
    halve_batch(min_batch=4, keep_effective_batch=True),
    mixed_precision(),
    lower_resolution(),
    lower_resolution(factor=0.5, min_size=64),
    drop_cache(),
    shrink_buffers(),
    shrink_buffers(factor=0.25),
]


def memory_rank(plan: Plan) -> tuple:
    return plan.batch_size, plan.cache, plan.image_size or (10**9, 10**9)


@given(
    ladder=st.lists(st.sampled_from(MEMORY_STEPS), min_size=1, max_size=6),
    batch=st.integers(1, 2048),
    accum=st.integers(1, 4),
    cache=st.booleans(),
    image=st.one_of(st.none(), st.tuples(st.integers(8, 512), st.integers(8, 512))),
    device=st.sampled_from([{"device": "cpu"}, GPU, {"device": "tpu"}]),
    resizable=st.booleans(),
)
def test_memory_ladders_are_monotone_and_terminate(ladder, batch, accum, cache, image, device, resizable):
    policy = Policy(ladders={"gpu_oom": ladder})
    plan = Plan(batch_size=batch, grad_accum_steps=accum, cache=cache, image_size=image)
    context = StepContext(plan, resizable_input=resizable, source_image_size=(300, 200), **device)
    for _ in range(500):
        result = policy.degrade(plan, oom(plan), context)
        if result is None:
            break
        new_plan, _step = result
        assert new_plan != plan
        assert new_plan.batch_size <= plan.batch_size
        assert not (new_plan.cache and not plan.cache)
        if plan.image_size is not None:
            assert new_plan.image_size is not None
            assert all(n <= o for n, o in zip(new_plan.image_size, plan.image_size, strict=True))
        if plan.precision != "float32":
            assert new_plan.precision == plan.precision
        assert Plan.model_validate_json(new_plan.model_dump_json()) == new_plan
        plan = new_plan
    else:
        pytest.fail("the ladder never ran out")


# ----------------------------------------------------------------------------------------- presets


def test_list_presets_has_the_shipped_presets_with_descriptions():
    presets = list_presets()
    for name in PRESETS:
        assert presets[name]
    assert "T4" in presets["colab-free"]


@pytest.mark.parametrize("name", PRESETS)
def test_each_preset_loads_and_considers_every_kind(name):
    policy = load_policy(name)
    assert policy.description
    text = resolve_policy_path(name).read_text()
    for kind in RETRYABLE_KINDS:
        assert f"\n{kind} " in text, f"{name}.toml does not mention {kind}"
    assert load_policy(REPO / "policies" / f"{name}.toml") == policy
    assert load_policy(str(REPO / "policies" / f"{name}.toml")) == policy


def test_default_preset_contract():
    policy = load_policy("default")
    assert any(step.name == "halve_batch" for step in policy.ladder("gpu_oom"))
    assert any(step.name == "halve_batch" for step in policy.ladder("host_oom"))
    assert any(step.name == "drop_cache" for step in policy.ladder("host_oom"))
    assert [step.name for step in policy.ladder("nan_loss")] == [
        "leave_mixed_precision",
        "lower_learning_rate",
    ]


def test_conservative_preset_keeps_the_math():
    policy = load_policy("conservative")
    assert policy.probe.enabled is False
    for kind in RETRYABLE_KINDS:
        for step in policy.ladder(kind):
            assert step.name != "lower_resolution"
            if step.name == "halve_batch":
                assert step.keep_effective_batch


def test_colab_preset_walks_a_t4_down():
    policy = load_policy("colab-free")
    plan = Plan(batch_size=64, image_size=(224, 224))
    context = StepContext(plan, resizable_input=True, **GPU)
    names = []
    while (result := policy.degrade(plan, oom(plan), context)) is not None:
        plan, step = result
        names.append(step.name)
    assert names[0] == "mixed_precision"
    assert plan.batch_size >= 2
    assert plan.image_size == (64, 64)
    assert names.index("lower_resolution") > names.index("halve_batch")


def test_the_nan_ladder_undoes_mixed_precision_and_the_oom_ladder_does_not_redo_it():
    policy = load_policy("default")
    plan = Plan(precision="mixed_float16")
    nan = oom(plan, "nan_loss")
    new_plan, step = policy.degrade(plan, nan, StepContext(plan, **GPU))
    assert (step.name, new_plan.precision) == ("leave_mixed_precision", "float32")
    later, step = policy.degrade(new_plan, oom(new_plan), StepContext(plan, incidents=(nan,), **GPU))
    assert step.name == "halve_batch"
    assert later.precision == "float32"


def test_unknown_preset_lists_the_presets():
    with pytest.raises(InvalidPolicyError) as info:
        load_policy("defualt")
    message = str(info.value)
    assert "'defualt'" in message
    for name in PRESETS:
        assert name in message
    assert "did you mean 'default'" in message


def test_a_policy_passes_through():
    policy = Policy(max_restarts=2)
    assert load_policy(policy) is policy


def test_load_policy_rejects_other_types():
    with pytest.raises(InvalidPolicyError, match="Expected a preset name"):
        load_policy(3)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ TOML files


def test_design_example_loads(tmp_path):
    path = write(
        tmp_path,
        """
description = "Colab free tier: T4 15 GB, 12.7 GB RAM"
max_restarts = 10

[ladders]
gpu_oom  = ["mixed_precision", { step = "halve_batch", min_batch = 8, keep_effective_batch = true },
            { step = "lower_resolution", factor = 0.75, min_size = 64 }]
host_oom = ["drop_cache", "shrink_buffers", "halve_batch"]
crash    = []        # empty ladder: restart from the last checkpoint with the same plan
hang     = []
""",
    )
    policy = load_policy(path)
    assert policy.ladder("gpu_oom") == (
        mixed_precision(),
        halve_batch(min_batch=8, keep_effective_batch=True),
        lower_resolution(factor=0.75, min_size=64),
    )
    assert policy.ladder("host_oom") == (drop_cache(), shrink_buffers(), halve_batch())
    assert policy.ladder("killed") == ()
    assert policy.probe.enabled


def test_array_of_tables_and_probe_section(tmp_path):
    policy = load_policy(
        write(
            tmp_path,
            """
[[ladders.nan_loss]]
step = "lower_learning_rate"
factor = 0.1

[probe]
enabled = false
""",
        )
    )
    assert policy.ladder("nan_loss") == (lower_learning_rate(factor=0.1),)
    assert policy.probe.enabled is False
    assert policy.max_restarts == 10


def test_relative_path_without_separator_but_with_toml_suffix(tmp_path, monkeypatch):
    write(tmp_path, "max_restarts = 4\n", "mine.toml")
    monkeypatch.chdir(tmp_path)
    assert load_policy("mine.toml").max_restarts == 4


def test_missing_file(tmp_path):
    with pytest.raises(InvalidPolicyError) as info:
        load_policy(tmp_path / "nope.toml")
    message = str(info.value)
    assert "not found" in message and "nope.toml" in message and "default" in message


@pytest.mark.parametrize(
    ("text", "key", "received", "expected"),
    [
        (
            '[ladders]\ngpu_oom = ["halve_batchh"]\n',
            "ladders.gpu_oom[0]",
            "step 'halve_batchh'",
            "one of the registered steps",
        ),
        (
            '[ladders]\ngpu_oom = ["drop_cache", { step = "halve_batch", min_batch = "8" }]\n',
            "ladders.gpu_oom[1].min_batch",
            "'8' (str)",
            "a valid integer",
        ),
        (
            '[ladders]\ngpu_oom = ["drop_cache", { step = "halve_batch", min_batch = 0 }]\n',
            "ladders.gpu_oom[1].min_batch",
            "0 (int)",
            "greater than or equal to 1",
        ),
        (
            '[ladders]\nhost_oom = [{ step = "shrink_buffers", factor = 2.0 }]\n',
            "ladders.host_oom[0].factor",
            "2.0 (float)",
            "less than 1",
        ),
        (
            '[ladders]\ngpu_oom = [{ step = "halve_batch", keep_effective_batch = "yes" }]\n',
            "ladders.gpu_oom[0].keep_effective_batch",
            "'yes' (str)",
            "a valid boolean",
        ),
        (
            '[ladders]\ngpu_oom = [{ step = "halve_batch", min = 8 }]\n',
            "ladders.gpu_oom[0].min",
            "unknown key 'min' = 8",
            "min_batch, keep_effective_batch",
        ),
        ("[ladders]\ngpu_ooom = []\n", "ladders.gpu_ooom", "incident kind 'gpu_ooom'", "one of gpu_oom"),
        (
            '[ladders]\nuser_error = ["drop_cache"]\n',
            "ladders.user_error",
            "incident kind 'user_error'",
            "one of gpu_oom",
        ),
        (
            "max_retries = 3\n",
            "max_retries",
            "unknown key 'max_retries' = 3",
            "description, max_restarts, ladders, probe",
        ),
        ("max_restarts = 2.5\n", "max_restarts", "2.5 (float)", "a valid integer"),
        (
            "[probe]\nstable = 10\n",
            "probe.stable",
            "unknown key 'stable' = 10",
            "enabled, stable_steps, max_probes",
        ),
        ('ladders = "halve_batch"\n', "ladders", "'halve_batch' (str)", "a table mapping incident kinds"),
    ],
)
def test_invalid_files_name_the_file_key_received_and_expected(tmp_path, text, key, received, expected):
    message = load_error(tmp_path, text, "broken_policy.toml")
    assert "broken_policy.toml" in message
    assert str(tmp_path) in message
    line = next((line for line in message.splitlines() if line.strip().startswith(f"{key}: ")), None)
    assert line is not None, message
    assert f"received {received}" in line
    assert "expected" in line and expected in line
    assert "python -m resilient policies check" in message


def test_every_problem_in_a_file_is_reported_at_once(tmp_path):
    text = (
        "max_retries = 3\n[ladders]\noom = []\n"
        'gpu_oom = [{ step = "halve_batch", min_batch = 0, keep = true }, "x"]\n'
    )
    message = load_error(tmp_path, text)
    keys = ["max_retries", "ladders.oom", "ladders.gpu_oom[0].min_batch", "ladders.gpu_oom[0].keep"]
    for key in [*keys, "ladders.gpu_oom[1]"]:
        assert f"\n  {key}: received" in message, key


def test_invalid_toml_syntax(tmp_path):
    message = load_error(tmp_path, '[ladders]\ngpu_oom = ["halve_batch"\nhost_oom = []\n', "syntax.toml")
    assert "syntax.toml" in message
    assert "not valid TOML" in message
    assert "line" in message


def test_not_toml_at_all(tmp_path):
    message = load_error(tmp_path, "gpu_oom: [halve_batch]\n", "yaml.toml")
    assert "yaml.toml" in message and "not valid TOML" in message


# -------------------------------------------------------------------------------------- custom steps


def test_register_a_class_and_use_it_from_toml(tmp_path):
    @register_step("test_halve_workers")
    class HalveWorkers(Step):
        """Halve the parallel map calls."""

        minimum: int = 1

        def apply(self, plan, incident, context):
            calls = plan.parallel_calls or 8
            return (
                plan.replace(parallel_calls=max(self.minimum, calls // 2)) if calls > self.minimum else None
            )

    policy = load_policy(
        write(tmp_path, '[ladders]\nhost_oom = [{ step = "test_halve_workers", minimum = 2 }]\n')
    )
    step = policy.ladder("host_oom")[0]
    assert isinstance(step, HalveWorkers)
    assert str(step) == "test_halve_workers(minimum=2)"
    plan, _ = policy.degrade(Plan(), oom(Plan(), "host_oom"))
    assert plan.parallel_calls == 4
    assert list_steps()["test_halve_workers"] == "Halve the parallel map calls."
    assert get_step("test_halve_workers") == HalveWorkers()


def test_register_a_function_and_use_it_from_toml(tmp_path):
    @register_step("test_scale_batch")
    def scale_batch(plan: Plan, incident: Incident, context: StepContext, factor: float = 0.5) -> Plan | None:
        """Scale the batch by a factor."""
        new_batch = max(1, int(plan.batch_size * factor))
        return plan.replace(batch_size=new_batch) if new_batch < plan.batch_size else None

    assert scale_batch(Plan(batch_size=10), None, None, factor=0.3).batch_size == 3  # still a function
    policy = load_policy(
        write(tmp_path, '[ladders]\ngpu_oom = [{ step = "test_scale_batch", factor = 0.25 }]\n')
    )
    plan, step = policy.degrade(Plan(batch_size=32), oom(Plan()))
    assert plan.batch_size == 8
    assert str(step) == "test_scale_batch(factor=0.25)"
    assert step.spec() == {"step": "test_scale_batch", "factor": 0.25}
    # Used directly in Python, the function stands for the step with its defaults.
    assert Policy(ladders={"gpu_oom": [scale_batch]}).ladder("gpu_oom")[0] == get_step("test_scale_batch")


def test_function_step_parameters_are_validated_from_annotations(tmp_path):
    @register_step("test_annotated_step")
    def annotated(plan, incident, context, rounds: int = 1):
        return None

    message = load_error(tmp_path, '[ladders]\ngpu_oom = [{ step = "test_annotated_step", rounds = "x" }]\n')
    assert "ladders.gpu_oom[0].rounds: received 'x' (str)" in message
    assert "a valid integer" in message
    message = load_error(tmp_path, '[ladders]\ngpu_oom = [{ step = "test_annotated_step", round = 1 }]\n')
    assert "ladders.gpu_oom[0].round: received unknown key 'round'" in message


def test_function_step_requires_the_three_arguments():
    with pytest.raises(InvalidPolicyError, match=r"\(plan, incident, context\)"):
        register_step("test_bad_signature")(lambda plan: plan)


def test_register_step_rejects_other_objects_and_bad_names():
    with pytest.raises(InvalidPolicyError, match="cannot register"):
        register_step("test_not_a_step")(int)
    with pytest.raises(InvalidPolicyError, match="Invalid step name"):
        register_step("has space")


def test_a_name_cannot_be_taken_twice_by_accident():
    with pytest.raises(InvalidPolicyError, match="already registered"):

        @register_step("halve_batch")
        def other(plan, incident, context):
            return None

    assert type(get_step("halve_batch")) is halve_batch


def test_re_registering_the_same_definition_is_allowed_and_replace_is_explicit():
    def define():
        @register_step("test_reregistered")
        def step(plan, incident, context):
            return None

        return step

    define()
    define()  # a re-run notebook cell

    @register_step("test_reregistered", replace=True)
    def replacement(plan, incident, context, level: int = 2):
        return None

    assert get_step("test_reregistered").level == 2


# ------------------------------------------------------------------------------------------- probing


def test_next_probe_bisects_the_batch():
    probe = next_probe(Plan(batch_size=16, precision="mixed_float16"), Plan(batch_size=32))
    assert probe == Plan(batch_size=24, precision="mixed_float16")


@pytest.mark.parametrize(("working", "failed"), [(16, 17), (16, 18), (64, 72), (32, 32), (32, 16), (1, 2)])
def test_next_probe_stops_when_the_gap_is_small(working, failed):
    assert next_probe(Plan(batch_size=working), Plan(batch_size=failed)) is None


def test_next_probe_keeps_the_effective_batch():
    probe = next_probe(Plan(batch_size=6, grad_accum_steps=8), Plan(batch_size=12, grad_accum_steps=4))
    assert (probe.batch_size, probe.grad_accum_steps) == (8, 6)
    assert probe.effective_batch == 48


def test_next_probe_gives_up_without_an_exact_divisor():
    assert next_probe(Plan(batch_size=8, grad_accum_steps=4), Plan(batch_size=16, grad_accum_steps=2)) is None


@given(
    working=st.integers(1, 4096),
    gap=st.integers(1, 4096),
    accum=st.integers(1, 16),
)
def test_next_probe_lands_strictly_between(working, gap, accum):
    failed = working + gap
    start = Plan(batch_size=working, grad_accum_steps=accum)
    probe = next_probe(start, Plan(batch_size=failed))
    if probe is None:
        return
    assert working < probe.batch_size < failed
    assert probe.effective_batch == start.effective_batch or accum == 1
    assert probe.diff(start).keys() <= {"batch_size", "grad_accum_steps"}


@given(working=st.integers(1, 1024), gap=st.integers(2, 1024))
def test_probing_converges(working, gap):
    low, high = Plan(batch_size=working), Plan(batch_size=working + gap)
    for _ in range(64):
        probe = next_probe(low, high)
        if probe is None:
            return
        low = probe  # pretend every probe holds: the search must still end
    pytest.fail("probing never converged")


# ------------------------------------------------------------------------------------------------ CLI


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_cli_lists_presets():
    for argv in (["policies"], ["policies", "list"]):
        code, out, _ = run_cli(*argv)
        assert code == 0
        for name in PRESETS:
            assert name in out
        assert "T4" in out


def test_cli_output_into_a_closed_pipe_is_not_an_error():
    # `python -m resilient policies steps | head -1`: the reader is gone before we write.
    proc = subprocess.Popen([sys.executable, "-m", "resilient", "policies", "steps"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()
    assert b"Traceback" not in err


def test_cli_check_valid_prints_the_ladders():
    code, out, err = run_cli("policies", "check", "default")
    assert code == 0, err
    assert "default.toml" in out
    assert "gpu_oom" in out and "halve_batch(" in out


def test_cli_check_invalid_file_exits_2(tmp_path):
    path = write(tmp_path, '[ladders]\ngpu_oom = [{ step = "halve_batch", min_batch = 0 }]\n')
    code, out, err = run_cli("policies", "check", str(path))
    assert code == 2
    assert "ladders.gpu_oom[0].min_batch" in err
    assert out == ""


def test_cli_check_unknown_preset_exits_2():
    code, _, err = run_cli("policies", "check", "nope")
    assert code == 2
    assert "default" in err


def test_cli_show_and_steps():
    code, out, _ = run_cli("policies", "show", "conservative")
    assert code == 0 and "probe: disabled" in out
    code, out, _ = run_cli("policies", "steps")
    assert code == 0
    assert "halve_batch" in out and "shrink_buffers" in out


def test_cli_usage_errors_return_2():
    assert run_cli()[0] == 2
    assert run_cli("nonsense")[0] == 2


def test_cli_check_imports_custom_steps(tmp_path, monkeypatch):
    (tmp_path / "my_cli_steps.py").write_text(
        "from resilient.policy.step import register_step\n\n"
        "@register_step('test_cli_custom')\n"
        "def custom(plan, incident, context):\n"
        "    return None\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    path = write(tmp_path, '[ladders]\ncrash = ["test_cli_custom"]\n')
    code, out, err = run_cli("policies", "check", str(path), "--import", "my_cli_steps")
    assert code == 0, err
    assert "test_cli_custom()" in out
    assert run_cli("policies", "check", str(path), "--import", "no_such_module_xyz")[0] == 2


def test_python_m_resilient_policies_check_is_fast(tmp_path):
    path = write(tmp_path, '[ladders]\ngpu_oom = ["halve_batch"]\n')
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "resilient", "policies", "check", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    assert "halve_batch" in done.stdout
    assert elapsed < 5, f"policies check took {elapsed:.1f}s; something imports TensorFlow"


# ------------------------------------------------------------------------------------------- [memory]


def test_memory_section_defaults_and_toml(tmp_path):
    assert Policy().memory == MemorySettings(pressure_checkpoint=True, pressure_threshold=0.85,
                                             rearm_threshold=0.75, available_margin=1 << 30, pressure_interval=30.0)
    assert load_policy("default").memory == Policy().memory
    policy = load_policy(write(tmp_path, '[memory]\npressure_threshold = 0.9\navailable_margin = "512MiB"\n'
                                         'pressure_interval = "2min"\n'))
    assert policy.memory.pressure_threshold == 0.9 and policy.memory.available_margin == 512 << 20
    assert policy.memory.pressure_interval == 120.0
    assert load_policy(write(tmp_path, "[memory]\npressure_interval = 5\n")).memory.pressure_interval == 5.0
    assert "a checkpoint at 90% of the host memory limit" in policy.describe()
    assert "every 120s above the mark" in policy.describe()
    assert "memory: no pressure checkpoint" in Policy(memory={"pressure_checkpoint": False}).describe()


@pytest.mark.parametrize(("text", "expected"), [
    ("pressure_threshold = 1.5", "memory.pressure_threshold: received 1.5 (float); expected a value less than or "
                                 "equal to 1"),
    ('available_margin = "lots"', "memory.available_margin: received 'lots' (str); expected a size such as"),
    ("rearm_threshold = 0.9", "memory.rearm_threshold: received rearm_threshold = 0.9 with pressure_threshold = "
                              "0.85; expected rearm_threshold below pressure_threshold"),
    ("presure_threshold = 0.8", "memory.presure_threshold: received unknown key 'presure_threshold'"),
    ('pressure_interval = "soon"', "memory.pressure_interval: received 'soon' (str); expected a positive duration"),
    ("pressure_interval = 0", "memory.pressure_interval: received 0 (int); expected a positive duration"),
])
def test_memory_section_mistakes_name_the_key(tmp_path, text, expected):
    error = load_error(tmp_path, f"[memory]\n{text}\n")
    assert expected in error and "policy.toml" in error
