"""The restart rules, on hand-built inputs: ``decide`` is pure, so every rule is a function call.

A grid of every incident kind x a policy that changes the plan or not x the state of the plan search
x what came before (nothing, the same incident at the same step, the same checkpoint, progress) x
the restart budget, checked against the rules as written in decide.py's docstring; then targeted
cases for each rule's details (texts, journal entries, waits, the search).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import pytest
import tenacity

from resilient._incident import INCIDENT_KINDS, RETRYABLE_KINDS, Incident
from resilient._plan import Plan
from resilient._protocol import ErrorReport
from resilient.policy.policy import Policy, ProbeSettings, Step, StepContext
from resilient.policy.search import PlanSearch
from resilient.steps import halve_batch
from resilient.supervisor.decide import (
    NO_PROGRESS,
    AttemptFacts,
    Decision,
    RestartRules,
    decide,
    repeats_without_progress,
    stop_without_progress,
    wait_repeats_exponential,
)
from resilient.supervisor.disk import DISK_MARGIN, DiskSpace
from resilient.supervisor.report import SavedCheckpoint

WORKING, FAILED, PROBE = Plan(batch_size=32), Plan(batch_size=64), Plan(batch_size=48)
STEP, CHECKPOINT = 7, 5
CHANGES = Policy(ladders={kind: [halve_batch(min_batch=1)] for kind in RETRYABLE_KINDS})
KEEPS = Policy()
OOM = ("gpu_oom", "host_oom")


def settings(**changes: Any) -> ProbeSettings:
    return ProbeSettings(**{"stable_steps": 6, "measure_seconds": 0.0, **changes})


def make_search(state: str) -> tuple[PlanSearch, Plan, Plan | None]:
    """(search, the plan the attempt ran, the plan the supervisor stopped it for) in one of four states."""
    if state == "none":  # no OOM degradation yet: the search is idle
        return PlanSearch(settings()), WORKING, None
    search = PlanSearch(settings())
    search.degraded(FAILED, WORKING)
    if state == "working":  # a search after an OOM, training on the working plan
        return search, WORKING, None
    search.probing, search.probes = PROBE, 1
    if state == "probing":  # the attempt ran the probe
        return search, PROBE, None
    return search, WORKING, PROBE  # "switching": the monitor stopped the working plan to start the probe


def incident(kind: str, plan: Plan, *, step: int = STEP, checkpoint: int | None = CHECKPOINT, attempt: int = 9,
             plan_after: Plan | None = None, **fields: Any) -> Incident:
    fields.setdefault("detail", f"{kind} detail")
    return Incident(kind=kind, attempt=attempt, epoch=0, step=step, plan_before=plan, plan_after=plan_after,
                    checkpoint_step=checkpoint, **fields)


def history(kind: str, plan: Plan, what: str) -> list[Incident]:
    """Incidents before this one: none, the same at the same step, the same checkpoint, or progress."""
    if what == "none":
        return []
    step, checkpoint = {"repeat": (STEP, CHECKPOINT), "stuck": (STEP - 1, CHECKPOINT), "progress": (3, 2)}[what]
    return [incident(kind, plan, step=step, checkpoint=checkpoint, attempt=1, plan_after=plan, action="restart")]


def facts(inc: Incident | None, plan: Plan, switch_to: Plan | None = None, **fields: Any) -> AttemptFacts:
    probe = fields.pop("probe", plan == PROBE)
    return AttemptFacts(attempt=9, incident=inc, probe=probe, start_step=3, step=inc.step if inc else 20,
                        checkpoint=SavedCheckpoint(step=CHECKPOINT, path="/run/checkpoints/ckpt-5"),
                        switch_to=switch_to, **fields)


def run_decide(inc: Incident | None, plan: Plan, *, policy: Policy = KEEPS, search: PlanSearch | None = None,
               earlier: list[Incident] | None = None, max_restarts: int = 10, switch_to: Plan | None = None,
               **fields: Any) -> Decision:
    return decide(facts(inc, plan, switch_to, **fields), plan, policy, search or PlanSearch(settings()),
                  earlier or [], StepContext(WORKING), RestartRules.of(max_restarts))


def search_fields(search: PlanSearch) -> dict[str, Any]:
    return dict(vars(search))


# ---------------------------------------------------------------------------------------------- the grid


def expected(kind: str, changes: bool, state: str, before: str, budget: str) -> tuple[str, str]:
    """(decision kind, what happens), as decide.py's docstring states the rules."""
    if kind == "user_error":
        return "give_up", "user_error"
    if state == "switching" and kind == "preempted":
        return "probe", "switch"
    if state == "probing" and kind in OOM:
        return ("give_up" if budget == "spent" else "probe"), "probe_failed"
    then = "degrade" if changes else "restart"
    if not changes and before == "repeat":
        return "give_up", "no_progress"
    if budget == "spent":
        return "give_up", then
    return then, then


