"""A worker's start-up phases, when each ended, and their hang timeouts, calibrated from this call's attempts.

An attempt begins with three phases in which the worker sends no heartbeat of its own:

- ``import``: from the spawn until TensorFlow is imported (the worker's ``restore`` heartbeat; a
  worker that never sends one is in ``import`` until its hello, restore included);
- ``restore``: building the model and restoring the checkpoint, until the worker's hello;
- ``first_step``: building the input pipeline and compiling, until the first trained step (a train
  heartbeat with a step time, or the ``first_step`` notice).

The timeout of each phase (``phase_timeout``): a phase no attempt of this call has completed yet gets
``cap``: ``startup_timeout`` (600 s), or ``hang_timeout`` where that is larger. A measured phase gets
``STARTUP_FACTOR`` times the slowest measurement (the restore phase also ``STARTUP_FACTOR`` times the
slowest checkpoint save seen, since a restore reads what a save wrote; the first step of a resumed
epoch also ``STARTUP_FACTOR`` times the slowest step seen for each batch its input skips, since a
factory's dataset re-reads them), never less than the floor and never more than ``cap``. The floor is an explicit ``hang_timeout`` (it applies where it is larger
than the calibrated time), or ``AUTO_STARTUP_FLOOR`` when ``hang_timeout`` is automatic, and never
below ``STARTUP_MIN_TIMEOUT``. Measurements come from this call only: a new call may run on another
machine, or with cold caches, so its first attempt gets the cap.

A worker started ahead of its attempt (standby.py) is timed from its go: its ``import`` phase is what
was left of the import then, near zero for a warm standby. That measures the attempt's start-up, not
a fresh worker's import, so it does not calibrate the ``import`` timeout (``StartupClock.calibrating``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .._protocol import Heartbeat, Hello, Notice

StartupPhase = Literal["import", "restore", "first_step"]
STARTUP_PHASES: tuple[StartupPhase, ...] = ("import", "restore", "first_step")
#: A measured phase may take this many times its slowest measurement (a loaded CPU, a cold disk cache).
STARTUP_FACTOR = 3.0
#: The floor of a measured phase's timeout when ``hang_timeout`` is automatic (as AUTO_HANG_FLOOR for steps).
AUTO_STARTUP_FLOOR = 60.0
#: No start-up phase is called a hang after less silence than this, whatever hang_timeout says.
STARTUP_MIN_TIMEOUT = 5.0


def phase_timeout(measured: float | None, hang_timeout: float | None, cap: float, extra: float = 0.0) -> float:
    """Seconds of silence that read as a hang in a start-up phase measured at ``measured`` seconds (None:
    never completed in this call), ``extra`` seconds allowed on top (see the module docstring)."""
    if measured is None:
        return cap
    floor = max(STARTUP_MIN_TIMEOUT, hang_timeout if hang_timeout is not None else AUTO_STARTUP_FLOOR)
    return min(cap, max(floor, STARTUP_FACTOR * measured + extra))


def startup_cap(hang_timeout: float | None, startup_timeout: float) -> float:
    """The most a start-up phase is given: ``startup_timeout``, or ``hang_timeout`` where that is larger."""
    return max(startup_timeout, hang_timeout or 0.0)


@dataclass(frozen=True)
class StartupCalibration:
    """What this call measured of its attempts' start-ups: the slowest of each phase, the slowest save."""

    seconds: Mapping[str, float] = field(default_factory=dict)
    save_seconds: float = 0.0
    step_seconds: float = 0.0

    def after(self, measured: Mapping[str, float], save_seconds: float = 0.0,
              step_seconds: float = 0.0) -> StartupCalibration:
        """This calibration with one more attempt's measurements."""
        merged = dict(self.seconds)
        for phase, seconds in measured.items():
            merged[phase] = max(seconds, merged.get(phase, 0.0))
        return StartupCalibration(merged, max(self.save_seconds, save_seconds), max(self.step_seconds, step_seconds))

    def first_step_timeout(self, timeouts: Mapping[str, float], skip_steps: int, cap: float) -> float:
        """The first_step timeout of an attempt whose input skips ``skip_steps`` batches of a resumed epoch."""
        base = timeouts["first_step"]
        return base if base >= cap else min(cap, base + STARTUP_FACTOR * skip_steps * self.step_seconds)

    def timeouts(self, hang_timeout: float | None, startup_timeout: float) -> dict[str, float]:
        """The next attempt's timeout of each start-up phase."""
        cap = startup_cap(hang_timeout, startup_timeout)
        extra = {"restore": STARTUP_FACTOR * self.save_seconds}
        return {phase: round(phase_timeout(self.seconds.get(phase), hang_timeout, cap, extra.get(phase, 0.0)), 3)
                for phase in STARTUP_PHASES}


@dataclass
class StartupClock:
    """When an attempt's start-up phases ended, by the supervisor's clock (``time.monotonic``)."""

    spawned: float
    imported: float | None = None  # the worker's "restore" heartbeat: TensorFlow is imported
    ready: float | None = None  # its hello: the model is built and restored
    stepped: float | None = None  # its first trained step
    started_ahead: bool = False  # a worker started ahead of its attempt, timed from its go (standby.py)

    def saw(self, msg: Any, now: float) -> None:
        """Note the end of a phase that ``msg``, received at ``now``, marks."""
        if self.stepped is not None:
            return
        if isinstance(msg, Heartbeat) and msg.phase == "restore" and self.ready is None:
            self.imported = self.imported or now
        elif isinstance(msg, Hello):
            self.ready = self.ready or now
        elif (isinstance(msg, Heartbeat) and msg.phase == "train" and msg.step_seconds) or (
                isinstance(msg, Notice) and msg.event == "first_step"):
            self.stepped = now

    def phase(self) -> StartupPhase | None:
        """The start-up phase the worker is in (None: it has trained a step)."""
        if self.stepped is not None:
            return None
        if self.ready is not None:
            return "first_step"
        return "restore" if self.imported is not None else "import"

    def calibrating(self) -> dict[str, float]:
        """The measured phases that calibrate later attempts' timeouts (``StartupCalibration.after``)."""
        measured = self.measured()
        if self.started_ahead:
            measured.pop("import", None)
        return measured

    def measured(self) -> dict[str, float]:
        """Seconds of each phase that ended in this attempt."""
        ends = {"import": self.imported or self.ready, "restore": self.ready if self.imported else None,
                "first_step": self.stepped if self.ready else None}
        starts = {"import": self.spawned, "restore": self.imported, "first_step": self.ready}
        return {phase: round(end - starts[phase], 3) for phase, end in ends.items()  # type: ignore[operator]
                if end is not None and starts[phase] is not None}
