"""FAULTS.md's rendering: every cell of kinds x phases, empty ones visible, a cell's tests grouped by claim."""

from __future__ import annotations

from tests import fault_matrix


def test_every_cell_is_rendered_and_an_empty_one_is_visible():
    text = fault_matrix.render({})
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| fault")]
    assert len(rows) == len(fault_matrix.KINDS)
    assert all(row.count("| ·") == len(fault_matrix.PHASES) for row in rows)
    assert f"Covered: 0 of {len(fault_matrix.KINDS) * len(fault_matrix.PHASES)} cells" in text


def test_a_cells_tests_are_grouped_by_what_they_claim():
    same = {"outcome": "completed", "incident": "killed", "lost": "1 step", "corrupted": "no"}
    cells = {("sigkill", "mid-epoch"): [
        {"test": "a.py::t1", **same}, {"test": "b.py::t2", **same},
        {"test": "c.py::t3", **same, "outcome": "TrainingFailedError"},
    ]}
    text = fault_matrix.render(cells)
    [row] = [line for line in text.splitlines() if line.startswith("| worker SIGKILLed")]
    assert "completed; `killed`; lost: 1 step; corrupted: no (`a.py::t1`, `b.py::t2`)<br>" in row
    assert "TrainingFailedError; `killed`; lost: 1 step; corrupted: no (`c.py::t3`)" in row
    assert "Covered: 1 of" in text
