"""The supervisor against a scripted fake worker: real subprocesses, real signals, no TensorFlow.

Each test writes a script (tests/fake_worker.py) saying what every attempt does, runs the supervisor
with small timeouts and an injected ``sleep`` that records the waits, then checks the outcome: the
incidents, the plan, the journal, the error text and that no worker process is left.
"""

from __future__ import annotations

import datetime as dt
import io
import itertools
import json
import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

import resilient.supervisor.process as supervisor_module
from resilient._checkpoint import CheckpointStore
from resilient._errors import TrainingFailedError, UserCodeError
from resilient._plan import Plan
from resilient._rundir import ObjectData, RunDir, RunSpec
from resilient._status import summarize
from resilient.policy import Policy, StepContext
from resilient.steps import halve_batch
from resilient.supervisor.loop import RunResult, Supervisor, SupervisorConfig
from resilient.supervisor.memory import PressureWatch, cgroup_support
from resilient.supervisor.process import INTERRUPT_SILENCE, Progress, WorkerProcess, interrupt_patience, worker_env
from resilient.supervisor.startup import STARTUP_MIN_TIMEOUT
from resilient.supervisor.telemetry import journal_interval

FAKE_WORKER = Path(__file__).resolve().parent / "fake_worker.py"
MB = 1 << 20
HANG_TIMEOUT = 1.0
KILL_GRACE = 0.5
#: A kernel OOM kill can take a while (reclaim first); memory tests must not read that as a hang.
MEMORY_TEST_HANG_TIMEOUT = 5.0

pytestmark = pytest.mark.timeout(60)

# Building blocks of scripts.
HELLO = {"do": "hello"}
RESULT = {"do": "result"}


def beat(n: int = 3, interval: float = 0.01) -> dict[str, Any]:
    return {"do": "beat", "n": n, "interval": interval}


def die(name: str) -> dict[str, Any]:
    return {"do": "signal", "name": name}


def report(kind: str, **fields: Any) -> dict[str, Any]:
    return {"do": "report", "kind": kind, **fields}


COMPLETE = [HELLO, beat(), {"do": "checkpoint"}, {"do": "epoch_end"}, RESULT]


# ------------------------------------------------------------------------------------------- harness


@dataclass
class Harness:
    run: RunDir
    stream: io.StringIO
    waits: list[float] = field(default_factory=list)
    supervisor: Supervisor | None = None

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        events = self.run.read_events()
        return [e for e in events if name is None or e["event"] == name]

    def names(self) -> list[str]:
        """The journal's story; ``memory_sample`` lines left out (how many there are depends on timing)."""
        return [e["event"] for e in self.events() if e["event"] != "memory_sample"]

    def worker_pids(self) -> list[int]:
        return [int(p.read_text()) for p in sorted(self.run.path.glob("attempts/*/pid"))]

    def assert_workers_gone(self) -> None:
        pids = self.worker_pids()
        assert pids, "no worker ever started"
        for pid in pids:
            assert not _alive(pid), f"worker {pid} is still running"


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture(autouse=True)
def no_leftover_workers():
    """Fails a test that leaves a fake worker running, after killing it (by pid)."""
    yield
    me = psutil.Process()
    leftovers = []
    for child in me.children(recursive=True):
        try:
            if any("fake_worker.py" in part for part in child.cmdline()):
                leftovers.append(child.pid)
                os.kill(child.pid, signal.SIGKILL)
        except (psutil.Error, ProcessLookupError):
            pass
    for pid in leftovers:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
    assert not leftovers, f"fake workers left running: {leftovers}"


@pytest.fixture
def supervise(tmp_path):
    """``supervise(script, **config) -> Harness``: a run directory, a script file and a configured Supervisor."""

    def make(
        script: dict[str, Any],
        *,
        policy: Policy | None = None,
        max_restarts: int = 3,
        plan: Plan | None = None,
        max_life: float = 20.0,
        run_path: Path | None = None,
        **overrides: Any,
    ) -> Harness:
        run_path = run_path or tmp_path / "run"
        run_path.mkdir(exist_ok=True)
        run = RunDir(run_path)
        plan = plan or Plan(batch_size=32)
        if not run.plan_json.exists():
            run.write_plan(plan)
        script_path = tmp_path / f"script-{len(list(tmp_path.glob('script-*')))}.json"
        script_path.write_text(json.dumps(script))
        harness = Harness(run=run, stream=io.StringIO())

        def worker_cmd(attempt: int, fd: int) -> list[str]:
            return [sys.executable, str(FAKE_WORKER), "--script", str(script_path), "--run-dir", str(run.path),
                    "--attempt", str(attempt), "--channel-fd", str(fd), "--max-life", str(max_life)]

        config = dict(
            run=run, policy=policy or Policy(), context=StepContext(plan), max_restarts=max_restarts,
            hang_timeout=HANG_TIMEOUT, startup_timeout=3.0, kill_grace=KILL_GRACE, poll_interval=0.02,
            sample_interval=0.05, worker_cmd=worker_cmd, stream=harness.stream, sleep=harness.waits.append,
            echo=True,
        )
        config.update(overrides)
        harness.supervisor = Supervisor(SupervisorConfig(**config))
        return harness

    return make


def parse_time(text: str) -> float:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def failed_run(harness: Harness) -> TrainingFailedError:
    with pytest.raises(TrainingFailedError) as info:
        harness.supervisor.run()
    return info.value


# ------------------------------------------------------------------------------------------ completion


def test_clean_completion(supervise):
    h = supervise({"default": [HELLO, {"do": "print", "text": "fake worker says hi"}, *COMPLETE[1:]]})
    result = h.supervisor.run()

    assert isinstance(result, RunResult)
    assert result.history == {"loss": [0.5], "batch_size": [32]}
    assert result.epochs_done == [0]
    assert result.incidents == []
    assert result.plan == Plan(batch_size=32)
    assert result.checkpoint == str(CheckpointStore(h.run.checkpoints).latest().path)
    assert h.waits == []

    names = h.names()
    assert "run_started" not in names  # fit journals that, not the supervisor
    assert names == ["attempt_started", "worker_ready", "checkpoint_saved", "epoch_end", "attempt_ended",
                     "run_finished"]
    for event in h.events():
        assert event["time"].endswith("Z")
    started, = h.events("attempt_started")
    assert started["attempt"] == 0
    assert started["plan"] == Plan(batch_size=32).model_dump(mode="json")
    ready, = h.events("worker_ready")
    assert ready["pid"] == h.worker_pids()[0]
    saved, = h.events("checkpoint_saved")
    assert (saved["epoch"], saved["step"]) == (0, 3)
    assert saved["bytes"] > 0 and saved["seconds"] >= 0
    ended, = h.events("attempt_ended")
    assert ended["attempt"] == 0
    assert ended["returncode"] == 0
    assert "signal" not in ended
    assert ended["memory_peak_bytes"] > 10 * MB  # a python process, sampled
    finished, = h.events("run_finished")
    assert finished["status"] == "completed"
    assert finished["epochs"] == 1
    assert finished["global_step"] == 3

    # The worker's stdout reaches the attempt's log only (issue 11: a quiet worker); the supervisor speaks.
    out = h.stream.getvalue()
    assert "fake worker says hi" not in out
    assert "resilient: attempt 0 starting with plan: batch=32 float32 cache" in out
    assert "fake worker says hi" in (h.run.attempt_dir(0) / "worker.log").read_text()
    h.assert_workers_gone()


def test_a_resumed_run_continues_the_attempt_numbering(supervise):
    supervise({"default": COMPLETE}).supervisor.run()
    h = supervise({"default": COMPLETE})  # a new supervisor on the same run directory (a new VM)
    result = h.supervisor.run()
    assert [e["attempt"] for e in h.events("attempt_started")] == [0, 1]
    assert result.epochs_done == [0]
    ready = h.events("worker_ready")[-1]
    assert ready["resumed_from_step"] == 3  # the fake worker resumed from the first run's checkpoint
    h.assert_workers_gone()


def test_notices_are_journaled_with_the_attempt(supervise):
    h = supervise({"default": [HELLO, {"do": "notice", "event": "checkpoint_corrupt",
                                       "fields": {"path": "ckpt-000000000009", "reason": "checksum mismatch"}},
                               *COMPLETE[1:]]})
    h.supervisor.run()
    notice, = h.events("checkpoint_corrupt")
    assert notice["attempt"] == 0
    assert (notice["path"], notice["reason"]) == ("ckpt-000000000009", "checksum mismatch")
    assert notice["time"].endswith("Z")


def test_an_adopted_standby_left_at_a_low_priority_is_said_on_the_console(supervise, tmp_path):
    low = {"import_nice": 19, "nice": 0, "autogroup_nice": 19, "threads_raised": 1, "threads_left_low": [],
           "hurried": False, "restored": False, "detail": "setting /proc/self/autogroup to 0: Permission denied"}
    h = supervise({"default": [{"do": "notice", "event": "standby_priority", "fields": low}, *COMPLETE]})
    h.supervisor.run()
    assert h.events("standby_priority")[0]["restored"] is False
    said = h.stream.getvalue()
    assert "attempt 0: the standby worker it took could not return to the normal CPU priority" in said
    assert "autogroup to 0: Permission denied" in said and 'standby = "off"' in said
    # Restored (or threads left low only, named in the journal): nothing on the console.
    h = supervise({"default": [{"do": "notice", "event": "standby_priority",
                                "fields": {**low, "restored": True, "autogroup_nice": 0}}, *COMPLETE]},
                  run_path=tmp_path / "run2")
    h.supervisor.run()
    assert h.events("standby_priority")[0]["restored"] is True
    assert "CPU priority" not in h.stream.getvalue()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_message_the_journal_cannot_take_does_not_cut_the_channel(supervise):
    h = supervise({"default": [HELLO, beat(2), {"do": "notice", "event": "odd", "fields": {"attempt": 99}},
                               beat(30, interval=0.05), *COMPLETE[1:]]})
    result = h.supervisor.run()
    assert result.incidents == []  # 1.5 s of healthy heartbeats after the notice: no hang
    assert "checkpoint_saved" in h.names()


