"""``python -m resilient status RUN_DIR``: what happened to a run, read from its directory alone."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, TextIO

from ._checkpoint import CheckpointStore
from ._plan import Plan
from ._rundir import RunDir
from ._units import format_bytes
from .supervisor.report import latest_checkpoint


def summarize(path: str | Path) -> str:
    """A plain-text account of the run in ``path``: plan, attempts, incidents, checkpoint, outcome."""
    run = RunDir(path)
    if not run.exists():
        raise FileNotFoundError(f"{run.path} holds no resilient run (no run.json). Expected a run_dir passed to fit.")
    spec = run.read_spec()
    plan = run.read_plan() if run.plan_json.exists() else spec.initial_plan
    events = run.read_events()
    lines = [f"run {run.path}", f"  model {spec.model_name}, {spec.epochs} epochs, seed {spec.seed}",
             f"  plan in force: {plan.describe()}"]
    if plan != spec.initial_plan:
        lines.append(f"  (asked for: {spec.initial_plan.describe()})")
    ended = {e["attempt"]: e for e in events if e["event"] == "attempt_ended"}
    incidents = {e["attempt"]: e for e in events if e["event"] == "incident"}
    epochs = [e for e in events if e["event"] == "epoch_end"]
    rates = {e["attempt"]: e.get("samples_per_s") for e in events if e["event"] == "throughput_measured"}
    verdicts = {e["attempt"]: e for e in events if e["event"] in ("probe_succeeded", "probe_rejected")}
    held = {e["attempt"]: e for e in events if e["event"] in ("probe_skipped", "probe_unjudged")}
    lines.append("  attempts:")
    for e in (e for e in events if e["event"] == "attempt_started"):
        a = e["attempt"]
        end = ended.get(a, {})
        status = end.get("signal") or (f"exit {end['returncode']}" if "returncode" in end else "running or lost")
        inc = incidents.get(a)
        what = f"{inc['kind']}: {inc.get('detail', '')}" if inc else ("completed" if end.get("returncode") == 0 else "")
        if end.get("interrupted"):
            what = "interrupted (Ctrl-C)"
        if e.get("probe"):
            what = f"probe; {what}" if what else "probe"
        if rates.get(a) is not None:
            what = f"{what}; {rates[a]:.1f} samples/s" if what else f"{rates[a]:.1f} samples/s"
        peak = format_bytes(end.get("memory_peak_bytes"))
        if end.get("gpu_memory_peak_bytes") is not None:
            peak += f", GPU {format_bytes(end['gpu_memory_peak_bytes'])}"
        lines.append(f"    {a:>3}  {Plan.model_validate(e['plan']).describe():<30} {status:<14} "
                     f"peak {peak:<10} {what}")
        if inc and inc.get("action"):
            lines.append(f"         -> {inc['action']}")
        verdict = verdicts.get(a)
        if verdict:
            kept = "kept" if verdict["event"] == "probe_succeeded" else "rejected"
            lines.append(f"         -> probe {kept}: {verdict.get('reason', '')}")
        note = held.get(a)
        if note and note["event"] == "probe_skipped":
            lines.append(f"         -> probe {Plan.model_validate(note['plan']).describe()} not started: "
                         f"{note.get('reason', '')}")
        elif note:
            lines.append(f"         -> the run completed on this probe before it was judged; plan.json keeps "
                         f"{Plan.model_validate(note['working']).describe()}")
    if epochs:
        last = epochs[-1]
        logs = ", ".join(f"{k}={v:.4g}" for k, v in sorted(last.get("logs", {}).items()))
        lines.append(f"  last epoch finished: {last['epoch']} (step {last['step']}) {logs}")
    ckpt = latest_checkpoint(run)
    lines.append(f"  last checkpoint: step {ckpt.step}, epoch {ckpt.epoch}, sample {ckpt.offset}"
                 if ckpt else "  last checkpoint: none")
    lines += _damage_lines(run, events)
    finished = [e for e in events if e["event"] == "run_finished"]
    lines.append(f"  status: {finished[-1]['status'] if finished else 'not finished (running, or its session died)'}")
    return "\n".join(lines)


def _damage_lines(run: RunDir, events: list[dict[str, Any]]) -> list[str]:
    """Damaged checkpoints: the generations that do not verify now, and those attempts found and skipped."""
    good, damaged = CheckpointStore(run.checkpoints).survey()
    lines = [f"  damaged checkpoint: {path.name} ({why}); a resume skips it" for path, why in damaged]
    if damaged and good is not None:
        lines.append(f"  a resume starts from: step {good.step} ({good.path.name}, verified)")
    elif damaged:
        lines.append("  no checkpoint verifies: fit refuses to resume this run; restore a copy of checkpoints/, or "
                     "delete it (or pass a new run_dir) to start over")
    seen = {path.name for path, _ in damaged}
    for e in events:
        name = Path(str(e.get("path", ""))).name
        if e["event"] == "checkpoint_corrupt" and name not in seen:
            seen.add(name)
            lines.append(f"  damaged checkpoint skipped by attempt {e.get('attempt')}: {name} ({e.get('reason', '')})")
    return lines


def add_command(subparsers: Any) -> None:
    parser = subparsers.add_parser("status", help="summarize a run directory", description=summarize.__doc__)
    parser.add_argument("run_dir", help="the run_dir passed to resilient.fit")
    parser.set_defaults(handler=_status)


def _status(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    try:
        print(summarize(args.run_dir), file=out)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=err)
        return 2
    return 0
