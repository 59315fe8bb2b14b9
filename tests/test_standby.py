"""The warm standby's rules (supervisor/standby.py) on hand-built inputs: when one may be started, what the
keeper journals, the go's wire format, ``[runtime] standby`` in a policy, and how a worker started ahead is
timed. The processes themselves are exercised in tests/test_e2e_standby.py."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from resilient._errors import InvalidPolicyError
from resilient._protocol import Heartbeat, Hello, Notice, WorkerGo
from resilient._rundir import Journal, RunDir
from resilient.policy import Policy, load_policy
from resilient.supervisor import standby as standby_module
from resilient.supervisor.standby import STANDBY_MARGIN, StandbyKeeper, standby_verdict
from resilient.supervisor.startup import StartupCalibration, StartupClock
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
        keeper.tick(4, {}, started_up=True, limit=tick.get("limit"), usage=tick.get("usage"))
    assert keeper.waiting is None
    [skipped] = _events(tmp_path)
    assert (skipped["event"], skipped["attempt"], skipped["reason"]) == ("standby_skipped", 4, reason)


def test_the_keeper_waits_for_the_attempt_to_start_up(tmp_path, no_spawn):
    keeper = _keeper(tmp_path, mode="off")
    keeper.tick(0, {}, started_up=False, limit=None, usage=None)  # not even a verdict before the first step
    assert _events(tmp_path) == []


def test_a_keeper_for_fake_workers_does_nothing(tmp_path, no_spawn):
    keeper = _keeper(tmp_path, enabled=False)
    keeper.tick(0, {}, started_up=True, limit=None, usage=None)
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
