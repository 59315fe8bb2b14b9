"""Re-deriving the plan when the resource settings change between calls (pure; fit applies it).

A degradation is learned under settings: a batch halved after a host OOM under
``host_memory_limit="1KB"`` says nothing about a call without that limit. Each call records the
settings it derives the plan under (``PlanBasis``: in run.json and in the journal's ``run_started``);
when the next call's differ, the plan is re-derived: the requested plan, with the journal's plan
changes replayed (field by field, in order) only where they still apply (``still_applies``):

- ``host_oom``: the host limit is the same or smaller (no limit then and now: the machine's RAM);
- ``gpu_oom``: the same device, and the GPU limit the same or smaller;
- any other kind (``nan_loss``...): kept, unless the policy changed;
- a probe the plan search kept: follows the OOM degradation that started the search;
- a changed policy drops every change: its own ladders answer the next incident.

Unknown settings (a run directory written by 0.1.0 records only the host limit in its journal) are
taken as unchanged, so an older run keeps what it learned.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from ._plan import Plan
from ._units import format_bytes

OOM_KINDS = ("gpu_oom", "host_oom")


class PlanBasis(BaseModel):
    """The resource settings a plan was derived under. None in ``device``/``policy``: not recorded."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    host_memory_limit: int | None = None
    gpu_memory_limit: int | None = None
    device: str | None = None  # "cpu" or "gpu"
    policy: str | None = None  # a fingerprint of the policy's ladders (``policy_fingerprint``)

    def changes(self, now: PlanBasis) -> list[str]:
        """What differs from ``self`` to ``now``, as readable ``name old -> new`` items (unknowns skipped)."""
        out = []
        for name in ("host_memory_limit", "gpu_memory_limit"):
            old, new = getattr(self, name), getattr(now, name)
            if old != new:
                out.append(f"{name} {_size(old)} -> {_size(new)}")
        if self.device is not None and now.device is not None and self.device != now.device:
            out.append(f"device {self.device} -> {now.device}")
        if self.policy is not None and now.policy is not None and self.policy != now.policy:
            out.append("policy ladders changed")
        return out


def policy_fingerprint(ladders: Mapping[str, Iterable[Any]]) -> str:
    """A short hash of a policy's ladders (the steps as they print, parameters included)."""
    blob = json.dumps({kind: [str(step) for step in ladder] for kind, ladder in sorted(ladders.items())})
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Learned:
    """One plan change from the journal: what caused it (None: a probe kept) and under which settings."""

    kind: str | None
    before: dict[str, Any]
    after: dict[str, Any]
    basis: PlanBasis

    def fields(self) -> dict[str, Any]:
        """The plan fields the change set (replayed over another plan)."""
        return {k: v for k, v in self.after.items() if self.before.get(k) != v}


@dataclass(frozen=True)
class Rederived:
    """The plan a call resumes with, and what the re-derivation says about it."""

    plan: Plan
    previous: Plan  # plan.json as the last call left it
    changed: bool  # the plan differs from plan.json
    dropped: tuple[str, ...] = ()  # the kinds whose changes no longer apply
    message: str = ""  # the console line ("" when nothing changed)


def learned_from_journal(events: Sequence[Mapping[str, Any]], fallback: PlanBasis) -> list[Learned]:
    """The journal's ``plan_changed`` events, each with the settings of the call it happened in.

    A call's settings are its ``run_started``'s ``plan_basis``; a journal written by 0.1.0 has
    only ``host_memory_limit`` there, the rest comes from ``fallback`` (the last call's run.json).
    Re-derivations themselves (``cause: settings_changed``) are not learned.
    """
    basis = fallback
    out: list[Learned] = []
    for event in events:
        name = event.get("event")
        if name == "run_started":
            recorded = event.get("plan_basis")
            if isinstance(recorded, Mapping):
                basis = PlanBasis.model_validate(recorded)
            else:
                basis = fallback.model_copy(update={"host_memory_limit": event.get("host_memory_limit")})
        elif name == "plan_changed" and event.get("cause") != "settings_changed":
            before, after = event.get("from"), event.get("to")
            if isinstance(before, Mapping) and isinstance(after, Mapping):
                out.append(Learned(event.get("incident"), dict(before), dict(after), basis))
    return out


def still_applies(kind: str | None, learned_under: PlanBasis, now: PlanBasis) -> bool:
    """Whether a change that ``kind`` caused under ``learned_under`` still holds under ``now``."""
    if learned_under.policy is not None and now.policy is not None and learned_under.policy != now.policy:
        return False
    if kind == "host_oom":
        return _no_larger(learned_under.host_memory_limit, now.host_memory_limit)
    if kind == "gpu_oom":
        if learned_under.device is not None and now.device is not None and learned_under.device != now.device:
            return False
        return _no_larger(learned_under.gpu_memory_limit, now.gpu_memory_limit)
    return True


def _no_larger(then: int | None, now: int | None) -> bool:
    """A memory budget ``now`` no larger than ``then`` (None: no limit, the machine's whole memory)."""
    if now is None:
        return then is None
    return then is None or now <= then


def rederive_plan(requested: Plan, current: Plan, learned: Sequence[Learned], last: PlanBasis,
                  now: PlanBasis) -> Rederived:
    """The plan this call resumes with: ``current`` (plan.json) when the settings are those of the last
    call (``last``), else ``requested`` with the learned changes that still apply replayed in order."""
    changes = last.changes(now)
    if not changes:
        return Rederived(current, current, changed=False)
    plan, dropped = requested, []
    search_kind: str | None = None  # the OOM degradation that started the plan search, for its kept probes
    for change in learned:
        kind = change.kind
        if kind in OOM_KINDS:
            search_kind = kind
        applies = still_applies(search_kind if kind is None else kind, change.basis, now)
        if not applies:
            label = kind or f"the {search_kind} plan search"
            if label not in dropped:
                dropped.append(label)
            continue
        try:
            plan = plan.replace(**change.fields())
        except (ValidationError, TypeError, ValueError):
            continue  # a change that does not fit the requested plan (another release's field): skipped
    if plan == current:
        return Rederived(current, current, changed=False, dropped=tuple(dropped))
    why = "; ".join(changes)
    kept = "dropped the degradations learned from " + ", ".join(dropped) if dropped else "kept what still applies"
    message = (f"the resource settings changed since the plan was derived ({why}): re-derived it from the requested "
               f"plan {requested.describe()} ({kept}): {current.describe()} -> {plan.describe()}")
    return Rederived(plan, current, changed=True, dropped=tuple(dropped), message=message)


def _size(value: int | None) -> str:
    return "none" if value is None else format_bytes(value)
