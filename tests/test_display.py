"""The caller's display (resilient/supervisor/display.py): its texts on hand-built values, the stream
display fed by the supervisor (scripted fake worker), the notebook panel in a real IPython kernel
(nbclient), and a real small fit with rehearsed faults writing to a pipe (e2e)."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from resilient._incident import INCIDENT_KINDS, Incident
from resilient._plan import Plan
from resilient._protocol import CheckpointSaved, EpochBegin, EpochEnd, Heartbeat, Hello
from resilient.supervisor.display import (
    RunView,
    StreamDisplay,
    TerminalDisplay,
    epoch_text,
    incident_text,
    keras_verbosity,
    make_display,
    panel_html,
    progress_text,
)

ROOT = Path(__file__).resolve().parent.parent
GB = 1_000_000_000


def incident(kind: str, **fields) -> Incident:
    base = dict(kind=kind, attempt=2, epoch=2, step=120, detail="d", checkpoint_step=100,
                plan_before=Plan(batch_size=128), plan_after=Plan(batch_size=128), action="restart with the same plan")
    return Incident(**{**base, **fields})


# ------------------------------------------------------------------------------------------ the texts


def test_the_gpu_oom_sentence_reads_as_the_issue_asks():
    text = incident_text(
        incident("gpu_oom", gpu_memory_peak_bytes=int(14.8 * GB), plan_after=Plan(batch_size=64, grad_accum_steps=2)),
        seconds_per_step=0.3, gpu_limit=15 * GB, log="run/attempts/002/worker.log")
    assert text == ("GPU out of memory at epoch 3, step 120 (peak 14.8 of 15.0 GB). Restarting from step 100 with "
                    "batch 64x2 (was 128). Lost 20 steps (6 s). Log: run/attempts/002/worker.log")


@pytest.mark.parametrize(("kind", "fields", "opening"), [
    ("gpu_oom", {}, "GPU out of memory at epoch 3, step 120."),
    ("host_oom", {"memory_peak_bytes": 12 * GB}, "Host memory ran out at epoch 3, step 120 (peak 12.0 of 12.7 GB)."),
    ("crash", {"signal": "SIGSEGV", "returncode": -11}, "The worker crashed (SIGSEGV) at epoch 3, step 120."),
    ("crash", {"returncode": 1}, "The worker crashed (exit code 1) at epoch 3, step 120."),
    ("killed", {"signal": "SIGKILL"}, "The worker was killed (SIGKILL) with no memory evidence at epoch 3, step 120."),
    ("hang", {"evidence": {"heartbeat_age": 10.2}}, "The worker hung (no heartbeat for 10 s) at epoch 3, step 120."),
    ("preempted", {}, "The worker was preempted (SIGTERM) and saved a checkpoint at epoch 3, step 120."),
    ("nan_loss", {}, "The loss became NaN at epoch 3, step 120."),
    ("disk_full", {}, "The disk is full at epoch 3, step 120."),
    ("user_error", {"detail": "ValueError: bad shape"}, "The training code raised ValueError at epoch 3, step 120."),
])
def test_each_incident_kind_has_its_sentence(kind, fields, opening):
    text = incident_text(incident(kind, **fields), host_limit=int(12.7 * GB), log="attempts/002/worker.log")
    assert text.startswith(opening + " ")
    assert text.endswith(" Log: attempts/002/worker.log")
    assert "\n" not in text and "\r" not in text
    if kind == "user_error":
        assert "Not retried" in text and "Lost" not in text
    else:
        assert "Restarting from step 100 with the same plan. Lost 20 steps." in text


def test_every_incident_kind_is_covered_above():
    assert set(INCIDENT_KINDS) == {"gpu_oom", "host_oom", "crash", "killed", "hang", "preempted", "nan_loss",
                                   "disk_full", "user_error"}


def test_plan_changes_giving_up_and_no_checkpoint_are_said():
    mixed = incident("gpu_oom", plan_after=Plan(batch_size=128, precision="mixed_float16"), checkpoint_step=None)
    assert ("Restarting from the beginning with mixed_float16 precision (was float32). Lost 120 steps."
            in incident_text(mixed))
    smaller = incident("gpu_oom", plan_before=Plan(batch_size=32, image_size=(224, 224)),
                       plan_after=Plan(batch_size=32, image_size=(168, 168)))
    assert "with images 168x168 (was 224x224)" in incident_text(smaller)
    given_up = incident("crash", signal="SIGSEGV", action="give up: no progress")
    text = incident_text(given_up, outcome="give_up")
    assert text == "The worker crashed (SIGSEGV) at epoch 3, step 120. Giving up (give up: no progress)."


def view(**fields) -> RunView:
    base = dict(epochs=6, epoch=2, step=130, epoch_steps=24, epoch_start_step=120, end_step=144,
                logs={"loss": 0.41234, "accuracy": 0.88}, samples_per_second=1234.5, seconds_per_step=0.5,
                plan=Plan(batch_size=64, grad_accum_steps=2), restarts=1, host_memory=800_000_000,
                host_memory_limit=int(12.7 * GB), gpu_memory=int(3.2 * GB), gpu_memory_limit=15 * GB,
                checkpoint_time=1000.0)
    return RunView(**{**base, **fields})


def test_the_progress_line_has_every_figure():
    assert progress_text(view(), now=1007.0) == (
        "epoch 3/6 | step 10/24 | loss 0.4123 accuracy 0.88 | 1,234 samples/s | ETA 0:07 | batch=64x2 float32 cache"
        " | restarts 1 | RAM 0.8/12.7 GB | GPU 3.2/15.0 GB | checkpoint 0:07 ago")
    assert progress_text(RunView()) == "starting | restarts 0"


def test_the_view_follows_the_channel():
    v = RunView()
    v.update(Hello(pid=1, epoch=1, step=30))
    v.update(Heartbeat(phase="restore", epoch=0, step=0))  # start-up placeholders move nothing
    v.update(EpochBegin(epoch=1, step=30, epochs=3, steps=18, steps_per_epoch=24, samples_per_step=32))
    v.update(Heartbeat(epoch=1, step=40, timed_steps=10, timed_seconds=2.0, logs={"loss": 0.5}), batch_size=32)
    v.update(CheckpointSaved(epoch=1, step=40, seconds=0.1, bytes=1, path="p", t=123.0))
    assert (v.epoch, v.step, v.epoch_start_step, v.end_step) == (1, 40, 24, 72)
    assert (v.seconds_per_step, v.samples_per_second, v.logs) == (0.2, 160.0, {"loss": 0.5})
    assert (v.checkpoint_step, v.checkpoint_time) == (40, 123.0)
    assert v.eta_seconds() == pytest.approx(6.4)
    assert v.update(EpochEnd(epoch=1, step=48, logs={"loss": 0.4})) is True
    assert epoch_text(v).startswith("epoch 2/3 | step 48 | loss 0.4 | 160 samples/s")


def test_verbose_keeps_keras_meaning():
    assert keras_verbosity("auto") == 1
    assert make_display(0) is None
    pipe = io.StringIO()  # not a terminal: lines, whatever verbose asks
    assert type(make_display(1, pipe)) is StreamDisplay
    assert type(make_display("auto", pipe)) is StreamDisplay
    assert type(make_display(2, pipe)) is StreamDisplay

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert type(make_display(1, Tty())) is TerminalDisplay
    assert type(make_display(2, Tty())) is StreamDisplay  # one line per epoch, as Keras's verbose=2


def test_the_terminal_display_redraws_one_line_and_prints_sentences_above_it():
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Tty()
    display = TerminalDisplay(out)
    display.attempt_started(0, Plan(batch_size=32))
    for step in range(1, 30):
        display.progress(Heartbeat(epoch=0, step=step, logs={"loss": 1.0 / step}))
        display.refresh()
    display.incident(incident("crash", signal="SIGSEGV"), outcome="restart", log="w.log")
    display.close()
    text = out.getvalue()
    assert "\r" in text or "\x1b[" in text, "the line is redrawn in place"
    assert text.count("The worker crashed (SIGSEGV)") == 1
    assert "restarts 1" in text


def test_the_notebook_panel_is_one_small_html_snippet():
    v = view(incidents=[f"incident {i} <b>" for i in range(500)])
    html = panel_html(v, now=1007.0)
    assert html.startswith('<div class="resilient-panel"') and html.endswith("</div>")
    assert "incident 499 &lt;b&gt;" in html and "incident 0 " not in html  # the newest 50, escaped
    assert len(html) < 10_000


# ------------------------------------------------------------------------------------------ supervisor


def test_the_supervisor_feeds_the_stream_display(tmp_path):
    from resilient._rundir import RunDir
    from resilient.policy import Policy, StepContext
    from resilient.supervisor.loop import Supervisor, SupervisorConfig

    fake = Path(__file__).resolve().parent / "fake_worker.py"
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.write_plan(Plan(batch_size=32))
    hello, beats = {"do": "hello"}, {"do": "beat", "n": 3, "interval": 0.01}
    script = {"attempts": {"0": [hello, {"do": "print", "text": "NOISE from the worker"}, beats,
                                 {"do": "checkpoint"}, {"do": "epoch_end"}, beats, {"do": "signal", "name": "SIGSEGV"}]},
              "default": [hello, beats, {"do": "checkpoint"}, {"do": "epoch_end"}, {"do": "result"}]}
    (tmp_path / "script.json").write_text(json.dumps(script))
    out = io.StringIO()

    def worker_cmd(attempt: int, fd: int) -> list[str]:
        return [sys.executable, str(fake), "--script", str(tmp_path / "script.json"), "--run-dir", str(run.path),
                "--attempt", str(attempt), "--channel-fd", str(fd), "--max-life", "20"]

    Supervisor(SupervisorConfig(run=run, policy=Policy(), context=StepContext(Plan(batch_size=32)), max_restarts=3,
                                hang_timeout=5.0, startup_timeout=5.0, worker_cmd=worker_cmd, stream=out,
                                sleep=lambda s: None, display=StreamDisplay(out))).run()
    lines = out.getvalue().splitlines()
    assert "NOISE" not in out.getvalue() and "NOISE" in (run.attempt_dir(0) / "worker.log").read_text()
    assert [line.split(" | ")[0] for line in lines if line.startswith("epoch ")] == ["epoch 1", "epoch 1"]
    crash = [line for line in lines if line.startswith("The worker crashed")]
    assert crash == [f"The worker crashed (SIGSEGV) at epoch 1, step 6. Restarting from step 3 with the same plan. "
                     f"Lost 3 steps. Log: {run.attempt_dir(0) / 'worker.log'}"]
    assert not any("attempt 0 ended" in line for line in lines), "the sentence stands for the technical line"
    assert lines[-1] == "resilient: attempt 1 completed after 3 steps (at step 6); the training is done"
    assert "\r" not in out.getvalue()


# ------------------------------------------------------------------------------------------ notebook


NOTEBOOK_CODE = """
import time
from resilient._incident import Incident
from resilient._plan import Plan
from resilient._protocol import EpochBegin, EpochEnd, Heartbeat
from resilient.supervisor.display import NotebookDisplay, make_display
display = make_display(1)
assert type(display) is NotebookDisplay, type(display)
display.attempt_started(0, Plan(batch_size=32))
display.progress(EpochBegin(epoch=0, step=0, epochs=2, steps=500, steps_per_epoch=500, samples_per_step=32))
for step in range(1, 1001):
    display.progress(Heartbeat(epoch=(step - 1) // 500, step=step, logs={"loss": 1.0 / step}))
    display.tick()  # throttled: at most twice a second
    if step == 400:
        display.incident(Incident(kind="gpu_oom", attempt=0, epoch=0, step=400, checkpoint_step=380,
                                  plan_before=Plan(batch_size=32), plan_after=Plan(batch_size=16)),
                         outcome="restart", log="attempts/000/worker.log")
        display.attempt_started(1, Plan(batch_size=16))
    time.sleep(0.001)
display.progress(EpochEnd(epoch=1, step=1000, logs={"loss": 0.001}))
display.close()
"""


@pytest.mark.timeout(120)
def test_the_notebook_panel_is_updated_in_place_in_a_real_kernel(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(NOTEBOOK_CODE)]
    messages: list[str] = []

    class Recording(nbclient.NotebookClient):
        def process_message(self, msg, cell, cell_index):  # every IOPub message of the cell, in order
            messages.append(msg["msg_type"])
            return super().process_message(msg, cell, cell_index)

    Recording(nb, timeout=90, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    outputs = nb.cells[0].outputs
    assert [o["output_type"] for o in outputs] == ["display_data"], outputs
    html = outputs[0]["data"]["text/html"]
    assert html.startswith('<div class="resilient-panel"')
    assert "(finished)" in html and "epoch 2/2" in html and "batch=16 float32" in html
    assert "GPU out of memory at epoch 1, step 400. Restarting from step 380 with batch 16 (was 32)." in html
    assert "Incidents (1)" in html
    assert len(json.dumps(nb.cells[0].outputs)) < 10_000, "the cell's output stays one small panel"
    assert messages.count("display_data") == 1 and "stream" not in messages
    # Updated in place, throttled: about 2 a second over the cell's ~1.5 s, plus the incident and the end.
    assert 2 <= messages.count("update_display_data") <= 20, messages


# ------------------------------------------------------------------------------------------ e2e

FIT_SCRIPT = """
import os, sys
sys.path.insert(0, {tests!r})
from conftest import make_data, make_model
import resilient
x, y = make_data(256)
resilient.fit(make_model(), x, y, epochs=3, batch_size=32, seed=0, run_dir={run!r}, faults="gpu_oom@4,segfault@12",
              checkpoint_every=2)
"""


@pytest.mark.e2e
@pytest.mark.timeout(240)
@pytest.mark.fault("gpu_oom", "mid-epoch", incident="gpu_oom", outcome="completed; one sentence naming the log, "
                   "no traceback on the caller's stream", lost="steps since the last checkpoint", corrupted="no")
@pytest.mark.fault("segfault", "mid-epoch", incident="crash", outcome="completed; one sentence naming the log, "
                   "no faulthandler dump on the caller's stream", lost="steps since the last checkpoint",
                   corrupted="no")
def test_a_fit_writing_to_a_pipe_tells_one_line_per_epoch_and_incident(tmp_path):
    run = tmp_path / "run"
    script = tmp_path / "fit.py"
    script.write_text(FIT_SCRIPT.format(tests=str(ROOT / "tests"), run=str(run)))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=220, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    out, err = done.stdout, done.stderr
    assert done.returncode == 0, out + err
    assert "\r" not in out and "\x1b" not in out, "no redraws on a pipe"
    for noise in ("absl", "cuda", "oneDNN", "Traceback", "Fatal Python error", "Extension modules",
                  "ResourceExhaustedError"):
        assert noise not in out, f"{noise!r} reached the caller's stdout:\n{out}"
    for noise in ("Traceback", "Fatal Python error", "Extension modules"):
        assert noise not in err, f"{noise!r} reached the caller's stderr:\n{err}"
    lines = out.splitlines()
    epochs = [line for line in lines if re.match(r"epoch \d/3 \| ", line)]
    assert [line.split(" | ")[0] for line in epochs] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"], out
    oom = [line for line in lines if line.startswith("GPU out of memory")]
    crash = [line for line in lines if line.startswith("The worker crashed (SIGSEGV)")]
    assert len(oom) == 1 and len(crash) == 1, out
    assert oom[0].startswith("GPU out of memory at epoch 1, step 4. Restarting from step 4 with ")
    assert oom[0].endswith(f"Log: {run / 'attempts' / '000' / 'worker.log'}")
    assert crash[0].endswith(f"Log: {run / 'attempts' / '001' / 'worker.log'}")
    # What the caller no longer sees is in the attempts' logs, in full.
    assert "ResourceExhaustedError" in (run / "attempts" / "000" / "worker.log").read_text()
    assert "Fatal Python error: Segmentation fault" in (run / "attempts" / "001" / "worker.log").read_text()
    assert lines[-1].startswith("resilient: attempt 2 completed")
    assert len(lines) <= 8, out  # starting, 3 epochs, 2 incidents, completed



def test_the_progress_line_tells_the_mirrors_lag():
    from resilient.supervisor.display import Display, mirror_text

    view = RunView(epochs=3, epoch=1, step=30, checkpoint_step=30, checkpoint_time=1000.0)
    assert mirror_text(view) is None  # no mirror_dir: nothing said
    display = Display()
    display.view = view
    display.mirror(None, None)
    assert progress_text(view, now=1010.0).endswith("checkpoint 0:10 ago | mirror: no copy yet")
    display.mirror(20, 990.0)
    assert progress_text(view, now=1010.0).endswith("mirror step 20, 10 steps / 0:20 behind")
    display.mirror(30, 1000.0)
    assert "mirror step 30 in sync" in panel_html(view, now=1010.0)
