"""End-to-end: the HTML report of a real run with rehearsed faults (a segfault, then a GPU OOM that degrades the
plan), built by ``History.report`` and by ``python -m resilient report``, checked for its structure and opened in
a real headless browser (Debian's chromium)."""

from __future__ import annotations

import html
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import resilient
from resilient._report import read_run
from tests.conftest import make_data, make_model

pytest.importorskip("matplotlib", reason="the report needs the `report` extra (pip install -e '.[report]')")

pytestmark = [pytest.mark.e2e]

ROOT = Path(__file__).resolve().parent.parent
#: 384 training samples (a quarter held out), batch 32: 12 steps an epoch, 36 in all; a checkpoint every 2 steps.
FAULTS = "segfault@5,gpu_oom@9"
#: Anything that would make a browser fetch: a URL in src/href/url()/@import (SVG's xmlns names are not fetched).
EXTERNAL = re.compile(r"""(?:src|href|xlink:href)\s*=\s*["']?\s*(?:https?:|//|ftp:)|url\(\s*["']?\s*(?:https?:|//)|"""
                      r"""@import""", re.I)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One real run shared by the tests: crash at step 5 (restart, same plan), GPU OOM at step 9 (mixed precision)."""
    base = tmp_path_factory.mktemp("report")
    x, y = make_data(512)
    history = resilient.fit(make_model(), x, y, epochs=3, batch_size=32, seed=1, run_dir=base / "run", verbose=0,
                            validation_split=0.25, checkpoint_every=2, faults=FAULTS)
    path = history.report(base / "out" / "report.html")
    return history, path


def _sections(page: str) -> dict[str, str]:
    """The page split at its ``<h2 id=...>`` headings."""
    parts = re.split(r'<h2 id="([a-z]+)">', page)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


@pytest.mark.fault("segfault", "mid-epoch", incident="crash", outcome="completed; the report shows the incident, "
                   "its evidence and action, and the attempt's exit", lost="1 step (since the checkpoint at step 4)",
                   corrupted="no")
@pytest.mark.fault("gpu_oom", "mid-epoch", incident="gpu_oom", outcome="completed; plan degraded (mixed precision), "
                   "the report marks the plan change at its step", lost="1 step (since the checkpoint at step 8)",
                   corrupted="no")
def test_report_holds_the_curves_attempts_incidents_and_checkpoints(run):
    history, path = run
    assert [i.kind for i in history.incidents] == ["crash", "gpu_oom"]
    page = path.read_text()
    sections = _sections(page)
    assert list(sections) == ["curves", "incidents", "attempts", "memory", "checkpoints"]
    assert '<span class="good">completed</span>' in page and "3 of 3" in page

    # Three inline SVG figures; the curves name both metrics, both series and every mark, at its step.
    for name in ("curves", "memory", "checkpoints"):
        assert sections[name].count("<svg") == 1, name
    curves = sections["curves"]
    for text in ("loss", "accuracy", "training", "validation", "crash", "gpu_oom", "plan: batch=32 mixed_bfloat16 cache",
                 "global step"):
        assert f">{html.escape(text)}" in curves, text  # the text of an SVG <text> element

    # The attempts table: one row per attempt, its plan, exit or signal, peak and steps lost.
    rows = re.findall(r"<tr><td class=\"num\">(\d+)</td>(.*?)</tr>", sections["attempts"])
    assert [r[0] for r in rows] == ["0", "1", "2"]
    assert "SIGSEGV" in rows[0][1] and "crash" in rows[0][1] and "1 step" in rows[0][1] and "MiB" in rows[0][1]
    assert "exit 3" in rows[1][1] and "gpu_oom" in rows[1][1]
    assert "batch=32 mixed_bfloat16 cache" in rows[2][1] and "exit 0" in rows[2][1] and "completed" in rows[2][1]
    assert "attempts/000/" in rows[0][1]

    # Each incident with its evidence, the action taken, the plan change and the log's tail.
    incidents = sections["incidents"].split('<div class="incident">')[1:]
    assert len(incidents) == 2
    crash, oom = incidents
    assert "step 5" in crash and "exit: SIGSEGV" in crash and "restart with the same plan" in crash
    assert "checkpoint at step 4 (lost 1 step)" in crash and "attempts/000/worker.log" in crash
    assert "step 9" in oom and "report: gpu_oom" in oom and "degrade: mixed_precision()" in oom
    assert "batch=32 float32 cache &rarr; batch=32 mixed_bfloat16 cache" in oom
    assert "checkpoint at step 8 (lost 1 step)" in oom
    # The marks drawn on the curves: each incident and the plan change at their step.
    marks = [(m.kind, m.label, m.step) for m in read_run(history.run_dir).marks]
    assert marks == [("incident", "crash", 5), ("incident", "gpu_oom", 9),
                     ("plan", "plan: batch=32 mixed_bfloat16 cache", 9)]
    assert "OOM when allocating tensor (rehearsed fault gpu_oom@9)" in oom

    # Memory: this journal's attempt peaks (or the supervisor's samples, once it journals them).
    assert "host memory" in sections["memory"]
    # The checkpoint timeline and the generations on disk, verified.
    assert "checkpoint (interval)" in sections["checkpoints"] and "ckpt-000000000036" in sections["checkpoints"]
    assert "verified" in sections["checkpoints"]


def test_report_is_self_contained_with_a_png_of_the_curves(run):
    _, path = run
    page = path.read_text()
    assert not EXTERNAL.search(page), EXTERNAL.search(page)
    assert "<script" not in page.lower() and "<link" not in page.lower()
    png = path.with_suffix(".png")
    assert png.name == "report.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "data:image/png;base64," in page
    _assert_not_blank(png)


def _assert_not_blank(png: Path) -> None:
    from PIL import Image  # matplotlib's own dependency

    with Image.open(png) as image:
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 20, f"{png} looks blank: {colours and len(colours)} colours"
    # Mostly background, but a real share of it drawn.
    assert max(count for count, _ in colours) < 0.97 * sum(count for count, _ in colours)


def test_cli_writes_the_report_without_importing_tensorflow(run, tmp_path):
    history, _ = run
    out = tmp_path / "cli" / "r.html"
    code = ("import sys; from resilient._cli import main; status = main(['report', sys.argv[1], '-o', sys.argv[2]]); "
            "assert not {'tensorflow', 'keras'} & set(sys.modules), sorted(sys.modules); raise SystemExit(status)")
    done = subprocess.run([sys.executable, "-c", code, str(history.run_dir), str(out)], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"report: {out}" in done.stdout and out.with_suffix(".png").exists()
    assert out.stat().st_mode & 0o077 == 0  # private, like the run directory it quotes
    done = subprocess.run([sys.executable, "-m", "resilient", "report", str(history.run_dir)], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (history.run_dir / "report.html").exists() and (history.run_dir / "report.png").exists()


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("no chromium on PATH (Debian: apt-get install -y chromium; .ci/run installs it where it can)")


def _browser(*args: str) -> subprocess.CompletedProcess[str]:
    # --no-sandbox: CI runs as root, where chromium refuses its sandbox; the page is our own file.
    return subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           "--enable-logging=stderr", "--v=0", *args], capture_output=True, text=True, timeout=120)


def test_report_renders_in_a_headless_browser(run, tmp_path):
    _, path = run
    shot = tmp_path / "screenshot.png"
    done = _browser(f"--screenshot={shot}", "--window-size=1200,2000", path.as_uri())
    assert done.returncode == 0 and shot.exists(), done.stderr[-3000:]
    _assert_not_blank(shot)
    console = [line for line in done.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert console == [], console

    dom = _browser("--dump-dom", path.as_uri())
    assert dom.returncode == 0, dom.stderr[-3000:]
    assert dom.stdout.count("<svg") == 3 and "Incidents" in dom.stdout
    assert len(re.findall(r"<tr><td class=\"num\">\d+</td>", dom.stdout)) == 3
    assert [line for line in dom.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line] == []
