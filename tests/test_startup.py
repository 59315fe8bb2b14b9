"""The start-up phases' hang timeouts (supervisor/startup.py), on hand-built measurements and messages."""

from __future__ import annotations

import pytest

from resilient._protocol import CheckpointSaved, Heartbeat, Hello, Notice
from resilient.supervisor.startup import (
    AUTO_STARTUP_FLOOR,
    STARTUP_FACTOR,
    STARTUP_MIN_TIMEOUT,
    StartupCalibration,
    StartupClock,
    phase_timeout,
)

CAP = 600.0


@pytest.mark.parametrize(("measured", "hang_timeout", "expected"), [
    (None, None, CAP),  # never measured in this call: the cap
    (None, 3.0, CAP),
    (8.0, None, AUTO_STARTUP_FLOOR),  # automatic: 3x 8 s is under the floor of a minute
    (30.0, None, 90.0),  # 3x the slowest measurement
    (500.0, None, CAP),  # never over the cap
    (0.5, 3.0, STARTUP_MIN_TIMEOUT),  # explicit hang_timeout under the minimum: the minimum
    (0.5, 20.0, 20.0),  # explicit hang_timeout larger than what was measured: it applies
    (8.0, 20.0, 24.0),  # measured start-up slower than hang_timeout: 3x the measurement
])
def test_the_timeout_of_a_start_up_phase(measured, hang_timeout, expected):
    assert phase_timeout(measured, hang_timeout, CAP) == expected


def test_the_cap_is_startup_timeout_or_a_larger_hang_timeout():
    assert StartupCalibration().timeouts(None, 600.0) == {"import": 600.0, "restore": 600.0, "first_step": 600.0}
    assert StartupCalibration().timeouts(900.0, 600.0)["import"] == 900.0
    assert StartupCalibration({"import": 400.0}).timeouts(None, 600.0)["import"] == 600.0


def test_the_calibration_keeps_the_slowest_of_each_phase_and_save():
    calibration = StartupCalibration().after({"import": 4.0, "restore": 1.0}, 0.5).after({"import": 2.0}, 2.0)
    assert calibration.seconds == {"import": 4.0, "restore": 1.0}
    assert calibration.save_seconds == 2.0
    # The restore reads what a save wrote: it also gets 3x the slowest save. first_step was never measured.
    assert calibration.timeouts(1.0, 600.0) == {"import": 12.0, "restore": STARTUP_FACTOR * (1.0 + 2.0),
                                                "first_step": 600.0}


def test_a_resumed_epoch_that_skips_batches_gets_time_to_skip_them():
    calibration = StartupCalibration().after({"first_step": 1.0}, step_seconds=0.5)
    timeouts = calibration.timeouts(None, 600.0)
    assert timeouts["first_step"] == AUTO_STARTUP_FLOOR
    assert calibration.first_step_timeout(timeouts, 0, 600.0) == AUTO_STARTUP_FLOOR
    assert calibration.first_step_timeout(timeouts, 100, 600.0) == AUTO_STARTUP_FLOOR + STARTUP_FACTOR * 100 * 0.5
    assert calibration.first_step_timeout(timeouts, 10_000, 600.0) == 600.0  # never over the cap


def test_the_clock_follows_the_phases_and_measures_those_that_ended():
    clock = StartupClock(spawned=100.0)
    assert clock.phase() == "import"
    clock.saw(Heartbeat(phase="startup", epoch=0, step=0), 100.2)  # the first heartbeat: still importing
    assert clock.phase() == "import" and clock.measured() == {}
    clock.saw(Heartbeat(phase="restore", epoch=0, step=0), 106.0)
    assert clock.phase() == "restore" and clock.measured() == {"import": 6.0}
    clock.saw(Hello(pid=1, step=30), 107.5)
    assert clock.phase() == "first_step"
    clock.saw(Heartbeat(phase="train", epoch=0, step=30), 108.0)  # an epoch's begin: no step time yet
    clock.saw(CheckpointSaved(epoch=0, step=30, seconds=0.1, bytes=1, path="x"), 108.5)
    assert clock.phase() == "first_step"
    clock.saw(Heartbeat(phase="train", epoch=0, step=31, step_seconds=0.2), 110.0)
    assert clock.phase() is None
    clock.saw(Heartbeat(phase="train", epoch=0, step=40, step_seconds=0.2), 120.0)
    assert clock.measured() == {"import": 6.0, "restore": 1.5, "first_step": 2.5}


def test_without_a_restore_heartbeat_import_lasts_until_the_hello():
    clock = StartupClock(spawned=0.0)
    clock.saw(Hello(pid=1), 7.0)
    clock.saw(Notice(event="first_step", fields={}), 9.0)  # the worker's notice also ends the phase
    assert clock.phase() is None
    assert clock.measured() == {"import": 7.0, "first_step": 2.0}
