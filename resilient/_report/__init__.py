"""The HTML report of a run, built from its run directory alone: ``resilient report RUN_DIR`` and
``History.report(path)``.

``record`` reads the directory into plain data, ``figures`` draws it with matplotlib (an optional extra:
``pip install 'resilient[report]'``; training never needs it), ``page`` writes the self-contained HTML.
Caller side: nothing here imports TensorFlow or Keras.
"""

from __future__ import annotations

import os
from pathlib import Path

from .._rundir import atomic_path
from .record import RunRecord, read_run

__all__ = ["MISSING_MATPLOTLIB", "RunRecord", "build_report", "read_run"]

MISSING_MATPLOTLIB = (
    "The report draws its figures with matplotlib, which is not installed. Install the `report` extra: "
    "pip install 'resilient[report]' (or pip install matplotlib). Training does not need it; "
    "`resilient status RUN_DIR` summarizes a run without it."
)


def build_report(run_dir: str | os.PathLike[str], path: str | os.PathLike[str] | None = None) -> Path:
    """Write the report of the run in ``run_dir`` to ``path`` (default ``RUN_DIR/report.html``) and the curves
    as a PNG beside it (``report.png``); returns the HTML's path.

    Raises FileNotFoundError when ``run_dir`` holds no run, ImportError (naming the extra) without matplotlib.
    """
    record = read_run(run_dir)
    try:
        import matplotlib  # noqa: F401  (checked first: the message names the extra to install)
    except ImportError as e:
        raise ImportError(MISSING_MATPLOTLIB) from e
    from . import figures, page

    out = Path(path) if path is not None else record.path / "report.html"
    if out.is_dir():
        out = out / "report.html"
    curves = figures.curves_figure(record)
    svgs = {
        "curves": figures.to_svg(curves) if curves is not None else None,
        "memory": _svg(figures.memory_figure(record)),
        "checkpoints": _svg(figures.checkpoint_figure(record)),
    }
    png = figures.to_png(curves) if curves is not None else None
    out.parent.mkdir(parents=True, exist_ok=True)
    if png is not None:
        _write(out.with_suffix(".png"), png)
    _write(out, page.render(record, svgs, png).encode("utf-8"))
    return out


def _svg(fig: object | None) -> str | None:
    from . import figures

    return figures.to_svg(fig) if fig is not None else None


def _write(path: Path, data: bytes) -> None:
    # Atomic (a reader never sees half a page), and 0600 like the run directory it describes: it quotes
    # worker logs and paths.
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
