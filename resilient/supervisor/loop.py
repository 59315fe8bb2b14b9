"""The supervisor: runs attempts in worker subprocesses until the training completes or cannot.

``Supervisor.run()`` is a state machine, one branch per state, each state's action one small method::

    START ──> MONITOR ──> CLASSIFY ──┬──> FINISH           the worker wrote result.json and exited 0
      ^                              ├──> GIVE_UP          user_error, restarts exhausted, or no progress
      |                              └──> DEGRADE ──> RESTART ──┐
      └─────────────────────────────────────────────────────────┘

- START prepares the attempt's directory and plan, journals ``attempt_started`` and spawns the
  worker (``WorkerProcess``, process.py).
- MONITOR watches it until it exits (process.py: output, channel, memory, hang, watchdog,
  rehearsed preemption, the plan search's switch) and journals ``attempt_ended``.
- CLASSIFY turns the evidence into an incident (classify.py), asks ``decide`` (decide.py, pure)
  what to do, and records the decision: the incident, its journal entries, plan.json, a console line.
- DEGRADE takes the decided plan: a rung of the policy's ladder, a probe, or the same plan.
- RESTART waits the decided time: nothing after a degradation or a preemption, exponential backoff
  while failures repeat without progress.
- FINISH journals ``run_finished`` and returns the result; GIVE_UP journals it and raises
  ``UserCodeError`` or ``TrainingFailedError`` with the root-cause report (report.py).

Ctrl-C in any state sends the worker SIGTERM (it saves a checkpoint at its next step) and waits
only while it shows life (a heartbeat, a save in progress; a few seconds for a silent one, at most
the preemption grace), then SIGKILLs and reaps it; a second Ctrl-C SIGKILLs at once. It says what
was saved, journals ``attempt_ended`` (``interrupted``) and ``run_finished`` (``interrupted``), and
re-raises.

A worker started ahead (standby.py) is adopted at START when one waits: ``fit``'s early worker for
the first attempt, the warm standby for a restart; the monitor starts the next standby once the
attempt has trained its first step and memory allows. Whatever still waits is killed and reaped when
the run ends, on Ctrl-C and on errors.

With ``mirror_dir`` a thread (mirror.py) copies the run to the mirror, woken by each ``CheckpointSaved``;
it never holds up a state, and when the run ends (finished, given up, Ctrl-C) it gets a bounded wait for
a last copy.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass, replace
from typing import Any

from .._checkpoint import CheckpointStore
from .._errors import DiskFullError, TrainingFailedError, UserCodeError
from .._incident import Incident
from .._plan import Plan
from .._protocol import EXIT_PREEMPTED, TrainingResult
from .._rundir import Journal, atomic_write_text
from ..policy.search import PlanSearch
from .classify import classify, signal_name
from .config import SupervisorConfig
from .decide import AttemptFacts, Decision, RestartRules, attempt_label, decide
from .disk import DiskSpace, is_disk_full_error, measure, own_write_text
from .folder_copy import FolderCopier
from .gpu import run_gpus
from .memory import GpuMemory, reap_stale_cgroups
from .mirror import Mirror
from .process import AttemptEnd, Progress, WorkerProcess, worker_env
from .report import latest_checkpoint, root_cause_report, saved_text, user_error_message
from .standby import StandbyKeeper, WaitingWorker
from .startup import StartupCalibration

__all__ = ["RunResult", "State", "Supervisor", "SupervisorConfig"]


@dataclass
class RunResult:
    history: dict[str, list[float]]
    epochs_done: list[int]
    incidents: list[Incident]
    plan: Plan  # the settled plan (plan.json), the one a later call resumes with
    checkpoint: str | None
    unjudged_probe: Plan | None = None  # the run completed on this probe before it could be judged


class State(enum.Enum):
    START = "start"
    MONITOR = "monitor"
    CLASSIFY = "classify"
    DEGRADE = "degrade"
    RESTART = "restart"
    FINISH = "finish"
    GIVE_UP = "give_up"


class Supervisor:
    """Runs the training to completion, one worker attempt at a time."""

    def __init__(self, config: SupervisorConfig, *, early_worker: WaitingWorker | None = None) -> None:
        """``early_worker``: a worker ``fit`` started ahead for the first attempt; the supervisor owns it now."""
        self.cfg = config
        self.rundir = config.run
        self.journal = Journal(config.run.events)
        self.incidents: list[Incident] = []
        self.plan = config.run.read_plan()
        self.gpu = GpuMemory()
        self.rules = RestartRules.of(config.max_restarts, config.backoff_base, config.backoff_max)
        # After an OOM degradation: the search for the best batch size that fits (see policy/search.py).
        self.search = PlanSearch(config.policy.probe)
        # This call's measured start-up phases: the hang timeouts of the next attempt's start-up (startup.py).
        self.startup = StartupCalibration()
        # Attempts are numbered across calls, probe restarts included.
        events = self.rundir.read_events()
        self._attempt_base = sum(1 for e in events if e.get("event") == "attempt_started")
        # The waiting worker (standby.py); after a host OOM in this run, none is started.
        self._standby = StandbyKeeper(
            self.journal, config.standby, early=early_worker, enabled=config.worker_cmd is None,
            host_oom=any(e.get("event") == "incident" and e.get("kind") == "host_oom" for e in events))
        self._attempts_started = 0
        # The current attempt, as the states hand it on.
        self._worker: WorkerProcess | None = None
        self._ended_attempt: int | None = None  # the last attempt whose attempt_ended is journaled
        self._probe = False  # the current attempt runs a probe
        self._switch_to: Plan | None = None  # the plan the search stopped the current worker for
        self._end: AttemptEnd | None = None
        self._facts: AttemptFacts | None = None
        self._decision: Decision | None = None
        self._result: TrainingResult | None = None
        self._mirror = None if config.mirror_dir is None else Mirror(
            config.run, config.mirror_dir, journal=self.journal, keep=config.mirror_keep, copy=config.mirror_copy,
            on_state=None if config.display is None else (lambda s: config.display.mirror(s.step, s.saved_at)))
        self._folder_copy = FolderCopier(config.run.path, config.image_folders, self.journal, say=config.say,
                                         disk_usage=config.disk_usage)

    # ------------------------------------------------------------------ the loop

    def run(self) -> RunResult:
        """Attempt after attempt until FINISH (returns the result) or GIVE_UP (raises)."""
        state = State.START
        if self._mirror is not None:
            self._mirror.start()
        self._folder_copy.start()
        try:
            while True:
                if state is State.START:
                    state = self._start()
                elif state is State.MONITOR:
                    state = self._monitor()
                elif state is State.CLASSIFY:
                    state = self._classify()
                elif state is State.DEGRADE:
                    state = self._degrade()
                elif state is State.RESTART:
                    state = self._restart()
                elif state is State.FINISH:
                    return self._finish()
                else:  # State.GIVE_UP
                    raise self._give_up()
        except KeyboardInterrupt:
            self._interrupted(state)
            raise
        except OSError as exc:
            if not is_disk_full_error(exc):
                raise
            raise self._out_of_disk(exc) from exc
        finally:
            self._folder_copy.close()
            self._standby.close()
            self._flush_mirror()
            if self.cfg.display is not None:
                self.cfg.display.close()

    # ------------------------------------------------------------------ the states

    def _start(self) -> State:
        self._worker = None
        self._tidy(cgroups=self._attempts_started == 0)
        attempt = self._attempt_base + self._attempts_started
        self._attempts_started += 1
        adir = self.rundir.attempt_dir(attempt)
        self.rundir.private_dir(adir)
        (adir / "error.json").unlink(missing_ok=True)
        self.rundir.result_json.unlink(missing_ok=True)
        atomic_write_text(adir / "plan.json", self.plan.model_dump_json(indent=2))
        self._probe = self.search.probing == self.plan
        worker = WorkerProcess(self.cfg, attempt, journal=self.journal, gpu=self.gpu,
                               judge=self._judge if self.search.active else None,
                               warmup_steps=self.search.settings.warmup_steps(), startup=self.startup,
                               gpus=run_gpus(self.cfg.devices, self.plan.replicas, self.gpu.count,
                                             os.environ.get("CUDA_VISIBLE_DEVICES")) if self.gpu.available else ())
        if self._mirror is not None:
            worker.on_checkpoint = self._mirror.notify
        env = worker_env(self.cfg.extra_env)
        worker.on_sample = lambda w: self._keep_standby(w, env)
        self.journal.write("attempt_started", attempt=attempt, plan=self.plan.model_dump(mode="json"),
                           probe=self._probe, startup_timeouts=worker.startup_timeouts)
        if self.cfg.display is not None:
            self.cfg.display.attempt_started(attempt, self.plan)  # the plan is on its progress line
        else:
            self.cfg.say(f"attempt {attempt} starting with plan: {self.plan.describe()}")
        self._switch_to = None
        self._worker = worker
        worker.start(self._standby.take(attempt, env) if self._standby.enabled else None)
        return State.MONITOR

    def _monitor(self) -> State:
        assert self._worker is not None
        end = self._worker.watch()
        self._journal_ended(self._worker.attempt, end)
        self.startup = self.startup.after(end.calibrating, end.progress.max_save_seconds,
                                          end.progress.max_step_seconds)
        self._end = end
        return State.CLASSIFY

    def _classify(self) -> State:
        self._facts = facts = self._facts_of_attempt()
        decision = decide(facts, self.plan, self.cfg.policy, self.search, self.incidents, self.cfg.context,
                          self.rules)
        self._record(decision)
        self._decision = decision
        if decision.kind == "finish":
            return State.FINISH
        if decision.kind == "give_up":
            return State.GIVE_UP
        return State.DEGRADE

    def _degrade(self) -> State:
        assert self._decision is not None
        self.plan, self.search = self._decision.plan, self._decision.search
        return State.RESTART

    def _restart(self) -> State:
        assert self._decision is not None
        self.cfg.sleep(self._decision.wait)
        return State.START

    def _finish(self) -> RunResult:
        assert self._decision is not None and self._result is not None
        result = self._result
        self._tidy()
        self.journal.write("run_finished", status="completed", epochs=len(result.epochs_done),
                           global_step=result.global_step)
        checkpoint = latest_checkpoint(self.rundir)
        return RunResult(result.history, result.epochs_done, list(self.incidents), self._decision.plan,
                         checkpoint.path if checkpoint else None, unjudged_probe=self._decision.unjudged_probe)

    def _give_up(self) -> Exception:
        assert self._decision is not None and self._facts is not None
        decision, run = self._decision, self.rundir
        self._tidy()
        if decision.incident is not None and decision.incident.kind == "disk_full":
            return self._disk_full(decision)
        if decision.incident is not None and decision.incident.kind == "user_error":
            self.journal.write("run_finished", status="user_error")
            report = self._facts.report
            return UserCodeError(user_error_message(report, self._facts.checkpoint, run),
                                 traceback=report.traceback if report else "", run_dir=str(run.path))
        self.journal.write("run_finished", status="failed", reason=decision.reason)
        return TrainingFailedError(root_cause_report(self.incidents, run, decision.reason),
                                   incidents=list(self.incidents), run_dir=str(run.path))

    def _interrupted(self, state: State) -> None:
        """Ctrl-C: stop the attempt in flight (interrupt() is a no-op once the worker is reaped; a second
        Ctrl-C in it SIGKILLs), then journal and say what was saved, whatever a second Ctrl-C did."""
        worker = self._worker
        in_flight = worker is not None and worker.attempt != self._ended_attempt
        try:
            if worker is not None and in_flight:
                worker.interrupt()
        finally:
            checkpoint = latest_checkpoint(self.rundir)
            if worker is not None and in_flight:
                self._journal_ended(worker.attempt, worker.ended() if worker.returncode is not None else None,
                                    interrupted=True)
                label = attempt_label(AttemptFacts(worker.attempt, None, probe=self._probe), self.plan)
                self.cfg.say(f"{label} interrupted (Ctrl-C), {saved_text(checkpoint)}; {_how_it_stopped(worker)}")
            self.journal.write("run_finished", status="interrupted",
                               checkpoint_step=checkpoint.step if checkpoint else None)

    def _disk_full(self, decision: Decision) -> DiskFullError:
        """GIVE_UP on a full disk: the root-cause report with the free space, the path and what to do."""
        disk = self._facts.disk if self._facts is not None else None
        self._journal_quietly("run_finished", status="failed", reason=decision.reason)
        return DiskFullError(root_cause_report(self.incidents, self.rundir, decision.reason or "disk full"),
                             incidents=list(self.incidents), run_dir=str(self.rundir.path),
                             path=disk.path if disk else str(self.rundir.path), free_bytes=disk.free if disk else None,
                             needed_bytes=disk.needed if disk else None)

    def _out_of_disk(self, exc: OSError) -> DiskFullError:
        """The supervisor's own write (plan.json, the journal, a log) found the disk full: stop cleanly."""
        if self._worker is not None:  # the write may have failed while it ran (START journals after the spawn)
            self._worker.stop(grace=self.cfg.kill_grace)
            self._worker._leave_cgroup()
        space = self._disk_space()
        self._journal_quietly("run_finished", status="failed", reason=f"disk full: {space.text()}")
        return DiskFullError(own_write_text(exc, space), incidents=list(self.incidents), run_dir=str(self.rundir.path),
                             path=space.path, free_bytes=space.free, needed_bytes=space.needed)

    # ------------------------------------------------------------------ helpers of the states

    def _keep_standby(self, worker: WorkerProcess, env: dict[str, str]) -> None:
        """From the monitor, after each memory sample: the standby keeper's look (standby.py)."""
        limit, usage = worker.memory_use()
        self._standby.tick(worker.attempt, env, limit=limit, usage=usage)

    def _flush_mirror(self) -> None:
        """At the end of the run, Ctrl-C included: a last copy within a bounded wait; say what the mirror holds."""
        if self._mirror is None:
            return
        state = self._mirror.close(self.cfg.mirror_flush_timeout)
        self.cfg.say(state.text(self._mirror.mirror.path))

    def _tidy(self, cgroups: bool = False) -> None:
        """Remove what dead processes left: half-written checkpoint generations (``.tmp-*``, ``.old-*``) and,
        with ``cgroups``, the memory cgroups of supervisors killed with SIGKILL. Called only where no worker
        of this run is alive (before an attempt starts, at the end), so none of them is being written; a
        waiting standby (standby.py) writes nothing before its go, and lives in no cgroup of ours until then."""
        removed = CheckpointStore(self.rundir.checkpoints).remove_leftovers()
        if removed:
            self._journal_quietly("leftovers_removed", checkpoints=[p.name for p in removed])
        # Said, not journaled: the groups belong to other runs, whose journals this one does not write.
        for path in reap_stale_cgroups() if cgroups else []:
            self.cfg.say(f"removed the memory cgroup {path} left by a supervisor that was killed")

    def _disk_space(self) -> DiskSpace:
        """The run directory's free space against what the next checkpoint needs."""
        ckpt_bytes = CheckpointStore(self.rundir.checkpoints).newest_bytes()
        return measure(self.rundir.path, ckpt_bytes, self.cfg.disk_usage)

    def _journal_quietly(self, event: str, **fields: object) -> None:
        """Journal ``event`` unless the disk is full (the run is stopping for that very reason)."""
        try:
            self.journal.write(event, **fields)
        except OSError as exc:
            if not is_disk_full_error(exc):
                raise

    def _journal_ended(self, attempt: int, end: AttemptEnd | None, **extra: object) -> None:
        """``attempt_ended``: how the worker exited, its memory peaks and measured start-up phases."""
        self._ended_attempt = attempt
        if end is None:  # Ctrl-C before the worker was spawned
            self.journal.write("attempt_ended", attempt=attempt, returncode=None, **extra)
            return
        ended: dict[str, object] = {"returncode": end.outcome.returncode}
        if end.outcome.signal:
            ended["signal"] = end.outcome.signal
        if end.cgroup_peak:
            ended["cgroup_peak_bytes"] = end.cgroup_peak
        if end.gpu_memory_peak is not None:
            ended["gpu_memory_peak_bytes"] = end.gpu_memory_peak
        ended["startup_seconds"] = end.startup_seconds
        self.journal.write("attempt_ended", attempt=attempt, memory_peak_bytes=end.memory_peak, **ended, **extra)

    def _facts_of_attempt(self) -> AttemptFacts:
        """The attempt's evidence, classified into an incident (None when it completed the training)."""
        assert self._worker is not None and self._end is not None
        outcome, progress = self._end.outcome, self._end.progress
        kind, detail, evidence = classify(outcome)
        checkpoint = latest_checkpoint(self.rundir)
        facts = AttemptFacts(self._worker.attempt, None, probe=self._probe, start_step=progress.start_step,
                             checkpoint=checkpoint, report=outcome.report,
                             switch_to=self._switch_to if outcome.decision == "probe" else None)
        if kind is None:
            self._result = TrainingResult.model_validate_json(self.rundir.result_json.read_bytes())
            return replace(facts, step=self._result.global_step, settled=self.rundir.read_plan())
        if kind == "disk_full":
            facts = replace(facts, disk=self._disk_space())
        report = outcome.report
        # The worker's own report is exact; heartbeats are throttled and may lag a step or two.
        epoch = report.epoch if report is not None and report.epoch is not None else progress.epoch
        step = report.step if report is not None and report.step is not None else progress.step
        device = None
        if self.plan.replicas > 1:
            device, evidence = _device_of(kind, evidence, self._end)
        incident = Incident(
            kind=kind, attempt=facts.attempt, epoch=epoch, step=step, detail=detail, evidence=evidence,
            returncode=outcome.returncode, signal=outcome.signal, memory_peak_bytes=self._end.memory_peak,
            gpu_memory_peak_bytes=self._end.gpu_memory_peak, device=device,
            checkpoint_step=checkpoint.step if checkpoint else None, plan_before=self.plan,
        )
        return replace(facts, incident=incident, step=step)

    def _record(self, decision: Decision) -> None:
        """Write what the decision says happened: the incident, the journal, plan.json, the console."""
        if decision.incident is not None:
            self.incidents.append(decision.incident)
            if decision.incident.kind == "host_oom":
                self._standby.host_oom = True  # memory is tight: no more standbys in this run
        disk_full = decision.incident is not None and decision.incident.kind == "disk_full"
        for event, fields in decision.journal:
            if disk_full:
                self._journal_quietly(event, **fields)  # the console and the error still say it
            else:
                self.journal.write(event, **fields)
        if decision.settle is not None:
            self.rundir.write_plan(decision.settle)
        messages = decision.messages
        display = self.cfg.display
        if display is not None and decision.incident is not None:
            # One plain sentence for the incident (naming the worker's log) stands for the first message.
            display.incident(decision.incident, outcome="give_up" if decision.kind == "give_up" else "restart",
                             log=self.rundir.attempt_dir(decision.incident.attempt) / "worker.log")
            messages = messages[1:]
        for message in messages:
            self.cfg.say(message)

    # ------------------------------------------------------------------ the plan search, while a worker trains

    def _judge(self, progress: Progress) -> bool | None:
        """Asked by the monitor: None until the attempt trained ``stable_steps`` and its throughput is
        measured; then whether the search stops it to switch plans."""
        settings = self.search.settings
        if progress.trained() < settings.stable_steps:
            return None
        measured, rate = progress.measurement(self.plan.batch_size, settings.measure_seconds)
        if not measured:
            return None
        return self._stable(rate, progress)

    def _stable(self, rate: float | None, progress: Progress) -> bool:
        """The attempt is stable: judge its throughput, pick what runs next (journaled at once)."""
        assert self._worker is not None
        attempt, horizon = self._worker.attempt, progress.horizon(self.plan)
        self.journal.write("throughput_measured", attempt=attempt, plan=self.plan.model_dump(mode="json"),
                           samples_per_s=round(rate, 2) if rate is not None else None,
                           steps_left=horizon.steps_left if horizon is not None else None)
        verdict = self.search.stable(self.plan, rate, horizon)
        for event, fields in verdict.events:
            self.journal.write(event, attempt=attempt, **fields)
        if verdict.settle is not None:
            previous = self.rundir.read_plan()
            self.rundir.write_plan(verdict.settle)  # a new VM resumes from the settled plan
            self.journal.write("plan_changed", **{"from": previous.model_dump(mode="json"),
                                                  "to": verdict.settle.model_dump(mode="json"),
                                                  "reason": verdict.message or "probe kept", "incident": None})
        if verdict.message:
            self.cfg.say(verdict.message)
        self._switch_to = verdict.switch_to
        return verdict.switch_to is not None


def _device_of(kind: str, evidence: dict[str, Any], end: AttemptEnd) -> tuple[str | None, dict[str, Any]]:
    """Over several devices: the device an incident names (the worker's error first; for a GPU OOM whose
    error names none, the fullest GPU at NVML's samples), and the evidence with the per-device peaks."""
    evidence = dict(evidence)
    peaks = end.gpu_devices
    if peaks is not None:
        evidence.update(peaks.evidence())
    device = evidence.get("device")
    if device is None and kind == "gpu_oom" and peaks is not None:
        device = peaks.fullest()
        if device is not None:
            evidence.update(device=device, device_source="nvml (fullest)")
    elif device is not None:
        evidence["device_source"] = "worker report"
    return device, evidence


def _how_it_stopped(worker: WorkerProcess) -> str:
    """How an interrupted worker ended, for its console line."""
    code = worker.returncode
    if code == EXIT_PREEMPTED:
        return "the worker saved it on SIGTERM and stopped"
    if worker.killed:
        return "the worker did not stop on SIGTERM and was killed (SIGKILL)"
    if code is None:
        return "no worker was running"
    return f"the worker ended ({signal_name(code) or f'exit code {code}'})"
