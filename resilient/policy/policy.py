"""Policies: for each incident kind, a ladder of degradation steps; loaded from presets, TOML or Python.

A step is a small frozen object with one method, ``apply(plan, incident, context) -> Plan | None``
(None: not applicable here, try the next rung). ``Policy.degrade`` takes the first rung, from the top,
that still changes the plan. That rule needs no memory of earlier incidents and makes ladders monotone:
with ``[mixed_precision, halve_batch]`` the first OOM switches precision (later it no longer changes
anything) and every later OOM halves the batch.

Policies run in the supervisor only, so custom Python steps are never pickled. This module and
``resilient.steps`` must stay free of TensorFlow so that loading and checking a policy is instant.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import os
import re
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    create_model,
    field_validator,
)
from pydantic_core import PydanticCustomError

from .._errors import InvalidPolicyError
from .._incident import RETRYABLE_KINDS, Incident
from .._plan import Plan

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

_PACKAGE_DIR = Path(__file__).resolve().parents[1]
#: Where preset names are looked up, first match wins: ``resilient/presets/``, where the wheel ships
#: the top-level ``policies/`` folder (pyproject's force-include), then ``policies/`` of a source checkout.
PRESET_DIRS: tuple[Path, ...] = (_PACKAGE_DIR / "presets", _PACKAGE_DIR.parent / "policies")
_PRESET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_STEP_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")


# --------------------------------------------------------------------------------------------- context


@dataclasses.dataclass(frozen=True)
class StepContext:
    """What a step may know beyond the plan and the incident: the request, the hardware, the history."""

    requested_plan: Plan
    _: dataclasses.KW_ONLY
    device: Literal["cpu", "gpu", "tpu"] = "cpu"
    gpu_compute_capability: tuple[int, int] | None = None
    cpu_supports_bf16: bool = False
    #: True when resilient builds the image pipeline and the model accepts another input size.
    resizable_input: bool = False
    source_image_size: tuple[int, int] | None = None
    #: Earlier incidents of this run, oldest first.
    incidents: tuple[Incident, ...] = ()
    has_batchnorm: bool = False
    #: True when the input decides its own batch size (a keras.utils.PyDataset): batch steps cannot apply.
    batch_size_fixed: bool = False
    #: Whether the input pipeline honours ``plan.cache`` / the buffer knobs (NumPy arrays have neither).
    cacheable: bool = True
    buffered: bool = True


# ----------------------------------------------------------------------------------------------- steps


class Step(BaseModel):
    """A degradation step: ``apply`` returns a changed plan, or None when it does not apply here.

    Subclasses declare their parameters as pydantic fields and implement ``apply``; register them
    with ``@register_step("name")`` so policy files can name them. Steps are frozen and compare by
    value, and ``str(step)`` reads like the call that built it: ``halve_batch(min_batch=8, ...)``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    #: The registry name policy files use; set by ``register_step``.
    name: ClassVar[str] = "step"

    def __init__(self, /, *args: Any, **params: Any) -> None:
        cls = type(self)
        if args:
            fields = list(cls.model_fields)
            if len(args) > len(fields):
                raise InvalidPolicyError(
                    f"Invalid arguments for step `{cls.name}`. Received: {len(args)} positional arguments. "
                    f"Expected at most {len(fields)}: {', '.join(fields) or '(none)'}."
                )
            for field, value in zip(fields, args, strict=False):
                if field in params:
                    raise InvalidPolicyError(
                        f"Invalid arguments for step `{cls.name}`. Received `{field}` twice. "
                        "Expected each parameter once, by position or by name."
                    )
                params[field] = value
        try:
            super().__init__(**params)
        except ValidationError as exc:
            raise _StepParamsError(cls, exc) from None

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        if "name" not in cls.__dict__:
            cls.name = cls.__name__

    def apply(self, plan: Plan, incident: Incident, context: StepContext) -> Plan | None:
        """The degraded plan, or None when this step cannot change anything useful here."""
        raise NotImplementedError(f"{type(self).__name__} must implement apply(plan, incident, context).")

    def params(self) -> dict[str, Any]:
        """The step's parameters, in declaration order."""
        return {field: getattr(self, field) for field in type(self).model_fields}

    def spec(self) -> str | dict[str, Any]:
        """The step as a policy file writes it: its name, or ``{"step": name, **params}``."""
        params = self.model_dump(mode="json")
        return {"step": self.name, **params} if params else self.name

    def describe(self) -> str:
        """A readable form, e.g. ``halve_batch(min_batch=8, keep_effective_batch=True)``."""
        args = ", ".join(f"{key}={value!r}" for key, value in self.params().items())
        return f"{self.name}({args})"

    def __repr__(self) -> str:
        return self.describe()

    def __str__(self) -> str:
        return self.describe()


