"""Failure classification on hand-built evidence: one test per rule, then the precedence between rules."""

from __future__ import annotations

import errno
import signal

import pytest

from resilient._protocol import EXIT_ORPHANED, EXIT_PREEMPTED, EXIT_REPORTED, ErrorReport
from resilient.supervisor.classify import (
    RSS_NEAR_LIMIT,
    AttemptOutcome,
    classify,
    is_disk_full,
    report_kind,
    signal_name,
)

MiB = 1 << 20
GiB = 1 << 30

SIGKILL = -signal.SIGKILL
SIGTERM = -signal.SIGTERM
SIGSEGV = -signal.SIGSEGV


def report(kind: str, message: str = "boom", type_: str = "SomeError", **extra: object) -> ErrorReport:
    """An error.json as a worker that still classifies writes it (and as 0.1.0 wrote it): ``kind`` set."""
    return ErrorReport.model_validate({"kind": kind, "type": type_, "message": message, "traceback": "Traceback ...",
                                       "epoch": 0, "step": 7, **extra})


# ------------------------------------------------------------------------------------------ signal_name


@pytest.mark.parametrize(
    ("returncode", "name"),
    [(-11, "SIGSEGV"), (-9, "SIGKILL"), (-15, "SIGTERM"), (-6, "SIGABRT"), (-7, "SIGBUS")],
)
def test_signal_name_of_a_signal_death(returncode, name):
    assert signal_name(returncode) == name


@pytest.mark.parametrize("returncode", [None, 0, 1, EXIT_REPORTED, 255])
def test_signal_name_is_none_for_a_normal_exit(returncode):
    assert signal_name(returncode) is None


def test_signal_name_of_an_unknown_signal_number():
    assert signal_name(-200) == "signal 200"


def test_outcome_signal_property_uses_signal_name():
    assert AttemptOutcome(returncode=-11).signal == "SIGSEGV"
    assert AttemptOutcome(returncode=3).signal is None


# --------------------------------------------------------------------------------------- completion


def test_exit_zero_with_result_is_completion():
    kind, detail, evidence = classify(AttemptOutcome(returncode=0, completed=True))
    assert kind is None
    assert detail == "completed"
    assert evidence["exit"] == "exit code 0"


def test_exit_zero_without_result_is_a_crash():
    kind, detail, _ = classify(AttemptOutcome(returncode=0, completed=False))
    assert kind == "crash"
    assert "exited 0" in detail
    assert "without finishing" in detail


def test_result_json_does_not_count_when_the_exit_was_not_clean():
    # A worker that wrote result.json but then died from a signal did not complete cleanly.
    kind, _, _ = classify(AttemptOutcome(returncode=SIGSEGV, completed=True))
    assert kind == "crash"


# ------------------------------------------------------------------------------- supervisor decisions


def test_hang_decision():
    kind, detail, evidence = classify(AttemptOutcome(returncode=SIGTERM, decision="hang", heartbeat_age=12.34))
    assert kind == "hang"
    assert "no heartbeat for 12.3s" in detail
    assert "SIGTERM" in detail
    assert evidence["heartbeat_age"] == 12.34
    assert evidence["exit"] == "SIGTERM"


def test_hang_decision_without_a_heartbeat_age():
    kind, detail, evidence = classify(AttemptOutcome(returncode=SIGKILL, decision="hang"))
    assert kind == "hang"
    assert "too long" in detail
    assert evidence["heartbeat_age"] is None


def test_hang_decision_beats_every_other_piece_of_evidence():
    outcome = AttemptOutcome(
        returncode=SIGKILL, decision="hang", heartbeat_age=5.0, report=report("gpu_oom"), oom_kills=2,
        last_rss=GiB, memory_limit=GiB,
    )
    kind, _, evidence = classify(outcome)
    assert kind == "hang"
    assert evidence["report"] == "gpu_oom"  # the report is still kept as evidence


def test_watchdog_decision_is_host_oom():
    outcome = AttemptOutcome(returncode=SIGKILL, decision="watchdog", last_rss=300 * MiB, memory_limit=150 * MiB)
    kind, detail, evidence = classify(outcome)
    assert kind == "host_oom"
    assert "watchdog" in detail
    assert "300.0 MiB" in detail
    assert "150.0 MiB" in detail
    assert evidence == {"exit": "SIGKILL", "source": "watchdog", "rss": 300 * MiB, "limit": 150 * MiB}


