"""Policies: for each incident kind, a ladder of degradation steps; loaded from presets, TOML or Python.

``Policy.degrade`` takes the first rung, from the top, that still changes the plan. That rule needs no
memory of earlier incidents and makes ladders monotone: with ``[mixed_precision, halve_batch]`` the
first OOM switches precision (later it no longer changes anything) and every later OOM halves the batch.

This module holds the Policy model and its probe settings, their validation (every mistake names the
key, what was received and what was expected), and loading from preset names and TOML files. Steps
and their registry live in ``step.py``, the built-in steps in ``steps.py``, the probe's search in
``search.py``.

Policies run in the supervisor only, so custom Python steps are never pickled. Nothing here imports
TensorFlow, so that loading and checking a policy is instant.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from .._errors import InvalidPolicyError
from .._incident import RETRYABLE_KINDS, Incident
from .._plan import Plan
from .._units import format_bytes, parse_duration, parse_size
from .step import (
    _REGISTRY,
    Step,
    StepContext,
    _explain,
    _signature,
    _StepParamsError,
    _unknown_step_parts,
    get_step,
)

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

_PACKAGE_DIR = Path(__file__).resolve().parents[1]
#: Where preset names are looked up, first match wins: ``resilient/presets/``, where the wheel ships
#: the top-level ``policies/`` folder (pyproject's force-include), then ``policies/`` of a source checkout.
PRESET_DIRS: tuple[Path, ...] = (_PACKAGE_DIR / "presets", _PACKAGE_DIR.parent / "policies")
_PRESET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# ---------------------------------------------------------------------------------------------- policy


def _policy_error(
    received: str,
    expected: str,
    *,
    subkey: str | None = None,
    hint: str = "",
    items: list[tuple[str, str, str]] | None = None,
) -> PydanticCustomError:
    """A validation error that ``_problems`` renders as ``key: received ...; expected ...``.

    ``subkey`` extends the key pydantic reports (``ladders.gpu_oom[1]`` + ``min_batch``); ``items``
    holds several ``(subkey, received, expected)`` problems found at once, one line each.
    """
    context: dict[str, Any] = {"received": received, "expected": expected, "hint": hint}
    if subkey is not None:
        context["subkey"] = subkey
    if items:
        context["items"] = list(items)
    return PydanticCustomError("policy", "received {received}; expected {expected}", context)


def _coerce_step(entry: object) -> Step:
    """One ladder entry (a name, a ``{step = ...}`` table, a Step, a Step class or function) as a Step."""
    if isinstance(entry, Step):
        return entry
    try:
        if isinstance(entry, str):
            return get_step(entry)
        if isinstance(entry, Mapping):
            params = dict(entry)
            name = params.pop("step", None)
            if not isinstance(name, str):
                raise _policy_error(
                    f"{entry!r}",
                    'a table with a `step` key naming the step, e.g. { step = "halve_batch", min_batch = 8 }',
                )
            return get_step(name, **params)
        if isinstance(entry, type) and issubclass(entry, Step):
            return entry()
        step_class = getattr(entry, "__resilient_step__", None)
        if isinstance(step_class, type) and issubclass(step_class, Step):
            return step_class()
    except _StepParamsError as exc:
        hint = f"Signature: {_signature_of(entry)}."
        if len(exc.problems) == 1:
            key, received, expected = exc.problems[0]
            raise _policy_error(received, expected, subkey=key, hint=hint) from None
        error = _policy_error(
            "; ".join(received for _, received, _ in exc.problems),
            "; ".join(expected for _, _, expected in exc.problems),
            hint=hint,
            items=exc.problems,
        )
        raise error from None
    except InvalidPolicyError:
        name = entry.get("step") if isinstance(entry, Mapping) else entry
        expected, hint = _unknown_step_parts(name)
        raise _policy_error(f"step {name!r}", expected, hint=hint) from None
    raise _policy_error(
        f"{entry!r} ({type(entry).__name__})",
        'a step name, a table { step = "name", param = value }, or a Step object',
    )


def _signature_of(entry: object) -> str:
    if isinstance(entry, Mapping):
        entry = entry.get("step")
    if isinstance(entry, str) and entry in _REGISTRY:
        return _signature(_REGISTRY[entry])
    if isinstance(entry, type) and issubclass(entry, Step):
        return _signature(entry)
    step_class = getattr(entry, "__resilient_step__", None)
    return _signature(step_class) if step_class is not None else "?"


def _step_spec(step: Step) -> str | dict[str, Any]:
    return step.spec()


def _check_kind(kind: object) -> str:
    if kind in RETRYABLE_KINDS:
        return str(kind)
    if kind == "user_error":
        hint = "user_error always ends the run, so it takes no ladder."
    else:
        close = difflib.get_close_matches(str(kind), RETRYABLE_KINDS, n=1)
        hint = f"Did you mean {close[0]!r}?" if close else ""
    raise _policy_error(f"incident kind {kind!r}", f"one of {', '.join(RETRYABLE_KINDS)}", hint=hint)


LadderEntry = Annotated[Step, BeforeValidator(_coerce_step), PlainSerializer(_step_spec)]
IncidentKindKey = Annotated[str, BeforeValidator(_check_kind)]


class ProbeSettings(BaseModel):
    """How the supervisor looks for a better batch size after an OOM degradation (TOML: ``[probe]``).

    After ``stable_steps`` steps on a plan, the supervisor measures its throughput (samples per
    second over the steps after a short warm-up, and over at least ``measure_seconds`` of training,
    so that a noisy machine does not decide) and tries a neighbouring batch size in a new
    worker: first between the working batch and the one that failed (bisection), then, with
    ``objective = "throughput"``, a smaller micro-batch with the same effective batch (more
    gradient accumulation), because the largest batch that fits is not always the fastest (on CPUs
    and on GPUs near their memory limit a smaller batch can train more samples per second).

    - ``objective = "largest"``: a probe that holds for ``stable_steps`` is kept; never probes down.
    - ``objective = "throughput"``: a probe is kept when it is faster; a larger batch is kept unless it
      is more than ``min_gain`` slower (it is closer to what was asked), a smaller one only when it
      is at least ``min_gain`` faster. A rejected probe becomes a bound, and the run goes back to the
      working plan.

    A probe starts only when the steps left in the run cover ``stable_steps`` and the warm-up plus
    ``measure_seconds`` of training (``resilient.policy.search.can_judge``); otherwise the run finishes on
    the working plan.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    enabled: bool = True
    stable_steps: int = Field(200, ge=1, description="Steps trained without incident before measuring and probing.")
    max_probes: int = Field(3, ge=0, description="Probes per run; each one costs a worker restart.")
    objective: Literal["throughput", "largest"] = "throughput"
    min_gain: float = Field(0.05, ge=0.0, le=1.0, description="Relative throughput difference that counts.")
    min_batch: int = Field(8, ge=1, description="The smallest micro-batch a probe down tries.")
    measure_seconds: float = Field(
        10.0, ge=0.0, description="Training time a throughput measurement covers at least (steps may run past stable_steps)."
    )

    def warmup_steps(self) -> int:
        """Steps at the start of an attempt left out of its throughput (tracing, caches warming up)."""
        return max(1, min(20, self.stable_steps // 4))


def _size(value: object) -> int:
    """A size in bytes from an int or a string such as ``"1GB"``."""
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        try:
            return parse_size(value)
        except ValueError:
            pass
    raise _policy_error(f"{value!r} ({type(value).__name__})", 'a size such as "1GB", "512MiB" or a number of bytes')


def _seconds(value: object) -> float:
    """Seconds from a number or a string such as ``"10s"``."""
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        try:
            return parse_duration(value)
        except ValueError:
            pass
    raise _policy_error(f"{value!r} ({type(value).__name__})", 'a positive duration such as "10s", "1min" or seconds')


class MemorySettings(BaseModel):
    """When the supervisor asks the worker for a checkpoint because memory runs short (TOML: ``[memory]``).

    The supervisor samples the worker's memory four times a second. With a host memory limit (the
    worker's memory cgroup, or the watchdog's budget), a checkpoint is asked for when the worker's
    memory (with its memory cgroup: the group's usage less inactive file cache, plus what an adopted worker
    brought, charged outside the group; under the watchdog: its private RSS) reaches ``pressure_threshold``
    of the limit; without one, when the machine's available memory
    falls below ``available_margin``. The worker saves it at its next step boundary, so an OOM kill
    that follows loses almost nothing. While memory stays above the mark (looked at every 10 ms then,
    every 50 ms under the watchdog), it asks again when memory climbs further (each request halves the
    headroom left under the limit, less what a save itself needs; without a limit, each time the available
    memory halves) and every ``pressure_interval`` while the worker trains on (at least ten times the last
    pressure checkpoint's cost apart), so the newest checkpoint stays close to a kill that a further climb
    or a spike brings. Never twice at the same step. The climb ends when memory
    falls back under ``rearm_threshold`` of the limit (without a limit: twice ``available_margin`` available).
    """

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    pressure_checkpoint: bool = True
    pressure_threshold: float = Field(0.85, gt=0.0, le=1.0, description="Share of the limit that asks for a checkpoint.")
    rearm_threshold: float = Field(0.75, gt=0.0, le=1.0, description="Share of the limit under which it is re-armed.")
    available_margin: Annotated[int, BeforeValidator(_size)] = Field(
        1 << 30, description="Without a limit: the machine's available memory below which a checkpoint is asked for.")
    pressure_interval: Annotated[float, BeforeValidator(_seconds)] = Field(
        30.0, description="Above the mark: seconds after which a worker still training is asked again.")

    @model_validator(mode="after")
    def _check_marks(self) -> MemorySettings:
        if self.rearm_threshold >= self.pressure_threshold:
            raise _policy_error(
                f"rearm_threshold = {self.rearm_threshold} with pressure_threshold = {self.pressure_threshold}",
                "rearm_threshold below pressure_threshold (memory must fall back before the next request)",
                subkey="rearm_threshold",
            )
        return self

    def describe(self) -> str:
        if not self.pressure_checkpoint:
            return "memory: no pressure checkpoint"
        return (f"memory: a checkpoint at {self.pressure_threshold:.0%} of the host memory limit (re-armed under "
                f"{self.rearm_threshold:.0%}), or under {format_bytes(self.available_margin)} available without one; "
                f"again as memory climbs, and every {self.pressure_interval:g}s above the mark")


class RuntimeSettings(BaseModel):
    """How the supervisor runs workers (TOML: ``[runtime]``).

    - ``standby = "auto"``: during training a second worker process waits with TensorFlow imported (no
      device, no data, no model), so a restart skips the import; it is not started after a host OOM in
      the run, nor when the machine's memory or the headroom under the worker's limit is below its own
      (about 0.7 GB) plus a margin. ``"off"``: every restart starts a fresh worker.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    standby: Literal["auto", "off"] = "auto"


class Policy(BaseModel):
    """For each retryable incident kind, a ladder of steps; plus the restart budget and probe settings.

    Build it in Python, ``Policy(ladders={"gpu_oom": [halve_batch(min_batch=8)]})``, or load it with
    ``load_policy``. A ladder entry is a step name, a ``{"step": name, **params}`` table or a Step.
    A kind left out gets an empty ladder: restart from the last checkpoint with the same plan.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    description: str = ""
    max_restarts: int = Field(10, ge=0)
    ladders: dict[IncidentKindKey, tuple[LadderEntry, ...]] = Field(
        default_factory=dict, validate_default=True
    )
    probe: ProbeSettings = Field(default_factory=ProbeSettings)
    memory: MemorySettings = Field(default_factory=MemorySettings)
    runtime: RuntimeSettings = Field(default_factory=RuntimeSettings)

    def __init__(self, /, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise _PolicyProblems(_problems(exc)) from None

    @field_validator("ladders", mode="before")
    @classmethod
    def _check_ladders(cls, value: object) -> dict[str, tuple[object, ...]]:
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            raise _policy_error(
                f"{value!r} ({type(value).__name__})",
                f"a table mapping incident kinds ({', '.join(RETRYABLE_KINDS)}) to lists of steps",
            )
        ladders: dict[str, tuple[object, ...]] = {}
        # Every retryable kind gets a ladder, in a fixed order; unknown kinds stay for _check_kind to report.
        for kind in [*RETRYABLE_KINDS, *(kind for kind in value if kind not in RETRYABLE_KINDS)]:
            entries = value.get(kind, ())
            # A lone entry is a one-rung ladder; that is what `gpu_oom = "halve_batch"` means.
            if isinstance(entries, (str, Mapping, Step)) or not isinstance(entries, Iterable):
                entries = (entries,)
            ladders[kind] = tuple(entries)
        return ladders

    def ladder(self, kind: str) -> tuple[Step, ...]:
        """The ladder for ``kind``; empty for kinds that take none (``user_error``)."""
        return self.ladders.get(kind, ())

    def degrade(
        self, plan: Plan, incident: Incident, context: StepContext | None = None
    ) -> tuple[Plan, Step] | None:
        """The first rung of ``incident.kind``'s ladder that changes ``plan``, with the plan it gives.

        None when no rung applies (the ladder is empty or exhausted): restart with the same plan
        or give up, as the supervisor's restart budget decides.
        """
        if context is None:
            context = StepContext(plan)
        for step in self.ladder(incident.kind):
            try:
                new_plan = step.apply(plan, incident, context)
            except Exception as exc:
                if hasattr(exc, "add_note"):  # Python >= 3.11
                    exc.add_note(f"Raised by policy step {step} on a {incident.kind} incident.")
                raise
            if new_plan is None:
                continue
            if not isinstance(new_plan, Plan):
                raise TypeError(
                    f"Policy step {step} returned {type(new_plan).__name__}. Expected a Plan or None."
                )
            if new_plan != plan:
                return new_plan, step
        return None

    def replace(self, **changes: Any) -> Policy:
        """A validated copy with ``changes`` applied, e.g. ``policy.replace(max_restarts=3)``."""
        data = {field: getattr(self, field) for field in type(self).model_fields}
        data.update(changes)
        return Policy(**data)

    def describe(self) -> str:
        """A multi-line readable summary: description, restart budget, probing and every ladder."""
        lines = []
        if self.description:
            lines.append(self.description)
        lines.append(f"max_restarts: {self.max_restarts}")
        if self.probe.enabled:
            goal = ("the fastest batch" if self.probe.objective == "throughput" else "the largest batch that fits")
            lines.append(
                f"probe: after {self.probe.stable_steps} stable steps, at most {self.probe.max_probes} probes "
                f"for {goal}"
            )
        else:
            lines.append("probe: disabled")
        lines.append(self.memory.describe())
        lines.append(f"standby: {self.runtime.standby}")
        lines.append("ladders:")
        width = max(len(kind) for kind in RETRYABLE_KINDS)
        for kind in RETRYABLE_KINDS:
            ladder = self.ladder(kind)
            rungs = " -> ".join(str(step) for step in ladder) if ladder else "(restart with the same plan)"
            lines.append(f"  {kind:<{width}}  {rungs}")
        return "\n".join(lines)


class _PolicyProblems(InvalidPolicyError):
    """Policy validation failed; ``problems`` holds one readable line per key, for callers to frame."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("Invalid policy:\n" + _bullets(problems))


_FIX_HINT = (
    'Ladders map incident kinds to lists of steps: a name ("drop_cache"), a table '
    '({ step = "halve_batch", min_batch = 8 }) or a Step object.'
)
_TOP_LEVEL_KEYS = list(Policy.model_fields)
_SECTION_KEYS = {"probe": list(ProbeSettings.model_fields), "memory": list(MemorySettings.model_fields),
                 "runtime": list(RuntimeSettings.model_fields)}


def _bullets(problems: list[str]) -> str:
    """Problems one per line, with the ladder syntax reminder when a ladder is at fault."""
    text = "\n".join(f"  {line}" for line in problems)
    return text + (f"\n{_FIX_HINT}" if any(line.startswith("ladders") for line in problems) else "")


def _format_key(loc: Iterable[object]) -> str:
    key = ""
    for part in loc:
        if part == "[key]":  # pydantic's marker for an error in a dict key rather than its value
            continue
        if isinstance(part, int):
            key += f"[{part}]"
        else:
            key += f".{part}" if key else str(part)
    return key or "(policy)"


def _problems(exc: ValidationError) -> list[str]:
    lines = []
    for error in exc.errors():
        loc = list(error["loc"])
        context = error.get("ctx") or {}
        if error["type"] == "policy":
            items = context.get("items") or [
                (context.get("subkey"), context["received"], context["expected"])
            ]
            for number, (subkey, received, expected) in enumerate(items, start=1):
                key = _format_key([*loc, subkey] if subkey else loc)
                line = f"{key}: received {received}; expected {expected}."
                last = number == len(items)
                lines.append(f"{line} {context['hint']}" if context.get("hint") and last else line)
            continue
        known = _SECTION_KEYS.get(str(loc[0]), _TOP_LEVEL_KEYS) if len(loc) > 1 else _TOP_LEVEL_KEYS
        received, expected = _explain(error, known, what="keys")
        lines.append(f"{_format_key(loc)}: received {received}; expected {expected}.")
    return lines


# ----------------------------------------------------------------------------------------------- files


def list_presets() -> dict[str, str]:
    """Preset names, sorted, with their descriptions (a broken file says so instead of raising)."""
    presets: dict[str, str] = {}
    for path in _preset_files():
        name = path.stem
        if name in presets:
            continue
        try:
            with path.open("rb") as handle:
                presets[name] = str(tomllib.load(handle).get("description", ""))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            presets[name] = f"(unreadable: {exc})"
    return dict(sorted(presets.items()))


def _preset_files() -> list[Path]:
    files = []
    for folder in PRESET_DIRS:
        if folder.is_dir():
            files.extend(sorted(path for path in folder.glob("*.toml") if _PRESET_NAME.match(path.stem)))
    return files


def _is_preset_name(spec: str | os.PathLike[str]) -> bool:
    if not isinstance(spec, str):
        return False
    separators = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    return not any(sep in spec for sep in separators) and not spec.endswith(".toml")


def resolve_policy_path(spec: str | os.PathLike[str]) -> Path:
    """The TOML file ``spec`` names: a preset's file, or the path itself; InvalidPolicyError if missing."""
    if _is_preset_name(spec):
        name = str(spec)
        if _PRESET_NAME.match(name):
            for folder in PRESET_DIRS:
                candidate = folder / f"{name}.toml"
                if candidate.is_file():
                    return candidate
        presets = ", ".join(list_presets()) or "(none found)"
        close = difflib.get_close_matches(name, list(list_presets()), n=1)
        raise InvalidPolicyError(
            f"Unknown policy preset. Received: {name!r}. Expected one of the presets: {presets}"
            + (f" (did you mean {close[0]!r}?)" if close else "")
            + ", or a path to a TOML file (it must contain a path separator or end in .toml). "
            "Run `python -m resilient policies` to list the presets."
        )
    path = Path(spec).expanduser()
    if not path.is_file():
        raise InvalidPolicyError(
            f"Policy file not found. Received: {str(spec)!r} ({path.resolve()}). "
            "Expected an existing TOML file "
            f"or a preset name ({', '.join(list_presets()) or 'none found'})."
        )
    return path


def load_policy(spec: str | os.PathLike[str] | Policy) -> Policy:
    """A Policy from a preset name, a path to a TOML file, or a Policy (returned as is).

    A string without a path separator that does not end in ``.toml`` is a preset name, looked up in
    ``PRESET_DIRS``. Every mistake raises InvalidPolicyError naming the file, the key (such as
    ``ladders.gpu_oom[1].min_batch``), what was received and what was expected.

    Example::

        policy = load_policy("colab-free")
        policy = load_policy("my_policy.toml")
    """
    if isinstance(spec, Policy):
        return spec
    if not isinstance(spec, (str, os.PathLike)):
        raise InvalidPolicyError(
            f"Invalid policy. Received: {spec!r} ({type(spec).__name__}). "
            "Expected a preset name, a path to a TOML file, or a resilient.Policy."
        )
    path = resolve_policy_path(spec)
    where = f"{path.name} ({path.resolve()})"
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidPolicyError(
            f"Invalid policy file {where}: not valid TOML: {exc}. "
            'Expected TOML such as:\n  max_restarts = 10\n  [ladders]\n  gpu_oom = ["halve_batch"]'
        ) from None
    except OSError as exc:
        raise InvalidPolicyError(f"Cannot read policy file {where}: {exc}.") from None
    try:
        return Policy(**data)
    except _PolicyProblems as exc:
        raise InvalidPolicyError(
            f"Invalid policy file {where}:\n{_bullets(exc.problems)}\n"
            f"Fix the file, then check it with `python -m resilient policies check {path}`."
        ) from None