class _FunctionStep(Step):
    """A step built from a plain function ``f(plan, incident, context, **params)``."""

    def apply(self, plan: Plan, incident: Incident, context: StepContext) -> Plan | None:
        function = type(self).__resilient_function__
        return function(plan, incident, context, **self.params())


class _StepParamsError(InvalidPolicyError):
    """Bad parameters for a step; keeps the structured problems so policy errors can name the key."""

    def __init__(self, cls: type[Step], exc: ValidationError) -> None:
        known = list(cls.model_fields)
        self.problems: list[tuple[str, str, str]] = []
        for error in exc.errors():
            key = ".".join(str(part) for part in error["loc"]) or "(arguments)"
            received, expected = _explain(error, known, what=f"parameters of {cls.name}")
            self.problems.append((key, received, expected))
        lines = [
            f"  {key}: received {received}; expected {expected}." for key, received, expected in self.problems
        ]
        super().__init__(
            f"Invalid arguments for step `{cls.name}`.\n" + "\n".join(lines) + "\n"
            f"Fix the values; the step's parameters are: {_signature(cls)}."
        )


def _signature(cls: type[Step]) -> str:
    parts = []
    for field, info in cls.model_fields.items():
        annotation = getattr(info.annotation, "__name__", None) or str(info.annotation)
        default = "" if info.is_required() else f" = {info.get_default(call_default_factory=True)!r}"
        parts.append(f"{field}: {annotation}{default}")
    return f"{cls.name}({', '.join(parts)})"


# -------------------------------------------------------------------------------------------- registry

_REGISTRY: dict[str, type[Step]] = {}
_T = TypeVar("_T")


def register_step(name: str, *, replace: bool = False) -> Callable[[_T], _T]:
    """Register a Step subclass, or a function ``f(plan, incident, context, **params)``, under ``name``.

    Policy files then name it: ``"name"`` or ``{ step = "name", param = 1 }``. A function's keyword
    parameters after the first three become the step's parameters, validated from their annotations.
    The decorator returns what it was given, so a decorated function can still be called directly.

    Example::

        @resilient.register_step("shrink_tokens")
        def shrink_tokens(plan, incident, context, factor: float = 0.5):
            ...
    """
    if not isinstance(name, str) or not _STEP_NAME.match(name):
        raise InvalidPolicyError(
            f"Invalid step name. Received: name={name!r}. "
            "Expected a string of letters, digits, '_', '.' or '-' that starts with a letter or '_'."
        )

    def decorator(obj: _T) -> _T:
        if isinstance(obj, type) and issubclass(obj, Step):
            cls = obj
            cls.name = name
        elif callable(obj) and not isinstance(obj, type):
            cls = _step_class_from_function(name, obj)
            obj.__resilient_step__ = cls  # type: ignore[attr-defined]
        else:
            raise InvalidPolicyError(
                f"register_step({name!r}) cannot register {obj!r}. Expected a subclass of resilient.Step "
                "or a function f(plan, incident, context, **params) -> Plan | None."
            )
        previous = _REGISTRY.get(name)
        if previous is not None and not replace and not _same_definition(previous, cls):
            raise InvalidPolicyError(
                f"A step named {name!r} is already registered ({_qualname(previous)}). "
                f"Received: {_qualname(cls)}. "
                f"Expected a new name; pass register_step({name!r}, replace=True) to replace it on purpose."
            )
        _REGISTRY[name] = cls
        return obj

    return decorator


def _qualname(cls: type[Step]) -> str:
    function = cls.__dict__.get("__resilient_function__")
    target = function if function is not None else cls
    return f"{target.__module__}.{target.__qualname__}"


def _same_definition(a: type[Step], b: type[Step]) -> bool:
    # Re-running a notebook cell re-registers the same definition; that must not be an error.
    return _qualname(a) == _qualname(b)