def test_echo_off_keeps_the_stream_quiet_but_still_logs(supervise):
    h = supervise({"default": [{"do": "print", "text": "quiet please"}, *COMPLETE]}, echo=False)
    h.supervisor.run()
    assert h.stream.getvalue() == ""
    assert "quiet please" in (h.run.attempt_dir(0) / "worker.log").read_text()


# ------------------------------------------------------------------------------------- signals, crashes


def test_segfault_is_a_crash_then_the_run_completes_at_once(supervise):
    h = supervise({"attempts": {"0": [HELLO, beat(5), {"do": "checkpoint"}, beat(2), die("SIGSEGV")]},
                   "default": COMPLETE})
    result = h.supervisor.run()

    incident, = result.incidents
    assert incident.kind == "crash"
    assert incident.attempt == 0
    assert incident.signal == "SIGSEGV"
    assert incident.returncode == -signal.SIGSEGV
    assert "SIGSEGV" in incident.detail
    assert incident.step == 7
    assert incident.checkpoint_step == 5
    assert incident.evidence["exit"] == "SIGSEGV"
    assert incident.action == "restart with the same plan"
    assert not incident.plan_changed
    assert h.waits == [0.0]  # a first failure restarts at once; the backoff is for failures that repeat

    ended = h.events("attempt_ended")
    assert [(e["attempt"], e["returncode"], e.get("signal")) for e in ended] == [
        (0, -signal.SIGSEGV, "SIGSEGV"), (1, 0, None)]
    logged, = h.events("incident")
    assert (logged["kind"], logged["attempt"], logged["step"]) == ("crash", 0, 7)
    assert "SIGSEGV" in logged["detail"]
    assert logged["epoch"] == 0
    assert h.events("run_finished")[0]["status"] == "completed"
    # The second attempt resumed from the checkpoint the first one saved.
    assert h.events("worker_ready")[1]["resumed_from_step"] == 5
    assert "plan_changed" not in h.names()
    h.assert_workers_gone()


@pytest.mark.parametrize("name", ["SIGABRT", "SIGBUS"])
def test_other_native_signals_are_crashes(supervise, name):
    h = supervise({"default": [HELLO, beat(2), die(name)]}, max_restarts=0)
    err = failed_run(h)
    incident, = err.incidents
    assert incident.kind == "crash"
    assert incident.signal == name
    assert name in incident.detail


def test_sigkill_without_memory_evidence_is_killed(supervise):
    h = supervise({"attempts": {"0": [HELLO, beat(3), die("SIGKILL")]}, "default": COMPLETE})
    result = h.supervisor.run()
    incident, = result.incidents
    assert incident.kind == "killed"
    assert incident.signal == "SIGKILL"
    assert incident.returncode == -9
    assert "no memory evidence" in incident.detail
    assert h.events("attempt_ended")[0]["signal"] == "SIGKILL"
    assert h.waits == [0.0]  # a first failure restarts at once
    h.assert_workers_gone()


def test_exit_code_without_a_report_is_a_crash(supervise):
    h = supervise({"default": [HELLO, beat(2), {"do": "exit", "code": 1}]}, max_restarts=0)
    incident, = failed_run(h).incidents
    assert incident.kind == "crash"
    assert incident.returncode == 1
    assert incident.signal is None
    assert "exited with code 1" in incident.detail


def test_exit_zero_without_a_result_is_a_crash(supervise):
    h = supervise({"default": [HELLO, beat(2), {"do": "exit", "code": 0}]}, max_restarts=0)
    incident, = failed_run(h).incidents
    assert incident.kind == "crash"
    assert "without finishing" in incident.detail


class _FakeGpu:
    """NVML as the supervisor sees it on a GPU machine: this much GPU memory used by the worker."""

    available = True
    count = 1

    def __init__(self, used: int) -> None:
        self.used = used

    def used_by(self, pids: set[int]) -> int | None:
        return self.used

    def per_device(self, pids: set[int]) -> list[tuple[int | None, int | None, int | None]]:
        return [(self.used, self.used + (1 << 30), 16 << 30)]


def test_the_gpu_memory_peak_is_journaled_reported_and_shown_in_the_status(supervise):
    h = supervise({"default": [HELLO, beat(5, interval=0.05), {"do": "exit", "code": 1}]}, max_restarts=0)
    h.supervisor.gpu = _FakeGpu(3 << 30)
    err = failed_run(h)
    incident, = err.incidents
    assert incident.gpu_memory_peak_bytes == 3 << 30
    ended, = h.events("attempt_ended")
    assert ended["gpu_memory_peak_bytes"] == 3 << 30
    assert h.events("incident")[0]["gpu_memory_peak_bytes"] == 3 << 30
    row, = [line for line in str(err).splitlines() if re.match(r"^\s+0  batch=", line)]
    assert re.search(r"\d+\.\d MiB, GPU 3\.0 GiB", row), row
    assert re.search(r"peak \d+\.\d MiB, GPU 3\.0 GiB", status_of(h, Plan(batch_size=32)))


class _TwoGpus(_FakeGpu):
    """Two GPUs of 16 GiB: the worker holds 3 and 5 GiB, and another job takes 9 GiB more of the first."""

    count = 2

    def per_device(self, pids: set[int]) -> list[tuple[int | None, int | None, int | None]]:
        return [(3 << 30, 12 << 30, 16 << 30), (5 << 30, 5 << 30, 16 << 30)]


@pytest.mark.parametrize(("message", "device", "source"), [
    ("OOM when allocating tensor with shape[64,4096] and type float on /job:localhost/replica:0/task:0/device:GPU:1 "
     "by allocator GPU_1_bfc", "GPU:1", "worker report"),
    ("OOM when allocating tensor with shape[64,4096]", "GPU:0", "nvml (fullest)"),  # 12 of 16 GiB in use
], ids=["named-by-the-error", "fullest-by-nvml"])
def test_a_gpu_oom_over_two_gpus_names_the_device(supervise, message, device, source):
    h = supervise({"default": [HELLO, beat(5, interval=0.05), report(None, type="ResourceExhaustedError",
                                                                      message=message)]},
                  max_restarts=0, plan=Plan(batch_size=32, replicas=2), devices=("gpu:0", "gpu:1"))
    h.supervisor.gpu = _TwoGpus(8 << 30)
    err = failed_run(h)
    incident, = err.incidents
    assert (incident.kind, incident.device, incident.evidence["device_source"]) == ("gpu_oom", device, source)
    assert incident.evidence["gpu_peaks"] == {"GPU:0": 3 << 30, "GPU:1": 5 << 30}
    assert incident.evidence["gpu_share_peaks"] == {"GPU:0": 0.75, "GPU:1": 0.3125}
    assert h.events("incident")[0]["device"] == device
    assert f"[device {device}]" in str(err)


def test_on_one_device_the_incident_names_none(supervise):
    message = "OOM when allocating tensor on /job:localhost/replica:0/task:0/device:GPU:0 by allocator GPU_0_bfc"
    h = supervise({"default": [HELLO, beat(2), report(None, type="ResourceExhaustedError", message=message)]},
                  max_restarts=0)
    h.supervisor.gpu = _FakeGpu(3 << 30)
    incident, = failed_run(h).incidents
    assert incident.device is None and incident.evidence["device"] == "GPU:0"  # the error's word stays evidence
    assert "gpu_peaks" not in incident.evidence


def test_without_a_gpu_nothing_about_gpu_memory_is_written(supervise):
    h = supervise({"default": [HELLO, beat(2), {"do": "exit", "code": 1}]}, max_restarts=0)
    h.supervisor.gpu = _FakeGpu(0)
    h.supervisor.gpu.available = False
    err = failed_run(h)
    assert err.incidents[0].gpu_memory_peak_bytes is None
    assert "gpu_memory_peak_bytes" not in h.events("attempt_ended")[0]
    assert "GPU" not in str(err)


# ------------------------------------------------------------------------------------------------ hangs


def _hang_script(*before: dict[str, Any]) -> dict[str, Any]:
    return {"attempts": {"0": [*before, HELLO, beat(3), {"do": "stamp", "name": "last_beat"},
                               {"do": "sleep", "seconds": 30}]},
            "default": COMPLETE}


def _seconds_from_last_beat_to_end(h: Harness) -> float:
    last_beat = float((h.run.attempt_dir(0) / "last_beat").read_text())
    ended = h.events("attempt_ended")[0]
    return parse_time(ended["time"]) - last_beat


def test_a_silent_worker_is_killed_as_a_hang(supervise):
    h = supervise(_hang_script())
    result = h.supervisor.run()

    incident = result.incidents[0]
    assert incident.kind == "hang"
    assert incident.signal == "SIGTERM"  # it honoured SIGTERM, so no SIGKILL was needed
    assert incident.step == 3
    assert HANG_TIMEOUT <= incident.evidence["heartbeat_age"] < HANG_TIMEOUT + 0.5
    assert "no heartbeat for" in incident.detail
    elapsed = _seconds_from_last_beat_to_end(h)
    assert HANG_TIMEOUT <= elapsed <= HANG_TIMEOUT + KILL_GRACE + 1.0
    assert not _alive(h.worker_pids()[0])
    assert "no heartbeat for" in h.stream.getvalue()
    assert h.waits == [0.0]  # a first failure restarts at once
    assert h.events("run_finished")[0]["status"] == "completed"
    h.assert_workers_gone()


def test_a_worker_that_ignores_sigterm_is_sigkilled_after_the_grace(supervise):
    h = supervise(_hang_script({"do": "ignore_sigterm"}))
    result = h.supervisor.run()

    incident = result.incidents[0]
    assert incident.kind == "hang"
    assert incident.signal == "SIGKILL"
    assert incident.returncode == -9
    assert h.events("attempt_ended")[0]["signal"] == "SIGKILL"
    elapsed = _seconds_from_last_beat_to_end(h)
    assert HANG_TIMEOUT + KILL_GRACE - 0.1 <= elapsed <= HANG_TIMEOUT + KILL_GRACE + 1.0
    h.assert_workers_gone()


