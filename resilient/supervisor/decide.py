"""What happens after an attempt: a pure function from what is known to a ``Decision``.

``decide`` reads the attempt's classified incident (``AttemptFacts``), the plan in force, the
policy, the plan search, the incidents of this call, the step context and the restart rules, and
changes none of them. The loop executes the decision: it records ``incident``, journals
``journal``, writes ``settle`` to plan.json, says ``messages``, then finishes, gives up, or waits
``wait`` seconds and starts the next attempt with ``plan``. Rules, first match wins:

1. the attempt completed the training: ``finish``. A probe still running was never judged, so
   plan.json keeps the settled plan (``unjudged_probe``);
2. ``user_error``: ``give_up`` at once, not retried; ``disk_full`` while the run's file system still
   lacks the space for another checkpoint (``facts.disk``, disk.py): ``give_up`` rather than a retry
   loop (with the space back it is treated as any other kind, below);
3. the supervisor stopped a healthy worker to switch plans and it stopped politely (``preempted``):
   ``probe``, which is not an incident. A worker that ended otherwise cancels the switch;
4. a probe ran out of memory: it bounds the search from above; ``probe`` back to the working plan;
5. otherwise the policy's ladder for the kind: its first rung that changes the plan gives
   ``degrade``, none gives ``restart`` with the same plan.

Rules 4 and 5 end in the restart rules (``RestartRules``, tenacity's strategies): ``give_up`` once
the incidents of this call exceed ``max_restarts`` (probe restarts are free), or when there was no
progress: the incident repeats an earlier one at the same point (kind, step and start-up phase),
and nothing changed since (the plan, and no checkpoint advanced in between, or only short of the
step that failed; ``repeats_without_change``). A start-up incident before a newer checkpoint is no repeat of
one after it, whatever step it is recorded at. Else the wait before the restart: nothing after a
plan change, a preemption or a first failure, exponential backoff while failures repeat without a new
checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import tenacity

from .._incident import Incident
from .._plan import Plan
from .._protocol import ErrorReport
from ..policy.policy import Policy, StepContext
from ..policy.search import PlanSearch
from .disk import DiskSpace
from .report import SavedCheckpoint, saved_text

DecisionKind = Literal["finish", "give_up", "degrade", "probe", "restart"]
#: A journal event to write: (event name, fields).
JournalEntry = tuple[str, dict[str, Any]]

OOM_KINDS = ("gpu_oom", "host_oom")
NO_PROGRESS = ("no progress: the same incident at the same step from the same checkpoint twice, with no rung "
               "left to apply")


@dataclass(frozen=True)
class AttemptFacts:
    """A finished attempt, classified: what ``decide`` reads."""

    attempt: int
    #: What ended it, classified, with no action or plan_after yet; None: it completed the training.
    incident: Incident | None
    probe: bool = False  # the attempt started on a probe of the plan search
    start_step: int | None = None  # the global step it started from (None: it never said hello)
    step: int | None = None  # the global step it reached
    checkpoint: SavedCheckpoint | None = None  # the newest checkpoint: the next attempt resumes there
    switch_to: Plan | None = None  # the supervisor stopped the worker to switch to this plan
    report: ErrorReport | None = None  # the worker's error report
    settled: Plan | None = None  # plan.json after the attempt (None: the plan in force)
    disk: DiskSpace | None = None  # after a disk_full incident: the free space measured


@dataclass(frozen=True)
class Decision:
    """What the loop does next, and what it records first."""

    kind: DecisionKind
    #: The next attempt's plan; at ``finish``, the settled plan the run ends with.
    plan: Plan
    #: The plan search after this decision (decide works on a copy).
    search: PlanSearch
    action: str = ""
    incident: Incident | None = None  # the incident to record (with its action and plan_after)
    journal: tuple[JournalEntry, ...] = ()  # written after the incident, in order
    settle: Plan | None = None  # the new plan.json (a new VM resumes with it)
    wait: float = 0.0  # seconds before the next attempt
    messages: tuple[str, ...] = ()  # console lines
    reason: str = ""  # give_up: why, for the root-cause report
    unjudged_probe: Plan | None = None  # finish: the run completed on this probe before it was judged


# ----------------------------------------------------------------------------------- restart rules


def same_point(a: Incident, b: Incident) -> bool:
    """The same kind at the same step, in the same start-up phase (``evidence["phase"]``) if any."""
    return a.kind == b.kind and a.step == b.step and a.evidence.get("phase") == b.evidence.get("phase")


def repeats_without_change(incident: Incident, earlier: Sequence[Incident]) -> bool:
    """No progress: ``incident`` repeats an earlier one at the same point, and nothing changed since:
    neither changed the plan, every incident in between ran the same plan, and the checkpoint either
    stayed where it was or only advanced short of the earlier failure's step (``short_of``: checkpoints
    written on the way to the same failure, as memory-pressure checkpoints are, get the run no further)."""
    if incident.plan_changed:
        return False
    for inc in reversed(earlier):
        if inc.plan_changed or inc.plan_before != incident.plan_before:
            return False  # something changed since: walking further back cannot find a repeat
        if inc.checkpoint_step != incident.checkpoint_step and not short_of(inc, incident):
            return False
        if same_point(inc, incident):
            return True
    return False


def short_of(earlier: Incident, incident: Incident) -> bool:
    """The checkpoint advanced since ``earlier`` but not past the step ``earlier`` failed at."""
    before, now = earlier.checkpoint_step, incident.checkpoint_step
    return now is not None and (before is None or now > before) and now <= earlier.step


def repeats_without_progress(incidents: Sequence[Incident]) -> int:
    """Failures in a row, newest back, with the same plan and no newer checkpoint between them."""
    repeats = 0
    previous_ckpt: int | None = None
    for inc in reversed(incidents):
        if inc.plan_changed or inc.kind == "preempted":
            break
        if previous_ckpt is not None and (inc.checkpoint_step or -1) < previous_ckpt:
            break
        previous_ckpt = inc.checkpoint_step or -1
        repeats += 1
    return repeats


def _incidents(retry_state: tenacity.RetryCallState) -> tuple[Incident, ...]:
    assert retry_state.outcome is not None
    incidents: tuple[Incident, ...] = retry_state.outcome.result()
    return incidents


class stop_without_progress(tenacity.stop.stop_base):
    """Stop when the last incident repeats an earlier one with nothing changed (``repeats_without_change``)."""

    def __call__(self, retry_state: tenacity.RetryCallState) -> bool:
        *earlier, last = _incidents(retry_state)
        return repeats_without_change(last, earlier)


class wait_repeats_exponential(tenacity.wait.wait_base):
    """``base * 2 ** (n - 2)`` seconds up to ``maximum``, n >= 2 the failures in a row without progress;
    nothing after a first failure (the restart is the cure; a warm standby worker makes it cost about a
    second), after a plan change (a new plan is its own reason to try) or a preemption (a polite stop)."""

    def __init__(self, base: float = 1.0, maximum: float = 60.0) -> None:
        self.base = base
        self.maximum = maximum

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        incidents = _incidents(retry_state)
        last = incidents[-1]
        if last.plan_changed or last.kind == "preempted":
            return 0.0
        repeats = repeats_without_progress(incidents)
        if repeats <= 1:
            return 0.0
        return float(min(self.maximum, self.base * 2 ** (repeats - 2)))


@dataclass(frozen=True)
class RestartRules:
    """When to stop restarting and how long to wait, as tenacity strategies over the incidents of a call."""

    max_restarts: int
    stop: tenacity.stop.stop_base
    wait: tenacity.wait.wait_base

    @classmethod
    def of(cls, max_restarts: int, backoff_base: float = 1.0, backoff_max: float = 60.0) -> RestartRules:
        # One attempt of the retried call per incident, so max_restarts restarts allow max_restarts + 1.
        return cls(max_restarts=max_restarts,
                   stop=tenacity.stop_after_attempt(max_restarts + 1) | stop_without_progress(),
                   wait=wait_repeats_exponential(backoff_base, backoff_max))

    def record(self, incidents: Sequence[Incident]) -> tenacity.RetryCallState:
        """The incidents as tenacity's record of a retried call: attempt n ended with incident n, and
        the last outcome holds them all (the strategies above read it)."""
        state = tenacity.RetryCallState(tenacity.Retrying(stop=self.stop, wait=self.wait), None, (), {})
        state.attempt_number = len(incidents)
        state.set_result(tuple(incidents))
        return state

    def gives_up(self, incidents: Sequence[Incident]) -> bool:
        return bool(self.stop(self.record(incidents)))

    def wait_after(self, incidents: Sequence[Incident]) -> float:
        return float(self.wait(self.record(incidents)))


# ------------------------------------------------------------------------------------------ decide


def decide(facts: AttemptFacts, plan: Plan, policy: Policy, search: PlanSearch, incidents: Sequence[Incident],
           context: StepContext, rules: RestartRules) -> Decision:
    """What to do after the attempt of ``facts``, which ran ``plan`` (see the module docstring)."""
    search = copy.copy(search)  # its fields are immutable values: a shallow copy leaves the caller's untouched
    incident = facts.incident
    if incident is None:
        return _finish(facts, plan, search)
    if incident.kind == "user_error":
        action = "stop: the training code raised an error; not retried"
        incident = incident.model_copy(update={"action": action})
        return Decision("give_up", plan, search, action=action, incident=incident, journal=(incident_entry(incident),),
                        messages=(_ended(facts, plan, incident, "not retried"),),
                        reason="the training code raised an error")
    if incident.kind == "disk_full" and facts.disk is not None and facts.disk.short:
        return _disk_still_full(facts, plan, incident, search)
    if facts.switch_to is not None:
        if incident.kind == "preempted":
            return _switch(facts, plan, facts.switch_to, search)
        search.cancel()  # the worker ended otherwise before the switch
    if search.probing == plan and incident.kind in OOM_KINDS and search.working is not None:
        return _probe_failed(facts, plan, incident, search, incidents, rules)
    return _react(facts, plan, incident, policy, search, incidents, context, rules)


def _finish(facts: AttemptFacts, plan: Plan, search: PlanSearch) -> Decision:
    """The run completed. plan.json keeps the settled plan: a probe that trained to the end was never
    measured, and one that was rejected (its stop came too late) is slower."""
    unjudged = search.finished(plan)
    settled = facts.settled or plan
    messages = [f"{attempt_label(facts, plan)} completed {progress_text(facts, saved=False)}; the training is done"]
    journal: list[JournalEntry] = []
    unjudged_probe = None
    if plan != settled and unjudged:
        journal.append(("probe_unjudged", {"attempt": facts.attempt, "plan": plan.model_dump(mode="json"),
                                           "working": settled.model_dump(mode="json"),
                                           "reason": "the run completed before the probe could be measured"}))
        messages.append(f"the run completed on probe {plan.describe()} before it could be judged; plan.json "
                        f"keeps the working plan {settled.describe()}")
        unjudged_probe = plan
    elif plan != settled:
        messages.append(f"the run completed on {plan.describe()} before it could go back to the working plan; "
                        f"plan.json keeps {settled.describe()}")
    return Decision("finish", settled, search, action="finish", journal=tuple(journal), messages=tuple(messages),
                    unjudged_probe=unjudged_probe)


def _disk_still_full(facts: AttemptFacts, plan: Plan, incident: Incident, search: PlanSearch) -> Decision:
    """The disk is still too full for another checkpoint: stop, say how much is free and what to do."""
    disk = facts.disk
    assert disk is not None
    action = "stop: the disk is still full; free space and call fit again to resume"
    evidence = {**incident.evidence, "path": disk.path, "mount": disk.mount, "free_bytes": disk.free,
                "needed_bytes": disk.needed}
    incident = incident.model_copy(update={"action": action, "evidence": evidence})
    return Decision("give_up", plan, search, action=action, incident=incident, journal=(incident_entry(incident),),
                    messages=(_ended(facts, plan, incident, f"not restarted: {disk.text()}"),),
                    reason=f"disk full: {disk.text()}")


def _switch(facts: AttemptFacts, plan: Plan, switch_to: Plan, search: PlanSearch) -> Decision:
    """Not an incident: we stopped a healthy worker to try another plan, or to leave a rejected probe."""
    stopped = f"{attempt_label(facts, plan)} stopped {progress_text(facts)}"
    if switch_to != search.probing:
        return Decision("probe", switch_to, search, action=f"back to {switch_to.describe()}",
                        messages=(f"{stopped}, to go back to the working plan {switch_to.describe()}",))
    working = search.working
    started = {"attempt": facts.attempt, "from": plan.model_dump(mode="json"), "to": switch_to.model_dump(mode="json"),
               "direction": "up" if switch_to.batch_size > plan.batch_size else "down",
               "working": working.model_dump(mode="json") if working else None,
               "working_samples_per_s": round(search.working_rate, 2) if search.working_rate else None}
    message = (f"{stopped}, to measure another plan: probe {switch_to.describe()} "
               f"(working: {working.describe() if working else '-'})")
    return Decision("probe", switch_to, search, action=f"probe {switch_to.describe()}",
                    journal=(("probe_started", started),), messages=(message,))


def _probe_failed(facts: AttemptFacts, plan: Plan, incident: Incident, search: PlanSearch,
                  incidents: Sequence[Incident], rules: RestartRules) -> Decision:
    """The probe did not fit: it becomes the new upper bound; back to the plan that works."""
    working = search.probe_oom(plan)
    action = f"probe failed: back to {working.describe()}"
    incident = incident.model_copy(update={"action": action, "plan_after": working})
    failed = ("probe_failed", {"attempt": facts.attempt, "plan": plan.model_dump(mode="json"),
                               "back_to": working.model_dump(mode="json")})
    decision = Decision("probe", working, search, action=action, incident=incident,
                        journal=(incident_entry(incident), failed),
                        messages=(_ended(facts, plan, incident, f"the probe does not fit: back to {working.describe()}"),))
    return _restart_or_give_up(decision, incidents, rules)


def _react(facts: AttemptFacts, plan: Plan, incident: Incident, policy: Policy, search: PlanSearch,
           incidents: Sequence[Incident], context: StepContext, rules: RestartRules) -> Decision:
    """The policy's answer to the incident: the first rung of its ladder that changes the plan, or the same plan."""
    degraded = policy.degrade(plan, incident, dataclasses.replace(context, incidents=tuple(incidents)))
    new_plan, action = (degraded[0], f"degrade: {degraded[1]}") if degraded else (plan, "restart with the same plan")
    incident = incident.model_copy(update={"action": action, "plan_after": new_plan})
    if repeats_without_change(incident, incidents):
        action = "give up: no progress"
        incident = incident.model_copy(update={"action": action})
    journal = [incident_entry(incident)]
    if incident.kind in OOM_KINDS and new_plan.batch_size < plan.batch_size:
        search.degraded(plan, new_plan)  # bounds for finding the best batch that fits
    if new_plan != plan:
        journal.append(("plan_changed", {"from": plan.model_dump(mode="json"), "to": new_plan.model_dump(mode="json"),
                                         "reason": action, "incident": incident.kind}))
    message = _ended(facts, plan, incident, action)
    if incident.plan_changed:
        message += f"; new plan: {new_plan.describe()}"
    decision = Decision("degrade" if new_plan != plan else "restart", new_plan, search, action=action,
                        incident=incident, journal=tuple(journal), settle=new_plan if new_plan != plan else None,
                        messages=(message,))
    return _restart_or_give_up(decision, incidents, rules)


