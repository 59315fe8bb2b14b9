"""The report's HTML: one self-contained page (inline CSS and SVG, the PNG as a data URI; no script, no link
to anything outside the file). Every string that came from the run directory passes through ``esc``."""

from __future__ import annotations

import base64
import html
import json
from typing import Any

from .._units import format_bytes
from .record import Attempt, IncidentView, RunRecord

_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222; margin: 0;
       background: #f6f7f9; }
main { max-width: 1100px; margin: 0 auto; padding: 24px 28px 48px; background: #fff; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 32px 0 8px; border-bottom: 1px solid #ddd;
padding-bottom: 4px; } h3 { font-size: 15px; margin: 0 0 6px; }
.muted { color: #666; } .bad { color: #c0392b; } .good { color: #1e8449; }
table { border-collapse: collapse; width: 100%; font-size: 13px; }
th, td { text-align: left; padding: 4px 8px; border-bottom: 1px solid #eee; vertical-align: top; }
th { background: #fafafa; font-weight: 600; } td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
dl.summary { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; margin: 12px 0; }
dl.summary dt { color: #666; } dl.summary dd { margin: 0; }
figure { margin: 8px 0; } figure svg { width: 100%; height: auto; }
.incident { border-left: 4px solid #c0392b; background: #fdf3f2; padding: 8px 12px; margin: 10px 0; }
.incident dl { display: grid; grid-template-columns: max-content 1fr; gap: 1px 12px; margin: 4px 0; }
.incident dt { color: #666; } .incident dd { margin: 0; }
pre { background: #272822; color: #f8f8f2; padding: 8px; overflow-x: auto; font-size: 12px; }
code { font-size: 12px; }
"""


def esc(value: Any) -> str:
    """Any value as HTML text (the journal is data: a detail may hold ``<`` or quotes)."""
    return html.escape("" if value is None else str(value), quote=True)


def _steps(n: int | None) -> str:
    return "" if n is None else f"{n} step{'s' if n != 1 else ''}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    return f"{hours}h {rest // 60:02d}m {rest % 60:02d}s" if hours else f"{rest // 60}m {rest % 60:02d}s"


def _peak(host: int | None, gpu: int | None, cgroup: int | None = None) -> str:
    parts = [format_bytes(host) if host is not None else "n/a"]
    if cgroup is not None:
        parts.append(f"cgroup {format_bytes(cgroup)}")
    if gpu is not None:
        parts.append(f"GPU {format_bytes(gpu)}")
    return ", ".join(parts)


def _summary(record: RunRecord) -> str:
    spec = record.spec
    epochs_done = max((len(points) for points in record.curves.values()), default=0)
    rows = [
        ("status", f'<span class="{"good" if record.status == "completed" else "bad"}">{esc(record.status)}</span>'),
        ("model", esc(spec.model_name) if spec else "n/a"),
        ("epochs", f"{epochs_done} of {spec.epochs}" if spec else str(epochs_done)),
        ("started", esc(record.started.isoformat(timespec="seconds").replace("+00:00", " UTC"))
         if record.started else "n/a"),
        ("wall time", _duration(record.duration)),
        ("attempts", f"{len(record.attempts)} ({len(record.incidents)} incident"
                     f"{'s' if len(record.incidents) != 1 else ''})"),
        ("plan in force", esc(record.plan.describe()) if record.plan else "n/a"),
    ]
    if spec and record.plan and spec.initial_plan != record.plan:
        rows.append(("asked for", esc(spec.initial_plan.describe())))
    final = {name: points[-1].value for name, points in record.curves.items() if points}
    if final:
        rows.append(("last epoch", esc(", ".join(f"{k}={v:.4g}" for k, v in sorted(final.items())))))
    rows.append(("run directory", f"<code>{esc(record.path)}</code>"))
    return '<dl class="summary">' + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in rows) + "</dl>"


def _figure(svg: str | None, caption: str, empty: str) -> str:
    if svg is None:
        return f'<p class="muted">{esc(empty)}</p>'
    return f"<figure>{svg}<figcaption class=\"muted\">{esc(caption)}</figcaption></figure>"


def _incident(view: IncidentView) -> str:
    where = ", ".join(part for part in (
        f"attempt {view.attempt}" if view.attempt is not None else "",
        f"epoch {view.epoch}" if view.epoch is not None else "",
        f"step {view.step}" if view.step is not None else "",
    ) if part)
    rows = [("what", esc(view.detail)), ("exit", esc(view.exit)), ("memory peak", esc(_peak(view.host_peak, view.gpu_peak)))]
    if view.error:
        rows.append(("worker's report", esc(view.error)))
    rows += [("evidence", "<br>".join(f"{esc(k)}: {esc(v if isinstance(v, str) else json.dumps(v))}"
                                      for k, v in view.evidence.items()) or "none recorded")]
    if view.checkpoint_step is not None:
        rows.append(("resumed from", f"checkpoint at step {view.checkpoint_step} "
                                     f"(lost {esc(_steps(view.steps_lost)) or 'n/a'})"))
    rows.append(("action", f"<strong>{esc(view.action or 'none recorded')}</strong>"))
    if view.plan_after and view.plan_after != view.plan_before:
        rows.append(("plan", f"{esc(view.plan_before)} &rarr; {esc(view.plan_after)}"))
    elif view.plan_before:
        rows.append(("plan", f"{esc(view.plan_before)} (kept)"))
    log = ""
    if view.log:
        tail = "\n".join(view.log_tail)
        log = (f"<details><summary>last lines of <code>{esc(view.log)}</code> (the full log is in the run "
               f"directory)</summary><pre>{esc(tail)}</pre></details>")
    body = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in rows)
    return (f'<div class="incident"><h3>{esc(view.kind)} <span class="muted">{esc(where)}'
            f"{esc(f' at {_duration(view.seconds)}') if view.seconds is not None else ''}</span></h3>"
            f"<dl>{body}</dl>{log}</div>")


def _attempt_row(a: Attempt) -> str:
    cells = [
        f'<td class="num">{a.attempt}</td>',
        f"<td>{esc(a.plan)}{' <span class=muted>(probe)</span>' if a.probe else ''}</td>",
        f"<td>{esc(_duration(a.started))}</td>",
        f"<td>{esc(_duration(a.ended - a.started) if a.ended is not None and a.started is not None else 'n/a')}</td>",
        f'<td class="num">{esc(a.resumed_from if a.resumed_from is not None else "")}</td>',
        f"<td>{esc(a.exit)}</td>",
        f"<td>{esc(_peak(a.host_peak, a.gpu_peak, a.cgroup_peak))}</td>",
        f'<td class="num">{esc(_steps(a.steps_lost))}</td>',
        f'<td class="{"good" if a.outcome == "completed" else "bad"}">{esc(a.outcome)}</td>',
        f"<td><code>{esc(a.log or '')}</code></td>",
    ]
    return f"<tr>{''.join(cells)}</tr>"


def _attempts(record: RunRecord) -> str:
    if not record.attempts:
        return '<p class="muted">No attempt started.</p>'
    head = ("<tr><th class=num>#</th><th>plan</th><th>started</th><th>ran</th><th class=num>resumed from step</th>"
            "<th>exit</th><th>memory peak</th><th class=num>steps lost</th><th>outcome</th><th>log</th></tr>")
    return f"<table><thead>{head}</thead><tbody>{''.join(_attempt_row(a) for a in record.attempts)}</tbody></table>"


def _generations(record: RunRecord) -> str:
    saved = record.checkpoints
    lines = [f"<p>{len(saved)} checkpoint{'s' if len(saved) != 1 else ''} saved"
             + (f", {len(record.generations)} generations kept" if saved else "") + ". In checkpoints/ now:</p>"]
    if not record.generations:
        return lines[0].replace(" In checkpoints/ now:", " No generation is on disk.")
    rows = "".join(
        f"<tr><td><code>{esc(g['name'])}</code></td><td class=num>{esc(g['step'])}</td><td class=num>{esc(g['epoch'])}"
        f"</td><td>{esc(g['created'])}</td><td>{esc(g['plan'] or '')}</td><td class=num>{esc(format_bytes(g['bytes']))}"
        f"</td><td class=\"{'bad' if g['damaged'] else 'good'}\">{esc(g['damaged'] or 'verified')}</td></tr>"
        for g in record.generations)
    head = ("<tr><th>generation</th><th class=num>step</th><th class=num>epoch</th><th>created</th><th>plan</th>"
            "<th class=num>size</th><th>checksums</th></tr>")
    return lines[0] + f"<table><thead>{head}</thead><tbody>{rows}</tbody></table>"


def render(record: RunRecord, svgs: dict[str, str | None], png: bytes | None) -> str:
    """The whole page; ``svgs`` holds the inline figures (``curves``, ``memory``, ``checkpoints``)."""
    name = record.spec.model_name if record.spec else record.path.name
    incidents = "".join(_incident(v) for v in record.incidents) or '<p class="good">No incident: every attempt ' \
                                                                  "that started ran to its end.</p>"
    png_block = ""
    if png is not None:
        data = base64.b64encode(png).decode("ascii")
        png_block = ('<details><summary>The curves as a PNG (also written beside this file)</summary>'
                     f'<img alt="training curves (PNG)" style="max-width:100%" src="data:image/png;base64,{data}">'
                     "</details>")
    source = ("sampled by the supervisor" if record.memory_source == "samples"
              else "each attempt's peak, held over the attempt: this journal has no memory samples")
    return "".join([
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>resilient report: {esc(name)}</title><style>{_CSS}</style></head><body><main>",
        f"<h1>Training report: {esc(name)}</h1>", _summary(record),
        '<h2 id="curves">Training curves</h2>',
        _figure(svgs.get("curves"), "Per-epoch loss and metrics (training, validation) at the step each epoch ended; red lines: "
                "incidents, blue dashed: plan changes, at the step where they happened.", "No epoch finished yet: nothing to draw."),
        png_block,
        '<h2 id="incidents">Incidents</h2>', incidents,
        '<h2 id="attempts">Attempts</h2>', _attempts(record),
        '<h2 id="memory">Memory</h2>',
        _figure(svgs.get("memory"), f"Memory over time against the limits (dashed); {source}. Red lines: incidents.",
                "The journal holds no memory figures for this run."),
        '<h2 id="checkpoints">Checkpoints</h2>',
        _figure(svgs.get("checkpoints"), "Each attempt's progress (grey), every checkpoint saved, and each incident.",
                "No checkpoint was saved."),
        _generations(record),
        f'<p class="muted">Built by <code>resilient report</code> from {esc(record.path)} alone.</p>',
        "</main></body></html>\n",
    ])