def test_a_worker_silent_from_the_start_gets_the_startup_timeout(supervise):
    # Before the first trained step, the longer startup_timeout applies (import, restore, compile).
    h = supervise({"default": [{"do": "sleep", "seconds": 30}]}, startup_timeout=2.0, max_restarts=0)
    started = time.monotonic()
    incident, = failed_run(h).incidents
    assert incident.kind == "hang"
    assert 2.0 <= incident.evidence["heartbeat_age"] < 2.5
    assert time.monotonic() - started < 2.0 + KILL_GRACE + 3.0
    h.assert_workers_gone()


RESTORE = {"do": "phase", "name": "restore"}
SILENT = {"do": "sleep", "seconds": 30}


def _startup_hang(matrix_phase: str) -> pytest.MarkDecorator:
    return pytest.mark.fault("hang", matrix_phase, incident="hang", outcome="completed; killed after the start-up "
                             "phase's calibrated timeout (5 s), not startup_timeout", lost="nothing", corrupted="no")


@pytest.mark.parametrize(("phase", "silent"), [
    pytest.param("import", [SILENT], marks=_startup_hang("worker start-up"), id="import"),
    pytest.param("restore", [RESTORE, SILENT], marks=_startup_hang("worker start-up"), id="restore"),
    pytest.param("first_step", [RESTORE, HELLO, SILENT], marks=_startup_hang("first step"), id="first_step"),
])
def test_a_hang_in_start_up_after_a_restart_gets_the_calibrated_timeout(supervise, phase, silent):
    # Attempt 0 measures a fast start (well under a second a phase), then crashes; attempt 1 goes silent in
    # one start-up phase. The phase's timeout is calibrated (3x the measured time, at least hang_timeout and
    # STARTUP_MIN_TIMEOUT, 5 s), not the uncalibrated cap (startup_timeout, 15 s here).
    h = supervise({"attempts": {"0": [RESTORE, HELLO, beat(3), die("SIGSEGV")], "1": silent}, "default": COMPLETE},
                  startup_timeout=15.0, max_life=25.0)
    result = h.supervisor.run()

    crash, hang = result.incidents
    assert crash.kind == "crash" and "phase" not in crash.evidence  # it died after its first step
    assert hang.kind == "hang"
    assert hang.evidence["phase"] == phase
    assert hang.evidence["timeout"] == STARTUP_MIN_TIMEOUT
    assert STARTUP_MIN_TIMEOUT <= hang.evidence["heartbeat_age"] < STARTUP_MIN_TIMEOUT + 1.0
    assert f"during start-up, phase {phase} (timeout 5.0s)" in hang.detail
    assert f"during start-up ({phase})" in h.stream.getvalue()
    started = h.events("attempt_started")
    assert started[0]["startup_timeouts"] == {"import": 15.0, "restore": 15.0, "first_step": 15.0}
    assert started[1]["startup_timeouts"] == {"import": 5.0, "restore": 5.0, "first_step": 5.0}
    measured = h.events("attempt_ended")[0]["startup_seconds"]
    assert set(measured) == {"import", "restore", "first_step"} and max(measured.values()) < 5.0 / 3
    ended_in = {"import": set(), "restore": {"import"}, "first_step": {"import", "restore"}}[phase]
    assert set(h.events("attempt_ended")[1]["startup_seconds"]) == ended_in
    logged = next(e for e in h.events("incident") if e["kind"] == "hang")
    assert logged["evidence"]["phase"] == phase
    assert h.events("run_finished")[0]["status"] == "completed"
    h.assert_workers_gone()


def test_a_resumed_epoch_that_skips_batches_gets_time_to_skip_them(supervise):
    # Attempt 0 measures steps of 0.1 s; attempt 1 resumes 20 batches into an epoch, which a factory's input
    # re-reads before the first step (7 s here): its first_step timeout is 5 s + 3 x 20 x 0.1 s, no hang.
    h = supervise({"attempts": {"0": [RESTORE, HELLO, beat(3, interval=0.1), {"do": "checkpoint"}, die("SIGSEGV")],
                                "1": [RESTORE, {"do": "hello", "skip_steps": 20}, {"do": "sleep", "seconds": 7},
                                      *COMPLETE[1:]]}}, startup_timeout=15.0, max_life=25.0)
    result = h.supervisor.run()
    assert [i.kind for i in result.incidents] == ["crash"]
    assert h.events("worker_ready")[1]["skip_steps"] == 20
    assert h.events("attempt_started")[1]["startup_timeouts"]["first_step"] == STARTUP_MIN_TIMEOUT
    h.assert_workers_gone()


# ------------------------------------------------------------------------------------------ degradation


def test_gpu_oom_report_halves_the_batch_and_restarts_at_once(supervise):
    policy = Policy(ladders={"gpu_oom": [halve_batch(min_batch=8)]})
    h = supervise(
        {"attempts": {"0": [HELLO, beat(4), report("gpu_oom", type="ResourceExhaustedError",
                                                   message="OOM when allocating tensor with shape[32,512]")]},
         "default": COMPLETE},
        policy=policy,
    )
    result = h.supervisor.run()

    incident, = result.incidents
    assert incident.kind == "gpu_oom"
    assert incident.returncode == 3
    assert incident.detail == "ResourceExhaustedError: OOM when allocating tensor with shape[32,512]"
    assert incident.evidence["source"] == "worker report"
    assert incident.plan_before == Plan(batch_size=32)
    assert incident.plan_after == Plan(batch_size=16)
    assert incident.action.startswith("degrade: halve_batch(")
    assert result.plan == Plan(batch_size=16)
    assert h.run.read_plan() == Plan(batch_size=16)
    assert result.history["batch_size"] == [16]  # the restarted worker read the new plan.json
    assert h.waits == [0.0]  # a new plan: no reason to wait

    changed, = h.events("plan_changed")
    assert changed["from"]["batch_size"] == 32
    assert changed["to"]["batch_size"] == 16
    assert changed["reason"].startswith("degrade: halve_batch")
    assert changed["incident"] == "gpu_oom"
    names = h.names()
    assert names.index("incident") < names.index("plan_changed") < names.index("attempt_started", 1)
    assert [e["plan"]["batch_size"] for e in h.events("attempt_started")] == [32, 16]
    assert "new plan: batch=16 float32 cache" in h.stream.getvalue()
    h.assert_workers_gone()


def test_an_exhausted_ladder_restarts_with_the_same_plan(supervise):
    policy = Policy(ladders={"gpu_oom": [halve_batch(min_batch=32)]})  # cannot go below 32
    h = supervise({"attempts": {"0": [HELLO, beat(2), report("gpu_oom")]}, "default": COMPLETE}, policy=policy)
    result = h.supervisor.run()
    assert result.incidents[0].action == "restart with the same plan"
    assert result.plan == Plan(batch_size=32)
    assert "plan_changed" not in h.names()
    assert h.waits == [0.0]  # a first failure restarts at once


# ------------------------------------------------------------------------------------ finding the best plan

#: Seconds per step by batch size: per sample, 16 is fastest (64: 160/s, 32: 320/s, 16: 400/s, 8: 267/s).
PACE = {"64": 0.4, "32": 0.1, "16": 0.04, "8": 0.03}


def paced(n: int = 10) -> dict[str, Any]:
    return {"do": "beat", "n": n, "interval": 0.01, "pace": PACE}


def _search_policy(**probe: Any) -> Policy:
    return Policy(ladders={"gpu_oom": [halve_batch(min_batch=2, keep_effective_batch=True)]},
                  probe={"enabled": True, "stable_steps": 6, "max_probes": 3, "measure_seconds": 0.0, **probe})


def test_the_search_probes_down_to_the_fastest_micro_batch_and_settles_there(supervise):
    # 64 runs out of memory -> 32x2. Nothing lies between 32 and 64 with the same effective batch, so
    # the search measures smaller micro-batches: 16x4 is faster (kept, settled), 8x8 slower (rejected,
    # back to 16x4).
    stop = {"do": "await_sigterm", "then": "report"}
    h = supervise({"attempts": {"0": [HELLO, beat(2), report("gpu_oom")],
                                "1": [HELLO, paced(), stop], "2": [HELLO, paced(), stop], "3": [HELLO, paced(), stop],
                                "4": [HELLO, paced(), {"do": "checkpoint"}, {"do": "epoch_end"}, RESULT]}},
                  policy=_search_policy(), plan=Plan(batch_size=64))
    result = h.supervisor.run()

    assert [i.kind for i in result.incidents] == ["gpu_oom"], "probes are not incidents"
    plans = [(e["plan"]["batch_size"], e["plan"]["grad_accum_steps"]) for e in h.events("attempt_started")]
    assert plans == [(64, 1), (32, 2), (16, 4), (8, 8), (16, 4)]
    assert result.plan == Plan(batch_size=16, grad_accum_steps=4)
    assert h.run.read_plan() == result.plan, "a new VM resumes from the settled plan"
    measured = {e["plan"]["batch_size"]: e["samples_per_s"] for e in h.events("throughput_measured")}
    assert measured[32] == pytest.approx(320, rel=1e-6)
    assert measured[16] == pytest.approx(400, rel=1e-6)
    assert measured[8] == pytest.approx(8 / 0.03, abs=0.01)  # journaled to 2 decimals
    started = h.events("probe_started")
    assert [(e["to"]["batch_size"], e["direction"]) for e in started] == [(16, "down"), (8, "down")]
    kept, = h.events("probe_succeeded")
    assert (kept["plan"]["batch_size"], kept["working"]["batch_size"]) == (16, 32)
    rejected, = h.events("probe_rejected")
    assert rejected["plan"]["batch_size"] == 8 and rejected["back_to"]["batch_size"] == 16
    settled = [e for e in h.events("plan_changed") if e["incident"] is None]
    assert [(e["from"]["batch_size"], e["to"]["batch_size"]) for e in settled] == [(32, 16)]
    assert h.waits == [0.0] * 4
    h.assert_workers_gone()


