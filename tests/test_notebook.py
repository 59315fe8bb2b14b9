"""examples/colab_quickstart.ipynb runs top to bottom in a real IPython kernel (nbclient), off Colab: the Drive
cell skips the mount, the training meets its rehearsed faults and completes with a mirror, the live panel is
the cell's output, the report is drawn, and a "new VM" (the local run directory deleted) restores from the mirror."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from resilient._checkpoint import CheckpointStore
from resilient._rundir import RunDir

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "examples" / "colab_quickstart.ipynb"

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("no_leftover_processes")]


def _texts(cell) -> list[str]:
    """Every text an output of ``cell`` holds: streams, results and displays (text and HTML)."""
    texts = []
    for out in cell.get("outputs", []):
        if out["output_type"] == "stream":
            texts.append(out["text"])
        elif out["output_type"] in ("execute_result", "display_data"):
            texts.extend(str(v) for k, v in out["data"].items() if k.startswith("text/"))
        elif out["output_type"] == "error":
            texts.append("\n".join(out.get("traceback", [])))
    return texts


@pytest.mark.timeout(240)
def test_the_colab_quickstart_notebook_runs_top_to_bottom_off_colab(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    # The kernel (and its workers) import resilient from this tree; its temporary folders land in tmp_path.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=200, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()

    code = [c for c in nb.cells if c.cell_type == "code"]
    for cell in code:
        assert cell.get("execution_count") is not None, cell.source  # every cell ran
        errors = [o for o in cell.outputs if o["output_type"] == "error"]
        assert not errors, "\n".join(_texts(cell))
        for text in _texts(cell):
            assert "Traceback" not in text and "Error" not in text.replace("ResourceExhaustedError", ""), text

    fit_cell = next(c for c in code if "faults=FAULTS," in c.source)
    panels = [o for o in fit_cell.outputs if o["output_type"] == "display_data"]
    assert len(panels) == 1, fit_cell.outputs  # one panel, updated in place
    html = panels[0]["data"]["text/html"]
    assert html.startswith('<div class="resilient-panel"') and "(finished)" in html and "epoch 3/3" in html
    assert "Incidents (2)" in html and "GPU out of memory" in html and "SIGSEGV" in html
    assert "mirror step 72" in html

    [base] = list(tmp_path.glob("resilient-colab-*"))
    run, mirror = RunDir(base / "content" / "runs" / "digits"), RunDir(base / "drive" / "MyDrive" / "resilient" / "digits")
    finished = [e for e in run.read_events() if e["event"] == "run_finished"]
    assert finished[0]["status"] == "completed"
    assert next(e for e in mirror.read_events() if e["event"] == "run_finished")["status"] == "completed"
    assert CheckpointStore(mirror.checkpoints).latest().step == 72
    report_cell = next(c for c in code if "history.report()" in c.source)
    assert "report.html" in "".join(_texts(report_cell))
    assert any("image/png" in o.get("data", {}) for o in report_cell.outputs)  # the report's figure, shown

    joined = "\n".join(t for cell in code for t in _texts(cell))
    assert "run_dir:" in joined and "drive" in joined  # the Drive cell ran its off-Colab branch
    assert "validation accuracy of the trained model" in joined
    status = "\n".join(_texts(next(c for c in code if "resilient status" in c.source)))
    assert "mirror: step 72 verified" in status and "in sync with the local checkpoint" in status, status
    assert "on the mirror" in status and "status: completed" in status
    new_vm = code[-1]
    new_vm_text = "\n".join(_texts(new_vm))
    assert "restored the run from the mirror" in new_vm_text and "already complete" in new_vm_text
    assert "epochs: [0, 1, 2]" in new_vm_text
    assert json.loads(json.dumps(nb.metadata))["kernelspec"]["name"] == "python3"