def test_watchdog_beats_cgroup_and_worker_report():
    outcome = AttemptOutcome(
        returncode=SIGKILL, decision="watchdog", oom_kills=1, report=report("user_error"),
        last_rss=2 * GiB, memory_limit=GiB,
    )
    kind, _, evidence = classify(outcome)
    assert kind == "host_oom"
    assert evidence["source"] == "watchdog"


# ------------------------------------------------------------------------------------- kernel evidence


def test_cgroup_oom_kill_is_host_oom():
    kind, detail, evidence = classify(AttemptOutcome(returncode=SIGKILL, oom_kills=1, memory_limit=GiB))
    assert kind == "host_oom"
    assert "OOM killer" in detail
    assert "1.0 GiB" in detail
    assert "oom_kill +1" in detail
    assert evidence == {"exit": "SIGKILL", "source": "cgroup", "oom_kills": 1, "limit": GiB}


def test_cgroup_oom_kill_beats_the_sigkill_rule_even_with_low_rss():
    # RSS far below the limit would read "killed"; the kernel's counter is stronger evidence.
    outcome = AttemptOutcome(returncode=SIGKILL, oom_kills=3, last_rss=10 * MiB, memory_limit=GiB)
    kind, _, evidence = classify(outcome)
    assert kind == "host_oom"
    assert evidence["source"] == "cgroup"
    assert evidence["oom_kills"] == 3


def test_cgroup_oom_kill_beats_the_worker_report():
    kind, _, evidence = classify(AttemptOutcome(returncode=EXIT_REPORTED, oom_kills=1, report=report("user_error")))
    assert kind == "host_oom"
    assert evidence["source"] == "cgroup"


def test_zero_oom_kills_is_no_evidence():
    kind, _, _ = classify(AttemptOutcome(returncode=SIGKILL, oom_kills=0, memory_limit=GiB))
    assert kind == "killed"


# --------------------------------------------------------------------------------------- worker reports


@pytest.mark.parametrize("kind", ["gpu_oom", "host_oom", "nan_loss", "user_error"])
def test_worker_report_kinds(kind):
    outcome = AttemptOutcome(
        returncode=EXIT_REPORTED,
        report=report(kind, type_="ResourceExhaustedError", message="OOM when allocating tensor\nsecond line"),
    )
    got, detail, evidence = classify(outcome)
    assert got == kind
    # The detail is the exception type and the first line of its message only.
    assert detail == "ResourceExhaustedError: OOM when allocating tensor"
    assert evidence == {"exit": "exit code 3", "report": kind, "source": "worker report"}


def test_worker_report_preempted_has_its_own_detail():
    kind, detail, evidence = classify(AttemptOutcome(returncode=EXIT_PREEMPTED, report=report("preempted")))
    assert kind == "preempted"
    assert "SIGTERM" in detail
    assert "checkpoint" in detail
    assert evidence["source"] == "worker report"


def test_worker_report_with_empty_message():
    kind, detail, _ = classify(AttemptOutcome(returncode=EXIT_REPORTED, report=report("nan_loss", message="")))
    assert kind == "nan_loss"
    assert detail == "SomeError:"


def test_worker_report_beats_the_exit_status():
    # A worker that reported a GPU OOM and was then SIGKILLed is still a GPU OOM.
    kind, _, _ = classify(AttemptOutcome(returncode=SIGKILL, report=report("gpu_oom")))
    assert kind == "gpu_oom"


def test_unknown_report_kind_falls_through_to_the_exit_status():
    kind, detail, evidence = classify(
        AttemptOutcome(returncode=EXIT_REPORTED, report=report("weird", message="odd failure"))
    )
    assert kind == "crash"
    assert "exited with code 3" in detail
    assert "odd failure" in detail
    assert evidence["report"] == "weird"
    assert "source" not in evidence


# ---------------------------------------------------------------------------------------- exit status


def test_sigkill_with_rss_near_the_limit_is_host_oom():
    limit = 1000 * MiB
    rss = int(RSS_NEAR_LIMIT * limit)
    kind, detail, evidence = classify(AttemptOutcome(returncode=SIGKILL, last_rss=rss, memory_limit=limit))
    assert kind == "host_oom"
    assert "near the limit" in detail
    assert evidence == {"exit": "SIGKILL", "source": "rss", "rss": rss, "limit": limit}


def test_sigkill_with_rss_just_below_the_threshold_is_killed():
    limit = 1000 * MiB
    rss = int(RSS_NEAR_LIMIT * limit) - 1
    kind, detail, evidence = classify(AttemptOutcome(returncode=SIGKILL, last_rss=rss, memory_limit=limit))
    assert kind == "killed"
    assert "no memory evidence" in detail
    assert evidence == {"exit": "SIGKILL"}


