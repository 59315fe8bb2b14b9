"""The supervisor: runs attempts in worker subprocesses until the training completes or cannot.

State machine (one ``run()`` loop; tenacity drives the restarts)::

    START ──> MONITOR ──> CLASSIFY ──┬──> FINISH           worker wrote result.json and exited 0
      ^                              ├──> GIVE_UP          user_error, restarts exhausted, or no progress
      |                              └──> DEGRADE ──> RESTART ──┐
      └─────────────────────────────────────────────────────────┘

- START spawns ``python -m resilient.worker.attempt`` (never a fork of this process) with a pipe for
  the channel, puts it into its memory cgroup when there is a limit, and journals ``attempt_started``.
- MONITOR forwards the worker's output to our stdout, reads heartbeats and progress, samples
  memory (psutil, cgroup, NVML), and acts: a silent worker is killed as a hang; a worker over the
  memory budget without a cgroup is killed by the watchdog; a rehearsed ``preempt`` gets SIGTERM.
- CLASSIFY turns the evidence into an Incident (see classify.py).
- DEGRADE asks the policy for the next plan; the new plan is written to plan.json before the restart.
- RESTART waits: nothing after a degradation or a preemption, exponential backoff for repeats.
"""

from __future__ import annotations

import codecs
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import tenacity

from .._checkpoint import CheckpointStore
from .._errors import TrainingFailedError, UserCodeError
from .._incident import Incident
from .._plan import Plan
from .._protocol import (
    EXIT_PREEMPTED,
    EXIT_REPORTED,
    ChannelReader,
    CheckpointSaved,
    EpochBegin,
    EpochEnd,
    FaultFired,
    Heartbeat,
    Hello,
    Notice,
)
from .._rundir import Journal, RunDir, atomic_write_text
from .._units import format_bytes
from ..policy.search import Horizon, PlanSearch
from .classify import AttemptOutcome, classify
from .memory import GpuMemory, MemoryCgroup, tree_rss

#: Floor of the automatic hang timeout, in seconds.
AUTO_HANG_FLOOR = 120.0
#: An automatic hang timeout is this many times the slowest step seen so far.
AUTO_HANG_FACTOR = 10.0
#: Memory of the rehearsed host_oom when the run has no limit: current usage plus this.
REHEARSAL_HEADROOM = 256 << 20


@dataclass
class SupervisorConfig:
    run: RunDir
    policy: Any  # resilient.policy.policy.Policy
    context: Any  # resilient.policy.policy.StepContext
    max_restarts: int
    hang_timeout: float | None = None  # None: calibrated from observed step times
    startup_timeout: float = 600.0
    host_memory_limit: int | None = None
    rehearse_host_oom: bool = False
    kill_grace: float = 5.0
    preempt_grace: float = 120.0
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    poll_interval: float = 0.05
    sample_interval: float = 0.25
    worker_cmd: Callable[[int, int], list[str]] | None = None  # (attempt, channel_fd) -> argv; a seam for tests
    extra_env: dict[str, str] = field(default_factory=dict)
    stream: IO[str] | None = None  # where worker output goes; None: sys.stdout at write time
    sleep: Callable[[float], None] = time.sleep
    echo: bool = True


@dataclass
class RunResult:
    history: dict[str, list[float]]
    epochs_done: list[int]
    incidents: list[Incident]
    plan: Plan  # the settled plan (plan.json), the one a later call resumes with
    checkpoint: str | None
    unjudged_probe: Plan | None = None  # the run completed on this probe before it could be judged


OOM_KINDS = ("gpu_oom", "host_oom")


class _Restart(Exception):
    """Restart with a new plan that is not a reaction to an incident (a probe)."""


class _AttemptFailed(Exception):
    def __init__(self, incident: Incident, no_progress: bool) -> None:
        super().__init__(incident.detail)
        self.incident = incident
        self.no_progress = no_progress