def _step_class_from_function(name: str, function: Callable[..., Plan | None]) -> type[Step]:
    parameters = list(inspect.signature(function).parameters.values())
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if len(parameters) < 3 or any(p.kind not in positional for p in parameters[:3]):
        raise InvalidPolicyError(
            f"register_step({name!r}) needs a function whose first three parameters are (plan, incident, "
            f"context). Received: {getattr(function, '__name__', function)}{inspect.signature(function)}."
        )
    try:
        hints = typing.get_type_hints(function)
    except Exception:  # unresolvable annotations: accept any value rather than refuse the step
        hints = {}
    fields: dict[str, Any] = {}
    for parameter in parameters[3:]:
        if parameter.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            continue
        default = ... if parameter.default is inspect.Parameter.empty else parameter.default
        fields[parameter.name] = (hints.get(parameter.name, Any), default)
    cls = create_model(  # type: ignore[call-overload]
        getattr(function, "__name__", name),
        __base__=_FunctionStep,
        __module__=getattr(function, "__module__", __name__),
        __doc__=function.__doc__,
        **fields,
    )
    cls.__resilient_function__ = staticmethod(function)
    cls.__qualname__ = getattr(function, "__qualname__", cls.__name__)
    cls.name = name
    return cls


def _registry() -> dict[str, type[Step]]:
    from .. import steps  # noqa: F401  (imported for its side effect: registers the built-in steps)

    return _REGISTRY


def list_steps() -> dict[str, str]:
    """Registered step names, sorted, with the first line of each step's docstring."""
    return {name: _first_line(cls.__doc__) for name, cls in sorted(_registry().items())}


def get_step(name: str, /, **params: Any) -> Step:
    """Build the step registered as ``name`` with ``params``; InvalidPolicyError says what is wrong."""
    cls = _registry().get(name) if isinstance(name, str) else None
    if cls is None:
        expected, hint = _unknown_step_parts(name)
        raise InvalidPolicyError(f"Unknown step. Received: {name!r}. Expected {expected}. {hint}")
    return cls(**params)


def _unknown_step_parts(name: object) -> tuple[str, str]:
    """(expected, hint) for an unknown step name."""
    known = sorted(_registry())
    close = difflib.get_close_matches(str(name), known, n=1)
    hint = f"Did you mean {close[0]!r}? " if close else ""
    hint += "A custom step must be registered with @resilient.register_step(name) before the policy loads."
    return f"one of the registered steps: {', '.join(known)}", hint


def _first_line(doc: str | None) -> str:
    text = (doc or "").strip()
    return text.splitlines()[0].strip().replace("``", "") if text else ""


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
_PROBE_KEYS = list(ProbeSettings.model_fields)


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
        known = _PROBE_KEYS if loc[:1] == ["probe"] else _TOP_LEVEL_KEYS
        received, expected = _explain(error, known, what="keys")
        lines.append(f"{_format_key(loc)}: received {received}; expected {expected}.")
    return lines


def _explain(error: Mapping[str, Any], known: list[str], *, what: str) -> tuple[str, str]:
    """(received, expected) phrases for one pydantic error."""
    kind = error["type"]
    if kind == "extra_forbidden":
        return (
            f"unknown key {error['loc'][-1]!r} = {error['input']!r}",
            f"one of the {what}: {', '.join(known) or '(none)'}",
        )
    if kind == "missing":
        return "no value", "a value (it is required)"
    message = str(error["msg"])
    for prefix in ("Input should be ", "Value error, "):
        message = message.removeprefix(prefix)
    if message.startswith(("greater", "less")):
        message = "a value " + message
    return f"{error['input']!r} ({type(error['input']).__name__})", message


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


# --------------------------------------------------------------------------------------------- probing


def next_probe(working: Plan, failed: Plan) -> Plan | None:
    """The plan to try between a working batch size and a failed one (bisection), or None.

    Only the batch size is probed; every other knob stays as in ``working``. When ``working``
    accumulates gradients, the probe keeps its effective batch exactly (batch * accumulation), so
    only divisors of that effective batch are candidates. None when the gap is small
    (``failed - working <= max(1, working // 8)``) or no candidate lies strictly between.

    ``resilient.policy.search.PlanSearch`` uses it for the probe up (``failed``: the smallest batch known to
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
