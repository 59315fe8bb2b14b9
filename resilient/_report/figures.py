"""The report's figures, drawn with matplotlib's object API (``Figure``, Agg/SVG canvases; never pyplot, so
nothing global changes in the caller's process and no GUI backend is chosen)."""

from __future__ import annotations

import io
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .record import Mark, RunRecord

#: Text stays text in the SVG (smaller, searchable) and journal strings are never parsed as mathtext
#: (a ``$`` in a metric name would otherwise be TeX); a fixed salt keeps the SVG's ids stable between builds.
_RC = {"svg.fonttype": "none", "text.parse_math": False, "svg.hashsalt": "resilient-report", "font.size": 9,
       "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3}
_INCIDENT = "#c0392b"
_PLAN = "#2471a3"
_WIDTH = 9.0
#: Points a line or a scatter keeps at most: a long run saves tens of thousands of checkpoints, and every
#: marker is an SVG element (the figure's shape does not change at this density).
MAX_POINTS = 1500
#: At most this many metric panels (loss first); a model with more metrics keeps the rest in the table.
MAX_PANELS = 6


def thin(items: list[Any], most: int = MAX_POINTS) -> list[Any]:
    """Every k-th item (the last kept) so that at most about ``most`` remain."""
    if len(items) <= most:
        return items
    stride = math.ceil(len(items) / most)
    return items[::stride] + ([items[-1]] if (len(items) - 1) % stride else [])


@contextmanager
def style() -> Iterator[None]:
    import matplotlib

    with matplotlib.rc_context(_RC):
        yield


def to_svg(fig: Any) -> str:
    """The figure as an ``<svg>`` element to inline in HTML (no XML prolog, no metadata block)."""
    buf = io.StringIO()
    with style():
        fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    text = buf.getvalue()
    text = text[text.index("<svg"):]
    return re.sub(r"<metadata>.*?</metadata>\s*", "", text, flags=re.S)


def to_png(fig: Any, dpi: int = 110) -> bytes:
    buf = io.BytesIO()
    with style():
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    return buf.getvalue()


def _panels(curves: dict[str, Any]) -> list[str]:
    """Metric names to draw, one panel each: a metric and its ``val_`` twin share one; loss first."""
    bases = []
    for name in curves:
        base = name[4:] if name.startswith("val_") else name
        if base not in bases:
            bases.append(base)
    bases.sort(key=lambda b: (b != "loss", b))
    return bases[:MAX_PANELS]


def _mark_x(mark: Mark, by_step: bool) -> float | None:
    if by_step:
        return float(mark.step) if mark.step is not None else None
    return mark.epoch + 0.5 if mark.epoch is not None else None  # inside the epoch it happened in


def _draw_marks(ax: Any, marks: list[Mark], xs: list[float | None], *, label: bool) -> None:
    """Vertical lines for incidents (solid red) and plan changes (dashed blue), named on the first panel."""
    for mark, x in zip(marks, xs):
        if x is None or not math.isfinite(x):
            continue
        incident = mark.kind == "incident"
        ax.axvline(x, color=_INCIDENT if incident else _PLAN, linestyle="-" if incident else "--", linewidth=1.2,
                   alpha=0.8, zorder=1)
        if label:
            # Incident names left of their line, plan changes right of theirs: the two often share a step.
            ax.annotate(mark.label, xy=(x, 1.0), xycoords=("data", "axes fraction"), rotation=90, va="top",
                        ha="right" if incident else "left", fontsize=7, color=_INCIDENT if incident else _PLAN,
                        xytext=(-2 if incident else 2, -2), textcoords="offset points")


def _mark_legend(ax: Any, marks: list[Mark]) -> None:
    from matplotlib.lines import Line2D

    handles, labels = ax.get_legend_handles_labels()
    if any(m.kind == "incident" for m in marks):
        handles.append(Line2D([], [], color=_INCIDENT, linewidth=1.2))
        labels.append("incident")
    if any(m.kind == "plan" for m in marks):
        handles.append(Line2D([], [], color=_PLAN, linestyle="--", linewidth=1.2))
        labels.append("plan change")
    ax.legend(handles, labels, loc="best", fontsize=8, framealpha=0.8)


def curves_figure(record: RunRecord) -> Any | None:
    """Loss and metrics per epoch (train and validation) against the global step, with incidents and plan changes."""
    from matplotlib.figure import Figure

    panels = _panels(record.curves)
    if not panels:
        return None
    by_step = all(p.step is not None for points in record.curves.values() for p in points)
    with style():
        fig = Figure(figsize=(_WIDTH, 2.3 * len(panels) + 0.4), layout="constrained")
        axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
        for i, (ax, base) in enumerate(zip(axes, panels)):
            for name, colour in ((base, "#1f77b4"), (f"val_{base}", "#ff7f0e")):
                points = record.curves.get(name, [])
                if points:
                    xs = [p.step if by_step else p.epoch + 1 for p in points]
                    ax.plot(xs, [p.value for p in points], marker="o", markersize=3.5, color=colour,
                            label="validation" if name.startswith("val_") else "training", zorder=3)
            _draw_marks(ax, record.marks, [_mark_x(m, by_step) for m in record.marks], label=i == 0)
            ax.set_ylabel(base)
            _mark_legend(ax, record.marks if i == 0 else [])
        axes[-1].set_xlabel("global step (a point is the end of an epoch)" if by_step else "epoch")
    return fig


def _time_scale(record: RunRecord) -> tuple[float, str]:
    duration = record.duration or 0.0
    if duration > 2 * 3600:
        return 3600.0, "hours since the run started"
    if duration > 300:
        return 60.0, "minutes since the run started"
    return 1.0, "seconds since the run started"


def _byte_scale(values: list[float]) -> tuple[float, str]:
    top = max((v for v in values if math.isfinite(v)), default=0.0)
    for scale, unit in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB")):
        if top >= scale:
            return float(scale), unit
    return 1024.0, "KiB"


def memory_figure(record: RunRecord) -> Any | None:
    """Host (and GPU) memory over time against the limits, incidents marked at their time."""
    from matplotlib.figure import Figure

    if not record.memory:
        return None
    sides = [gpu for gpu in (False, True) if any(s.gpu == gpu and not s.limit for s in record.memory)] or [False]
    tscale, tlabel = _time_scale(record)
    with style():
        fig = Figure(figsize=(_WIDTH, 2.6 * len(sides) + 0.4), layout="constrained")
        axes = fig.subplots(len(sides), 1, sharex=True, squeeze=False)[:, 0]
        for i, (ax, gpu) in enumerate(zip(axes, sides)):
            series = [s for s in record.memory if s.gpu == gpu]
            bscale, unit = _byte_scale([v for s in series for _, v in s.points])
            for s in series:  # not thinned: a stride could drop the peak that explains an incident
                ax.plot([t / tscale for t, _ in s.points], [v / bscale for _, v in s.points], label=s.name,
                        linestyle="--" if s.limit else "-", linewidth=1.4 if s.limit else 1.2, zorder=3)
            _draw_marks(ax, record.marks, [m.seconds / tscale if m.seconds is not None else None
                                           for m in record.marks], label=i == 0)
            ax.set_ylabel(f"{'GPU' if gpu else 'host'} memory ({unit})")
            ax.set_ylim(bottom=0)
            _mark_legend(ax, record.marks if i == 0 else [])
        axes[-1].set_xlabel(tlabel)
    return fig


def checkpoint_figure(record: RunRecord) -> Any | None:
    """The step each attempt reached over time, every checkpoint saved, and where each attempt ended."""
    from matplotlib.figure import Figure

    if not record.checkpoints and not record.progress:
        return None
    tscale, tlabel = _time_scale(record)
    with style():
        fig = Figure(figsize=(_WIDTH, 3.2), layout="constrained")
        ax = fig.subplots()
        for attempt, line in sorted(record.progress.items()):
            line = thin(line)
            ax.plot([t / tscale for t, _ in line], [s for _, s in line], color="#7f8c8d", linewidth=1.0, zorder=2,
                    label="training progress" if attempt == min(record.progress) else None)
        reasons = sorted({c.reason for c in record.checkpoints})
        for reason, marker in zip(reasons, "os^Dvp<>h*"):
            saved = thin([c for c in record.checkpoints if c.reason == reason and c.seconds is not None])
            ax.scatter([c.seconds / tscale for c in saved], [c.step for c in saved], marker=marker, s=22, zorder=3,
                       label=f"checkpoint ({reason or 'saved'})")
        hit = [i for i in record.incidents if i.seconds is not None and i.step is not None]
        if hit:
            ax.scatter([i.seconds / tscale for i in hit], [i.step for i in hit], marker="X", s=70, color=_INCIDENT,
                       zorder=4, label="incident")
        for i in hit:
            ax.annotate(i.kind, (i.seconds / tscale, i.step), xytext=(4, 4), textcoords="offset points",
                        fontsize=7, color=_INCIDENT)
        ax.set_xlabel(tlabel)
        ax.set_ylabel("global step")
        ax.legend(loc="best", fontsize=8, framealpha=0.8)
    return fig
