"""End-to-end, real TensorFlow workers on CPU: fit's early worker and the warm standby (supervisor/standby.py).

A restart takes the standby (its import phase is near zero), none is started after a host OOM or with the
policy's ``standby = "off"``, a refused fit leaves no early worker, and killing the caller leaves no worker
and no standby. Each prints the recovery time (fault -> first resumed step) it measured.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import keras
import psutil
import pytest

import resilient
from resilient._errors import InvalidArgumentError
from resilient._rundir import RunDir
from resilient.supervisor import standby as standby_module
from tests.conftest import make_data, make_model

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("no_leftover_processes")]

ROOT = Path(__file__).resolve().parent.parent


class WaitForStandby(keras.callbacks.Callback):
    """Holds the end of the first epoch until the run's journal shows a warm standby (bounded): a fault in the
    next epoch then meets a standby that has finished importing, whatever the machine's speed. (At an epoch
    end the wait counts in no step's time, so the hang and interrupt timeouts are not stretched.)"""

    def __init__(self, run_dir: str, timeout: float = 90.0) -> None:
        super().__init__()
        self.run_dir, self.timeout = run_dir, timeout

    def on_epoch_end(self, epoch, logs=None):
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline and not any(
                e["event"] == "standby_ready" and e.get("kind") == "standby" for e in RunDir(self.run_dir).read_events()):
            time.sleep(0.2)