class _Monitor:
    """Live state of one attempt, fed by the channel reader thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.last_beat = time.monotonic()
        self.phase = "startup"
        self.epoch: int | None = None
        self.step: int | None = None
        self.trained_steps = 0
        self.max_step_seconds = 0.0
        self.max_save_seconds = 0.0
        self.pending_preempt = False
        self.pending_host_oom = False
        self.resumed_from: int | None = None
        self.start_step: int | None = None
        self.cgroup_peak: int | None = None
        # Throughput: the worker's cumulative (timed steps, timed seconds), after the warm-up and now.
        self.timing_base: tuple[int, float] | None = None
        self.timing: tuple[int, float] | None = None
        # What is left of the run (EpochBegin): the global step it ends at under this plan.
        self.end_step: int | None = None
        self.samples_per_step: int | None = None

    def samples_per_second(self, batch_size: int) -> float | None:
        """Throughput of this attempt since the end of its warm-up (None: not measured)."""
        if self.timing_base is None or self.timing is None:
            return None
        steps, seconds = self.timing[0] - self.timing_base[0], self.timing[1] - self.timing_base[1]
        return batch_size * steps / seconds if steps > 0 and seconds > 0 else None

    def seconds_per_step(self) -> float | None:
        """Measured seconds per training step since the warm-up (None: not measured)."""
        if self.timing_base is None or self.timing is None:
            return None
        steps, seconds = self.timing[0] - self.timing_base[0], self.timing[1] - self.timing_base[1]
        return seconds / steps if steps > 0 and seconds > 0 else None


class Supervisor:
    """Runs the training to completion, one worker attempt at a time."""

    def __init__(self, config: SupervisorConfig) -> None:
        self.cfg = config
        self.rundir = config.run
        self.journal = Journal(config.run.events)
        self.incidents: list[Incident] = []
        self.plan = config.run.read_plan()
        self.gpu = GpuMemory()
        self._attempts_started = 0
        self._attempt_base = sum(1 for e in self.rundir.read_events() if e.get("event") == "attempt_started")
        self._proc: subprocess.Popen[bytes] | None = None
        # After an OOM degradation: the search for the best batch size that fits (see policy/search.py).
        self._search = PlanSearch(config.policy.probe)
        self._switch_to: Plan | None = None

    # ------------------------------------------------------------------ run loop

    def run(self) -> RunResult:
        cfg = self.cfg
        retrying = tenacity.Retrying(
            stop=tenacity.stop_any(self._stop_after_restarts, _stop_when_no_progress),
            wait=self._wait,
            retry=tenacity.retry_if_exception_type((_AttemptFailed, _Restart)),
            sleep=cfg.sleep,
            reraise=True,
        )
        try:
            return retrying(self._attempt)
        except _AttemptFailed as failed:
            reason = (
                "no progress: the same incident at the same step twice with no rung left to apply"
                if failed.no_progress
                else f"restarts exhausted (max_restarts={cfg.max_restarts})"
            )
            self.journal.write("run_finished", status="failed", reason=reason)
            raise TrainingFailedError(
                root_cause_report(self.incidents, self.rundir, reason), incidents=list(self.incidents),
                run_dir=str(self.rundir.path),
            ) from None
        except KeyboardInterrupt:
            self._stop_worker(grace=cfg.preempt_grace)
            self.journal.write("run_finished", status="interrupted")
            raise

    def _stop_after_restarts(self, retry_state: tenacity.RetryCallState) -> bool:
        """Stop once the incidents of this call exceed max_restarts (probe restarts are free)."""
        return len(self.incidents) > self.cfg.max_restarts

    def _wait(self, retry_state: tenacity.RetryCallState) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        if not isinstance(exc, _AttemptFailed):
            return 0.0  # a probe restart
        if exc.incident.plan_changed or exc.incident.kind == "preempted":
            return 0.0  # a new plan, or a polite stop: no reason to wait
        # Back off only while failures repeat without progress: a checkpoint that moved on since the
        # previous incident resets the count.
        repeats = 0
        previous_ckpt: int | None = None
        for inc in reversed(self.incidents):
            if inc.plan_changed or inc.kind == "preempted":
                break
            if previous_ckpt is not None and (inc.checkpoint_step or -1) < previous_ckpt:
                break
            previous_ckpt = inc.checkpoint_step or -1
            repeats += 1
        return tenacity.wait_exponential(multiplier=self.cfg.backoff_base, max=self.cfg.backoff_max)(
            _FakeState(repeats)
        )

    # ------------------------------------------------------------------ one attempt

    def _attempt(self) -> RunResult:
        attempt = self._attempt_base + self._attempts_started  # probe restarts are attempts too
        self._attempts_started += 1
        adir = self.rundir.attempt_dir(attempt)
        adir.mkdir(parents=True, exist_ok=True)
        for stale in ("error.json",):
            (adir / stale).unlink(missing_ok=True)
        self.rundir.result_json.unlink(missing_ok=True)
        atomic_write_text(adir / "plan.json", self.plan.model_dump_json(indent=2))
        self.journal.write("attempt_started", attempt=attempt, plan=self.plan.model_dump(mode="json"),
                           probe=self._search.probing == self.plan)
        self._say(f"attempt {attempt} starting with plan: {self.plan.describe()}")
        label = f"attempt {attempt}" + (f" (probe {self.plan.describe()})" if self._search.probing == self.plan else "")

        try:
            outcome, mon, peak = self._spawn_and_monitor(attempt, adir)
        except KeyboardInterrupt:
            self._say(f"{label} interrupted (Ctrl-C), {_saved_text(self.rundir)}")
            raise
        kind, detail, evidence = classify(outcome)
        ended = {"returncode": outcome.returncode}
        if outcome.signal:
            ended["signal"] = outcome.signal
        if getattr(mon, "cgroup_peak", None):
            ended["cgroup_peak_bytes"] = mon.cgroup_peak
        self.journal.write("attempt_ended", attempt=attempt, memory_peak_bytes=peak, **ended)

        if kind is None:
            result = json.loads(self.rundir.result_json.read_text())
            unjudged = self._completed(attempt, label, mon, result)
            self.journal.write("run_finished", status="completed", epochs=len(result["epochs_done"]),
                               global_step=result["global_step"])
            meta = CheckpointStore(self.rundir.checkpoints).latest_meta()
            return RunResult(result["history"], result["epochs_done"], list(self.incidents), self.rundir.read_plan(),
                             meta["path"] if meta else None, unjudged_probe=unjudged)

        ckpt = CheckpointStore(self.rundir.checkpoints).latest_meta()
        report = outcome.report or {}
        # The worker's own report is exact; heartbeats are throttled and may lag a step or two.
        epoch = report["epoch"] if report.get("epoch") is not None else mon.epoch
        step = report["step"] if report.get("step") is not None else mon.step
        base = dict(kind=kind, attempt=attempt, epoch=epoch, step=step, detail=detail, evidence=evidence,
                    returncode=outcome.returncode, signal=outcome.signal, memory_peak_bytes=peak,
                    checkpoint_step=ckpt["step"] if ckpt else None, plan_before=self.plan)
        if kind == "user_error":
            incident = Incident(**base, action="stop: the training code raised an error; not retried")
            self._record(incident)
            self._say(f"{label} ended: {kind} ({detail}) {_progress_text(mon, step, ckpt)}; not retried")
            self.journal.write("run_finished", status="user_error")
            report = outcome.report or {}
            raise UserCodeError(
                f"The training code raised {report.get('type')}: {report.get('message')}\n"
                f"It is not a resource failure, so resilient did not retry. The run directory keeps its last "
                f"checkpoint ({_ckpt_text(ckpt)}); fix the error and call fit again with run_dir="
                f"{str(self.rundir.path)!r} to resume.\n\nWorker traceback:\n{report.get('traceback', '')}",
                traceback=report.get("traceback", ""), run_dir=str(self.rundir.path),
            )

        switch_to = self._switch_to
        self._switch_to = None
        if outcome.decision == "probe" and kind == "preempted" and switch_to is not None:
            # Not an incident: we stopped a healthy worker to try another plan, or to leave a rejected probe.
            search = self._search
            if switch_to == search.probing:
                self.journal.write("probe_started", attempt=attempt, **{
                    "from": self.plan.model_dump(mode="json"), "to": switch_to.model_dump(mode="json"),
                    "direction": "up" if switch_to.batch_size > self.plan.batch_size else "down",
                    "working": search.working.model_dump(mode="json") if search.working else None,
                    "working_samples_per_s": round(search.working_rate, 2) if search.working_rate else None})
                self._say(f"{label} stopped {_progress_text(mon, step, ckpt)}, to measure another plan: probe "
                          f"{switch_to.describe()} (working: {search.working.describe() if search.working else '-'})")
            else:
                self._say(f"{label} stopped {_progress_text(mon, step, ckpt)}, to go back to the working plan "
                          f"{switch_to.describe()}")
            self.plan = switch_to
            raise _Restart()
        if outcome.decision == "probe":
            self._search.cancel()  # the worker ended otherwise before the switch

        if self._search.probing == self.plan and kind in OOM_KINDS and self._search.working is not None:
            # The probe did not fit: it becomes the new upper bound; go back to the plan that works.
            failed_probe = self.plan
            working = self._search.probe_oom(failed_probe)
            incident = Incident(**base, action=f"probe failed: back to {working.describe()}", plan_after=working)
            self._record(incident)
            self.journal.write("probe_failed", attempt=attempt, plan=failed_probe.model_dump(mode="json"),
                               back_to=working.model_dump(mode="json"))
            self._say(f"{label} ended: {kind} ({detail}) {_progress_text(mon, step, ckpt)}; the probe does not "
                      f"fit: back to {working.describe()}")
            self.plan = working
            raise _AttemptFailed(incident, no_progress=False)

        probe = Incident(**base, action="")
        degraded = self.cfg.policy.degrade(self.plan, probe, self._context())
        if degraded is not None:
            new_plan, step_obj = degraded
            action = f"degrade: {step_obj}"
        else:
            new_plan, action = self.plan, "restart with the same plan"
        no_progress = (
            degraded is None
            and any(i.kind == kind and i.step == step and not i.plan_changed for i in self.incidents)
        )
        if no_progress:
            action = "give up: no progress"
        incident = Incident(**base, action=action, plan_after=new_plan)
        self._record(incident)
        if kind in OOM_KINDS and new_plan.batch_size < self.plan.batch_size:
            self._search.degraded(self.plan, new_plan)  # bounds for finding the best batch that fits
        if new_plan != self.plan:
            self.journal.write("plan_changed", **{"from": self.plan.model_dump(mode="json"),
                                                  "to": new_plan.model_dump(mode="json"), "reason": action,
                                                  "incident": kind})
            self.rundir.write_plan(new_plan)
            self.plan = new_plan
        self._say(f"{label} ended: {kind} ({detail}) {_progress_text(mon, step, ckpt)}; {action}"
                  + (f"; new plan: {new_plan.describe()}" if incident.plan_changed else ""))
        raise _AttemptFailed(incident, no_progress)

    def _completed(self, attempt: int, label: str, mon: _Monitor, result: dict[str, Any]) -> Plan | None:
        """The run completed in this attempt: say so; returns the probe it ended on before it was judged.

        plan.json keeps the settled plan: a probe that trained to the end was never measured, and one
        that was rejected (its stop came too late) is slower."""
        self._switch_to = None  # a stop for another plan came too late: nothing left to train
        unjudged = self._search.finished(self.plan)
        settled = self.rundir.read_plan()
        self._say(f"{label} completed {_progress_text(mon, result.get('global_step'), None, saved=False)}; "
                  f"the training is done")
        if self.plan == settled:
            return None
        if unjudged:
            self.journal.write("probe_unjudged", attempt=attempt, plan=self.plan.model_dump(mode="json"),
                               working=settled.model_dump(mode="json"),
                               reason="the run completed before the probe could be measured")
            self._say(f"the run completed on probe {self.plan.describe()} before it could be judged; plan.json "
                      f"keeps the working plan {settled.describe()}")
            return self.plan
        self._say(f"the run completed on {self.plan.describe()} before it could go back to the working plan; "
                  f"plan.json keeps {settled.describe()}")
        return None

    def _context(self) -> Any:
        ctx = self.cfg.context
        try:
            import dataclasses

            return dataclasses.replace(ctx, incidents=tuple(self.incidents))
        except TypeError:
            return ctx

    def _record(self, incident: Incident) -> None:
        self.incidents.append(incident)
        self.journal.write("incident", **incident.model_dump(mode="json", exclude={"plan_before", "plan_after"}),
                           plan_before=incident.plan_before.model_dump(mode="json"),
                           plan_after=incident.plan_after.model_dump(mode="json") if incident.plan_after else None)

    # ------------------------------------------------------------------ spawn and watch

    def _command(self, attempt: int, fd: int) -> list[str]:
        if self.cfg.worker_cmd is not None:
            return self.cfg.worker_cmd(attempt, fd)
        return [sys.executable, "-m", "resilient.worker", "--run-dir", str(self.rundir.path),
                "--attempt", str(attempt), "--channel-fd", str(fd), "--supervisor-pid", str(os.getpid()),
                "--plan", str(self.rundir.attempt_dir(attempt) / "plan.json")]

    def _env(self) -> dict[str, str]:
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
        env.update(self.cfg.extra_env)
        return env

    def _spawn_and_monitor(self, attempt: int, adir: Path) -> tuple[AttemptOutcome, _Monitor, int | None]:
        cfg = self.cfg
        limit = cfg.host_memory_limit
        group: MemoryCgroup | None = None
        group_note = None
        if limit is not None or cfg.rehearse_host_oom:
            try:
                group = MemoryCgroup.create(limit if limit is not None else _total_ram())
            except OSError as e:
                group_note = f"memory cgroup unavailable ({e}); the psutil watchdog enforces the limit"
                if limit is not None:
                    self.journal.write("memory_enforcement", attempt=attempt, mechanism="watchdog", reason=str(e))
        read_fd, write_fd = os.pipe()
        mon = _Monitor()
        log = open(adir / "worker.log", "ab")
        try:
            proc = subprocess.Popen(
                self._command(attempt, write_fd), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, pass_fds=(write_fd,), env=self._env(), start_new_session=True,
            )
        except BaseException:
            os.close(read_fd)
            os.close(write_fd)
            log.close()
            if group is not None:
                group.remove()
            raise
        os.close(write_fd)
        self._proc = proc
        if group is not None:
            try:
                group.add(proc.pid)
                self.journal.write("memory_enforcement", attempt=attempt, mechanism=f"cgroup v{group.version}",
                                   limit=group.limit, requested_limit=limit, path=str(group.path))
            except OSError as e:
                group_note = f"could not move the worker into {group.path} ({e}); the watchdog enforces the limit"
                group.remove()
                group = None
        if group_note:
            self._say(group_note)
        oom_before = group.oom_kills() if group else 0
        warmup = self._search.settings.warmup_steps()
        effective_limit = [limit]

        def on_message(msg: Any) -> None:
            now = time.monotonic()
            with mon.lock:
                mon.last_beat = now
                if isinstance(msg, Heartbeat):
                    mon.phase = msg.phase
                    mon.epoch, mon.step = msg.epoch, msg.step
                    if msg.timed_steps is not None and msg.timed_seconds is not None:
                        mon.timing = (msg.timed_steps, msg.timed_seconds)
                        if mon.timing_base is None and msg.timed_steps >= warmup:
                            mon.timing_base = mon.timing
                    if msg.phase == "train" and msg.step_seconds:
                        mon.trained_steps += 1
                        mon.max_step_seconds = max(mon.max_step_seconds, msg.step_seconds)
                elif isinstance(msg, Hello):
                    mon.epoch, mon.step, mon.resumed_from = msg.epoch, msg.step, msg.resumed_from
                    mon.start_step = msg.step
                    self.journal.write("worker_ready", attempt=attempt, pid=msg.pid, epoch=msg.epoch, step=msg.step,
                                       resumed_from_step=msg.resumed_from)
                elif isinstance(msg, CheckpointSaved):
                    mon.max_save_seconds = max(mon.max_save_seconds, msg.seconds)
                    mon.epoch, mon.step = msg.epoch, msg.step
                    mon.phase = "train"
                    self.journal.write("checkpoint_saved", attempt=attempt, epoch=msg.epoch, step=msg.step,
                                       seconds=round(msg.seconds, 4), bytes=msg.bytes, reason=msg.reason,
                                       path=msg.path)
                elif isinstance(msg, EpochBegin):
                    mon.epoch, mon.step = msg.epoch, msg.step
                    mon.end_step, mon.samples_per_step = msg.end_step(), msg.samples_per_step
                elif isinstance(msg, EpochEnd):
                    mon.step = msg.step
                    self.journal.write("epoch_end", attempt=attempt, epoch=msg.epoch, step=msg.step, logs=msg.logs)
                elif isinstance(msg, FaultFired):
                    mon.step = msg.step
                    self.journal.write("fault_fired", attempt=attempt, kind=msg.kind, step=msg.step, fault=msg.key)
                    if msg.kind == "preempt":
                        mon.pending_preempt = True
                    elif msg.kind == "host_oom" and limit is None:
                        mon.pending_host_oom = True
                elif isinstance(msg, Notice):
                    fields = {k: v for k, v in msg.fields.items() if k not in {"time", "event", "attempt"}}
                    self.journal.write(msg.event, attempt=attempt, **fields)

        reader = ChannelReader(read_fd, on_message)
        reader.start()
        pump = threading.Thread(target=self._pump, args=(proc, log), name="resilient-output", daemon=True)
        pump.start()

        decision: str | None = None
        stable_steps = self._search.settings.stable_steps
        probe_checked = not self._search.active
        last_rss: int | None = None
        peak: int | None = None
        heartbeat_age: float | None = None
        next_sample = 0.0
        try:
            while proc.poll() is None:
                now = time.monotonic()
                if now >= next_sample:
                    next_sample = now + cfg.sample_interval
                    rss = tree_rss(proc.pid)
                    if rss is not None:
                        last_rss = rss
                        peak = max(peak or 0, rss)
                    gpu = self.gpu.used_by({proc.pid}) if self.gpu.available else None
                    if gpu:
                        mon.__dict__["gpu_peak"] = max(mon.__dict__.get("gpu_peak", 0), gpu)
                with mon.lock:
                    preempt, arm = mon.pending_preempt, mon.pending_host_oom
                    mon.pending_preempt = mon.pending_host_oom = False
                    age = now - mon.last_beat
                    timeout = self._hang_timeout(mon)
                if arm:
                    effective_limit[0] = self._arm_rehearsal_limit(group, last_rss)
                if preempt and decision is None:
                    decision = "preempt"
                    self._say("rehearsed preemption: sending SIGTERM to the worker")
                    _signal(proc, signal.SIGTERM)
                if (
                    effective_limit[0] is not None and group is None and last_rss is not None
                    and last_rss > effective_limit[0] and decision in (None, "preempt")
                ):
                    decision = "watchdog"
                    _signal(proc, signal.SIGKILL)
                if not probe_checked and decision is None:
                    with mon.lock:
                        trained = (mon.step or 0) - mon.start_step if mon.start_step is not None else 0
                    measured, rate = self._measurement(mon) if trained >= stable_steps else (False, None)
                    if measured:
                        probe_checked = True
                        if self._probe_due(attempt, rate, self._horizon(mon)):
                            decision = "probe"
                            _signal(proc, signal.SIGTERM)  # checkpoint, exit; restarted with the next plan
                if age > timeout and decision is None:
                    decision, heartbeat_age = "hang", age
                    self._say(f"no heartbeat for {age:.1f}s (timeout {timeout:.1f}s): stopping the worker")
                    self._stop_worker(grace=cfg.kill_grace)
                if decision == "preempt" and age > cfg.preempt_grace:
                    _signal(proc, signal.SIGKILL)
                time.sleep(cfg.poll_interval)
        except KeyboardInterrupt:
            self._stop_worker(grace=cfg.preempt_grace)  # let it save its SIGTERM checkpoint
            raise
        except BaseException:
            self._stop_worker(grace=cfg.kill_grace)
            raise
        finally:
            reader.join(timeout=10)
            pump.join(timeout=10)
            log.close()
            self._proc = None
        oom_kills = (group.oom_kills() - oom_before) if group else 0
        cgroup_peak = None
        if group is not None:
            cgroup_peak = group.peak()  # includes page cache the kernel could have reclaimed
            if oom_kills and cgroup_peak:
                peak = max(peak or 0, cgroup_peak)  # the spike that the kernel killed for
            group.remove()
        mon.cgroup_peak = cgroup_peak
        report = None
        try:
            report = json.loads((adir / "error.json").read_text())
        except (OSError, json.JSONDecodeError):
            pass
        outcome = AttemptOutcome(
            returncode=proc.returncode, report=report, decision=decision,
            oom_kills=oom_kills, last_rss=last_rss, memory_limit=effective_limit[0], heartbeat_age=heartbeat_age,
            completed=self.rundir.result_json.exists(),
        )
        return outcome, mon, peak

    def _measurement(self, mon: _Monitor) -> tuple[bool, float | None]:
        """(whether the attempt can be judged now, its samples/s). Judged once its window (after the
        warm-up) covers ``measure_seconds`` of training and two timed heartbeats bracket it (they are
        throttled); a worker that reports no timing is judged at ``stable_steps``, unmeasured."""
        with mon.lock:
            if mon.timing is None:
                return True, None
            rate = mon.samples_per_second(self.plan.batch_size)
            window = mon.timing[1] - mon.timing_base[1] if mon.timing_base is not None else 0.0
        return rate is not None and window >= self._search.settings.measure_seconds, rate

    def _horizon(self, mon: _Monitor) -> Horizon | None:
        """What is left of the run, as the worker reported it (None: unknown, e.g. an input of unknown length)."""
        with mon.lock:
            end, step, per_step, step_seconds = mon.end_step, mon.step, mon.samples_per_step, mon.seconds_per_step()
        if end is None or step is None:
            return None
        # A stop for a probe waits for the end of the gradient-accumulation window.
        left = max(0, end - step - (self.plan.grad_accum_steps - 1))
        return Horizon(steps_left=left, step_seconds=step_seconds,
                       per_batch=per_step is None or per_step == self.plan.batch_size)

    def _probe_due(self, attempt: int, rate: float | None, horizon: Horizon | None = None) -> bool:
        """Called once an attempt trained ``stable_steps``: judge its throughput, pick what runs next."""
        self.journal.write("throughput_measured", attempt=attempt, plan=self.plan.model_dump(mode="json"),
                           samples_per_s=round(rate, 2) if rate is not None else None,
                           steps_left=horizon.steps_left if horizon is not None else None)
        verdict = self._search.stable(self.plan, rate, horizon)
        for event, fields in verdict.events:
            self.journal.write(event, attempt=attempt, **fields)
        if verdict.settle is not None:
            previous = self.rundir.read_plan()
            self.rundir.write_plan(verdict.settle)  # a new VM resumes from the settled plan
            self.journal.write("plan_changed", **{"from": previous.model_dump(mode="json"),
                                                  "to": verdict.settle.model_dump(mode="json"),
                                                  "reason": verdict.message or "probe kept", "incident": None})
        if verdict.message:
            self._say(verdict.message)
        self._switch_to = verdict.switch_to
        return verdict.switch_to is not None

    def _arm_rehearsal_limit(self, group: MemoryCgroup | None, rss: int | None) -> int:
        base = (group.usage() if group is not None else None) or rss or 0
        new_limit = base + REHEARSAL_HEADROOM
        if group is not None:
            group.set_limit(new_limit)
        self.journal.write("rehearsal_limit", limit=new_limit, mechanism="cgroup" if group else "watchdog")
        return new_limit

    def _hang_timeout(self, mon: _Monitor) -> float:
        cfg = self.cfg
        if cfg.hang_timeout is not None:
            base = cfg.hang_timeout
        else:
            base = max(AUTO_HANG_FLOOR, AUTO_HANG_FACTOR * mon.max_step_seconds)
        if mon.trained_steps == 0:
            return max(base, cfg.startup_timeout)  # import, restore, first compiled step
        if mon.phase in ("save", "epoch_end", "validate"):
            return max(base, 3 * mon.max_save_seconds + base)
        return base

    def _pump(self, proc: subprocess.Popen[bytes], log: IO[bytes]) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            log.write(chunk)
            log.flush()
            if self.cfg.echo:
                text = decoder.decode(chunk)
                stream = self.cfg.stream or sys.stdout
                try:
                    stream.write(text)
                    stream.flush()
                except (OSError, ValueError):
                    pass

    def _stop_worker(self, grace: float) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        _signal(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            _signal(proc, signal.SIGKILL)
            proc.wait(timeout=30)

    def _say(self, text: str) -> None:
        if not self.cfg.echo:
            return
        stream = self.cfg.stream or sys.stdout
        try:
            stream.write(f"resilient: {text}\n")
            stream.flush()
        except (OSError, ValueError):
            pass


class _FakeState:
    """The bit of tenacity's RetryCallState that its wait strategies read."""

    def __init__(self, attempt_number: int) -> None:
        self.attempt_number = max(1, attempt_number)


