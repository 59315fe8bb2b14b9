"""The warm standby's rules (supervisor/standby.py) on hand-built inputs: when one may be started, what the
keeper journals, the go's wire format, ``[runtime] standby`` in a policy, and how a worker started ahead is
timed. The processes themselves are exercised in tests/test_e2e_standby.py."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest
from pydantic import ValidationError

from resilient._errors import InvalidPolicyError
from resilient._protocol import Heartbeat, Hello, Notice, WorkerGo
from resilient._rundir import Journal, RunDir
from resilient.policy import Policy, load_policy
from resilient.supervisor import standby as standby_module
from resilient.supervisor.standby import STANDBY_IMPORT_NICE, STANDBY_MARGIN, StandbyKeeper, standby_verdict
from resilient.supervisor.startup import StartupCalibration, StartupClock
from resilient.worker import __main__ as worker_main
from resilient.worker.__main__ import _parse_args

GB = 1 << 30
NEED = 1 * GB


@pytest.mark.parametrize(("kwargs", "reason"), [
    ({}, None),  # plenty of memory: a standby may start
    ({"mode": "off"}, "off"),
    ({"host_oom": True}, "host_oom"),
    ({"available": NEED - 1}, "machine_memory"),
    ({"limit": 2 * GB, "usage": 2 * GB - NEED + 1}, "limit_headroom"),
    ({"limit": 2 * GB, "usage": 2 * GB - NEED}, None),  # exactly enough headroom
    ({"limit": 2 * GB, "usage": None}, None),  # usage not sampled yet: the machine decides
])
def test_when_a_standby_may_start(kwargs, reason):
    args = {"mode": "auto", "host_oom": False, "need": NEED, "available": 16 * GB, "limit": None, "usage": None}
    verdict = standby_verdict(**{**args, **kwargs})
    assert (verdict[0] if verdict else None) == reason
    if verdict:
        assert verdict[1]  # a sentence for the journal


def _keeper(tmp_path, mode="auto", available=16 * GB, **kwargs):
    keeper = StandbyKeeper(Journal(tmp_path / "events.jsonl"), mode, **kwargs)
    keeper.available = lambda: available
    return keeper


def _events(tmp_path):
    return [e for e in RunDir(tmp_path).read_events() if e["event"].startswith("standby_")]


@pytest.fixture
def no_spawn(monkeypatch):
    """Fails the test if the keeper starts a process."""

    def spawn(*args, **kwargs):
        raise AssertionError("a standby was spawned")

    monkeypatch.setattr(standby_module.WaitingWorker, "spawn", spawn)


@pytest.mark.parametrize(("setup", "tick", "reason"), [
    ({"mode": "off"}, {}, "off"),
    ({"host_oom": True}, {}, "host_oom"),
    ({"available": 600 << 20}, {}, "machine_memory"),
    # A tiny limit: 300 MB left under it, a standby needs its own ~0.7 GB plus the margin.
    ({}, {"limit": 1 * GB, "usage": 1 * GB - (300 << 20)}, "limit_headroom"),
])
def test_the_keeper_skips_a_standby_under_memory_pressure_and_says_why_once(tmp_path, no_spawn, setup, tick, reason):
    keeper = _keeper(tmp_path, **setup)
    for _ in range(3):  # the monitor asks after every memory sample; the journal says it once per attempt
        keeper.tick(4, {}, limit=tick.get("limit"), usage=tick.get("usage"))
    assert keeper.waiting is None
    [skipped] = _events(tmp_path)
    assert (skipped["event"], skipped["attempt"], skipped["reason"]) == ("standby_skipped", 4, reason)


def test_the_keeper_starts_the_standby_at_the_attempts_first_look(tmp_path, monkeypatch):
    # During the attempt's start-up, not after its first step: its import must be done before the training
    # runs, where it would take the CPU from the training's threads.
    monkeypatch.setattr(standby_module.WaitingWorker, "spawn", lambda env, **kwargs: _waiting(ready=False))
    keeper = _keeper(tmp_path)
    keeper.available = lambda: 100 * GB
    try:
        keeper.tick(0, {}, limit=None, usage=None)  # the attempt's first look: it has not trained a step
        assert keeper.waiting is not None
    finally:
        keeper.close()
    assert [(e["event"], e["for_attempt"]) for e in _events(tmp_path)] == [("standby_started", 1)]


def test_a_standby_ruled_out_by_the_policy_is_journaled_at_the_attempts_first_look(tmp_path, no_spawn):
    # Not only once the attempt has trained a step: a fault at an early step must not hide it.
    keeper = _keeper(tmp_path, mode="off")
    keeper.tick(0, {}, limit=None, usage=None)
    keeper.tick(0, {}, limit=None, usage=None)
    assert [(e["event"], e["reason"]) for e in _events(tmp_path)] == [("standby_skipped", "off")]


def test_a_keeper_for_fake_workers_does_nothing(tmp_path, no_spawn):
    keeper = _keeper(tmp_path, enabled=False)
    keeper.tick(0, {}, limit=None, usage=None)
    assert keeper.take(1, {}) is None and _events(tmp_path) == []


def test_the_margin_is_part_of_what_a_standby_needs():
    assert standby_verdict("auto", host_oom=False, need=(700 << 20) + STANDBY_MARGIN, available=1 * GB,
                           limit=None, usage=None)[0] == "machine_memory"


def test_the_go_is_strict():
    go = WorkerGo(run_dir="/runs/a", attempt=3, plan="/runs/a/attempts/003/plan.json")
    assert WorkerGo.model_validate_json(go.model_dump_json()) == go
    with pytest.raises(ValidationError):
        WorkerGo.model_validate_json('{"run_dir": "/r", "attempt": 1, "surprise": 1}')
    with pytest.raises(ValidationError):
        WorkerGo(run_dir="/r", attempt=-1)


def test_the_worker_command_line():
    assert _parse_args(["--standby", "--supervisor-pid", "1", "--channel-fd", "5"]).standby
    with pytest.raises(SystemExit):  # an attempt's worker needs its run and attempt
        _parse_args(["--supervisor-pid", "1"])
    assert _parse_args(["--standby", "--supervisor-pid", "1"]).import_nice == 0
    assert _parse_args(["--standby", "--supervisor-pid", "1", "--import-nice", "19"]).import_nice == 19
    for wrong in ("-5", "20"):  # not a nice value a process can lower itself to
        with pytest.raises(SystemExit):
            _parse_args(["--standby", "--supervisor-pid", "1", f"--import-nice={wrong}"])


def test_the_keeper_starts_its_standby_at_the_lowest_priority_and_fit_its_early_worker_at_the_normal_one(
        tmp_path, monkeypatch):
    spawned = []

    def spawn(env, kind="standby", import_nice=0):
        spawned.append((kind, import_nice))
        return _waiting(ready=False)

    monkeypatch.setattr(standby_module.WaitingWorker, "spawn", spawn)
    keeper = _keeper(tmp_path)
    try:
        keeper.tick(0, {"A": "1"}, limit=None, usage=None)
    finally:
        keeper.close()
    assert spawned == [("standby", STANDBY_IMPORT_NICE)] and STANDBY_IMPORT_NICE == 19
    [started] = _events(tmp_path)
    assert (started["event"], started["import_nice"]) == ("standby_started", 19)
    spawned.clear()
    from resilient._fit import _start_worker_early

    _start_worker_early().kill()
    assert spawned == [("early", 0)]  # the first attempt waits for it: nothing trains beside its import


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")
def test_a_standby_imports_in_a_low_priority_thread_and_its_main_thread_keeps_the_normal_one():
    before = os.getpriority(os.PRIO_PROCESS, 0)
    priority = worker_main._Priority(19)
    try:  # Keras is imported in this process already or now: the thread's priority is the test
        imported = worker_main._import_keras(priority)
    finally:
        priority.restore()  # this process's session, had it been lowered (a test run as a session leader)
    assert imported["import_nice"] == 19 and imported["import_seconds"] >= 0
    assert os.getpriority(os.PRIO_PROCESS, 0) == before
    assert worker_main._import_keras(worker_main._Priority(0))["import_nice"] == before  # fit's early worker


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")
def test_a_go_during_the_import_brings_the_import_back_to_the_normal_priority():
    if os.geteuid() != 0:
        pytest.skip("raising a thread's priority needs CAP_SYS_NICE")
    seen, low = [], threading.Event()

    def slow_import():  # a low-priority import that is still running when the go comes
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, 19)
        low.set()
        time.sleep(0.4)
        seen.append(os.getpriority(os.PRIO_PROCESS, tid))

    priority = worker_main._Priority(19)
    thread = threading.Thread(target=slow_import, daemon=True)
    thread.start()
    low.wait(10)
    worker_main._join_import(thread, priority, go_waiting=lambda: True)
    assert priority.hurried and seen == [os.getpriority(os.PRIO_PROCESS, 0)]
    assert priority.restore()["hurried"] is True


def test_the_autogroup_line_is_read(tmp_path, monkeypatch):
    path = tmp_path / "autogroup"
    monkeypatch.setattr(worker_main, "_AUTOGROUP", str(path))
    assert worker_main._autogroup_nice() is None  # no autogroups on this kernel
    path.write_text("/autogroup-9955 nice 19\n")
    assert worker_main._autogroup_nice() == 19


@pytest.fixture
def low_thread():
    """A thread of this process at nice 19, as OpenBLAS's pool is after a standby's import."""
    ready, done, tid = threading.Event(), threading.Event(), []

    def run():
        tid.append(threading.get_native_id())
        os.setpriority(os.PRIO_PROCESS, tid[0], 19)
        ready.set()
        done.wait(30)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    ready.wait(30)
    yield tid[0]
    done.set()
    thread.join(30)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")
def test_at_the_go_threads_started_during_the_import_are_raised_to_the_main_threads_priority(low_thread):
    if os.geteuid() != 0:
        pytest.skip("raising a thread's priority needs CAP_SYS_NICE")
    fields = worker_main._Priority(19).restore()
    assert worker_main._thread_nice(low_thread) == os.getpriority(os.PRIO_PROCESS, 0) == fields["nice"]
    assert fields["threads_raised"] >= 1 and fields["threads_left_low"] == [] and "detail" not in fields
    assert fields["restored"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")
def test_what_cannot_be_undone_at_the_go_is_named_not_left_low_silently(low_thread, monkeypatch):
    def refuse(which, who, prio):  # what an unprivileged process gets for raising a thread's priority
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(worker_main.os, "setpriority", refuse)
    priority = worker_main._Priority(19)
    priority.autogroup_before = 0  # the session was lowered for the import; the kernel refuses it back:
    monkeypatch.setattr(worker_main, "_set_autogroup_nice", lambda nice: f"setting /proc/self/autogroup to {nice}: "
                        "Resource temporarily unavailable")
    monkeypatch.setattr(worker_main, "_autogroup_nice", lambda: 19)
    fields = priority.restore()
    assert {"tid": low_thread, "name": worker_main._thread_name(low_thread), "nice": 19} in fields["threads_left_low"]
    assert fields["threads_raised"] == 0 and fields["restored"] is False and fields["autogroup_nice"] == 19
    assert "autogroup to 0: Resource temporarily unavailable" in fields["detail"] and "CAP_SYS_NICE" in fields["detail"]


def test_runtime_standby_in_a_policy(tmp_path):
    assert Policy().runtime.standby == "auto"
    path = tmp_path / "mine.toml"
    path.write_text('[runtime]\nstandby = "off"\n')
    assert load_policy(path).runtime.standby == "off"
    assert "standby: off" in load_policy(path).describe()
    path.write_text('[runtime]\nstandby = "never"\n')
    with pytest.raises(InvalidPolicyError, match=r"runtime\.standby: received 'never'.*expected 'auto' or 'off'"):
        load_policy(path)
    path.write_text('[runtime]\nstand_by = "off"\n')
    with pytest.raises(InvalidPolicyError, match=r"runtime\.stand_by: received unknown key.*standby"):
        load_policy(path)


def test_a_worker_started_ahead_is_timed_from_its_go_and_does_not_calibrate_the_import():
    clock = StartupClock(100.0, started_ahead=True)
    clock.saw(Heartbeat(phase="restore", epoch=0, step=0), 100.05)  # the import was done before the go
    clock.saw(Hello(pid=1), 101.0)
    clock.saw(Notice(event="first_step"), 102.0)
    assert clock.measured() == {"import": 0.05, "restore": 0.95, "first_step": 1.0}
    assert clock.calibrating() == {"restore": 0.95, "first_step": 1.0}
    # A fresh worker later in the call keeps the import timeout of what a cold import measured (here: none).
    calibration = StartupCalibration().after(clock.calibrating())
    assert calibration.timeouts(hang_timeout=3.0, startup_timeout=600.0)["import"] == 600.0
    cold = StartupClock(0.0)
    cold.saw(Heartbeat(phase="restore", epoch=0, step=0), 6.0)
    assert cold.calibrating()["import"] == 6.0


def _waiting(kind="standby", env=None, ready=True):
    """A WaitingWorker around a plain process (no TensorFlow): what the keeper does with it is the test."""
    read_fd, write_fd = os.pipe()
    if ready:
        os.write(write_fd, Notice(event="standby_ready", fields={"import_seconds": 3.5}).model_dump_json().encode()
                 + b"\n")
    proc = subprocess.Popen(["sleep", "60"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)
    os.close(write_fd)
    return standby_module.WaitingWorker(proc, read_fd, env or {"A": "1"}, kind)


def test_a_waiting_standby_is_used_with_the_same_environment(tmp_path):
    keeper = _keeper(tmp_path)
    keeper.waiting = waiting = _waiting()
    try:
        assert keeper.take(2, {"A": "1"}) is waiting
        used = _events(tmp_path)[-1]
        assert (used["event"], used["attempt"], used["kind"], used["imported"]) == ("standby_used", 2, "standby", True)
        assert waiting.import_seconds == 3.5 and keeper.waiting is None
        proc, fd, _ = waiting.take()  # what WorkerProcess.start does: the attempt owns it now
        waiting.kill()
        assert waiting.alive() and proc is waiting.proc
        os.close(fd)
    finally:
        waiting.taken = False
        waiting.kill()


@pytest.mark.parametrize("why", ["environment_changed", "exited"])
def test_a_standby_that_cannot_serve_is_killed_and_a_fresh_worker_starts(tmp_path, why):
    keeper = _keeper(tmp_path)
    keeper.waiting = waiting = _waiting()
    if why == "exited":
        waiting.proc.kill()
        waiting.proc.wait()
    assert keeper.take(1, {"A": "2"} if why == "environment_changed" else {"A": "1"}) is None
    assert waiting.proc.returncode is not None  # killed and reaped
    [skipped] = [e for e in _events(tmp_path) if e["event"] == "standby_skipped"]
    assert skipped["reason"] == why and skipped["attempt"] == 1


def test_a_waiting_standby_gives_its_memory_back_when_the_machine_runs_short(tmp_path, no_spawn):
    keeper = _keeper(tmp_path, available=STANDBY_MARGIN - 1)
    keeper.waiting = waiting = _waiting(ready=False)
    keeper.tick(0, {"A": "1"}, limit=None, usage=None)
    assert keeper.waiting is None and waiting.proc.returncode is not None
    assert [(e["event"], e["reason"]) for e in _events(tmp_path)] == [("standby_stopped", "machine_memory")]


def test_the_keeper_measures_a_ready_standby_for_the_next_decision(tmp_path, no_spawn):
    keeper = _keeper(tmp_path)
    keeper.waiting = _waiting()
    try:
        keeper.tick(0, {"A": "1"}, limit=None, usage=None)
        [ready] = _events(tmp_path)
        assert ready["event"] == "standby_ready" and ready["import_seconds"] == 3.5
        assert keeper.rss == ready["rss_bytes"] > 0  # sleep's own private memory: the next standby's need
    finally:
        keeper.close()
    assert keeper.waiting is None