class ThreadNices(keras.callbacks.Callback):
    """Appends, at each trained batch, the nice value of every thread of the worker that trains (its main
    thread and TensorFlow's pools) to a file, one JSON line per batch: {pid, threads: {tid: [name, nice]}}."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def on_train_batch_end(self, batch, logs=None):
        threads = {}
        for tid in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/stat") as f:
                    stat = f.read()
            except OSError:
                continue  # ended meanwhile
            threads[tid] = [stat[stat.index("(") + 1:stat.rindex(")")], int(stat[stat.rindex(")") + 2:].split()[16])]
        try:  # the session's share of the CPU, where the kernel groups tasks by session
            with open("/proc/self/autogroup") as f:
                autogroup = int(f.read().rsplit("nice", 1)[1])
        except OSError:
            autogroup = None
        with open(self.path, "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "threads": threads, "autogroup": autogroup}) + "\n")


def _events(run_dir, name, **match):
    return [e for e in RunDir(run_dir).read_events() if e["event"] == name
            and all(e.get(k) == v for k, v in match.items())]


def _seconds(event) -> float:
    return dt.datetime.fromisoformat(event["time"].replace("Z", "+00:00")).timestamp()


def _recovery(run_dir) -> float:
    """Seconds from the fault to the first step of the attempt after it, by the journal."""
    [fault] = _events(run_dir, "fault_fired")
    first = _events(run_dir, "first_step", attempt=fault["attempt"] + 1)[0]
    return _seconds(first) - _seconds(fault)


def _gone(pid: int, within: float) -> bool:
    end = time.monotonic() + within
    while time.monotonic() < end:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.timeout(180)
@pytest.mark.fault("segfault", "mid-epoch", incident="crash", outcome="completed; the restart took the warm "
                   "standby (journal: standby_used), its import phase near zero",
                   lost="nothing (resumed from the checkpoint at the fault's step)", corrupted="no")
def test_a_restart_takes_the_warm_standby_and_skips_the_import(tmp_path):
    x, y = make_data()
    run_dir = tmp_path / "run"
    nices = tmp_path / "nices.jsonl"
    history = resilient.fit(make_model(), x, y, epochs=2, batch_size=32, seed=1, run_dir=run_dir, verbose=0,
                            faults="segfault@10", checkpoint_every=1,
                            callbacks=[WaitForStandby(str(run_dir)), ThreadNices(str(nices))])
    assert [i.kind for i in history.incidents] == ["crash"] and history.epoch == [0, 1]
    [early] = _events(run_dir, "standby_used", attempt=0)
    assert early["kind"] == "early"  # fit started the first attempt's worker ahead
    [started] = _events(run_dir, "standby_started", for_attempt=1)
    [used] = _events(run_dir, "standby_used", attempt=1)
    assert (used["kind"], used["imported"], used["pid"]) == ("standby", True, started["pid"])
    assert _events(run_dir, "worker_ready", attempt=1)[0]["pid"] == started["pid"]
    # The standby imported at the lowest priority, beside the training; the attempt it ran trained at the normal
    # one: its main thread and TensorFlow's pools, and the threads its import started (raised at the go).
    normal = os.getpriority(os.PRIO_PROCESS, 0)  # the workers inherit the caller's
    [ready] = _events(run_dir, "standby_ready", pid=started["pid"])
    assert ready["import_nice"] == 19 and ready["autogroup_nice"] in (19, None)  # None: no autogroups here
    # fit's early worker imports at the normal priority (journaled where it was ready before its go).
    assert all(e["import_nice"] == normal for e in _events(run_dir, "standby_ready", kind="early"))
    [priority] = _events(run_dir, "standby_priority", attempt=1)
    assert (priority["import_nice"], priority["nice"], priority["restored"]) == (19, normal, True)
    left_low = {str(t["tid"]) for t in priority["threads_left_low"]}
    if os.geteuid() == 0:
        assert not left_low  # the privilege to raise a thread's priority again
    seen = [json.loads(line) for line in nices.read_text().splitlines()]
    trained = {tid: value for s in seen if s["pid"] == used["pid"] for tid, value in s["threads"].items()}
    assert any(name.startswith("tf_") for name, _ in trained.values())  # TensorFlow's pools were running
    assert {tid: nice for tid, (_, nice) in trained.items() if tid not in left_low} == dict.fromkeys(
        set(trained) - left_low, normal)
    # A session of its own, back at the default share (where there are autogroups).
    assert {s["autogroup"] for s in seen if s["pid"] == used["pid"]} == {None if ready["autogroup_nice"] is None else 0}
    [ended] = _events(run_dir, "attempt_ended", attempt=1)
    assert ended["startup_seconds"]["import"] < 0.5  # a fresh worker's import takes seconds
    # The standby kept for a next incident (attempt 2) was killed and reaped when fit returned.
    for spare in _events(run_dir, "standby_started", for_attempt=2):
        assert _gone(spare["pid"], within=1.0)
    print(f"recovery with the standby: {_recovery(run_dir):.2f} s; startup {ended['startup_seconds']}")


@pytest.mark.timeout(180)
@pytest.mark.fault("segfault", "mid-epoch", incident="crash", outcome="completed; with [runtime] standby = "
                   '"off" no standby is started: the restart starts a fresh worker',
                   lost="nothing (resumed from the checkpoint at the fault's step)", corrupted="no")
def test_the_policy_turns_the_standby_off(tmp_path):
    x, y = make_data()
    run_dir = tmp_path / "run"
    history = resilient.fit(make_model(), x, y, epochs=2, batch_size=32, seed=1, run_dir=run_dir, verbose=0,
                            faults="segfault@10", checkpoint_every=1, host_memory_limit="4GB",
                            policy=resilient.Policy(runtime={"standby": "off"}))
    assert [i.kind for i in history.incidents] == ["crash"] and history.epoch == [0, 1]
    # fit's early worker still serves the first attempt. What it imported before its go stays charged
    # outside the attempt's cgroup, so the group's limit leaves that out: the whole worker keeps to 4 GB.
    assert _events(run_dir, "standby_used", attempt=0)[0]["kind"] == "early"
    first, second = _events(run_dir, "memory_enforcement")
    if first["mechanism"].startswith("cgroup"):
        assert first["carried_bytes"] > 0 and first["limit"] == 4_000_000_000 - first["carried_bytes"]
        assert "carried_bytes" not in second and second["limit"] == 4_000_000_000  # a fresh worker
    assert _events(run_dir, "standby_started") == []
    assert _events(run_dir, "standby_used", attempt=1) == []
    assert _events(run_dir, "standby_skipped", attempt=0)[0]["reason"] == "off"
    [ended] = _events(run_dir, "attempt_ended", attempt=1)
    assert ended["startup_seconds"]["import"] > 1.0  # a fresh worker imports TensorFlow
    cold = sum(ended["startup_seconds"].values())
    print(f"recovery without the standby: {_recovery(run_dir):.2f} s; cold start of a fresh worker {cold:.2f} s "
          f"({ended['startup_seconds']})")


@pytest.mark.timeout(180)
@pytest.mark.fault("host_oom", "mid-epoch", incident="host_oom", outcome="completed; no standby is started "
                   "after a host OOM in the run (standby_skipped: host_oom)",
                   lost="the steps since the last checkpoint", corrupted="no")
def test_no_standby_is_started_after_a_host_oom(tmp_path):
    x, y = make_data()
    run_dir = tmp_path / "run"
    history = resilient.fit(make_model(), x, y, epochs=2, batch_size=8, seed=1, run_dir=run_dir, verbose=0,
                            faults="host_oom@3", checkpoint_every=2)
    assert [i.kind for i in history.incidents] == ["host_oom"]
    [incident] = _events(run_dir, "incident")
    assert [e for e in _events(run_dir, "standby_started") if _seconds(e) > _seconds(incident)] == []
    assert [e["reason"] for e in _events(run_dir, "standby_skipped", attempt=1)] == ["host_oom"]


def test_a_refused_fit_kills_its_early_worker(tmp_path, monkeypatch):
    spawned = []
    real_spawn = standby_module.WaitingWorker.spawn.__func__

    def spawn(cls, *args, **kwargs):
        worker = real_spawn(cls, *args, **kwargs)
        spawned.append(worker)
        return worker

    monkeypatch.setattr(standby_module.WaitingWorker, "spawn", classmethod(spawn))
    x, y = make_data()
    with pytest.raises(InvalidArgumentError, match="does not fit the model's input"):
        resilient.fit(make_model(), x[:, :7], y, run_dir=tmp_path / "run", verbose=0)
    [early] = spawned
    assert early.kind == "early" and early.proc.returncode == -signal.SIGKILL  # killed and reaped
    assert not psutil.pid_exists(early.pid)
    assert not (tmp_path / "run").exists()


CALLER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {root!r})
    from tests.conftest import make_data, make_model
    from tests.test_e2e_standby import WaitForStandby
    import resilient
    x, y = make_data()
    resilient.fit(make_model(), x, y, epochs=50, batch_size=8, seed=1, run_dir={run_dir!r}, verbose=0,
                  faults="hang@40", hang_timeout=600, callbacks=[WaitForStandby({run_dir!r})])
    """
)