def _stop_when_no_progress(retry_state: tenacity.RetryCallState) -> bool:
    exc = retry_state.outcome.exception() if retry_state.outcome else None
    return isinstance(exc, _AttemptFailed) and exc.no_progress


def _signal(proc: subprocess.Popen[bytes], sig: int) -> None:
    """Signal the worker's whole process group (it leads its own session), children included."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError, OSError):
        try:
            proc.send_signal(sig)
        except (ProcessLookupError, OSError):
            pass


def _total_ram() -> int:
    import psutil

    return int(psutil.virtual_memory().total)


def _progress_text(mon: _Monitor, step: int | None, ckpt: dict[str, Any] | None, saved: bool = True) -> str:
    """How far an attempt got, for its console line: "after 40 steps, checkpoint at step 80"."""
    start = mon.start_step
    if start is None or step is None:
        trained = "before its first step"
    else:
        n = max(0, step - start)
        trained = f"after {n} step{'' if n == 1 else 's'} (at step {step})"
    if not saved:
        return trained
    return f"{trained}, " + (f"checkpoint at step {ckpt['step']}" if ckpt else "no checkpoint yet")


def _saved_text(run: RunDir) -> str:
    meta = CheckpointStore(run.checkpoints).latest_meta()
    return f"checkpoint at step {meta['step']}" if meta else "no checkpoint yet"


def _ckpt_text(meta: dict[str, Any] | None) -> str:
    if not meta:
        return "none: the run starts from the beginning"
    return f"step {meta['step']}, epoch {meta.get('epoch')}, sample {meta.get('offset')} at {meta.get('path')}"


def root_cause_report(incidents: list[Incident], run: RunDir, reason: str) -> str:
    """The final failure, written for a person reading it in the morning."""
    ckpt = CheckpointStore(run.checkpoints).latest_meta()
    lines = [
        f"resilient: training failed after {len(incidents)} attempt(s): {reason}.",
        f"Run directory: {run.path}",
        f"Last checkpoint: {_ckpt_text(ckpt)}",
        "",
        f"{'attempt':>7}  {'plan':<34} {'ended by':<14} {'incident':<10} {'epoch/step':<11} {'memory peak':<12} detail",
    ]
    for inc in incidents:
        ended = inc.signal or (f"exit {inc.returncode}" if inc.returncode is not None else "?")
        if inc.returncode == EXIT_REPORTED:
            ended += " (error)"
        elif inc.returncode == EXIT_PREEMPTED:
            ended += " (SIGTERM)"
        where = f"{inc.epoch if inc.epoch is not None else '-'}/{inc.step if inc.step is not None else '-'}"
        lines.append(
            f"{inc.attempt:>7}  {inc.plan_before.describe():<34} {ended:<14} {inc.kind:<10} {where:<11} "
            f"{format_bytes(inc.memory_peak_bytes):<12} {inc.detail}"
        )
        if inc.action:
            lines.append(f"{'':>9}-> {inc.action}")
    if incidents:
        last = incidents[-1]
        counts: dict[str, int] = {}
        for inc in incidents:
            counts[inc.kind] = counts.get(inc.kind, 0) + 1
        lines += ["", "Incidents: " + ", ".join(f"{k} x{n}" for k, n in counts.items()) + "."]
        lines.append(f"Root cause: the last attempt ended with {last.kind}: {last.detail}.")
        lines.append("What to do: " + _advice(last.kind))
    lines.append(f"The journal is {run.events}; call fit again with the same run_dir to resume from the checkpoint.")
    return "\n".join(lines)


def _advice(kind: str) -> str:
    return {
        "gpu_oom": "the model does not fit on the GPU even with the policy's smallest plan; lower the batch size, "
                   "use a smaller model or input size, or add rungs to the gpu_oom ladder.",
        "host_oom": "host RAM ran out; avoid .cache() on large datasets, lower shuffle buffers, raise "
                    "host_memory_limit, or add drop_cache/shrink_buffers/halve_batch to the host_oom ladder.",
        "crash": "the worker crashed natively; see attempts/<N>/worker.log for the native stack; a library "
                 "upgrade or a smaller plan may help.",
        "killed": "something outside killed the worker with SIGKILL; check the machine's OOM log (dmesg) and "
                  "other jobs.",
        "hang": "the worker stopped making progress; raise hang_timeout if steps are legitimately slow, or check "
                "the input pipeline for deadlocks.",
        "preempted": "the worker kept being terminated; check what sends SIGTERM.",
        "nan_loss": "the loss kept diverging; lower the learning rate, leave mixed precision, or check the data.",
    }.get(kind, "see the journal and worker logs.")
