"""The search for the best batch size after an OOM degradation (pure; the supervisor drives it).

Halving after an OOM leaves the batch anywhere between half of what fits and what fits, and the
largest batch that fits is not always the fastest: on CPUs, and on GPUs close to their memory limit,
a smaller micro-batch with more gradient accumulation can train more samples per second. So once a
plan has trained ``stable_steps`` steps the supervisor reports its measured throughput here, and
the search answers with the next plan to try, or with nothing (keep training as is).

The search keeps a working plan (fits, measured) and two bounds on the batch size: ``above`` (failed
with an OOM, or measured slower) and ``below`` (measured slower). Candidates, in order:

1. up: bisect between ``working`` and ``above`` (``next_probe``), toward the batch that was asked;
2. down (objective "throughput" only, once ``working`` has been measured): a smaller micro-batch
   with the same effective batch (``probe_below``).

A probe that holds for ``stable_steps`` is judged on its throughput (``ProbeSettings``): kept, it
becomes the working plan and the plan it replaced becomes a bound; rejected, it becomes a bound
itself and the run goes back to the working plan. A probe that runs out of memory becomes ``above``.
Every probe counts toward ``max_probes``, so a run restarts at most ``2 * max_probes`` times for probing.

A probe starts only if it can be judged before the run ends (``Horizon``, ``can_judge``): the steps
left in the run, counted in the probe's steps, must cover its warm-up and its measurement
(``stable_steps``, and ``measure_seconds`` of training at the step time estimated from the plan in
force). Otherwise the search journals ``probe_skipped`` and the run finishes on the working plan. A
probe still running when the run completes was never judged: it is not settled (``finished``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .._plan import Plan
from .policy import ProbeSettings

# ------------------------------------------------------------------------------------------- bisection


def next_probe(working: Plan, failed: Plan) -> Plan | None:
    """The plan to try between a working batch size and a failed one (bisection), or None.

    Only the batch size is probed; every other knob stays as in ``working``. When ``working``
    accumulates gradients, the probe keeps its effective batch exactly (batch * accumulation), so
    only divisors of that effective batch are candidates. None when the gap is small
    (``failed - working <= max(1, working // 8)``) or no candidate lies strictly between.

    ``PlanSearch`` uses it for the probe up (``failed``: the smallest batch known to
    fail or to be slower) and ``probe_below`` for the probe down.
    """
    low, high = working.batch_size, failed.batch_size
    if high - low <= max(1, low // 8):
        return None
    middle = (low + high) // 2
    if working.grad_accum_steps == 1:
        return working.replace(batch_size=middle)
    effective = working.effective_batch
    candidates = [batch for batch in range(low + 1, high) if effective % batch == 0]
    if not candidates:
        return None
    batch = min(candidates, key=lambda b: (abs(b - middle), -b))
    return working.replace(batch_size=batch, grad_accum_steps=effective // batch)


def probe_below(working: Plan, below: Plan | None, min_batch: int) -> Plan | None:
    """A smaller micro-batch with the same effective batch (more accumulation), or None.

    The effective batch (batch * accumulation) is kept exactly, so the training's math does not
    change, and only divisors of it are candidates. Without a lower bound the candidate is the
    largest divisor at or below half the working batch; with one (``below``: measured slower), the
    divisor nearest the middle, strictly between. Never below ``min_batch``; None when the gap is
    small (``working - below <= max(1, below // 8)``) or no divisor qualifies.
    """
    effective = working.effective_batch
    floor = max(min_batch, below.batch_size + 1 if below is not None else 1)
    if below is None:
        candidates = [b for b in range(floor, working.batch_size // 2 + 1) if effective % b == 0]
        target = working.batch_size // 2
    else:
        if working.batch_size - below.batch_size <= max(1, below.batch_size // 8):
            return None
        candidates = [b for b in range(floor, working.batch_size) if effective % b == 0]
        target = (below.batch_size + working.batch_size) // 2
    if not candidates:
        return None
    batch = min(candidates, key=lambda b: (abs(b - target), -b))
    return working.replace(batch_size=batch, grad_accum_steps=effective // batch)


# ---------------------------------------------------------------------------------------------- search


@dataclass
class Verdict:
    """What the search decided at a stable point: journal ``events``, then restart with ``switch_to``."""

    switch_to: Plan | None = None  # None: keep training with the plan in force
    settle: Plan | None = None  # a new settled plan (plan.json) when a probe was kept
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    message: str | None = None


def _rate(value: float | None) -> float | None:
    return round(value, 2) if value is not None else None


#: Heartbeats are throttled (one per 0.25 s), so a measurement window opens up to one interval after
#: the warm-up and is read up to one interval after it covers ``measure_seconds``.
HEARTBEAT_SLACK_SECONDS = 0.5


@dataclass(frozen=True)
class Horizon:
    """How much of the run is left, seen from the plan in force when the search decides."""

    steps_left: int  # training steps left in the run under the plan in force
    step_seconds: float | None = None  # that plan's measured seconds per step (None: not measured)
    per_batch: bool = True  # a step is one batch of plan.batch_size samples (False: a PyDataset's own batches)

    def seen_from(self, plan: Plan, other: Plan) -> Horizon:
        """The same horizon in ``other``'s steps, assuming the same samples per second."""
        if not self.per_batch or other.batch_size == plan.batch_size:
            return self
        ratio = other.batch_size / plan.batch_size  # samples per step, other over plan
        seconds = self.step_seconds * ratio if self.step_seconds is not None else None
        return Horizon(steps_left=int(self.steps_left / ratio), step_seconds=seconds, per_batch=True)


def steps_to_judge(settings: ProbeSettings, step_seconds: float | None) -> int:
    """Steps a plan trains before the supervisor can judge it: ``stable_steps``, and the warm-up plus
    ``measure_seconds`` of training at ``step_seconds`` (a plan with no measured step time is judged
    at ``stable_steps``, unmeasured)."""
    needed = settings.stable_steps
    if step_seconds is not None and step_seconds > 0:
        # Rounded first, so that a step time measured a hair off (0.0199999 s) counts as what it is.
        measure = math.ceil(round((settings.measure_seconds + HEARTBEAT_SLACK_SECONDS) / step_seconds, 6))
        needed = max(needed, settings.warmup_steps() + measure)
    return needed


def can_judge(settings: ProbeSettings, plan: Plan, probe: Plan, horizon: Horizon | None) -> str | None:
    """None when ``probe``, started now from ``plan``, can be judged before the run ends; else why not.
    An unknown horizon (None) never holds a probe back."""
    if horizon is None:
        return None
    seen = horizon.seen_from(plan, probe)
    needed = steps_to_judge(settings, seen.step_seconds)
    if seen.steps_left >= needed:
        return None
    how = f"stable_steps={settings.stable_steps}"
    if seen.step_seconds:
        how += (f", or a warm-up of {settings.warmup_steps()} and {settings.measure_seconds:g}s of measurement "
                f"at about {seen.step_seconds:.3g}s a step")
    return f"{seen.steps_left} steps left in the run, fewer than the {needed} it needs to be judged ({how})"


class PlanSearch:
    """Bounds and measurements of the search; one per run (probes are counted across searches)."""

    def __init__(self, settings: ProbeSettings) -> None:
        self.settings = settings
        self.working: Plan | None = None
        self.working_rate: float | None = None
        self.above: Plan | None = None
        self.below: Plan | None = None
        self.probing: Plan | None = None  # the probe chosen or running
        self.probes = 0
        self._horizon: tuple[Plan, Horizon | None] | None = None  # (plan in force, horizon) of the last stable point

    @property
    def active(self) -> bool:
        return self.settings.enabled and self.working is not None and self.above is not None

    def degraded(self, failed: Plan, working: Plan) -> None:
        """An OOM lowered the batch from ``failed`` to ``working``: start from these bounds."""
        self.working, self.working_rate = working, None
        self.above, self.below, self.probing = failed, None, None

    def stable(self, plan: Plan, samples_per_s: float | None, horizon: Horizon | None = None) -> Verdict:
        """``plan`` trained ``stable_steps`` steps at ``samples_per_s`` (None: not measured); ``horizon``:
        what is left of the run (None: unknown), so that no probe starts that could not be judged."""
        if not self.active:
            return Verdict()
        self._horizon = (plan, horizon)
        if self.probing is not None and plan == self.probing:
            return self._judge(plan, samples_per_s)
        self.probing = None
        if plan != self.working:
            self._adopt(plan)
            if not self.active:
                return Verdict()
        self.working_rate = samples_per_s if samples_per_s is not None else self.working_rate
        return self._next(Verdict())

    def probe_oom(self, plan: Plan) -> Plan:
        """The probe ran out of memory: it bounds the search from above; back to the working plan."""
        assert self.working is not None
        self.above, self.probing = plan, None
        return self.working

    def cancel(self) -> None:
        """The probe chosen was never started (the worker ended otherwise)."""
        if self.probing is not None:
            self.probing = None
            self.probes -= 1

    def finished(self, plan: Plan) -> bool:
        """The run ended on ``plan``; True when that was a probe never judged (it is not settled: the
        working plan stays the plan a new run resumes from)."""
        unjudged = self.probing is not None and plan == self.probing
        self.probing = None
        return unjudged

    # ------------------------------------------------------------------ internals

    def _adopt(self, plan: Plan) -> None:
        """Another rung changed the plan (say a lower learning rate after a NaN): the bounds keep their
        batch sizes and take the plan's other knobs; a bound the new batch has crossed is dropped."""

        def like(bound: Plan | None) -> Plan | None:
            if bound is None:
                return None
            return plan.replace(batch_size=bound.batch_size, grad_accum_steps=bound.grad_accum_steps)

        above, below = like(self.above), like(self.below)
        self.above = above if above is not None and above.batch_size > plan.batch_size else None
        self.below = below if below is not None and below.batch_size < plan.batch_size else None
        self.working, self.working_rate = plan, None

    def _judge(self, probe: Plan, rate: float | None) -> Verdict:
        assert self.working is not None
        working, working_rate = self.working, self.working_rate
        up = probe.batch_size > working.batch_size
        gain = self.settings.min_gain
        if self.settings.objective == "largest" or rate is None or working_rate is None:
            keep, why = up, "it held" if up else "not measured"
        elif up:
            keep = rate >= working_rate * (1.0 - gain)
            why = f"{rate:.1f} vs {working_rate:.1f} samples/s" + ("" if keep else f" (over {gain:.0%} slower)")
        else:
            keep = rate >= working_rate * (1.0 + gain)
            why = f"{rate:.1f} vs {working_rate:.1f} samples/s" + ("" if keep else f" (not {gain:.0%} faster)")
        self.probing = None
        fields = {"plan": probe.model_dump(mode="json"), "samples_per_s": _rate(rate),
                  "working": working.model_dump(mode="json"), "working_samples_per_s": _rate(working_rate),
                  "reason": why}
        if keep:
            if up:
                self.below = working
            else:
                self.above = working
            self.working, self.working_rate = probe, rate
            verdict = Verdict(settle=probe, events=[("probe_succeeded", fields)],
                              message=f"probe {probe.describe()} kept: {why}")
            return self._next(verdict)
        if up:
            self.above = probe
        else:
            self.below = probe
        verdict = self._next(Verdict(events=[("probe_rejected", fields)],
                                     message=f"probe {probe.describe()} rejected: {why}"), going_back=True)
        if verdict.switch_to is None:
            verdict.switch_to = working  # nothing else to try: back to the plan that works
            verdict.events[0][1]["back_to"] = working.model_dump(mode="json")
            verdict.message = f"{verdict.message}; back to {working.describe()}"
        return verdict

    def _next(self, verdict: Verdict, going_back: bool = False) -> Verdict:
        assert self.working is not None and self.above is not None
        if self.probes >= self.settings.max_probes:
            return verdict
        candidate = next_probe(self.working, self.above)
        if (
            candidate is None and self.settings.objective == "throughput" and self.working_rate is not None
        ):
            candidate = probe_below(self.working, self.below, self.settings.min_batch)
        if candidate is not None:
            plan, horizon = self._horizon or (self.working, None)
            why = can_judge(self.settings, plan, candidate, horizon)
            if why is not None:
                assert horizon is not None
                seen = horizon.seen_from(plan, candidate)
                verdict.events.append(("probe_skipped", {
                    "plan": candidate.model_dump(mode="json"), "working": self.working.model_dump(mode="json"),
                    "steps_left": seen.steps_left, "steps_needed": steps_to_judge(self.settings, seen.step_seconds),
                    "reason": why}))
                skipped = f"not probing {candidate.describe()}: {why}"
                if not going_back:
                    skipped += f"; the run finishes on {self.working.describe()}"
                verdict.message = f"{verdict.message}; {skipped}" if verdict.message else skipped
                return verdict
            self.probing = candidate
            self.probes += 1
            verdict.switch_to = candidate
        return verdict