@pytest.mark.parametrize(("last_rss", "limit"), [(10 * GiB, None), (None, GiB), (None, None)])
def test_sigkill_without_a_limit_or_a_sample_is_killed(last_rss, limit):
    kind, _, evidence = classify(AttemptOutcome(returncode=SIGKILL, last_rss=last_rss, memory_limit=limit))
    assert kind == "killed"
    assert "source" not in evidence


def test_sigterm_is_preempted():
    kind, detail, evidence = classify(AttemptOutcome(returncode=SIGTERM))
    assert kind == "preempted"
    assert "SIGTERM" in detail
    assert evidence["exit"] == "SIGTERM"


def test_exit_preempted_is_preempted():
    kind, detail, _ = classify(AttemptOutcome(returncode=EXIT_PREEMPTED))
    assert kind == "preempted"
    assert f"exit code {EXIT_PREEMPTED}" in detail


def test_supervisor_preempt_decision_is_preempted_even_after_sigkill():
    # The worker overran the preemption grace and was SIGKILLed: still a preemption, not "killed".
    kind, _, _ = classify(AttemptOutcome(returncode=SIGKILL, decision="preempt", last_rss=GiB, memory_limit=GiB))
    assert kind == "preempted"


@pytest.mark.parametrize("sig", [signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS, signal.SIGILL])
def test_native_crash_signals_are_crash_with_the_signal_name(sig):
    kind, detail, evidence = classify(AttemptOutcome(returncode=-sig))
    assert kind == "crash"
    assert sig.name in detail
    assert evidence == {"exit": sig.name}


def test_exit_code_one_without_a_report_is_a_crash():
    kind, detail, evidence = classify(AttemptOutcome(returncode=1))
    assert kind == "crash"
    assert "exited with code 1" in detail
    assert evidence == {"exit": "exit code 1"}


def test_exit_reported_without_error_json_is_a_crash():
    kind, detail, _ = classify(AttemptOutcome(returncode=EXIT_REPORTED))
    assert kind == "crash"
    assert "code 3" in detail


def test_orphaned_worker_is_killed():
    kind, detail, evidence = classify(AttemptOutcome(returncode=EXIT_ORPHANED))
    assert kind == "killed"
    assert "lost its supervisor" in detail
    assert evidence["exit"] == f"exit code {EXIT_ORPHANED}"


def test_classify_is_pure_and_deterministic():
    outcome = AttemptOutcome(returncode=SIGKILL, last_rss=GiB, memory_limit=GiB, report=None)
    assert classify(outcome) == classify(outcome)


# ------------------------------------------------------------------- what the worker raised, from its facts


def raised(exc: BaseException) -> ErrorReport:
    """The report a worker that only reports writes: the facts of the exception, no kind."""
    return ErrorReport.of(exc, epoch=0, step=7)


def chained(outer: BaseException, inner: BaseException) -> BaseException:
    try:
        try:
            raise inner
        except BaseException as e:
            raise outer from e
    except BaseException as e:
        return e


class ResourceExhaustedError(Exception):
    """Named like tf.errors.ResourceExhaustedError: classification reads type names, not classes."""


class NanLoss(Exception):
    """Named like the worker's own exception for a diverged loss."""


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (ResourceExhaustedError("failed to allocate memory"), "gpu_oom"),
        (RuntimeError("OOM when allocating tensor with shape[1024,1024]"), "gpu_oom"),
        (RuntimeError("CUDA error: out of memory"), "gpu_oom"),
        (RuntimeError("GPU ran Out Of Memory while compiling"), "gpu_oom"),
        (MemoryError("Unable to allocate 8.0 GiB"), "host_oom"),
        (NanLoss("loss became nan at global step 12 (epoch 0)"), "nan_loss"),
        (ValueError("shapes (32, 10) and (32, 1) not aligned"), "user_error"),
        (RuntimeError("out of memory"), "user_error"),  # no device named: not a GPU OOM
        (KeyError("label"), "user_error"),
        (OSError(28, "No space left on device"), "disk_full"),
        (OSError(122, "Disk quota exceeded"), "disk_full"),
        (ResourceExhaustedError("/run/ckpt/weights.npz; No space left on device"), "disk_full"),
        (RuntimeError("write failed: No space left on device"), "disk_full"),
    ],
)
def test_report_kind_from_the_exception(exc, kind):
    report = raised(exc)
    assert report.kind is None
    assert report_kind(report) == kind