def test_largest_objective_never_probes_down(supervise):
    h = supervise({"attempts": {"0": [HELLO, beat(2), report("gpu_oom")]},
                   "default": [HELLO, paced(), {"do": "checkpoint"}, {"do": "epoch_end"}, RESULT]},
                  policy=_search_policy(objective="largest"), plan=Plan(batch_size=64))
    result = h.supervisor.run()
    assert result.plan == Plan(batch_size=32, grad_accum_steps=2)
    assert not h.events("probe_started")
    assert h.events("throughput_measured"), "the stable point was reached and judged"


def test_the_worker_gets_two_malloc_arenas_unless_the_caller_chose(supervise, monkeypatch):
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    assert worker_env(supervise({"default": COMPLETE}).supervisor.cfg.extra_env)["MALLOC_ARENA_MAX"] == "2"
    monkeypatch.setenv("MALLOC_ARENA_MAX", "8")
    assert worker_env(supervise({"default": COMPLETE}).supervisor.cfg.extra_env)["MALLOC_ARENA_MAX"] == "8"


def test_a_measurement_covers_measure_seconds_of_training(supervise):
    # 10 steps of 0.1 s after one warm-up step: 0.9 s of training, short of 2 s, so the plan is never
    # judged and the run completes on it.
    h = supervise({"attempts": {"0": [HELLO, beat(2), report("gpu_oom")]},
                   "default": [HELLO, paced(), {"do": "checkpoint"}, {"do": "epoch_end"}, RESULT]},
                  policy=_search_policy(measure_seconds=2.0), plan=Plan(batch_size=64))
    result = h.supervisor.run()
    assert result.plan == Plan(batch_size=32, grad_accum_steps=2)
    assert not h.events("throughput_measured") and not h.events("probe_started")


def test_a_slower_larger_probe_is_rejected_and_the_run_goes_back(supervise):
    # 32 runs out of memory -> 16; the probe up (24) holds but is much slower per sample, so it becomes
    # the upper bound and the run returns to 16 (the next bisection, 20, is then tried and also rejected).
    pace = {"16": 0.04, "24": 0.2, "20": 0.2}
    stop = {"do": "await_sigterm", "then": "report"}
    paced_here = {"do": "beat", "n": 10, "interval": 0.01, "pace": pace}
    h = supervise({"attempts": {"0": [HELLO, beat(2), report("gpu_oom")],
                                "1": [HELLO, paced_here, stop], "2": [HELLO, paced_here, stop],
                                "3": [HELLO, paced_here, stop]},
                   "default": [HELLO, paced_here, {"do": "checkpoint"}, {"do": "epoch_end"}, RESULT]},
                  policy=Policy(ladders={"gpu_oom": [halve_batch(min_batch=16)]},
                                probe={"enabled": True, "stable_steps": 6, "max_probes": 2, "measure_seconds": 0.0}),
                  plan=Plan(batch_size=32))
    result = h.supervisor.run()
    plans = [e["plan"]["batch_size"] for e in h.events("attempt_started")]
    assert plans == [32, 16, 24, 20, 16]
    assert result.plan == Plan(batch_size=16)
    assert [e["plan"]["batch_size"] for e in h.events("probe_rejected")] == [24, 20]
    assert not h.events("probe_succeeded")
    assert h.run.read_plan() == Plan(batch_size=16)
    out = h.stream.getvalue()
    assert re.search(r"resilient: attempt 1 stopped after \d+ steps \(at step \d+\), no checkpoint yet, to measure "
                     r"another plan: probe batch=24 float32 cache \(working: batch=16 float32 cache\)\n", out)
    assert re.search(r"resilient: attempt 2 \(probe batch=24 float32 cache\) stopped after \d+ steps .*, to measure "
                     r"another plan: probe batch=20 float32 cache", out)
    assert re.search(r"resilient: attempt 3 \(probe batch=20 float32 cache\) stopped after \d+ steps .*, to go back "
                     r"to the working plan batch=16 float32 cache\n", out)
    assert re.search(r"resilient: attempt 4 completed after \d+ steps \(at step \d+\); the training is done\n", out)


def epoch_begin(steps: int, **fields: Any) -> dict[str, Any]:
    return {"do": "epoch_begin", "steps": steps, **fields}


def status_of(h: Harness, plan: Plan) -> str:
    """``python -m resilient status`` of the run (a run.json written here: the fake worker needs none)."""
    h.run.write_spec(RunSpec(epochs=1, seed=0, data=ObjectData(kind="factory", key="x"), model_fingerprint="x",
                             initial_plan=plan))
    return summarize(h.run.path)


def test_no_probe_starts_that_could_not_be_judged_before_the_run_ends(supervise):
    # 64 runs out of memory -> 32x2, whose attempt reports 12 steps left in the run. It is measured
    # after about 6 (0.1 s a step, 0.5 s of measurement); a probe at 16x4 would need a warm-up step and
    # 1 s (measurement and heartbeat slack) at about 0.05 s a step, 21 steps, and only about 10 of
    # them are left: no probe starts, and the run completes on 32x2 without another restart.
    h = supervise({"attempts": {"0": [HELLO, beat(2), report("gpu_oom")],
                                "1": [HELLO, epoch_begin(12), {"do": "beat", "n": 12, "interval": 0.05, "pace": PACE},
                                      {"do": "sleep", "seconds": 0.3}, {"do": "checkpoint"}, {"do": "epoch_end"},
                                      RESULT]}},
                  policy=_search_policy(measure_seconds=0.5), plan=Plan(batch_size=64))
    result = h.supervisor.run()

    working = Plan(batch_size=32, grad_accum_steps=2)
    assert [e["plan"]["batch_size"] for e in h.events("attempt_started")] == [64, 32]
    assert h.events("throughput_measured"), "the plan was measured"
    assert not h.events("probe_started")
    skipped, = h.events("probe_skipped")
    assert skipped["attempt"] == 1
    assert (skipped["plan"]["batch_size"], skipped["working"]["batch_size"]) == (16, 32)
    assert skipped["steps_needed"] == 21 and skipped["steps_left"] < 21
    assert f"{skipped['steps_left']} steps left in the run" in skipped["reason"]
    assert result.plan == working and result.unjudged_probe is None
    assert h.run.read_plan() == working, "plan.json unchanged"
    assert not h.events("probe_unjudged")
    out = h.stream.getvalue()
    assert "resilient: not probing batch=16x4 float32 cache: " in out
    assert "the run finishes on batch=32x2 float32 cache" in out
    assert "resilient: attempt 1 completed after 12 steps (at step 12); the training is done" in out
    assert "-> probe batch=16x4 float32 cache not started: " in status_of(h, Plan(batch_size=64))
    h.assert_workers_gone()


def test_a_probe_with_enough_steps_left_still_runs_and_is_judged(supervise):
    # 32x2 reports 200 steps left: its probe (16x4) starts and is kept (400 vs 320 samples/s). The kept
    # probe reports 30 steps left; once judged (after ~14), a probe at 8x8 would need 51 steps: skipped.
    stop = {"do": "await_sigterm", "then": "report"}
    h = supervise({"attempts": {"0": [HELLO, beat(2), report("gpu_oom")],
                                "1": [HELLO, epoch_begin(200), paced(), stop],
                                "2": [HELLO, epoch_begin(30), {"do": "beat", "n": 30, "interval": 0.03, "pace": PACE},
                                      {"do": "sleep", "seconds": 0.3}, {"do": "checkpoint"}, {"do": "epoch_end"},
                                      RESULT]}},
                  policy=_search_policy(measure_seconds=0.5), plan=Plan(batch_size=64))
    result = h.supervisor.run()

    plans = [(e["plan"]["batch_size"], e["plan"]["grad_accum_steps"]) for e in h.events("attempt_started")]
    assert plans == [(64, 1), (32, 2), (16, 4)]
    started, = h.events("probe_started")
    assert started["to"]["batch_size"] == 16
    kept, = h.events("probe_succeeded")
    assert kept["plan"]["batch_size"] == 16
    skipped, = h.events("probe_skipped")
    assert (skipped["attempt"], skipped["plan"]["batch_size"], skipped["steps_needed"]) == (2, 8, 51)
    assert result.plan == Plan(batch_size=16, grad_accum_steps=4) == h.run.read_plan()
    assert result.unjudged_probe is None and not h.events("probe_unjudged")
    assert "resilient: attempt 2 (probe batch=16x4 float32 cache) completed after 30 steps" in h.stream.getvalue()
    h.assert_workers_gone()


def test_a_run_that_completes_on_an_unjudged_probe_says_so_and_keeps_the_working_plan(supervise):
    # No horizon reported (an input of unknown length): the probe starts, and the run ends 3 steps
    # into it, before stable_steps (6). The probe was never measured, so plan.json keeps 32x2.
    stop = {"do": "await_sigterm", "then": "report"}
    h = supervise({"attempts": {"0": [HELLO, beat(2), report("gpu_oom")],
                                "1": [HELLO, paced(), stop],
                                "2": [HELLO, paced(3), {"do": "checkpoint"}, {"do": "epoch_end"}, RESULT]}},
                  policy=_search_policy(), plan=Plan(batch_size=64))
    result = h.supervisor.run()

    working, probe = Plan(batch_size=32, grad_accum_steps=2), Plan(batch_size=16, grad_accum_steps=4)
    assert [e["plan"]["batch_size"] for e in h.events("attempt_started")] == [64, 32, 16]
    assert not h.events("probe_succeeded") and not h.events("probe_rejected")
    unjudged, = h.events("probe_unjudged")
    assert unjudged["attempt"] == 2
    assert unjudged["plan"] == probe.model_dump(mode="json") and unjudged["working"] == working.model_dump(mode="json")
    assert h.run.read_plan() == working, "plan.json keeps the settled plan, not the unjudged probe"
    assert result.plan == working and result.unjudged_probe == probe
    assert h.names()[-1] == "run_finished"
    out = h.stream.getvalue()
    assert ("resilient: attempt 2 (probe batch=16x4 float32 cache) completed after 3 steps (at step 3); "
            "the training is done\n") in out
    assert ("resilient: the run completed on probe batch=16x4 float32 cache before it could be judged; plan.json "
            "keeps the working plan batch=32x2 float32 cache\n") in out
    status = status_of(h, Plan(batch_size=64))
    assert "-> the run completed on this probe before it was judged; plan.json keeps batch=32x2" in status
    assert "plan in force: batch=32x2 float32 cache" in status
    h.assert_workers_gone()


