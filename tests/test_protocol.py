"""The files that cross the process boundary, as pydantic models: written by one side, read by the other,
and read back from run directories written by 0.1.0."""

from __future__ import annotations

import errno
import json
from pathlib import Path

from resilient._protocol import CheckpointMeta, ErrorReport, ExceptionFacts, TrainingResult

FIXTURE = Path(__file__).parent / "fixtures" / "rundir_v0"


def test_an_error_report_holds_the_exception_and_its_causes():
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("could not write the checkpoint") from inner
    except RuntimeError as exc:
        report = ErrorReport.of(exc, epoch=2, step=40)
    assert (report.type, report.message, report.epoch, report.step) == (
        "RuntimeError", "could not write the checkpoint", 2, 40)
    assert report.causes == (ExceptionFacts(type="OSError", message="[Errno 28] No space left on device",
                                            errno=errno.ENOSPC),)
    assert [f.type for f in report.chain] == ["RuntimeError", "OSError"]
    assert "RuntimeError" in report.traceback
    assert ErrorReport.model_validate_json(report.model_dump_json()) == report


def test_a_report_without_an_exception_carries_only_the_workers_word():
    report = ErrorReport.of(None, kind="preempted", epoch=1, step=9)
    assert (report.kind, report.type, report.chain) == ("preempted", None, ())


def test_a_cyclic_cause_chain_ends():
    a, b = ValueError("a"), ValueError("b")
    a.__context__, b.__context__ = b, a
    assert [f.message for f in ErrorReport.of(a).chain] == ["a", "b"]


def test_release_0_1_0_checkpoint_meta_and_results_read_with_defaults():
    manifest = json.loads((FIXTURE / "checkpoints" / "ckpt-000000000009" / "manifest.json").read_text())
    meta = CheckpointMeta.model_validate(manifest["meta"])
    assert (meta.epoch, meta.global_step, meta.stopped, meta.last_logs) == (1, 9, False, None)
    old_result = {"history": {"loss": [0.5]}, "epochs_done": [0], "global_step": 6, "attempt": 0,
                  "stopped_early": False}
    assert TrainingResult.model_validate(old_result).steps is None
    old_error = {"kind": "gpu_oom", "type": "ResourceExhaustedError", "message": "OOM", "traceback": "",
                 "epoch": 0, "step": 3}
    assert ErrorReport.model_validate(old_error).causes == ()