def test_numpy_allocation_failure_is_host_oom():
    np = pytest.importorskip("numpy")
    with pytest.raises(MemoryError) as info:  # numpy's _ArrayMemoryError, which calls itself MemoryError
        np.empty(1 << 62, dtype=np.uint8)
    assert report_kind(raised(info.value)) == "host_oom"


@pytest.mark.parametrize(
    ("inner", "kind"),
    [(ResourceExhaustedError("OOM"), "gpu_oom"), (MemoryError(), "host_oom"), (ValueError("bad"), "user_error")],
)
def test_a_memory_failure_anywhere_in_the_chain_decides(inner, kind):
    exc = chained(RuntimeError("Graph execution error"), inner)
    assert report_kind(raised(exc)) == kind


def test_the_outermost_memory_failure_wins():
    exc = chained(MemoryError("host"), ResourceExhaustedError("gpu"))
    assert report_kind(raised(exc)) == "host_oom"


def test_a_nan_loss_only_counts_when_raised_itself():
    assert report_kind(raised(chained(ValueError("wrapped"), NanLoss("nan")))) == "user_error"


def test_a_set_kind_is_honoured_over_the_facts():
    # A worker that still classifies (and every 0.1.0 error.json) says what it thinks; that word wins.
    report = ErrorReport(kind="gpu_oom", type="ValueError", message="not about memory")
    assert report_kind(report) == "gpu_oom"
    assert report_kind(ErrorReport(kind="preempted")) == "preempted"


def test_a_report_without_an_exception_or_a_kind_names_nothing():
    assert report_kind(ErrorReport()) is None
    kind, _, evidence = classify(AttemptOutcome(returncode=EXIT_REPORTED, report=ErrorReport()))
    assert kind == "crash"
    assert evidence["report"] is None and "source" not in evidence


@pytest.mark.parametrize(
    ("exc", "kind", "detail"),
    [
        (chained(RuntimeError("Graph execution error:\ndetails"), ResourceExhaustedError("OOM")), "gpu_oom",
         "RuntimeError: Graph execution error:"),
        (ValueError("bad shape"), "user_error", "ValueError: bad shape"),
        (NanLoss("loss became nan"), "nan_loss", "NanLoss: loss became nan"),
    ],
)
def test_classify_reads_a_facts_only_report(exc, kind, detail):
    got, got_detail, evidence = classify(AttemptOutcome(returncode=EXIT_REPORTED, report=raised(exc)))
    assert (got, got_detail) == (kind, detail)
    assert evidence == {"exit": "exit code 3", "report": kind, "source": "worker report"}


def test_a_preempted_report_from_the_new_worker():
    report = ErrorReport.of(None, kind="preempted", epoch=0, step=7)
    kind, detail, _ = classify(AttemptOutcome(returncode=EXIT_PREEMPTED, report=report))
    assert kind == "preempted" and "SIGTERM" in detail


def test_an_error_json_of_release_0_1_0_still_classifies():
    old = '{"kind": "gpu_oom", "type": "ResourceExhaustedError", "message": "OOM", "traceback": "", "epoch": 0, "step": 3}'
    kind, detail, _ = classify(AttemptOutcome(returncode=EXIT_REPORTED, report=ErrorReport.model_validate_json(old)))
    assert (kind, detail) == ("gpu_oom", "ResourceExhaustedError: OOM")


# ------------------------------------------------------------------------------------------- disk full


def test_a_full_disk_anywhere_in_the_chain_is_disk_full():
    exc = chained(RuntimeError("saving the checkpoint failed"), OSError(28, "No space left on device"))
    got, detail, evidence = classify(AttemptOutcome(returncode=EXIT_REPORTED, report=raised(exc)))
    assert (got, detail) == ("disk_full", "RuntimeError: saving the checkpoint failed")
    assert evidence == {"exit": "exit code 3", "report": "disk_full", "source": "worker report"}


def test_a_full_disk_beats_tensorflows_resource_exhausted():
    # TensorFlow reports ENOSPC as ResourceExhaustedError: it is not a GPU OOM.
    exc = chained(ResourceExhaustedError("/run/ckpt/variables.data; No space left on device"), ValueError("x"))
    assert report_kind(raised(exc)) == "disk_full"


def test_the_errno_alone_is_enough():
    report = ErrorReport(type="OSError", message="write failed", errno=errno.EDQUOT)
    assert report_kind(report) == "disk_full"
    assert is_disk_full(errno.ENOSPC) and not is_disk_full(errno.EIO, "Input/output error")