def test_a_probe_that_runs_out_of_memory_ends_with_a_line_and_goes_back(supervise):
    policy = Policy(ladders={"gpu_oom": [halve_batch(min_batch=16)]},
                    probe={"enabled": True, "stable_steps": 6, "max_probes": 1, "measure_seconds": 0.0})
    stop = {"do": "await_sigterm", "then": "report"}
    h = supervise({"attempts": {"0": [HELLO, beat(2), report("gpu_oom")],
                                "1": [HELLO, paced(), stop],
                                "2": [HELLO, beat(2), report("gpu_oom", type="ResourceExhaustedError", message="OOM")]},
                   "default": [HELLO, paced(), {"do": "checkpoint"}, {"do": "epoch_end"}, RESULT]},
                  policy=policy, plan=Plan(batch_size=32))
    result = h.supervisor.run()
    assert [e["plan"]["batch_size"] for e in h.events("attempt_started")] == [32, 16, 24, 16]
    assert result.plan == Plan(batch_size=16) == h.run.read_plan()
    failed, = h.events("probe_failed")
    assert failed["plan"]["batch_size"] == 24
    out = h.stream.getvalue()
    assert ("resilient: attempt 0 ended: gpu_oom (RuntimeError:) after 2 steps (at step 2), no checkpoint yet; "
            "degrade: halve_batch(") in out
    assert re.search(r"resilient: attempt 2 \(probe batch=24 float32 cache\) ended: gpu_oom \(ResourceExhaustedError: "
                     r"OOM\) after 2 steps \(at step 2\), no checkpoint yet; the probe does not fit: back to "
                     r"batch=16 float32 cache\n", out)
    assert "resilient: attempt 3 completed after 10 steps" in out
    h.assert_workers_gone()


# ------------------------------------------------------------------------------------------- preemption


@pytest.mark.parametrize("then", ["report", "exit4"])
def test_rehearsed_preempt_gets_sigterm_and_restarts_without_waiting(supervise, then):
    h = supervise({"attempts": {"0": [HELLO, beat(3), {"do": "checkpoint"}, {"do": "fault", "kind": "preempt"},
                                      {"do": "await_sigterm", "then": then}]},
                   "default": COMPLETE})
    result = h.supervisor.run()

    incident, = result.incidents
    assert incident.kind == "preempted"
    assert incident.returncode == 4
    assert incident.checkpoint_step == 3
    if then == "report":
        assert "SIGTERM received" in incident.detail
        assert incident.evidence["source"] == "worker report"
    else:
        assert "exit code 4" in incident.detail
    fired, = h.events("fault_fired")
    assert (fired["kind"], fired["fault"], fired["attempt"]) == ("preempt", "preempt@3", 0)
    assert "sending SIGTERM" in h.stream.getvalue()
    assert h.waits == [0.0]  # a polite stop: no backoff
    detail = "SIGTERM received; the worker saved a checkpoint and exited" if then == "report" else "terminated"
    assert (f"resilient: attempt 0 ended: preempted ({detail}" in h.stream.getvalue()
            and "after 3 steps (at step 3), checkpoint at step 3; restart with the same plan\n" in h.stream.getvalue())
    assert h.events("run_finished")[0]["status"] == "completed"
    h.assert_workers_gone()


def test_each_attempt_end_gets_a_line_on_stdout(supervise, capsys):
    # A crash (no checkpoint yet), a polite stop (checkpoint kept), then the completion.
    h = supervise({"attempts": {"0": [HELLO, beat(2), die("SIGSEGV")],
                                "1": [HELLO, beat(3), {"do": "checkpoint"}, {"do": "fault", "kind": "preempt"},
                                      {"do": "await_sigterm"}]},
                   "default": COMPLETE}, stream=None)
    h.supervisor.run()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("resilient: attempt")]
    assert lines[0] == "resilient: attempt 0 starting with plan: batch=32 float32 cache"
    assert lines[1].startswith("resilient: attempt 0 ended: crash (")
    assert lines[1].endswith("after 2 steps (at step 2), no checkpoint yet; restart with the same plan")
    assert lines[3] == ("resilient: attempt 1 ended: preempted (SIGTERM received; the worker saved a checkpoint and "
                        "exited) after 3 steps (at step 3), checkpoint at step 3; restart with the same plan")
    assert lines[5] == "resilient: attempt 2 completed after 3 steps (at step 6); the training is done"
    assert len(lines) == 6, "one line as each attempt starts, one as it ends"


# ----------------------------------------------------------------------------------------- user errors


def test_user_error_is_raised_after_one_attempt_with_the_traceback(supervise):
    traceback = (
        "Traceback (most recent call last):\n"
        '  File "train.py", line 12, in custom_loss\n'
        "    return y_true @ y_pred\n"
        "ValueError: shapes (32, 10) and (32, 1) not aligned\n"
    )
    h = supervise({"default": [HELLO, beat(2), {"do": "checkpoint"},
                               report("user_error", type="ValueError",
                                      message="shapes (32, 10) and (32, 1) not aligned", traceback=traceback)]})
    with pytest.raises(UserCodeError) as info:
        h.supervisor.run()
    err = info.value
    message = str(err)
    assert "The training code raised ValueError: shapes (32, 10) and (32, 1) not aligned" in message
    assert "did not retry" in message
    assert traceback in message
    assert 'File "train.py", line 12, in custom_loss' in message
    assert "step 2" in message  # the checkpoint it keeps
    assert str(h.run.path) in message
    assert err.worker_traceback == traceback
    assert err.run_dir == str(h.run.path)

    assert len(h.events("attempt_started")) == 1
    assert h.waits == []
    incident, = h.events("incident")
    assert incident["kind"] == "user_error"
    assert incident["action"].startswith("stop")
    finished, = h.events("run_finished")
    assert finished["status"] == "user_error"
    assert ("resilient: attempt 0 ended: user_error (ValueError: shapes (32, 10) and (32, 1) not aligned) after 2 "
            "steps (at step 2), checkpoint at step 2; not retried\n") in h.stream.getvalue()
    h.assert_workers_gone()


# ------------------------------------------------------------------------------------------- giving up


def test_restarts_exhausted_raise_a_root_cause_report(supervise):
    # Every attempt trains a little further, checkpoints, then segfaults: progress, but never the end.
    h = supervise({"default": [HELLO, beat(4), {"do": "checkpoint"}, beat(1), die("SIGSEGV")]}, max_restarts=2)
    err = failed_run(h)
    report_text = str(err)

    assert [i.kind for i in err.incidents] == ["crash", "crash", "crash"]
    assert [i.step for i in err.incidents] == [5, 9, 13]  # each resumes from the last checkpoint
    assert err.run_dir == str(h.run.path)
    assert "training failed after 3 attempt(s): restarts exhausted (max_restarts=2)" in report_text
    assert f"Run directory: {h.run.path}" in report_text
    latest = CheckpointStore(h.run.checkpoints).latest()
    assert f"Last checkpoint: step 12, epoch 0, sample 384 at {latest.path}" in report_text
    rows = [line for line in report_text.splitlines() if re.match(r"^\s+\d+  batch=", line)]
    assert len(rows) == 3
    for attempt, (row, step) in enumerate(zip(rows, (5, 9, 13), strict=True)):
        assert row.split()[0] == str(attempt)
        assert "batch=32 float32 cache" in row
        assert "SIGSEGV" in row
        assert "crash" in row
        assert f"0/{step}" in row
        assert re.search(r"\d+\.\d MiB", row), row  # the memory peak
        assert "the worker died from SIGSEGV" in row
    assert "Root cause: the last attempt ended with crash" in report_text
    assert "What to do:" in report_text
    assert str(h.run.events) in report_text

    assert len(h.events("attempt_started")) == 3
    finished, = h.events("run_finished")
    assert finished["status"] == "failed"
    assert "restarts exhausted" in finished["reason"]
    assert h.waits == [0.0, 0.0]  # each crash came after new checkpoints: no backoff
    h.assert_workers_gone()


def test_the_same_incident_at_the_same_step_twice_stops_early(supervise):
    # No checkpoint: every attempt starts over and dies at step 5. Retrying cannot help.
    h = supervise({"default": [HELLO, beat(5), die("SIGSEGV")]}, max_restarts=5)
    err = failed_run(h)

    assert len(err.incidents) == 2
    assert [i.step for i in err.incidents] == [5, 5]
    assert err.incidents[-1].action == "give up: no progress"
    assert "no progress" in str(err)
    assert len(h.events("attempt_started")) == 2
    finished, = h.events("run_finished")
    assert finished["status"] == "failed"
    assert finished["reason"].startswith("no progress")
    assert h.waits == [0.0]  # a first failure restarts at once
    h.assert_workers_gone()


@pytest.mark.fault("sigkill", "worker start-up", incident="killed", outcome="completed (a start-up kill after a "
                   "newer checkpoint is progress)", lost="nothing", corrupted="no")
def test_start_up_kills_around_a_newer_checkpoint_are_progress(supervise):
    # The sequence: killed at start-up, killed at step 30 after a checkpoint at 30, killed at
    # start-up again. Both start-up kills are recorded at step 0, but from different checkpoints.
    kill = die("SIGKILL")
    h = supervise({"attempts": {"0": [kill], "1": [HELLO, beat(30), {"do": "checkpoint"}, kill], "2": [kill]},
                   "default": COMPLETE}, max_restarts=10)
    result = h.supervisor.run()

    assert [(i.kind, i.step, i.checkpoint_step) for i in result.incidents] == [
        ("killed", 0, None), ("killed", 30, 30), ("killed", 0, 30)]
    assert [i.action for i in result.incidents] == ["restart with the same plan"] * 3
    assert result.epochs_done == [0]
    assert h.events("run_finished")[0]["status"] == "completed"
    h.assert_workers_gone()