@pytest.mark.timeout(180)
@pytest.mark.fault("caller_sigkill", "mid-epoch", incident="none (the supervisor is gone)",
                   outcome="the worker and the warm standby die with their supervisor, no orphan",
                   lost="the steps since the last checkpoint, kept for a later fit", corrupted="no")
def test_killing_the_caller_leaves_no_worker_and_no_standby(tmp_path):
    run_dir = tmp_path / "run"
    caller = subprocess.Popen([sys.executable, "-c", CALLER.format(root=str(ROOT), run_dir=str(run_dir))],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (_events(run_dir, "fault_fired") and
                                                   _events(run_dir, "standby_ready", kind="standby")):
            assert caller.poll() is None, "the caller ended early"
            time.sleep(0.2)
        worker = _events(run_dir, "worker_ready")[-1]["pid"]
        standby = _events(run_dir, "standby_ready", kind="standby")[-1]["pid"]
        assert psutil.pid_exists(worker) and psutil.pid_exists(standby) and worker != standby
        os.kill(caller.pid, signal.SIGKILL)
        caller.wait(timeout=10)
        assert _gone(worker, within=10), "the worker outlived its supervisor"
        assert _gone(standby, within=10), "the standby outlived its supervisor"
    finally:
        if caller.poll() is None:
            caller.kill()
            caller.wait()


@pytest.mark.timeout(180)
@pytest.mark.fault("ctrl_c", "mid-epoch", incident="none (run_finished: interrupted)", outcome="KeyboardInterrupt; "
                   "the worker and the waiting standby are killed and reaped", lost="steps since the last checkpoint",
                   corrupted="no")
def test_ctrl_c_kills_the_waiting_standby(tmp_path):
    x, y = make_data()
    run_dir = tmp_path / "run"
    standby: list[int] = []

    def press_ctrl_c() -> None:  # once a standby waits, as a person at the keyboard would
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            ready = _events(run_dir, "standby_ready", kind="standby")
            if ready:
                standby.append(ready[-1]["pid"])
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.2)

    threading.Thread(target=press_ctrl_c, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        resilient.fit(make_model(), x, y, epochs=50, batch_size=8, seed=1, run_dir=run_dir, verbose=0,
                      callbacks=[WaitForStandby(str(run_dir))])
    [pid] = standby
    assert _gone(pid, within=0.5), "the standby outlived the interrupted fit"
    assert _events(run_dir, "run_finished")[-1]["status"] == "interrupted"