GRID = [
    (kind, changes, state, before, budget)
    for kind in INCIDENT_KINDS
    for changes in (True, False)
    for state in ("none", "working", "probing", "switching")
    for before in ("none", "repeat", "stuck", "progress")
    for budget in ("left", "spent")
]


@pytest.mark.parametrize(("kind", "changes", "state", "before", "budget"), GRID)
def test_the_restart_rules(kind, changes, state, before, budget):
    search, plan, switch_to = make_search(state)
    untouched = copy.copy(search)
    earlier = history(kind, plan, before) if kind != "user_error" else []
    inc = incident(kind, plan)
    decision = run_decide(inc, plan, policy=CHANGES if changes else KEEPS, search=search, earlier=earlier,
                          switch_to=switch_to, max_restarts=len(earlier) if budget == "spent" else 10)
    want, what = expected(kind, changes, state, before, budget)

    assert decision.kind == want
    assert search_fields(search) == search_fields(untouched), "decide never changes the search it is given"
    events = [event for event, _ in decision.journal]

    if what == "switch":
        assert decision.incident is None, "a switch of plans is not an incident"
        assert (decision.plan, decision.wait, events) == (PROBE, 0.0, ["probe_started"])
        assert decision.search.probing == PROBE
        return
    recorded = decision.incident
    assert recorded is not None
    assert (recorded.kind, recorded.plan_before, recorded.step) == (kind, plan, STEP)
    assert recorded.action == decision.action and recorded.action
    assert events[0] == "incident" and decision.journal[0][1]["kind"] == kind
    if what == "user_error":
        assert decision.action.startswith("stop") and events == ["incident"]
        assert decision.settle is None
        return
    if what == "probe_failed":
        assert decision.plan == WORKING == recorded.plan_after
        assert events == ["incident", "probe_failed"]
        assert (decision.search.above, decision.search.probing) == (PROBE, None)
    elif what == "degrade":
        assert decision.plan == decision.settle == recorded.plan_after == plan.replace(batch_size=plan.batch_size // 2)
        assert events == ["incident", "plan_changed"]
        assert decision.action.startswith("degrade: halve_batch(")
    else:  # restart with the same plan, or give up on no progress
        assert decision.plan == plan == recorded.plan_after and decision.settle is None
        assert events == ["incident"]
    if state == "switching":
        assert decision.search.probing is None and decision.search.probes == 0, "the switch is cancelled"
    if what == "no_progress":
        assert (decision.action, decision.reason) == ("give up: no progress", NO_PROGRESS)
    elif want == "give_up":
        assert decision.reason == f"restarts exhausted (max_restarts={len(earlier)})"
    if want == "give_up":
        assert decision.wait == 0.0
    elif recorded.plan_changed or kind == "preempted":
        assert decision.wait == 0.0, "a new plan, or a polite stop: no reason to wait"
    else:
        assert decision.wait == {"none": 0.0, "stuck": 1.0, "progress": 0.0}[before]


def test_the_grid_is_hundreds_of_cases():
    assert len(GRID) == len(INCIDENT_KINDS) * 2 * 4 * 4 * 2 >= 500


# ------------------------------------------------------------------------------------------- finish


def test_a_completed_attempt_finishes_on_the_settled_plan():
    decision = run_decide(None, WORKING, settled=WORKING)
    assert (decision.kind, decision.plan, decision.incident, decision.journal) == ("finish", WORKING, None, ())
    assert decision.messages == ("attempt 9 completed after 17 steps (at step 20); the training is done",)
    assert decision.unjudged_probe is None


def test_a_run_that_completes_on_an_unjudged_probe_keeps_the_working_plan():
    search, plan, _ = make_search("probing")
    decision = run_decide(None, plan, search=search, settled=WORKING)
    assert (decision.kind, decision.plan, decision.unjudged_probe) == ("finish", WORKING, PROBE)
    (event, fields), = decision.journal
    assert event == "probe_unjudged"
    assert (fields["plan"], fields["working"]) == (PROBE.model_dump(mode="json"), WORKING.model_dump(mode="json"))
    assert decision.messages[0].startswith("attempt 9 (probe batch=48 float32 cache) completed after 17 steps")
    assert decision.messages[1] == ("the run completed on probe batch=48 float32 cache before it could be judged; "
                                    "plan.json keeps the working plan batch=32 float32 cache")
    assert decision.search.probing is None


def test_a_run_that_completes_on_a_rejected_probe_says_it_could_not_go_back():
    decision = run_decide(None, PROBE, settled=WORKING)  # the search no longer probes 48: it was judged
    assert (decision.plan, decision.unjudged_probe, decision.journal) == (WORKING, None, ())
    assert decision.messages[1] == ("the run completed on batch=48 float32 cache before it could go back to the "
                                    "working plan; plan.json keeps batch=32 float32 cache")


# ------------------------------------------------------------------------------------- targeted rules


def test_a_user_error_stops_with_its_line():
    inc = incident("user_error", WORKING, detail="ValueError: shapes", evidence={"source": "worker report"})
    decision = run_decide(inc, WORKING, report=ErrorReport(type="ValueError", message="shapes"))
    assert decision.kind == "give_up"
    assert decision.messages == ("attempt 9 ended: user_error (ValueError: shapes) after 4 steps (at step 7), "
                                 "checkpoint at step 5; not retried",)


def test_a_degradation_line_names_the_new_plan():
    decision = run_decide(incident("gpu_oom", WORKING), WORKING, policy=CHANGES)
    assert decision.messages == ("attempt 9 ended: gpu_oom (gpu_oom detail) after 4 steps (at step 7), checkpoint at "
                                 f"step 5; {decision.action}; new plan: batch=16 float32 cache",)
    changed = dict(decision.journal)["plan_changed"]
    assert (changed["from"]["batch_size"], changed["to"]["batch_size"], changed["incident"]) == (32, 16, "gpu_oom")
    assert changed["reason"] == decision.action


def test_an_oom_degradation_starts_the_search_from_its_bounds():
    decision = run_decide(incident("gpu_oom", FAILED), FAILED, policy=CHANGES)
    assert (decision.search.working, decision.search.above) == (WORKING, FAILED)
    assert decision.search.active


def test_a_degradation_of_another_kind_leaves_the_search_alone():
    decision = run_decide(incident("nan_loss", FAILED), FAILED, policy=CHANGES)
    assert decision.search.working is None and not decision.search.active


def test_the_switch_to_a_probe_journals_where_it_goes():
    search, plan, switch_to = make_search("switching")
    search.working_rate = 320.123
    decision = run_decide(incident("preempted", plan), plan, search=search, switch_to=switch_to)
    (event, fields), = decision.journal
    assert event == "probe_started"
    assert (fields["direction"], fields["working_samples_per_s"], fields["to"]["batch_size"]) == ("up", 320.12, 48)
    assert decision.messages == ("attempt 9 stopped after 4 steps (at step 7), checkpoint at step 5, to measure "
                                 "another plan: probe batch=48 float32 cache (working: batch=32 float32 cache)",)


def test_the_switch_back_from_a_rejected_probe_is_no_incident():
    search, _, _ = make_search("working")  # the probe was judged and rejected: the search no longer probes
    decision = run_decide(incident("preempted", PROBE), PROBE, search=search, switch_to=WORKING, probe=True)
    assert (decision.kind, decision.plan, decision.incident, decision.journal) == ("probe", WORKING, None, ())
    assert decision.messages[0].endswith(", to go back to the working plan batch=32 float32 cache")


def test_a_probe_that_does_not_fit_goes_back_with_its_line():
    search, plan, _ = make_search("probing")
    decision = run_decide(incident("gpu_oom", plan, detail="ResourceExhaustedError: OOM"), plan, search=search)
    assert decision.messages == ("attempt 9 (probe batch=48 float32 cache) ended: gpu_oom (ResourceExhaustedError: "
                                 "OOM) after 4 steps (at step 7), checkpoint at step 5; the probe does not fit: back "
                                 "to batch=32 float32 cache",)
    assert decision.action == "probe failed: back to batch=32 float32 cache"


def test_the_policy_sees_the_earlier_incidents_and_the_draft_incident():
    seen: list[tuple[str, int, str]] = []

    class Record(Step):
        def apply(self, plan, incident, context):
            seen.append((incident.kind, len(context.incidents), incident.action))
            return None

    earlier = history("crash", WORKING, "progress")
    run_decide(incident("crash", WORKING), WORKING, policy=Policy(ladders={"crash": [Record()]}), earlier=earlier)
    assert seen == [("crash", 1, "")]


def test_an_error_in_a_policy_step_propagates():
    class Broken(Step):
        def apply(self, plan, incident, context):
            raise RuntimeError("step bug")

    with pytest.raises(RuntimeError, match="step bug"):
        run_decide(incident("crash", WORKING), WORKING, policy=Policy(ladders={"crash": [Broken()]}))


def test_no_progress_needs_the_same_step_and_kind():
    earlier = [incident("hang", WORKING, plan_after=WORKING, action="restart")]
    assert run_decide(incident("crash", WORKING), WORKING, earlier=earlier).kind == "restart"
    assert run_decide(incident("hang", WORKING), WORKING, earlier=earlier).kind == "give_up"


def startup_kill(checkpoint: int | None, attempt: int) -> Incident:
    """A kill while the worker started (before its Hello, so recorded at step 0), resuming from ``checkpoint``."""
    return incident("killed", WORKING, step=0, checkpoint=checkpoint, attempt=attempt, evidence={"phase": "import"})


def decide_in_turn(incidents: list[Incident], max_restarts: int = 10) -> list[Decision]:
    """Each incident decided after the ones before it, as the loop records them (with their actions)."""
    decisions, recorded = [], []
    for inc in incidents:
        decision = run_decide(inc, WORKING, earlier=list(recorded), max_restarts=max_restarts)
        decisions.append(decision)
        recorded.append(decision.incident)
    return decisions


def test_a_startup_kill_after_a_newer_checkpoint_is_progress():
    # The sequence: start-up kill, kill at step 30 after a newer checkpoint, start-up kill again.
    kill_at_30 = incident("killed", WORKING, step=30, checkpoint=30, attempt=1)
    decisions = decide_in_turn([startup_kill(None, 0), kill_at_30, startup_kill(30, 2)])
    assert [d.kind for d in decisions] == ["restart"] * 3
    assert decisions[-1].action == "restart with the same plan" and decisions[-1].reason == ""


def test_a_newer_checkpoint_is_progress_unless_the_run_fails_again_short_of_it():
    earlier = [incident("crash", WORKING, step=7, checkpoint=5, plan_after=WORKING, action="restart")]
    # Resumed from 6 and failed at 7 again: the failure is where it was, the run got no further.
    assert run_decide(incident("crash", WORKING, step=7, checkpoint=6), WORKING, earlier=earlier).kind == "give_up"
    assert run_decide(incident("crash", WORKING, step=9, checkpoint=6), WORKING, earlier=earlier).kind == "restart"
    assert run_decide(startup_kill(6, 1), WORKING, earlier=[startup_kill(5, 0)]).kind == "restart"


def test_the_same_incident_point_and_checkpoint_twice_is_no_progress():
    decisions = decide_in_turn([startup_kill(None, 0), incident("killed", WORKING, step=30, checkpoint=30),
                                startup_kill(30, 2), startup_kill(30, 3)])
    assert [d.kind for d in decisions] == ["restart", "restart", "restart", "give_up"]
    assert (decisions[-1].action, decisions[-1].reason) == ("give up: no progress", NO_PROGRESS)


def test_checkpoints_that_advance_short_of_the_same_failure_are_no_progress():
    # A worker whose memory sits near its limit: each attempt writes a memory-pressure checkpoint a step after
    # it resumed and is OOM-killed at the same epoch end. The checkpoints advance, the run gets no further.
    earlier = [incident("host_oom", WORKING, step=256, checkpoint=148, plan_after=WORKING)]
    decision = run_decide(incident("host_oom", WORKING, step=256, checkpoint=149), WORKING, earlier=earlier)
    assert (decision.kind, decision.reason) == ("give_up", NO_PROGRESS)
    # A checkpoint past the earlier failure's step is progress, whatever fails next at that step.
    earlier = [incident("host_oom", WORKING, step=256, checkpoint=148, plan_after=WORKING)]
    assert run_decide(incident("host_oom", WORKING, step=256, checkpoint=256), WORKING, earlier=earlier).kind == "give_up"
    assert run_decide(incident("host_oom", WORKING, step=300, checkpoint=257), WORKING, earlier=earlier).kind == "restart"


def test_a_checkpoint_that_moved_in_between_breaks_the_repeat():
    # 7 from checkpoint 5, then 9 from checkpoint 6, then 7 from checkpoint 5 again (6 was found damaged):
    # something changed since the first, so the third is no repeat of it.
    earlier = [incident("crash", WORKING, step=7, checkpoint=5, plan_after=WORKING),
               incident("crash", WORKING, step=9, checkpoint=6, plan_after=WORKING)]
    assert run_decide(incident("crash", WORKING, step=7, checkpoint=5), WORKING, earlier=earlier).kind == "restart"


def test_a_repeat_needs_the_same_startup_phase_and_plan():
    first_step = incident("hang", WORKING, step=0, checkpoint=None, evidence={"phase": "first_step"})
    import_hang = incident("hang", WORKING, step=0, checkpoint=None, evidence={"phase": "import"}, plan_after=WORKING)
    assert run_decide(first_step, WORKING, earlier=[import_hang]).kind == "restart"
    probe_ran = incident("hang", PROBE, step=0, checkpoint=None, evidence={"phase": "first_step"}, plan_after=PROBE)
    assert run_decide(first_step, WORKING, earlier=[probe_ran]).kind == "restart"
    assert run_decide(first_step, WORKING, earlier=[probe_ran.model_copy(update={"plan_before": WORKING,
                                                                                 "plan_after": WORKING})]).kind == "give_up"


def test_an_earlier_plan_change_at_the_same_step_is_not_a_repeat():
    earlier = [incident("gpu_oom", FAILED, plan_after=WORKING, action="degrade")]
    assert run_decide(incident("gpu_oom", WORKING), WORKING, earlier=earlier).kind == "restart"


def test_max_restarts_counts_incidents_only():
    earlier = [incident("crash", WORKING, step=s, checkpoint=s, plan_after=WORKING) for s in (1, 2)]
    assert run_decide(incident("crash", WORKING, step=3, checkpoint=3), WORKING, earlier=earlier,
                      max_restarts=3).kind == "restart"
    spent = run_decide(incident("crash", WORKING, step=3, checkpoint=3), WORKING, earlier=earlier, max_restarts=2)
    assert (spent.kind, spent.reason) == ("give_up", "restarts exhausted (max_restarts=2)")
    assert spent.incident is not None and spent.incident.action == "restart with the same plan"


def test_a_give_up_after_a_degradation_still_settles_the_new_plan():
    decision = run_decide(incident("gpu_oom", WORKING), WORKING, policy=CHANGES, max_restarts=0)
    assert (decision.kind, decision.settle) == ("give_up", Plan(batch_size=16))


# -------------------------------------------------------------------------------- tenacity strategies


def crashes(checkpoints: list[int | None], plan: Plan = WORKING) -> list[Incident]:
    return [incident("crash", plan, step=10 + i, checkpoint=c, attempt=i, plan_after=plan)
            for i, c in enumerate(checkpoints)]


@pytest.mark.parametrize(("n", "seconds"), [(1, 0.0), (2, 1.0), (3, 2.0), (4, 4.0), (7, 32.0), (8, 60.0), (12, 60.0)])
def test_the_backoff_doubles_up_to_its_maximum(n, seconds):
    assert RestartRules.of(100).wait_after(crashes([4] * n)) == seconds


def test_the_backoff_has_its_own_base_and_maximum():
    rules = RestartRules.of(100, backoff_base=0.5, backoff_max=3.0)
    assert [rules.wait_after(crashes([None] * n)) for n in (1, 2, 3, 4, 5)] == [0.0, 0.5, 1.0, 2.0, 3.0]


def test_repeats_stop_at_a_plan_change_a_preemption_or_progress():
    assert repeats_without_progress(crashes([4, 4, 4])) == 3
    assert repeats_without_progress(crashes([2, 4, 4])) == 2
    changed = incident("gpu_oom", FAILED, plan_after=WORKING)
    assert repeats_without_progress([changed, *crashes([4, 4])]) == 2
    assert repeats_without_progress([*crashes([4]), incident("preempted", WORKING), *crashes([4])]) == 1


def test_the_rules_are_tenacity_strategies_over_a_real_retry_state():
    rules = RestartRules.of(2)
    assert isinstance(rules.stop, tenacity.stop.stop_any)
    assert isinstance(rules.wait, wait_repeats_exponential)
    state = rules.record(crashes([1, 2]))
    assert isinstance(state, tenacity.RetryCallState)
    assert state.attempt_number == 2 and len(state.outcome.result()) == 2
    assert not rules.stop(state)
    assert rules.stop(rules.record(crashes([1, 2, 3])))
    assert stop_without_progress()(rules.record([*crashes([1]), incident("crash", WORKING, step=10, checkpoint=1,
                                                                        plan_after=WORKING)]))


def test_decisions_are_frozen():
    decision = run_decide(incident("crash", WORKING), WORKING)
    with pytest.raises(dataclasses.FrozenInstanceError):
        decision.wait = 3.0  # type: ignore[misc]


# ------------------------------------------------------------------------------------------- disk full


def disk(free: int | None, checkpoint_bytes: int = 3 << 20) -> DiskSpace:
    return DiskSpace(path="/mnt/runs/a", mount="/mnt/runs", free=free, checkpoint_bytes=checkpoint_bytes)


def test_a_disk_still_too_full_for_a_checkpoint_stops_with_the_figures():
    inc = incident("disk_full", WORKING, detail="OSError: [Errno 28] No space left on device",
                   evidence={"source": "worker report"})
    decision = run_decide(inc, WORKING, disk=disk(12 << 10))
    assert decision.kind == "give_up" and decision.wait == 0.0 and decision.settle is None
    assert decision.reason == ("disk full: 12.0 KiB free on /mnt/runs (the file system of run_dir /mnt/runs/a); the "
                               "next checkpoint needs about 3.0 MiB plus 16.0 MiB for logs")
    assert decision.incident.action == decision.action == "stop: the disk is still full; free space and call fit again to resume"
    assert decision.incident.evidence == {"source": "worker report", "path": "/mnt/runs/a", "mount": "/mnt/runs",
                                          "free_bytes": 12 << 10, "needed_bytes": (3 << 20) + DISK_MARGIN}
    assert [event for event, _ in decision.journal] == ["incident"]
    assert decision.messages == ("attempt 9 ended: disk_full (OSError: [Errno 28] No space left on device) after 4 "
                                 "steps (at step 7), checkpoint at step 5; not restarted: " + disk(12 << 10).text(),)


@pytest.mark.parametrize("free", [None, (3 << 20) + DISK_MARGIN, 1 << 40])
def test_a_disk_full_incident_with_the_space_back_restarts(free):
    decision = run_decide(incident("disk_full", WORKING), WORKING, disk=disk(free))
    assert decision.kind == "restart" and decision.incident.action == "restart with the same plan"
    assert decision.wait == 0.0  # a first failure


def test_no_retry_loop_on_a_disk_that_fills_again_at_the_same_step():
    earlier = history("disk_full", WORKING, "repeat")
    decision = run_decide(incident("disk_full", WORKING), WORKING, earlier=earlier, disk=disk(1 << 40))
    assert (decision.kind, decision.reason) == ("give_up", NO_PROGRESS)


def test_the_space_a_run_needs_is_one_checkpoint_and_a_margin():
    assert disk(None).short is False  # not measured: no reason to stop
    assert disk((3 << 20) + DISK_MARGIN - 1).short and not disk((3 << 20) + DISK_MARGIN).short
    assert "at least 16.0 MiB for its first checkpoint" in disk(0, checkpoint_bytes=0).text()
    assert disk(0).advice().startswith("free at least 19.0 MiB on /mnt/runs")
    assert "call fit again with run_dir='/mnt/runs/a': it resumes from the last checkpoint" in disk(0).advice()