# --------------------------------------------------------------------------------------------- memory


def test_watchdog_kills_a_worker_over_the_budget_without_cgroups(supervise, monkeypatch):
    def no_cgroups(*args: Any, **kwargs: Any) -> None:
        raise OSError("memory cgroups disabled for this test")

    monkeypatch.setattr(supervisor_module.MemoryCgroup, "create", no_cgroups)
    limit = 150 * MB
    h = supervise({"attempts": {"0": [HELLO, beat(2), {"do": "alloc", "mb": 300},
                                      {"do": "await_sigterm", "timeout": 10}]},
                   "default": COMPLETE},
                  host_memory_limit=limit, hang_timeout=MEMORY_TEST_HANG_TIMEOUT)
    result = h.supervisor.run()

    incident, = result.incidents
    assert incident.kind == "host_oom"
    assert incident.signal == "SIGKILL"
    assert incident.evidence["source"] == "watchdog"
    assert incident.evidence["limit"] == limit
    assert incident.evidence["rss"] > limit
    assert incident.memory_peak_bytes > limit
    assert "watchdog" in incident.detail
    enforcement = h.events("memory_enforcement")
    assert enforcement[0]["mechanism"] == "watchdog"
    assert "disabled for this test" in enforcement[0]["reason"]
    assert "memory cgroup unavailable" in h.stream.getvalue()
    assert h.events("run_finished")[0]["status"] == "completed"
    h.assert_workers_gone()


@pytest.mark.cgroup
def test_the_kernel_kills_a_worker_over_its_cgroup_limit(supervise):
    ok, why = cgroup_support()
    if not ok:
        pytest.skip(f"no writable memory cgroup here: {why}")
    limit = 200 * MB
    h = supervise({"attempts": {"0": [HELLO, beat(2), {"do": "alloc", "mb": 2048},
                                      {"do": "await_sigterm", "timeout": 10}]},
                   "default": COMPLETE},
                  host_memory_limit=limit, hang_timeout=MEMORY_TEST_HANG_TIMEOUT)
    result = h.supervisor.run()

    incident, = result.incidents
    assert incident.kind == "host_oom", incident
    assert incident.signal == "SIGKILL"
    assert incident.evidence["source"] == "cgroup"
    assert incident.evidence["oom_kills"] >= 1
    assert incident.evidence["limit"] == limit
    assert "OOM killer" in incident.detail
    enforcement = [e for e in h.events("memory_enforcement") if e["attempt"] == 0]
    assert enforcement[0]["mechanism"].startswith("cgroup v")
    assert enforcement[0]["limit"] == limit
    assert not Path(enforcement[0]["path"]).exists()  # the group is removed after the attempt
    assert h.events("run_finished")[0]["status"] == "completed"
    h.assert_workers_gone()


def _looks(watch: PressureWatch, samples: list[tuple[float, int, int]], limit: int | None = 1000,
           save_seconds: float = 0.0) -> list[str | None]:
    """``watch``'s answers to (time, step, used or available) samples."""
    out = []
    for now, step, level in samples:
        used, available = (level, None) if limit is not None else (5, level)
        out.append(watch.observe(used, limit, available, now=now, step=step, save_seconds=save_seconds))
    return out


def test_pressure_watch_asks_on_crossing_and_again_each_time_the_headroom_halves():
    watch = PressureWatch(threshold=0.85, rearm=0.75, interval=1000)
    limit = 1000
    # 850 crosses (headroom 150); then 925 halves it (75), 963 again (37), 982, and at the limit every look.
    climb = [(0, 1, 500), (1, 2, 849), (2, 3, 850), (3, 4, 900), (4, 5, 924), (5, 6, 925), (6, 7, 950),
             (7, 8, 963), (8, 9, 981), (9, 10, 982), (10, 11, 1000), (11, 12, 1000)]
    assert _looks(watch, climb, limit) == [None, None, "first_crossing", None, None, "further_climb", None,
                                           "further_climb", None, "further_climb", "further_climb", "further_climb"]
    # A dip within the climb does not lower the mark: rising back to where it was asks nothing.
    assert _looks(watch, [(12, 13, 900), (13, 14, 1000)], limit) == [None, "further_climb"]
    assert watch.observe(None, limit, None) is None  # no sample: nothing decided


def test_pressure_watch_keeps_a_saves_own_memory_out_of_the_headroom_it_halves():
    # A save needs 100 of the 1000: the headroom halved is what is left under 900, and from 900 on every look asks.
    watch = PressureWatch(threshold=0.85, rearm=0.75, interval=1000)
    samples = [(0, 1, 850), (1, 2, 874), (2, 3, 875), (3, 4, 888), (4, 5, 900), (5, 6, 901), (6, 7, 902)]
    assert [watch.observe(used, 1000, None, now=now, step=step, reserve=100) for now, step, used in samples] == [
        "first_crossing", None, "further_climb", "further_climb", "further_climb", "further_climb", "further_climb"]


def test_pressure_watch_rearms_only_under_the_lower_mark():
    watch = PressureWatch(threshold=0.85, rearm=0.75, interval=1000)
    limit = 1000
    # Falling between the marks keeps the climb (a new crossing asks nothing); under 750 ends it.
    samples = [(0, 1, 860), (1, 2, 800), (2, 3, 870), (3, 4, 749), (4, 5, 860)]
    assert _looks(watch, samples, limit) == ["first_crossing", None, None, None, "first_crossing"]
    assert not watch.armed


def test_pressure_watch_asks_again_only_after_steps_were_trained_since_the_last_request():
    watch = PressureWatch(interval=5)
    # The worker stalls at step 10 (a long validation, a save): neither a climb nor the interval asks, since a
    # checkpoint there would hold nothing new; the first step after the stall does.
    samples = [(0, 10, 860), (1, 10, 990), (20, 10, 995), (21, 11, 995)]
    assert _looks(watch, samples) == ["first_crossing", None, None, "further_climb"]


def test_pressure_watch_asks_at_an_interval_while_memory_stays_above_the_mark():
    watch = PressureWatch(interval=5)
    samples = [(0, 1, 880), (4.9, 50, 880), (5.0, 60, 880), (9, 70, 870), (10, 80, 870), (12, 90, 700),
               (13, 100, 880)]
    assert _looks(watch, samples) == ["first_crossing", None, "interval", None, "interval", None, "first_crossing"]


def test_pressure_watch_spaces_its_repeats_by_the_cost_of_a_pressure_checkpoint():
    # A 2 s checkpoint: a climb waits 2 s after the last request, the interval 10 x 2 s (not 5 s).
    watch = PressureWatch(interval=5)
    samples = [(0, 1, 860), (1, 2, 940), (2, 3, 940), (10, 4, 940), (20, 5, 940), (22, 6, 940)]
    assert _looks(watch, samples, save_seconds=2.0) == ["first_crossing", None, "further_climb", None, None,
                                                       "interval"]


def test_pressure_watch_without_a_limit_reads_the_machines_available_memory():
    watch = PressureWatch(margin=1000, interval=1000)
    # Below the margin: asks; again each time what is available halves; the climb ends with twice the margin back.
    samples = [(0, 1, 3000), (1, 2, 1000), (2, 3, 999), (3, 4, 600), (4, 5, 499), (5, 6, 400), (6, 7, 249),
               (7, 8, 1999), (8, 9, 800), (9, 10, 2000), (10, 11, 900)]
    assert _looks(watch, samples, None) == [None, None, "first_crossing", None, "further_climb", None,
                                            "further_climb", None, None, None, "first_crossing"]
    assert watch.observe(5, None, None) is None
    interval = PressureWatch(margin=1000, interval=5)
    assert _looks(interval, [(0, 1, 900), (3, 2, 800), (6, 3, 800)], None) == ["first_crossing", None, "interval"]


def test_memory_pressure_asks_the_worker_for_one_checkpoint_per_climb(supervise, monkeypatch):
    _no_cgroups(monkeypatch)  # the watchdog's budget is the limit: the same on every machine
    limit = 250 * MB  # the fake worker's own 20-30 MB plus 200 MB: over 85%, under the limit
    h = supervise({"attempts": {"0": [HELLO, beat(2), {"do": "alloc", "mb": 200},
                                      beat(40, interval=0.025), RESULT]}, "default": COMPLETE},
                  host_memory_limit=limit, hang_timeout=MEMORY_TEST_HANG_TIMEOUT)
    result = h.supervisor.run()

    assert result.incidents == []
    # Memory stayed over the mark for about a second of samples: one request, to the worker (SIGUSR1).
    assert len((h.run.attempt_dir(0) / "pressure").read_text().splitlines()) == 1
    [request] = h.events("checkpoint_requested")
    assert request["reason"] == "memory_pressure" and request["attempt"] == 0
    assert request["limit_bytes"] == limit and 0.85 * limit <= request["used_bytes"] < limit
    assert "memory pressure" in h.stream.getvalue()
    h.assert_workers_gone()


#: Pressure marks low enough that the fake worker's own memory (15-45 MB) plus a scripted allocation crosses them.
LOW_MARKS = {"pressure_threshold": 0.5, "rearm_threshold": 0.4}


def _alloc(mb: int) -> dict[str, Any]:
    return {"do": "alloc", "mb": mb, "chunk_mb": 2}


