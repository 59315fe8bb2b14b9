"""Steps and their registry: the unit a policy ladder is made of.

A step is a small frozen object with one method, ``apply(plan, incident, context) -> Plan | None``
(None: not applicable here, try the next rung). ``register_step`` names a Step subclass, or a plain
function ``f(plan, incident, context, **params)``, so that policy files can use it; ``get_step`` builds
one by name. ``StepContext`` is what a step may know beyond the plan and the incident.

No TensorFlow here: steps run in the supervisor, and checking a policy must be instant.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import re
import typing
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from .._errors import InvalidPolicyError
from .._incident import Incident
from .._plan import Plan

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
    from . import steps  # noqa: F401  (imported for its side effect: registers the built-in steps)

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
