"""One worker process: START it, MONITOR it until it exits -> how its attempt ended (``AttemptEnd``).

- START spawns ``python -m resilient.worker`` (never a fork of this process: TensorFlow does not
  survive one) in a session of its own, with a pipe for the channel, and moves it into a memory
  cgroup when the run has a limit (or rehearses a host OOM); or it adopts a worker started ahead
  (standby.py: fit's early worker, the run's warm standby), moves it into the cgroup and sends its go.
- MONITOR copies the worker's output to the attempt's ``worker.log`` (only there), reads the
  channel (heartbeats, progress, checkpoints, faults) and feeds the caller's display (display.py),
  samples memory (private RSS of the process tree, the cgroup, NVML) and acts on what it sees: a silent worker is killed as a hang (in its
  start-up phases after their own calibrated timeouts, startup.py); a worker
  over the memory budget without a cgroup is killed by the watchdog; a worker whose memory runs short
  (``[memory]`` in the policy, ``PressureWatch``; looked at every poll while above the mark) gets SIGUSR1: a
  checkpoint at its next step, again as memory climbs on and at an interval; a rehearsed ``preempt`` gets
  SIGTERM, and so does a healthy worker the plan search wants to leave for another plan (``judge``).

What the supervisor did to the worker is the outcome's ``decision``; classify.py reads it first.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

from pydantic import ValidationError

from .._plan import Plan
from .._protocol import (
    ChannelReader,
    CheckpointSaved,
    EpochBegin,
    EpochEnd,
    ErrorReport,
    FaultFired,
    Heartbeat,
    Hello,
    Notice,
    StepBoard,
    WorkerGo,
)
from .._rundir import FILE_MODE, Journal
from .._units import format_bytes
from ..policy.search import Horizon
from .classify import AttemptOutcome, Intervention
from .config import SupervisorConfig
from .gpu import DevicePeaks
from .memory import GpuMemory, MemoryCgroup, PressureWatch, available_memory, tree_rss
from .standby import WaitingWorker, WorkerOutput
from .startup import StartupCalibration, StartupClock, StartupPhase, startup_cap
from .telemetry import MemorySample, MemoryTelemetry

#: Floor of the automatic hang timeout, in seconds.
AUTO_HANG_FLOOR = 120.0
#: An automatic hang timeout is this many times the slowest step seen so far.
AUTO_HANG_FACTOR = 10.0
#: Memory of the rehearsed host_oom when the run has no limit: current usage plus this.
REHEARSAL_HEADROOM = 256 << 20
#: A checkpoint's save needs about this many times its size in memory (the snapshot, then the file's pages
#: until they are written): the headroom PressureWatch keeps for the last save before a kill.
SAVE_RESERVE_FACTOR = 2
#: Seconds between looks at the worker's memory while it is above the pressure mark (with a cgroup, or
#: without a limit: a few file reads each; the watchdog's RSS walk, a millisecond, stays at the poll interval).
PRESSURE_LOOK = 0.01
#: On Ctrl-C, a worker silent this long (plus twice its slowest step) shows no life: it is not waited for.
INTERRUPT_SILENCE = 3.0
#: On Ctrl-C, a worker in the middle of a save is waited for this long plus 3x its slowest save.
INTERRUPT_SAVE_PATIENCE = 30.0


# ------------------------------------------------------------------------------------------ progress


@dataclass(frozen=True)
class Progress:
    """How far the worker got, as its channel said; a new value for every message."""

    phase: str = "startup"
    epoch: int | None = None
    step: int | None = None
    start_step: int | None = None  # where the attempt began (its Hello: the checkpoint it resumed from)
    skip_steps: int = 0  # batches of the resumed epoch its input skips before the first step (its Hello)
    trained_steps: int = 0  # train heartbeats with a step time: 0 until the first compiled step
    max_step_seconds: float = 0.0
    max_save_seconds: float = 0.0
    pressure_save_seconds: float | None = None  # what the last memory-pressure checkpoint cost (PressureWatch)
    checkpoint_bytes: int = 0  # the size of the last checkpoint (a save needs about twice that: PressureWatch)
    # Throughput: the worker's cumulative (timed steps, timed seconds), after the warm-up and now.
    timing_base: tuple[int, float] | None = None
    timing: tuple[int, float] | None = None
    # What is left of the run (EpochBegin): the global step it ends at under this plan.
    end_step: int | None = None
    samples_per_step: int | None = None

    def trained(self) -> int:
        """Steps trained in this attempt."""
        return (self.step or 0) - self.start_step if self.start_step is not None else 0

    def samples_per_second(self, batch_size: int) -> float | None:
        """Throughput of this attempt since the end of its warm-up (None: not measured)."""
        window = self._window()
        return batch_size * window[0] / window[1] if window else None

    def seconds_per_step(self) -> float | None:
        """Measured seconds per training step since the warm-up (None: not measured)."""
        window = self._window()
        return window[1] / window[0] if window else None

    def _window(self) -> tuple[int, float] | None:
        if self.timing_base is None or self.timing is None:
            return None
        steps, seconds = self.timing[0] - self.timing_base[0], self.timing[1] - self.timing_base[1]
        return (steps, seconds) if steps > 0 and seconds > 0 else None

    def measurement(self, batch_size: int, measure_seconds: float) -> tuple[bool, float | None]:
        """(whether the attempt can be judged now, its samples/s). Judged once its window (after the
        warm-up) covers ``measure_seconds`` of training and two timed heartbeats bracket it (they are
        throttled); a worker that reports no timing is judged at once, unmeasured."""
        if self.timing is None:
            return True, None
        rate = self.samples_per_second(batch_size)
        window = self.timing[1] - self.timing_base[1] if self.timing_base is not None else 0.0
        return rate is not None and window >= measure_seconds, rate

    def horizon(self, plan: Plan) -> Horizon | None:
        """What is left of the run, as the worker reported it (None: unknown, e.g. an input of unknown length)."""
        if self.end_step is None or self.step is None:
            return None
        # A stop for a probe waits for the end of the gradient-accumulation window.
        left = max(0, self.end_step - self.step - (plan.grad_accum_steps - 1))
        per_batch = self.samples_per_step is None or self.samples_per_step == plan.batch_size
        return Horizon(steps_left=left, step_seconds=self.seconds_per_step(), per_batch=per_batch)


def advance(progress: Progress, msg: Any, warmup_steps: int) -> Progress:
    """``progress`` after one channel message (timing counts from ``warmup_steps`` timed steps on)."""
    if isinstance(msg, Heartbeat):
        changes: dict[str, Any] = {"phase": msg.phase, "epoch": msg.epoch, "step": msg.step}
        if msg.timed_steps is not None and msg.timed_seconds is not None:
            changes["timing"] = (msg.timed_steps, msg.timed_seconds)
            if progress.timing_base is None and msg.timed_steps >= warmup_steps:
                changes["timing_base"] = changes["timing"]
        if msg.phase == "train" and msg.step_seconds:
            changes["trained_steps"] = progress.trained_steps + 1
            changes["max_step_seconds"] = max(progress.max_step_seconds, msg.step_seconds)
        return replace(progress, **changes)
    if isinstance(msg, Hello):
        return replace(progress, epoch=msg.epoch, step=msg.step, start_step=msg.step, skip_steps=msg.skip_steps)
    if isinstance(msg, CheckpointSaved):
        slowest = max(progress.max_save_seconds, msg.seconds)
        if msg.background:  # written while the training went on: it says nothing of where the training is now
            return replace(progress, max_save_seconds=slowest, checkpoint_bytes=msg.bytes)
        pressure = msg.seconds if msg.reason == "memory_pressure" else progress.pressure_save_seconds
        return replace(progress, epoch=msg.epoch, step=msg.step, phase="train", max_save_seconds=slowest,
                       pressure_save_seconds=pressure, checkpoint_bytes=msg.bytes)
    if isinstance(msg, EpochBegin):
        return replace(progress, epoch=msg.epoch, step=msg.step, end_step=msg.end_step(),
                       samples_per_step=msg.samples_per_step)
    if isinstance(msg, (EpochEnd, FaultFired)):
        return replace(progress, step=msg.step)
    return progress


@dataclass(frozen=True)
class AttemptEnd:
    """How an attempt ended (the evidence to classify) and what the monitor saw of it."""

    outcome: AttemptOutcome
    progress: Progress
    #: Private RSS of the worker's process tree; the cgroup's peak when the kernel OOM-killed it.
    memory_peak: int | None = None
    cgroup_peak: int | None = None  # includes page cache the kernel could have reclaimed
    gpu_memory_peak: int | None = None
    #: Per-device GPU peaks of the run's GPUs (gpu.DevicePeaks); None where none is watched.
    gpu_devices: DevicePeaks | None = None
    #: Seconds of each start-up phase that ended in this attempt (startup.py).
    startup_seconds: dict[str, float] = field(default_factory=dict)
    #: Those that calibrate later attempts' timeouts (not the import of a worker started ahead).
    calibrating: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------------------- the process


#: ``judge(progress)``, asked on every poll until it answers: None (not yet measurable), False (keep
#: training), True (stop the worker: the plan search switches plans).
Judge = Callable[[Progress], bool | None]


class WorkerProcess:
    """One attempt's worker: ``start()``, then ``watch()`` until it exits; ``stop()`` from anywhere."""

    def __init__(self, cfg: SupervisorConfig, attempt: int, *, journal: Journal, gpu: GpuMemory,
                 judge: Judge | None = None, warmup_steps: int = 0,
                 startup: StartupCalibration | None = None, gpus: tuple[tuple[int, str], ...] = ()) -> None:
        self.cfg = cfg
        self.attempt = attempt
        self.dir = cfg.run.attempt_dir(attempt)
        self.journal = journal
        self.gpu = gpu
        self.judge = judge
        #: The run's GPUs, (NVML index, TensorFlow's name) each (gpu.run_gpus): watched one by one.
        self.gpus = gpus
        self._device_peaks = DevicePeaks(tuple(name for _, name in gpus)) if gpus else None
        self.warmup_steps = warmup_steps
        #: Told each committed checkpoint's step (the mirror's wake-up, mirror.py); must not block.
        self.on_checkpoint: Callable[[int], None] | None = None
        #: What this call measured of earlier start-ups (startup.py); and so, the seconds of silence that
        #: read as a hang in each start-up phase.
        self.startup = startup or StartupCalibration()
        self.startup_timeouts: dict[str, float] = self.startup.timeouts(cfg.hang_timeout, cfg.startup_timeout)
        #: The memory budget in force: the run's, or the one a rehearsed host_oom armed.
        self.memory_limit = cfg.host_memory_limit
        #: What the supervisor did to the worker (AttemptOutcome.decision).
        self.decision: Intervention | None = None
        self._lock = threading.Lock()  # guards the fields below, written by the channel's reader thread
        self._progress = Progress()
        self._last_beat = time.monotonic()
        self._clock = StartupClock(self._last_beat)
        self._pending_preempt = self._pending_host_oom = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._group: MemoryCgroup | None = None
        self._oom_before = 0
        self._threads: list[threading.Thread] = []
        self._log: IO[bytes] | None = None
        self._last_rss: int | None = None
        self._peak: int | None = None
        self._gpu_peak: int | None = None
        self._telemetry = MemoryTelemetry(cfg.started, cfg.telemetry_schedule)  # memory_sample lines
        self._heartbeat_age: float | None = None
        #: The worker's error report sent over the channel when it could not write error.json (a full disk).
        self._sent_report: ErrorReport | None = None
        #: The worker's step board (its step at every step, in shared memory), once its notice named it.
        self._board: StepBoard | None = None
        self._board_seq = 0
        self._hang_phase: StartupPhase | None = None  # the start-up phase a hang was seen in
        self.interrupted = False  # Ctrl-C reached this attempt (interrupt())
        self.killed = False  # interrupt() had to SIGKILL it
        self._hang_timeout: float | None = None
        memory = getattr(cfg.policy, "memory", None)
        #: Asks for a checkpoint when memory runs short (None: the policy turned it off).
        self._pressure = (PressureWatch(memory.pressure_threshold, memory.rearm_threshold, memory.available_margin,
                                        memory.pressure_interval)
                          if memory is not None and memory.pressure_checkpoint else None)
        self._pressure_high = False  # memory above the mark at the last look: it is looked at every poll
        self._carried = 0  # memory an adopted worker brought, charged outside its cgroup (start())
        #: Called from the monitor after each memory sample (the supervisor's standby keeper); must not block.
        self.on_sample: Callable[[WorkerProcess], None] | None = None

    # ------------------------------------------------------------------ START

    def start(self, waiting: WaitingWorker | None = None) -> None:
        """Spawn the worker (or adopt ``waiting``, a worker started ahead: standby.py), put it into its
        memory cgroup, start reading its channel and output; an adopted worker gets its go last."""
        # A worker started ahead brings what its import took, charged outside the group (the kernel does not
        # move charges with a process): the group's limit leaves that out, so the worker's whole memory stays
        # within the budget, as a fresh worker's does.
        self._carried = (tree_rss(waiting.pid) or 0) if waiting is not None and waiting.alive() else 0
        group, note = self._open_cgroup()
        # Private (the run directory is code) and unbuffered: a full disk fails the write, not close().
        log = os.fdopen(os.open(self.dir / "worker.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE), "ab",
                        buffering=0)
        try:
            adopted = self._adopt(waiting, log) if waiting is not None else None
            proc, read_fd, output = adopted or self._spawn(log)
        except BaseException:
            log.close()
            if group is not None:
                group.remove()
            if waiting is not None:
                waiting.kill()  # not adopted: nobody else holds it any more
            raise
        self._proc, self._log = proc, log
        if group is not None:
            group, note = self._join_cgroup(group, proc.pid)
        if note:
            self.cfg.say(note)
        self._group = group
        self._oom_before = group.oom_kills() if group else 0
        self._threads = [ChannelReader(read_fd, self._on_message), output.thread]
        self._threads[0].start()
        if adopted is not None and waiting is not None:
            with self._lock:  # its start-up phases are timed from the go: the import is done or under way
                self._last_beat = time.monotonic()
                self._clock = StartupClock(self._last_beat, started_ahead=True)
            try:
                waiting.go(WorkerGo(run_dir=str(self.cfg.run.path), attempt=self.attempt,
                                    plan=str(self.dir / "plan.json")))
            except OSError:
                pass  # it died while waiting: the monitor sees it exit, and the attempt is classified as usual

    def _spawn(self, log: IO[bytes]) -> tuple[subprocess.Popen[bytes], int, WorkerOutput]:
        """A fresh worker for this attempt: (its process, the channel's read end, its output's pump)."""
        read_fd, write_fd = os.pipe()
        with self._lock:
            self._last_beat = time.monotonic()
            self._clock = StartupClock(self._last_beat)
        try:
            proc = subprocess.Popen(
                worker_command(self.cfg, self.attempt, write_fd), stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, pass_fds=(write_fd,),
                env=worker_env(self.cfg.extra_env), start_new_session=True,
            )
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        output = WorkerOutput(proc)
        output.attach(log)
        return proc, read_fd, output

    def _adopt(self, waiting: WaitingWorker, log: IO[bytes]) -> tuple[subprocess.Popen[bytes], int, WorkerOutput]:
        """Take a waiting worker for this attempt; its output so far goes to the attempt's log first."""
        proc, read_fd, output = waiting.take()
        output.attach(log)
        return proc, read_fd, output

    def _open_cgroup(self) -> tuple[MemoryCgroup | None, str | None]:
        """(the attempt's memory cgroup, or None with the note that says why the watchdog enforces the limit)."""
        limit = self.cfg.host_memory_limit
        if limit is None and not self.cfg.rehearse_host_oom:
            return None, None
        try:
            cap = max(limit - self._carried, limit // 2) if limit is not None else _total_ram()
            return MemoryCgroup.create(cap), None
        except OSError as e:
            if limit is not None:
                self.journal.write("memory_enforcement", attempt=self.attempt, mechanism="watchdog", reason=str(e))
            return None, f"memory cgroup unavailable ({e}); the psutil watchdog enforces the limit"

    def _join_cgroup(self, group: MemoryCgroup, pid: int) -> tuple[MemoryCgroup | None, str | None]:
        try:
            group.add(pid)
        except OSError as e:
            group.remove()
            return None, f"could not move the worker into {group.path} ({e}); the watchdog enforces the limit"
        carried = {"carried_bytes": self._carried} if self._carried and self.cfg.host_memory_limit else {}
        self.journal.write("memory_enforcement", attempt=self.attempt, mechanism=f"cgroup v{group.version}",
                           limit=group.limit, requested_limit=self.cfg.host_memory_limit, path=str(group.path),
                           **carried)
        return group, None

    # ------------------------------------------------------------------ MONITOR

    def watch(self) -> AttemptEnd:
        """Watch the worker until it exits; Ctrl-C gives it the preemption grace to save, then re-raises."""
        assert self._proc is not None, "start() first"
        next_sample = 0.0
        try:
            while self._proc.poll() is None:
                now = time.monotonic()
                if now >= next_sample:
                    next_sample = now + self.cfg.sample_interval
                    self._sample(now)
                    if self.on_sample is not None:
                        self.on_sample(self)
                elif self._pressure_high:
                    # Above the mark a quarter second is many steps: memory is looked at every poll (every
                    # PRESSURE_LOOK where that is cheap), so a request comes within a step or two of the climb.
                    self._look_at_pressure(now)
                self._check(now)
                if self.cfg.display is not None:
                    self.cfg.display.tick()  # the live displays redraw from this thread (a notebook needs it)
                fast = self._pressure_high and (self._group is not None or self.memory_limit is None)
                time.sleep(min(self.cfg.poll_interval, PRESSURE_LOOK) if fast else self.cfg.poll_interval)
        except KeyboardInterrupt:
            try:
                self.interrupt()  # let it save its SIGTERM checkpoint if it can; a second Ctrl-C kills at once
            finally:
                self._leave_cgroup()
            raise
        except BaseException:
            self.stop(grace=self.cfg.kill_grace)
            self._leave_cgroup()
            raise
        finally:
            for thread in self._threads:
                thread.join(timeout=10)
            if self._log is not None:
                self._log.close()
            self._journal_memory(self._telemetry.flush())  # the peak since the last line: the attempt's end
        return self._ended()

    def _sample(self, now: float) -> None:
        assert self._proc is not None
        rss = tree_rss(self._proc.pid)
        self._note_rss(rss)
        devices = self.gpu.per_device({self._proc.pid}) if self.gpu.available else []
        used = sum(held or 0 for held, _, _ in devices)
        if self._device_peaks is not None and devices:
            self._device_peaks.add([devices[i] if i < len(devices) else (None, None, None) for i, _ in self.gpus])
        if used:
            self._gpu_peak = max(self._gpu_peak or 0, used)
        group = self._group
        sample = MemorySample(rss=rss, cgroup=group.usage() if group is not None else None,
                              gpu=tuple(d[0] for d in devices), gpu_device=tuple(d[1] for d in devices),
                              gpu_total=tuple(d[2] for d in devices))
        self._journal_memory(self._telemetry.add(sample, now))
        self._watch_pressure(rss, group, now)

    def _look_at_pressure(self, now: float) -> None:
        """Between samples, under pressure: the worker's memory alone (no GPU, no telemetry line); with a
        cgroup, the group's files only (a fraction of a millisecond)."""
        assert self._proc is not None
        rss = None
        if self._group is None:
            rss = tree_rss(self._proc.pid)
            self._note_rss(rss)
        self._watch_pressure(rss, self._group, now)

    def _note_rss(self, rss: int | None) -> None:
        """A reading of the worker's memory, kept as the last one and the peak. Not once the supervisor has
        killed the worker (the watchdog, a hang): the last reading is then the evidence, and a process on its
        way out reads 0. (After a SIGTERM, a preemption's or a probe's, the watchdog still watches it save.)"""
        if rss and self.decision not in ("watchdog", "hang"):
            self._last_rss = rss
            self._peak = max(self._peak or 0, rss)

    def _pressure_usage(self, rss: int | None, group: MemoryCgroup | None) -> int | None:
        """The worker's memory as its limit counts it. With a cgroup: what the kernel holds to the group's
        own limit (its usage less inactive file cache, read afresh: near the limit the kernel keeps the usage
        pinned there and reclaims that cache), plus the difference between the run's limit and the group's
        (what an adopted worker brought, charged outside); else its private RSS (the watchdog's measure)."""
        working_set = group.working_set() if group is not None else None
        if group is None or working_set is None:
            return rss
        outside = self.memory_limit - group.limit if self.memory_limit is not None else 0
        return working_set + max(0, outside)

    def _watch_pressure(self, rss: int | None, group: MemoryCgroup | None, now: float) -> None:
        """Memory running short: ask the worker (SIGUSR1, to it alone) for a checkpoint at its next step
        boundary (``PressureWatch``: on crossing the mark, as memory climbs on, at an interval while it stays
        above), journaled as ``checkpoint_requested`` with its ``trigger``."""
        watch, proc = self._pressure, self._proc
        if watch is None or proc is None or self.decision is not None:
            self._pressure_high = False
            return
        with self._lock:
            progress = self._progress
        if progress.start_step is None:
            return  # no Hello yet: nothing to checkpoint
        limit = self.memory_limit
        used = self._pressure_usage(rss, group)
        available = available_memory() if limit is None else None
        self._pressure_high = watch.high(used, limit, available)
        cost = progress.pressure_save_seconds or progress.max_save_seconds
        trigger = watch.observe(used, limit, available, now=now, step=progress.step, save_seconds=cost,
                                reserve=SAVE_RESERVE_FACTOR * progress.checkpoint_bytes)
        if trigger is None:
            return
        try:
            self.journal.write("checkpoint_requested", attempt=self.attempt, reason="memory_pressure",
                               trigger=trigger, epoch=progress.epoch, step=progress.step, used_bytes=used,
                               limit_bytes=limit, available_bytes=available)
        except OSError:
            pass  # a full disk must not stop the request
        if trigger == "first_crossing":  # the repeats of the climb are in the journal only
            if limit is not None:
                why = f"{format_bytes(used)} of the {format_bytes(limit)} limit ({(used or 0) / limit:.0%})"
            else:
                why = f"{format_bytes(available)} left available on the machine"
            self.cfg.say(f"memory pressure: {why}; asking the worker for a checkpoint at its next step "
                         "(and again while memory climbs)")
        try:
            os.kill(proc.pid, signal.SIGUSR1)  # not the group: its children keep SIGUSR1's default (exit)
        except (ProcessLookupError, PermissionError):
            pass

    def _journal_memory(self, sample: MemorySample | None) -> None:
        """A ``memory_sample`` line (telemetry.py): best effort, so a full disk never stops the monitor."""
        if sample is None:
            return
        with self._lock:
            progress = self._progress
        mechanism = None if self.memory_limit is None else "cgroup" if self._group is not None else "watchdog"
        fields = sample.fields(self.memory_limit, mechanism, self.cfg.gpu_memory_limit)
        try:
            self.journal.note("memory_sample", attempt=self.attempt, epoch=progress.epoch, step=progress.step,
                              **fields)
        except OSError:
            pass

    def _check(self, now: float) -> None:
        """One look at the worker: act on a rehearsal, the memory budget, the plan search, silence."""
        self._read_board(now)
        with self._lock:
            progress, age, phase = self._progress, now - self._last_beat, self._clock.phase()
            preempt, arm = self._pending_preempt, self._pending_host_oom
            self._pending_preempt = self._pending_host_oom = False
        if arm:
            self._arm_rehearsal_limit()
        if preempt and self.decision is None:
            self.decision = "preempt"
            self.cfg.say("rehearsed preemption: sending SIGTERM to the worker")
            self._signal(signal.SIGTERM)
        if self._over_budget() and self.decision in (None, "preempt"):
            self.decision = "watchdog"
            self._signal(signal.SIGKILL)
        if self.judge is not None and self.decision is None and self._switch_plans(progress):
            self.decision = "probe"
            self._signal(signal.SIGTERM)  # it checkpoints and exits; the next attempt runs the next plan
        timeout = self.hang_timeout(progress, phase)
        if age > timeout and self.decision is None:
            self.decision, self._heartbeat_age = "hang", age
            self._hang_phase, self._hang_timeout = phase, timeout
            during = f" during start-up ({phase})" if phase else ""
            self.cfg.say(f"no heartbeat for {age:.1f}s{during} (timeout {timeout:.1f}s): stopping the worker")
            self.stop(grace=self.cfg.kill_grace)
        if self.decision == "preempt" and age > self.cfg.preempt_grace:
            self._signal(signal.SIGKILL)

    def memory_use(self) -> tuple[int | None, int | None]:
        """(the memory budget in force, the worker's use against it: its cgroup's, else its private RSS)."""
        group = self._group
        usage = group.usage() if group is not None else None
        return self.memory_limit, usage if usage is not None else self._last_rss

    def _switch_plans(self, progress: Progress) -> bool:
        assert self.judge is not None
        verdict = self.judge(progress)
        if verdict is not None:
            self.judge = None  # judged once per attempt
        return bool(verdict)

    def _over_budget(self) -> bool:
        """Over the memory budget with no cgroup to enforce it: the watchdog's case."""
        return (self.memory_limit is not None and self._group is None and self._last_rss is not None
                and self._last_rss > self.memory_limit)

    def _arm_rehearsal_limit(self) -> None:
        """A rehearsed host_oom fired in a run without a limit: a limit just above current usage."""
        group = self._group
        base = (group.usage() if group is not None else None) or self._last_rss or 0
        self.memory_limit = base + REHEARSAL_HEADROOM
        if group is not None:
            group.set_limit(self.memory_limit)
        self.journal.write("rehearsal_limit", limit=self.memory_limit, mechanism="cgroup" if group else "watchdog")

    def hang_timeout(self, progress: Progress, startup: StartupPhase | None = None) -> float:
        """Seconds of silence that read as a hang in the worker's current phase (``startup``: the start-up
        phase it is in, None after its first trained step)."""
        cfg = self.cfg
        if startup == "first_step" and progress.skip_steps:  # a factory re-reads what a resumed epoch skips
            return self.startup.first_step_timeout(self.startup_timeouts, progress.skip_steps,
                                                   startup_cap(cfg.hang_timeout, cfg.startup_timeout))
        if startup is not None:
            return self.startup_timeouts[startup]
        if cfg.hang_timeout is not None:
            base = cfg.hang_timeout
        else:
            base = max(AUTO_HANG_FLOOR, AUTO_HANG_FACTOR * progress.max_step_seconds)
        if progress.phase in ("save", "epoch_end", "validate"):
            return max(base, 3 * progress.max_save_seconds + base)
        return base

    def ended(self) -> AttemptEnd:
        """How the attempt ended, once the worker was reaped (``watch()`` returns it; after Ctrl-C, ask)."""
        return self._ended()

    def _ended(self) -> AttemptEnd:
        assert self._proc is not None
        self._read_board()  # the step it was at when it ended: exact, even for a kill
        if self._board is not None:
            self._board.close()
            self._board = None
        group, peak = self._group, self._peak
        oom_kills, cgroup_peak = 0, None
        if group is not None:
            oom_kills = group.oom_kills() - self._oom_before
            cgroup_peak = group.peak()
            if oom_kills and cgroup_peak:
                peak = max(peak or 0, cgroup_peak)  # the spike that the kernel killed for
            self._leave_cgroup()
        outcome = AttemptOutcome(
            returncode=self._proc.returncode, report=read_error_report(self.dir) or self._sent_report,
            decision=self.decision,
            oom_kills=oom_kills, last_rss=self._last_rss, memory_limit=self.memory_limit,
            heartbeat_age=self._heartbeat_age, completed=self.cfg.run.result_json.exists(),
            startup_phase=self._hang_phase or self._clock.phase(), hang_timeout=self._hang_timeout,
        )
        with self._lock:
            progress, startup, calibrating = self._progress, self._clock.measured(), self._clock.calibrating()
        return AttemptEnd(outcome, progress, memory_peak=peak, cgroup_peak=cgroup_peak,
                          gpu_memory_peak=self._gpu_peak, gpu_devices=self._device_peaks, startup_seconds=startup,
                          calibrating=calibrating)

    def _leave_cgroup(self) -> None:
        if self._group is not None:
            self._group.remove()
            self._group = None

    # ------------------------------------------------------------------ the channel and the output

    def _on_message(self, msg: Any) -> None:
        """Runs on the channel's reader thread, for every message."""
        if isinstance(msg, Notice) and msg.event == "step_board":
            self._open_board(msg.fields.get("fd"))
            return
        with self._lock:
            self._last_beat = time.monotonic()
            self._clock.saw(msg, self._last_beat)
            self._progress = advance(self._progress, msg, self.warmup_steps)
            if isinstance(msg, FaultFired):
                self._pending_preempt |= msg.kind == "preempt"
                self._pending_host_oom |= msg.kind == "host_oom" and self.cfg.host_memory_limit is None
        if self.cfg.display is not None:
            # Host memory: the last sample; GPU: the attempt's peak so far (what an OOM is measured against).
            self.cfg.display.progress(msg, host_memory=self._last_rss, gpu_memory=self._gpu_peak)
        self._journal_message(msg)

    def _journal_message(self, msg: Any) -> None:
        attempt = self.attempt
        if isinstance(msg, Hello):
            self.journal.write("worker_ready", attempt=attempt, pid=msg.pid, epoch=msg.epoch, step=msg.step,
                               resumed_from_step=msg.resumed_from, skip_steps=msg.skip_steps)
        elif isinstance(msg, CheckpointSaved):
            self.journal.write("checkpoint_saved", attempt=attempt, epoch=msg.epoch, step=msg.step,
                               seconds=round(msg.seconds, 4), bytes=msg.bytes, reason=msg.reason, path=msg.path,
                               **_save_timing(msg))
            if self.on_checkpoint is not None:
                self.on_checkpoint(msg.step)
        elif isinstance(msg, EpochEnd):
            self.journal.write("epoch_end", attempt=attempt, epoch=msg.epoch, step=msg.step, logs=msg.logs)
        elif isinstance(msg, FaultFired):
            self.journal.write("fault_fired", attempt=attempt, kind=msg.kind, step=msg.step, fault=msg.key)
        elif isinstance(msg, Notice):
            self._take_notice(msg)
            fields = {k: v for k, v in msg.fields.items() if k not in {"time", "event", "attempt"}}
            self.journal.write(msg.event, attempt=attempt, **fields)

    def _open_board(self, fd: Any) -> None:
        """Map the worker's step board; where that fails, the supervisor knows the step from the heartbeats
        (at most a quarter of a second old), and the journal says why."""
        proc = self._proc
        if proc is None or not isinstance(fd, int) or self._board is not None:
            return
        try:
            self._board = StepBoard.open(proc.pid, fd)
        except OSError as exc:
            try:
                self.journal.write("step_board_failed", attempt=self.attempt, error=str(exc))
            except OSError:
                pass

    def _read_board(self, now: float | None = None) -> None:
        """The worker's newest step from its board, into the progress (a new step is also a sign of life)."""
        board = self._board
        record = board.read() if board is not None else None
        if record is None:
            return
        seq, phase, epoch, step = record
        with self._lock:
            # Every heartbeat is written on the board before it is sent, so the board's phase is the newest
            # (a heartbeat still in the pipe may name an older one, as a save's does); a message may tell a
            # newer step (a fault fired before the step's write): the step is the larger.
            progress = self._progress
            if step >= (progress.step or 0) and (phase, epoch, step) != (progress.phase, progress.epoch, progress.step):
                self._progress = replace(progress, phase=phase, epoch=epoch, step=step)
            elif phase != progress.phase:
                self._progress = replace(progress, phase=phase)
            if seq != self._board_seq:
                self._board_seq = seq
                if now is not None:
                    self._last_beat = max(self._last_beat, now)  # a new step written: a sign of life

    def _take_notice(self, msg: Notice) -> None:
        """What a notice means beyond its journal line: a damaged checkpoint, and an adopted standby left at a low
        CPU priority, are said on the console; an error report the worker could not write to disk is kept as if
        read from error.json."""
        if msg.event == "checkpoint_corrupt":
            self.cfg.say(f"attempt {self.attempt}: checkpoint {Path(str(msg.fields.get('path', '?'))).name} is "
                         f"damaged ({msg.fields.get('reason', 'unknown')}); skipped: the attempt resumes from the newest one "
                         "that verifies")
        elif msg.event == "standby_priority" and msg.fields.get("restored") is False:
            self.cfg.say(f"attempt {self.attempt}: the standby worker it took could not return to the normal CPU "
                         f"priority after its low-priority import ({msg.fields.get('detail', 'no reason given')}); "
                         "it trains at the low one. If restarts train slowly, set [runtime] standby = \"off\" in "
                         "the policy")
        elif msg.event == "error_report":
            try:
                self._sent_report = ErrorReport.model_validate(msg.fields.get("report"))
            except ValidationError:
                pass

    # ------------------------------------------------------------------ stopping

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode if self._proc is not None else None

    def interrupt(self) -> None:
        """Ctrl-C: SIGTERM (the worker saves a checkpoint at its next step and exits), wait while it
        shows life (``interrupt_patience``), at most ``preempt_grace``; then SIGKILL and reap. A second
        Ctrl-C during the wait SIGKILLs at once, reaps, and re-raises. Nothing when it was reaped already."""
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        if proc.poll() is None:
            self.interrupted = True
            self._signal(signal.SIGTERM)
            try:
                self._wait_while_alive(proc)
            except KeyboardInterrupt:
                self._kill_and_reap(proc)
                raise
        self._kill_and_reap(proc)

    def _wait_while_alive(self, proc: subprocess.Popen[bytes]) -> None:
        started = time.monotonic()
        while proc.poll() is None:
            now = time.monotonic()
            self._read_board(now)
            with self._lock:
                progress, age = self._progress, now - self._last_beat
            if now - started >= self.cfg.preempt_grace:
                return
            if now - started >= INTERRUPT_SILENCE and age > interrupt_patience(progress):
                return
            time.sleep(self.cfg.poll_interval)

    def _kill_and_reap(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL the worker's group unless it exited, and reap it (no zombie), whatever Ctrl-C says."""
        if proc.poll() is None:
            self.killed = True
            self._signal(signal.SIGKILL)
        for _ in range(3):  # SIGKILL is not refused; a further Ctrl-C must not leave the process unreaped
            try:
                proc.wait(timeout=30)
                return
            except KeyboardInterrupt:
                continue
            except subprocess.TimeoutExpired:
                return  # stuck in the kernel (D state): nothing more a signal can do

    def stop(self, grace: float) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds; nothing when the worker already exited."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        self._signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            proc.wait(timeout=30)

    def _signal(self, sig: int) -> None:
        """Signal the worker's whole process group (it leads its own session), children included."""
        proc = self._proc
        assert proc is not None
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError, OSError):
            try:
                proc.send_signal(sig)
            except (ProcessLookupError, OSError):
                pass


# ------------------------------------------------------------------------------------------- helpers


def _save_timing(msg: CheckpointSaved) -> dict[str, Any]:
    """A checkpoint's split timing for its journal line (absent for a worker that does not report it)."""
    if msg.snapshot_seconds is None:
        return {}
    return {"snapshot_seconds": round(msg.snapshot_seconds, 4), "write_seconds": round(msg.write_seconds or 0.0, 4),
            "background": msg.background}


def interrupt_patience(progress: Progress) -> float:
    """Seconds of silence after which a worker asked to stop by Ctrl-C shows no more life: a few
    seconds plus twice its slowest step (it finishes the step, then saves); longer during a save."""
    if progress.phase == "save":
        return INTERRUPT_SAVE_PATIENCE + 3 * progress.max_save_seconds
    return INTERRUPT_SILENCE + 2 * progress.max_step_seconds



def worker_command(cfg: SupervisorConfig, attempt: int, fd: int) -> list[str]:
    """The worker's argv: ``python -m resilient.worker`` with its run, attempt, channel and plan."""
    if cfg.worker_cmd is not None:
        return cfg.worker_cmd(attempt, fd)
    return [sys.executable, "-m", "resilient.worker", "--run-dir", str(cfg.run.path),
            "--attempt", str(attempt), "--channel-fd", str(fd), "--supervisor-pid", str(os.getpid()),
            "--plan", str(cfg.run.attempt_dir(attempt) / "plan.json")]


def worker_env(extra_env: dict[str, str]) -> dict[str, str]:
    """The worker's environment: ours, TensorFlow's settings, this package on PYTHONPATH, then ``extra_env``."""
    env = dict(os.environ)
    env.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # glibc gives each thread that allocates its own malloc arena; under TensorFlow's thread pools
    # freed activations fragment them and the worker's RSS creeps up epoch after epoch, so a plan
    # that fitted can be OOM-killed later. Two arenas lower the footprint and the creep (10
    # epochs of bench_degradation's model at batch 32: private RSS 760 -> 935 MB by default,
    # 661 -> 876 MB with two arenas) at no measurable cost in throughput. The caller's setting wins.
    env.setdefault("MALLOC_ARENA_MAX", "2")
    env["PYTHONUNBUFFERED"] = "1"
    package_root = str(Path(__file__).resolve().parents[2])
    paths = [package_root] + [p for p in sys.path if p and os.path.isdir(p)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env.update(extra_env)
    return env


def read_error_report(attempt_dir: Path) -> ErrorReport | None:
    """The worker's ``error.json``, or None when it wrote none (or a damaged one)."""
    try:
        return ErrorReport.model_validate_json((attempt_dir / "error.json").read_bytes())
    except (OSError, ValidationError):
        return None


def _total_ram() -> int:
    import psutil

    return int(psutil.virtual_memory().total)