def test_memory_pressure_asks_again_while_memory_climbs_on_toward_the_limit(supervise, monkeypatch):
    _no_cgroups(monkeypatch)
    limit = 300 * MB
    # 170 MB and the worker's own: past 50% (headroom 85-115 MB); 70 MB more halves that headroom, under the limit.
    h = supervise({"attempts": {"0": [HELLO, beat(2), _alloc(170), beat(12, interval=0.025), _alloc(240),
                                      beat(12, interval=0.025), RESULT]}, "default": COMPLETE},
                  host_memory_limit=limit, hang_timeout=MEMORY_TEST_HANG_TIMEOUT, policy=Policy(memory=LOW_MARKS))
    result = h.supervisor.run()

    assert result.incidents == []
    requests = h.events("checkpoint_requested")
    triggers = [r["trigger"] for r in requests]
    assert triggers[0] == "first_crossing" and len(triggers) >= 2 and set(triggers[1:]) == {"further_climb"}, triggers
    first, last = requests[0], requests[-1]
    assert last["used_bytes"] >= (first["used_bytes"] + limit) / 2 and last["used_bytes"] < limit
    assert last["step"] > first["step"]
    assert len((h.run.attempt_dir(0) / "pressure").read_text().splitlines()) == len(requests)  # each one signalled
    h.assert_workers_gone()


def test_memory_pressure_asks_at_an_interval_while_the_worker_trains_above_the_mark(supervise, monkeypatch):
    _no_cgroups(monkeypatch)
    # Above the mark for 1.2 s of training, then a 1 s stall without a step: requests every 0.3 s while it trains,
    # none twice at the same step.
    h = supervise({"attempts": {"0": [HELLO, beat(2), _alloc(170), beat(48, interval=0.025),
                                      {"do": "sleep", "seconds": 1.0}, RESULT]}, "default": COMPLETE},
                  host_memory_limit=300 * MB, hang_timeout=MEMORY_TEST_HANG_TIMEOUT,
                  policy=Policy(memory={**LOW_MARKS, "pressure_interval": 0.3}))
    result = h.supervisor.run()

    assert result.incidents == []
    requests = h.events("checkpoint_requested")
    assert [r["trigger"] for r in requests][:1] == ["first_crossing"]
    assert 2 <= len(requests) <= 6 and {r["trigger"] for r in requests[1:]} == {"interval"}, requests
    times = [dt.datetime.fromisoformat(r["time"].replace("Z", "+00:00")).timestamp() for r in requests]
    assert all(b - a >= 0.3 - 0.01 for a, b in itertools.pairwise(times)), times
    steps = [r["step"] for r in requests]
    assert steps == sorted(set(steps)), steps  # the stall asked nothing more: nothing new to save
    h.assert_workers_gone()


def test_no_pressure_checkpoint_when_the_policy_turns_it_off(supervise, monkeypatch):
    _no_cgroups(monkeypatch)
    h = supervise({"attempts": {"0": [HELLO, beat(2), {"do": "alloc", "mb": 200}, beat(20, interval=0.025),
                                      RESULT]}, "default": COMPLETE},
                  host_memory_limit=250 * MB, hang_timeout=MEMORY_TEST_HANG_TIMEOUT,
                  policy=Policy(memory={"pressure_checkpoint": False}))
    h.supervisor.run()
    assert not (h.run.attempt_dir(0) / "pressure").exists() and not h.events("checkpoint_requested")


def _no_cgroups(monkeypatch: pytest.MonkeyPatch) -> None:
    def create(*args: Any, **kwargs: Any) -> None:
        raise OSError("memory cgroups disabled for this test")

    monkeypatch.setattr(supervisor_module.MemoryCgroup, "create", create)


REHEARSED_HOST_OOM = {
    "attempts": {"0": [HELLO, beat(2), {"do": "fault", "kind": "host_oom"}, {"do": "sleep", "seconds": 0.4},
                       {"do": "alloc", "mb": 1024}, {"do": "await_sigterm", "timeout": 10}]},
    "default": COMPLETE,
}


def test_rehearsed_host_oom_without_a_limit_arms_the_watchdog(supervise, monkeypatch):
    _no_cgroups(monkeypatch)
    h = supervise(REHEARSED_HOST_OOM, rehearse_host_oom=True, hang_timeout=MEMORY_TEST_HANG_TIMEOUT)
    result = h.supervisor.run()

    incident, = result.incidents
    assert incident.kind == "host_oom"
    assert incident.evidence["source"] == "watchdog"
    armed, = h.events("rehearsal_limit")
    assert armed["mechanism"] == "watchdog"
    assert armed["limit"] == incident.evidence["limit"]
    assert armed["limit"] < incident.evidence["rss"] < armed["limit"] + 200 * MB
    assert "memory_enforcement" not in h.names()  # no limit was asked for, so none is announced
    h.assert_workers_gone()


@pytest.mark.cgroup
def test_rehearsed_host_oom_in_a_cgroup_is_a_real_kernel_kill(supervise):
    ok, why = cgroup_support()
    if not ok:
        pytest.skip(f"no writable memory cgroup here: {why}")
    h = supervise(REHEARSED_HOST_OOM, rehearse_host_oom=True, hang_timeout=MEMORY_TEST_HANG_TIMEOUT)
    result = h.supervisor.run()

    incident, = result.incidents
    assert incident.kind == "host_oom", incident
    assert incident.evidence["source"] == "cgroup"
    assert incident.evidence["oom_kills"] >= 1
    armed, = h.events("rehearsal_limit")
    assert armed["mechanism"] == "cgroup"
    assert incident.evidence["limit"] == armed["limit"]
    h.assert_workers_gone()


# ------------------------------------------------------------------------------------------ interrupts


def _interrupt_when_ready(monkeypatch: pytest.MonkeyPatch, h: Harness) -> None:
    """Raise KeyboardInterrupt in the monitor loop (as Ctrl-C would) once the worker is training."""
    real = supervisor_module.tree_rss
    ready = h.run.attempt_dir(0) / "ready"

    def sample(pid: int) -> int | None:
        if ready.exists():
            raise KeyboardInterrupt
        return real(pid)

    monkeypatch.setattr(supervisor_module, "tree_rss", sample)


INTERRUPTED = {"default": [HELLO, beat(2), {"do": "stamp", "name": "ready"},
                           {"do": "await_sigterm", "save_seconds": 1.0}]}


def test_ctrl_c_stops_the_worker_and_journals_interrupted(supervise, monkeypatch):
    h = supervise(INTERRUPTED, kill_grace=0.5, preempt_grace=5.0)
    _interrupt_when_ready(monkeypatch, h)
    with pytest.raises(KeyboardInterrupt):
        h.supervisor.run()
    assert h.names()[-2:] == ["attempt_ended", "run_finished"]
    assert h.events("run_finished")[0]["status"] == "interrupted"
    ended, = h.events("attempt_ended")
    assert (ended["attempt"], ended["returncode"], ended["interrupted"]) == (0, 4, True)  # it saved and exited
    assert len(h.events("attempt_started")) == 1
    assert "resilient: attempt 0 interrupted (Ctrl-C), " in h.stream.getvalue()
    assert "the worker saved it on SIGTERM and stopped" in h.stream.getvalue()
    h.assert_workers_gone()


def test_ctrl_c_gives_the_worker_the_preempt_grace_to_save(supervise, monkeypatch):
    h = supervise(INTERRUPTED, kill_grace=0.5, preempt_grace=5.0)
    _interrupt_when_ready(monkeypatch, h)
    with pytest.raises(KeyboardInterrupt):
        h.supervisor.run()
    assert (h.run.attempt_dir(0) / "saved").exists()  # it took 1 s to save: less than preempt_grace


def _run_with_ctrl_c(h: Harness, *, again_after: float | None = None) -> tuple[list[float], float]:
    """Run until KeyboardInterrupt from a real Ctrl-C: SIGINT to this process once the worker stamped
    ``ready`` (and again ``again_after`` seconds later). Returns the times they were sent and the time
    run() raised; no SIGINT is sent once it did."""
    sent: list[float] = []
    done = threading.Event()
    ready = h.run.attempt_dir(0) / "ready"

    def press() -> None:
        while not ready.exists() and not done.wait(0.02):
            pass
        for delay in (0.0, again_after):
            if delay is None or done.wait(delay):
                return
            sent.append(time.monotonic())
            os.kill(os.getpid(), signal.SIGINT)

    thread = threading.Thread(target=press, daemon=True)
    thread.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            h.supervisor.run()
        return sent, time.monotonic()
    finally:
        done.set()
        thread.join()


def test_interrupt_patience_follows_the_workers_pace():
    # Silent for a few seconds plus two of its slowest steps, or during a save 30 s plus 3x its slowest save.
    assert interrupt_patience(Progress()) == INTERRUPT_SILENCE
    assert interrupt_patience(Progress(phase="train", max_step_seconds=2.0)) == INTERRUPT_SILENCE + 4.0
    assert interrupt_patience(Progress(phase="save", max_step_seconds=2.0, max_save_seconds=5.0)) == 45.0


HUNG = {"default": [HELLO, beat(3), {"do": "checkpoint"}, {"do": "ignore_sigterm"}, {"do": "stamp", "name": "ready"},
                    {"do": "sleep", "seconds": 30}]}


@pytest.mark.fault("ctrl_c", "mid-epoch", incident="none (run_finished: interrupted)", outcome="KeyboardInterrupt "
                   "within a few seconds with a hung worker; attempt_ended journaled; no process left",
                   lost="steps since the last checkpoint", corrupted="no")
def test_ctrl_c_with_a_hung_worker_returns_within_seconds_and_reaps_it(supervise):
    h = supervise(HUNG, preempt_grace=120.0)
    sent, returned = _run_with_ctrl_c(h)
    assert INTERRUPT_SILENCE <= returned - sent[0] < INTERRUPT_SILENCE + 2.0, "not preempt_grace (120 s)"
    assert h.names()[-2:] == ["attempt_ended", "run_finished"]
    ended, = h.events("attempt_ended")
    assert (ended["attempt"], ended["signal"], ended["interrupted"]) == (0, "SIGKILL", True)
    assert ended["memory_peak_bytes"] > 0
    finished = h.events("run_finished")[0]
    assert (finished["status"], finished["checkpoint_step"]) == ("interrupted", 3)
    assert ("resilient: attempt 0 interrupted (Ctrl-C), checkpoint at step 3; the worker did not stop on SIGTERM and "
            "was killed (SIGKILL)\n") in h.stream.getvalue()
    assert re.search(r"\n\s+0  batch=32 float32 cache\s+SIGKILL\s+peak [^\n]*interrupted \(Ctrl-C\)\n",
                     status_of(h, Plan(batch_size=32)))
    pid, = h.worker_pids()
    assert not psutil.pid_exists(pid), "reaped: no zombie, no process"


