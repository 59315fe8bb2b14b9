"""The report on hand-written run directories: memory from ``memory_sample`` events of any shape or from attempt
peaks, a run still going, hostile journal text escaped, and the errors (no run, no matplotlib)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from resilient._cli import main
from resilient._plan import Plan
from resilient._report import MISSING_MATPLOTLIB, read_run
from resilient._rundir import ArraysData, RunDir, RunSpec

ROOT = Path(__file__).resolve().parent.parent
PLAN = Plan(batch_size=32).model_dump(mode="json")
HALF = Plan(batch_size=16, grad_accum_steps=2).model_dump(mode="json")
GB = 10**9


def _run(tmp_path: Path, events: list[dict], *, host_limit: int | None = None) -> Path:
    """A run directory with run.json and these events (``t``: seconds after 12:00:00 UTC)."""
    run = RunDir(tmp_path / "run")
    run.create()
    run.write_spec(RunSpec(epochs=2, seed=0, data=ArraysData(x="data/x.npy", y="data/y.npy", samples=64),
                           model_fingerprint="f", model_name="tiny", initial_plan=Plan(batch_size=32),
                           host_memory_limit_bytes=host_limit))
    lines = []
    for e in events:
        t = e.pop("t")
        lines.append(json.dumps({"time": f"2026-01-01T12:{t // 60:02d}:{t % 60:02d}.000Z", **e}))
    run.events.write_text("\n".join(lines) + "\n")
    return run.path


def _story(*, samples: list[dict] = ()) -> list[dict]:
    """Attempt 0 dies of host OOM at step 3 (plan halved), attempt 1 completes 2 epochs."""
    return [
        {"t": 0, "event": "run_started"},
        {"t": 1, "event": "attempt_started", "attempt": 0, "plan": PLAN},
        {"t": 3, "event": "worker_ready", "attempt": 0, "epoch": 0, "step": 0, "resumed_from_step": None},
        {"t": 4, "event": "checkpoint_saved", "attempt": 0, "epoch": 0, "step": 2, "reason": "interval", "bytes": 10,
         "path": "x/ckpt-000000000002"},
        *samples,
        {"t": 6, "event": "attempt_ended", "attempt": 0, "returncode": -9, "signal": "SIGKILL",
         "memory_peak_bytes": 3 * GB, "cgroup_peak_bytes": 4 * GB},
        {"t": 6, "event": "incident", "kind": "host_oom", "attempt": 0, "epoch": 0, "step": 3,
         "detail": "the kernel OOM-killed it", "evidence": {"cgroup_oom_kill": 1}, "checkpoint_step": 2,
         "action": "degrade: halve_batch()", "plan_before": PLAN, "plan_after": HALF},
        {"t": 6, "event": "plan_changed", "from": PLAN, "to": HALF, "reason": "degrade", "incident": "host_oom"},
        {"t": 7, "event": "attempt_started", "attempt": 1, "plan": HALF},
        {"t": 9, "event": "worker_ready", "attempt": 1, "epoch": 0, "step": 2, "resumed_from_step": 2},
        {"t": 10, "event": "epoch_end", "attempt": 1, "epoch": 0, "step": 4, "logs": {"loss": 0.9, "val_loss": 1.0}},
        {"t": 11, "event": "epoch_end", "attempt": 1, "epoch": 1, "step": 8, "logs": {"loss": 0.5, "val_loss": 0.7}},
        {"t": 12, "event": "attempt_ended", "attempt": 1, "returncode": 0, "memory_peak_bytes": 2 * GB},
        {"t": 12, "event": "run_finished", "status": "completed"},
    ]


def test_memory_comes_from_attempt_peaks_without_samples_against_the_asked_limit(tmp_path):
    record = read_run(_run(tmp_path, _story(), host_limit=5 * GB))
    assert record.memory_source == "attempt peaks"
    series = {s.name: s for s in record.memory}
    peak = series["host peak (worker RSS)"].points
    assert peak[:2] == [(1.0, 3.0 * GB), (6.0, 3.0 * GB)] and peak[3:5] == [(7.0, 2.0 * GB), (12.0, 2.0 * GB)]
    assert series["host peak (cgroup)"].points[0] == (1.0, 4.0 * GB)
    limit = series["host_memory_limit (asked)"]
    assert limit.limit and {v for _, v in limit.points} == {5.0 * GB}
    # The plan change is marked where it was decided: the incident's step.
    assert [(m.kind, m.step) for m in record.marks] == [("incident", 3), ("plan", 3)]
    assert record.attempts[0].steps_lost == 1 and record.attempts[0].exit == "SIGKILL"
    assert record.attempts[1].resumed_from == 2 and record.attempts[1].outcome == "completed"


@pytest.mark.parametrize("shape", ["flat", "nested"])
def test_memory_samples_of_either_shape_are_drawn_with_their_limits(tmp_path, shape):
    def sample(t: int, rss: int) -> dict:
        if shape == "flat":
            return {"t": t, "event": "memory_sample", "attempt": 0, "rss_bytes": rss, "cgroup_limit_bytes": 5 * GB,
                    "gpu_used_bytes": rss // 2, "gpu_limit_bytes": 4 * GB}
        return {"t": t, "event": "memory_sample", "attempt": 0, "host": {"rss": rss, "limit": 5 * GB},
                "gpu": [{"index": 0, "used_bytes": rss // 2, "total_bytes": 4 * GB}]}

    record = read_run(_run(tmp_path, _story(samples=[sample(4, GB), sample(5, 2 * GB)])))
    assert record.memory_source == "samples"
    series = {s.name: s for s in record.memory}
    host = "rss_bytes" if shape == "flat" else "host.rss"
    gpu = "gpu_used_bytes" if shape == "flat" else "gpu.0.used_bytes"
    assert series[host].points == [(4.0, 1.0 * GB), (5.0, 2.0 * GB)] and not series[host].limit
    assert series[gpu].gpu and not series[gpu].limit
    assert sum(s.limit and not s.gpu for s in record.memory) == 1 and sum(s.limit and s.gpu for s in record.memory) == 1
    assert "attempt" not in series  # not memory

    pytest.importorskip("matplotlib")
    from resilient._report import build_report

    page = build_report(tmp_path / "run").read_text()
    assert "sampled by the supervisor" in page and "GPU memory" in page and "host memory" in page


def test_journal_text_is_escaped_and_never_read_as_markup_or_math(tmp_path):
    pytest.importorskip("matplotlib")
    from resilient._report import build_report

    events = _story()
    evil = "<script>alert(1)</script> & \"quotes\" $x^2$"
    for e in events:
        if e["event"] == "incident":
            e["detail"] = evil
            e["evidence"] = {"<img src=x onerror=alert(1)>": evil}
            e["kind"] = "crash"
        if e["event"] == "epoch_end":
            e["logs"]["<b>$weird$</b>"] = 0.1
    page = build_report(_run(tmp_path, events), tmp_path / "r.html").read_text()
    assert "<script" not in page and "<img src=x" not in page and "<b>$" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; &quot;quotes&quot; $x^2$" in page
    assert "&lt;b&gt;$weird$&lt;/b&gt;" in page  # in the curves' SVG, as plain text


def test_a_run_still_going_reports_what_it_has(tmp_path):
    pytest.importorskip("matplotlib")
    from resilient._report import build_report

    events = [e for e in _story() if e["event"] not in ("epoch_end", "run_finished")][:-1]
    path = build_report(_run(tmp_path, events))
    page = path.read_text()
    assert path == tmp_path / "run" / "report.html"
    assert "not finished" in page and "No epoch finished yet" in page and "running or lost" in page
    assert not path.with_suffix(".png").exists()  # no curves to draw


def test_cli_on_a_directory_without_a_run_says_so(tmp_path):
    done = subprocess.run([sys.executable, "-m", "resilient", "report", str(tmp_path)], capture_output=True,
                          text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 2
    assert f"error: {tmp_path} holds no resilient run (no run.json)" in done.stderr
    assert "run_dir passed to resilient.fit" in done.stderr and "Traceback" not in done.stderr


def test_without_matplotlib_the_error_names_the_extra(tmp_path):
    run = _run(tmp_path, _story())
    code = ("import sys; sys.modules['matplotlib'] = None\n"  # what an environment without it looks like
            "from resilient._cli import main; raise SystemExit(main(['report', sys.argv[1]]))")
    done = subprocess.run([sys.executable, "-c", code, str(run)], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 1 and f"error: {MISSING_MATPLOTLIB}" in done.stderr
    assert "pip install 'resilient[report]'" in done.stderr
    assert not (run / "report.html").exists()


def test_history_report_uses_the_run_directory(tmp_path, monkeypatch):
    from resilient import History

    seen = []
    monkeypatch.setattr("resilient._report.build_report", lambda run_dir, path=None: seen.append((run_dir, path)))
    History({}, [], [], Plan(batch_size=1), tmp_path).report("out.html")
    assert seen == [(tmp_path, "out.html")]
    assert main(["report", "--help"], out=None) == 0


def test_thin_keeps_the_ends_and_bounds_the_count():
    from resilient._report.figures import thin

    assert thin(list(range(10)), 20) == list(range(10))
    kept = thin(list(range(10_001)), 1000)
    assert kept[0] == 0 and kept[-1] == 10_000 and len(kept) <= 1001


def test_curves_come_from_result_json_when_the_journal_has_no_epoch_ends(tmp_path):
    """A run journaled by 0.1.0 (no ``epoch_end`` events): the curves come from result.json, at each epoch's end."""
    run = _run(tmp_path, [e for e in _story() if e["event"] != "epoch_end"])
    (run / "result.json").write_text(json.dumps({"history": {"loss": [0.9, 0.5], "val_loss": [1.0, 0.7]},
                                                 "epochs_done": [0, 1], "global_step": 8, "steps": 4}))
    record = read_run(run)
    assert [(p.epoch, p.step, p.value) for p in record.curves["loss"]] == [(0, 4, 0.9), (1, 8, 0.5)]
    assert [p.value for p in record.curves["val_loss"]] == [1.0, 0.7]