def _restart_or_give_up(decision: Decision, earlier: Sequence[Incident], rules: RestartRules) -> Decision:
    assert decision.incident is not None
    incidents = (*earlier, decision.incident)
    if rules.gives_up(incidents):
        reason = (NO_PROGRESS if repeats_without_change(decision.incident, earlier)
                  else f"restarts exhausted (max_restarts={rules.max_restarts})")
        return dataclasses.replace(decision, kind="give_up", reason=reason)
    return dataclasses.replace(decision, wait=rules.wait_after(incidents))


# ------------------------------------------------------------------------------------------- texts


def incident_entry(incident: Incident) -> JournalEntry:
    """The ``incident`` journal event: the incident's fields, its plans as JSON."""
    fields = incident.model_dump(mode="json", exclude={"plan_before", "plan_after"})
    fields["plan_before"] = incident.plan_before.model_dump(mode="json")
    fields["plan_after"] = incident.plan_after.model_dump(mode="json") if incident.plan_after else None
    return "incident", fields


def attempt_label(facts: AttemptFacts, plan: Plan) -> str:
    """``attempt 3``, or ``attempt 3 (probe batch=16 float32 cache)``."""
    return f"attempt {facts.attempt}" + (f" (probe {plan.describe()})" if facts.probe else "")


def progress_text(facts: AttemptFacts, saved: bool = True) -> str:
    """How far an attempt got, for its console line: "after 40 steps (at step 120), checkpoint at step 80"."""
    if facts.start_step is None or facts.step is None:
        trained = "before its first step"
    else:
        n = max(0, facts.step - facts.start_step)
        trained = f"after {n} step{'' if n == 1 else 's'} (at step {facts.step})"
    return f"{trained}, {saved_text(facts.checkpoint)}" if saved else trained


def _ended(facts: AttemptFacts, plan: Plan, incident: Incident, what_next: str) -> str:
    return (f"{attempt_label(facts, plan)} ended: {incident.kind} ({incident.detail}) {progress_text(facts)}; "
            f"{what_next}")