@pytest.mark.fault("ctrl_c", "worker start-up", incident="none (run_finished: interrupted)", outcome="KeyboardInterrupt "
                   "within a few seconds; attempt_ended journaled; no process left", lost="nothing", corrupted="no")
def test_ctrl_c_during_start_up_does_not_wait_for_the_import(supervise):
    # A worker still importing has nothing to save; it is silent, so it gets a few seconds, not the grace.
    h = supervise({"default": [{"do": "ignore_sigterm"}, {"do": "stamp", "name": "ready"}, SILENT]},
                  preempt_grace=120.0, startup_timeout=60.0)
    sent, returned = _run_with_ctrl_c(h)
    assert returned - sent[0] < INTERRUPT_SILENCE + 2.0
    ended, = h.events("attempt_ended")
    assert (ended["signal"], ended["interrupted"], ended["startup_seconds"]) == ("SIGKILL", True, {})
    finished, = h.events("run_finished")
    assert (finished["status"], finished["checkpoint_step"]) == ("interrupted", None)
    assert "resilient: attempt 0 interrupted (Ctrl-C), no checkpoint yet; the worker did not stop" in h.stream.getvalue()
    pid, = h.worker_pids()
    assert not psutil.pid_exists(pid)


@pytest.mark.fault("ctrl_c", "checkpoint save", incident="none (run_finished: interrupted)", outcome="a second Ctrl-C "
                   "during the save stops at once (SIGKILL, reaped)", lost="the save in progress; older checkpoints "
                   "kept", corrupted="no")
def test_a_second_ctrl_c_during_the_wait_kills_at_once_and_still_reaps(supervise):
    # The worker answers SIGTERM with a long save (its "save" heartbeat, then 30 s): a save in progress is
    # life, so the first Ctrl-C waits for it; the second one, a second later, does not.
    saving = [HELLO, beat(3), {"do": "checkpoint"}, {"do": "stamp", "name": "ready"},
              {"do": "await_sigterm", "save_seconds": 30, "timeout": 30}]
    h = supervise({"default": saving}, preempt_grace=120.0)
    sent, returned = _run_with_ctrl_c(h, again_after=1.0)
    assert len(sent) == 2
    assert sent[1] - sent[0] >= 1.0
    assert returned - sent[1] < 1.0, "the second Ctrl-C does not wait"
    assert not (h.run.attempt_dir(0) / "saved").exists()
    ended, = h.events("attempt_ended")
    assert (ended["signal"], ended["interrupted"]) == ("SIGKILL", True)
    assert h.events("run_finished")[0]["status"] == "interrupted"
    assert "interrupted (Ctrl-C), checkpoint at step 3; the worker did not stop on SIGTERM" in h.stream.getvalue()
    pid, = h.worker_pids()
    assert not psutil.pid_exists(pid), "reaped: no zombie, no process"


# ---------------------------------------------------------------------------------------- grandchildren


def test_a_hang_kill_takes_the_workers_children_too(supervise):
    h = supervise({"attempts": {"0": [HELLO, {"do": "spawn_child", "seconds": 6}, beat(3),
                                      {"do": "sleep", "seconds": 30}]},
                   "default": COMPLETE})
    try:
        started = time.monotonic()
        h.supervisor.run()
        child = int((h.run.attempt_dir(0) / "child_pid").read_text())
        assert time.monotonic() - started < 5.0  # a stray grandchild holding the output pipe must not stall us
        assert not _alive(child)
    finally:
        pid_file = h.run.attempt_dir(0) / "child_pid"
        if pid_file.exists():
            try:
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_backoff_grows_while_crashes_repeat_without_progress():
    from resilient._incident import Incident
    from resilient._plan import Plan
    from resilient.supervisor.decide import RestartRules

    plan = Plan(batch_size=32)
    rules = RestartRules.of(max_restarts=10, backoff_base=1.0, backoff_max=60.0)

    def wait_after(checkpoints):
        incidents = [Incident(kind="crash", attempt=i, plan_before=plan, plan_after=plan, checkpoint_step=c)
                     for i, c in enumerate(checkpoints)]
        return rules.wait_after(incidents)

    assert wait_after([4]) == 0.0  # a first failure: the restart is the cure
    assert wait_after([4, 4]) == 1.0
    assert wait_after([4, 4, 4]) == 2.0
    assert wait_after([4, 4, 8]) == 0.0  # progress since the last crash resets the backoff


# ------------------------------------------------------------------------------------ memory telemetry


def test_memory_samples_are_journaled_at_the_schedules_rate_with_the_peak(supervise):
    # A run "ages" fast here: one line every 0.2 s for its first 1.5 s, then one every 1 s (telemetry.py).
    schedule = ((1.5, 0.2), (float("inf"), 1.0))
    alloc = {"do": "alloc", "mb": 64}
    t0 = time.time()
    h = supervise({"default": [HELLO, beat(3), alloc, beat(250, interval=0.02), RESULT]},
                  telemetry_schedule=schedule, sample_interval=0.05, started=time.monotonic())
    h.supervisor.gpu = _FakeGpu(3 << 30)
    h.supervisor.run()

    samples = h.events("memory_sample")
    ended, = h.events("attempt_ended")
    assert samples and all(s["attempt"] == 0 for s in samples)
    ages = [parse_time(s["time"]) - t0 for s in samples]
    # Never sooner than the schedule says (a slow machine only spaces them more); the last line is the end's flush.
    for age, next_age in itertools.pairwise(ages[:-1]):
        assert next_age - age >= journal_interval(age, schedule) - 0.05, (age, next_age)
    assert sum(1 for age in ages[:-1] if age > 1.6) >= 2, " ".join(f"{a:.2f}" for a in ages)
    assert sum(1 for age in ages if age < 1.5) >= 3, "the fine rate at first"
    # 4x fewer lines than samples at first, 20x after: the 3+ s attempt took 60+ samples.
    assert len(samples) <= 1.5 / 0.2 + 1 + (ages[-1] - 1.5) / 1.0 + 2
    # The peak between lines reaches the journal, and it is the peak the attempt reports.
    assert max(s["rss_bytes"] for s in samples) == ended["memory_peak_bytes"]
    assert max(s["rss_bytes"] for s in samples) > 64 * MB
    assert samples[-1]["step"] == 253 and names_before(h, "memory_sample", "attempt_ended")
    assert samples[0]["host_limit_bytes"] is None and samples[0]["limit_mechanism"] is None
    assert {s["gpu_bytes"][0] for s in samples} == {3 << 30}
    assert samples[0]["gpu_total_bytes"] == [16 << 30]


def test_memory_samples_name_the_watchdog_budget(supervise):
    h = supervise({"default": [HELLO, beat(20, interval=0.02), RESULT]}, host_memory_limit=4 << 30)
    h.supervisor.gpu = _FakeGpu(0)
    h.supervisor.gpu.available = False
    h.supervisor.run()
    samples = h.events("memory_sample")
    assert samples, "an attempt journals at least its first sample and its end"
    enforcement, = h.events("memory_enforcement")  # a cgroup where this machine allows one, else the watchdog
    mechanism = "watchdog" if enforcement["mechanism"] == "watchdog" else "cgroup"
    assert {s["limit_mechanism"] for s in samples} == {mechanism}
    assert {s["host_limit_bytes"] for s in samples} == {enforcement.get("limit", 4 << 30)}
    if mechanism == "cgroup":
        assert all(s["cgroup_bytes"] for s in samples[:-1])
    assert "gpu_bytes" not in samples[0]


def names_before(h: Harness, first: str, then: str) -> bool:
    names = [e["event"] for e in h.events()]
    return max(i for i, n in enumerate(names) if n == first) < names.index(then)


def test_the_last_memory_reading_before_a_kill_stays_the_evidence():
    # After the watchdog's (or a hang's) kill, the monitor may still read the dying process: it reads 0, which
    # must not replace the reading the kill was for. After a SIGTERM (preemption, probe) the readings go on.
    worker = object.__new__(WorkerProcess)
    worker.decision, worker._last_rss, worker._peak = None, None, None
    worker._note_rss(900 * MB)
    worker.decision = "watchdog"
    worker._note_rss(0)
    worker._note_rss(100 * MB)
    assert (worker._last_rss, worker._peak) == (900 * MB, 900 * MB)
    worker.decision = "preempt"
    worker._note_rss(0)  # a process on its way out reads 0: never a reading
    worker._note_rss(950 * MB)
    assert (worker._last_rss, worker._peak) == (950 * MB, 950 * MB)


@pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="the step board needs Linux's memfd_create")
def test_the_step_boards_phase_is_the_newest_and_its_step_never_goes_back():
    # A fault fired at step 10 (its message) before the worker wrote step 10 on its board; the last heartbeat
    # message named a save's phase, and the board the training's after it: a Ctrl-C must not wait for a save.
    import threading

    from resilient._protocol import StepBoard

    worker = object.__new__(WorkerProcess)
    worker._lock = threading.Lock()
    worker._progress, worker._board_seq, worker._last_beat = Progress(phase="save", epoch=0, step=10), 0, 0.0
    worker._board = StepBoard.create()
    try:
        worker._board.write("train", 0, 9)
        worker._read_board(now=5.0)
        assert (worker._progress.phase, worker._progress.step, worker._last_beat) == ("train", 10, 5.0)
        worker._read_board(now=9.0)  # nothing new written: no sign of life
        assert worker._last_beat == 5.0
        worker._board.write("validate", 1, 12)
        worker._read_board(now=10.0)
        assert (worker._progress.phase, worker._progress.epoch, worker._progress.step) == ("validate", 1, 12)
    finally:
        worker._board.close()
