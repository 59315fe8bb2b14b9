"""What resilient costs when nothing goes wrong, and how fast it comes back when something does.

Same small CNN (two conv blocks and a dense head, ~0.14 M parameters) on the same synthetic-but-learnable
32x32x3 data, side by side in one run:

1. steady-state throughput: resilient.fit (default checkpoint_every="auto") / plain model.fit
   in this process; median samples/s over the epochs after the first.       target >= 0.97
2. whole-run wall time of a ~60 s training: resilient.fit(...) (worker start included) /
   model.fit(...) (its own compile included), same epochs.                   target <= 1.10
3. recovery after a rehearsed crash (faults="segfault@N"): fault -> first resumed step,
   divided by the cold start (attempt 0 started -> its first step).          target <= 1.3

    python bench/bench_overhead.py            # ~3.5 min on 2 cores (plain / resilient / plain, 60 s each)
    python bench/bench_overhead.py --quick    # ~1.5 min (15 s trainings, one crash)

See bench/README.md for how each number is taken from the journal.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import _common as C
import keras

import resilient

#: An epoch counts as "quiet" when other processes and hypervisor steal took fewer cores than this.
QUIET = 0.25


class EpochTimer(keras.callbacks.Callback):
    """Plain model.fit's clock: train begin and every epoch end; stops once ``budget`` seconds are used."""

    def __init__(self, budget: float | None = None, min_epochs: int = 3) -> None:
        super().__init__()
        self.budget = budget
        self.min_epochs = min_epochs
        self.begin = 0.0
        self.ends: list[float] = []
        self.begins: list[float] = []

    def on_train_begin(self, logs=None):
        self.begin = time.time()

    def on_epoch_begin(self, epoch, logs=None):
        self.begins.append(time.time())

    def on_epoch_end(self, epoch, logs=None):
        now = time.time()
        self.ends.append(now)
        if self.budget is None or len(self.ends) < self.min_epochs:
            return
        last = now - (self.ends[-2] if len(self.ends) > 1 else self.begin)
        if now - self.begin + 0.5 * last >= self.budget:
            self.model.stop_training = True


class EpochMarks(keras.callbacks.Callback):
    """Carried into the worker: appends the wall time of every epoch begin and end to ``path``."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def _mark(self, what, epoch):
        with open(self.path, "a") as f:
            f.write(json.dumps({"what": what, "epoch": epoch, "t": time.time()}) + "\n")

    def on_epoch_begin(self, epoch, logs=None):
        self._mark("begin", epoch)

    def on_epoch_end(self, epoch, logs=None):
        self._mark("end", epoch)


def between_epochs(begins: list[float], ends: list[float]) -> list[float]:
    """Seconds from each epoch's end to the next epoch's begin."""
    return [b - e for e, b in zip(ends, begins[1:])]


class StepMarks(keras.callbacks.Callback):
    """Carried into the worker: appends to ``path`` the wall time of the first step each process
    trains, and the time the global step is back at each rehearsed fault's step.

    The journal has no event for "first trained step of an attempt", so this is how the
    recovery benchmark sees it (see bench/README.md). Only the recovery run carries it.
    """

    def __init__(self, path: str, fault_steps: list[int]) -> None:
        super().__init__()
        self.path = path
        self.fault_steps = list(fault_steps)
        self.pid = -1
        self.first_iteration = None
        self.pending: list[int] = []

    def _mark(self, **fields):
        fields.update(pid=os.getpid(), t=time.time())
        with open(self.path, "a") as f:
            f.write(json.dumps(fields) + "\n")

    def on_train_batch_end(self, batch, logs=None):
        if self.pid != os.getpid():  # first step of this process (state is restored from checkpoints)
            self.pid = os.getpid()
            it = int(self.model.optimizer.iterations.numpy())
            self.first_iteration = it
            self._mark(what="first_step", iteration=it)
            self.pending = [s for s in self.fault_steps if s >= it]
            return
        if self.pending:
            it = int(self.model.optimizer.iterations.numpy())
            while self.pending and it >= self.pending[0]:
                self._mark(what="regained", iteration=it, fault_step=self.pending.pop(0))


class HoldForStandby(keras.callbacks.Callback):
    """Carried into the worker: at the end of epoch ``epoch`` (0-based), holds until the run's journal shows a
    warm standby that has finished importing (at most ``timeout`` s), and marks how long it held in ``path``.

    It stands in for a long run: the standby imports at the lowest CPU priority, so beside a training that
    keeps every core busy it takes minutes to get ready; a fault that late meets a ready standby. The hold
    is outside what the recovery figure measures (fault -> first resumed step)."""

    def __init__(self, path: str, run_dir: str, epoch: int, timeout: float = 180.0) -> None:
        super().__init__()
        self.path, self.run_dir, self.epoch, self.timeout = path, run_dir, epoch, timeout

    def on_epoch_end(self, epoch, logs=None):
        if epoch != self.epoch:
            return
        t0 = time.time()
        ready = False
        while not ready and time.time() - t0 < self.timeout:
            with open(Path(self.run_dir) / "events.jsonl") as f:
                ready = any('"standby_ready"' in line and json.loads(line).get("kind") == "standby" for line in f)
            if not ready:
                time.sleep(0.1)
        with open(self.path, "a") as f:
            f.write(json.dumps({"what": "held", "epoch": epoch, "seconds": time.time() - t0, "ready": ready,
                                "pid": os.getpid(), "t": time.time()}) + "\n")


# ----------------------------------------------------------------------------- phases


def plain_fit(x, y, batch, budget, max_epochs, mon, cpu):
    t0 = time.time()
    model = C.small_cnn(x.shape[1:])
    timer = EpochTimer(budget=budget)
    model.fit(x, y, batch_size=batch, epochs=max_epochs, verbose=0, callbacks=[timer])
    wall = time.time() - t0
    starts = [timer.begin, *timer.ends[:-1]]
    durations = [e - s for s, e in zip(starts, timer.ends)]
    return {"wall_s": wall, "epochs": len(timer.ends), "epoch_s": durations,
            "epoch_cpu_s": [cpu.between(s, e) for s, e in zip(starts, timer.ends)],
            "epoch_foreign_cores": [mon.between(s, e)["foreign_cores"] for s, e in zip(starts, timer.ends)],
            "epoch_steal_cores": [mon.between(s, e)["steal_cores"] for s, e in zip(starts, timer.ends)],
            "between_epochs_s": between_epochs(timer.begins, timer.ends),
            "cpu_s": cpu.between(t0, t0 + wall), "load": mon.between(t0, t0 + wall)}


def resilient_fit(x, y, batch, epochs, run_dir, mon, cpu):
    marks_path = str(Path(run_dir).with_suffix(".epochs.jsonl"))
    t0 = time.time()
    model = C.small_cnn(x.shape[1:])
    resilient.fit(model, x, y, batch_size=batch, epochs=epochs, verbose=0, run_dir=run_dir, seed=0,
                  callbacks=[EpochMarks(marks_path)])
    wall = time.time() - t0
    marks = [json.loads(line) for line in open(marks_path) if line.strip()]
    j = C.read_journal(run_dir)
    ready = C.events(j, "worker_ready")[0]["_t"]
    ends = [e["_t"] for e in C.events(j, "epoch_end")]
    starts = [ready, *ends[:-1]]
    saves = C.events(j, "checkpoint_saved")
    started = C.events(j, "attempt_started")[0]["_t"]
    finished = C.events(j, "run_finished")[-1]["_t"]
    return {
        "wall_s": wall, "epochs": len(ends), "epoch_s": [e - s for s, e in zip(starts, ends)],
        "epoch_cpu_s": [cpu.between(s, e) for s, e in zip(starts, ends)],
        "epoch_foreign_cores": [mon.between(s, e)["foreign_cores"] for s, e in zip(starts, ends)],
        "epoch_steal_cores": [mon.between(s, e)["steal_cores"] for s, e in zip(starts, ends)],
        "cpu_s": cpu.between(t0, t0 + wall),
        "between_epochs_s": between_epochs([m["t"] for m in marks if m["what"] == "begin"],
                                           [m["t"] for m in marks if m["what"] == "end"]),
        "checkpoints": len(saves), "checkpoint_reasons": sorted({s.get("reason", "?") for s in saves}),
        # The training thread's share: a background-written checkpoint pauses training for its snapshot only.
        "checkpoint_seconds_total": sum(s["snapshot_seconds"] if s.get("background") else s["seconds"] for s in saves),
        "checkpoint_snapshot_s": [s.get("snapshot_seconds") for s in saves],
        "checkpoint_write_s": [s.get("write_seconds") for s in saves],
        "checkpoint_bytes": saves[-1]["bytes"] if saves else None,
        "breakdown_s": {
            "before_worker (validate, save model and data)": started - t0,
            "worker start -> ready (import TF, load model)": ready - started,
            "training (ready -> last epoch_end)": ends[-1] - ready,
            "final checkpoint, exit, load weights into caller": (t0 + wall) - ends[-1],
            "run_finished journaled -> fit returned": (t0 + wall) - finished,
        },
        "memory_peak_bytes": C.events(j, "attempt_ended")[0].get("memory_peak_bytes"),
        "load": mon.between(t0, t0 + wall),
    }


def recovery_run(x, y, batch, epochs, fault_steps, run_dir, mon, policy=None, hold_for_standby=None):
    """``hold_for_standby``: the epoch at whose end the first attempt waits for a ready standby (HoldForStandby)."""
    marks_path = str(Path(run_dir).with_suffix(".marks.jsonl"))
    faults = ",".join(f"segfault@{s}" for s in fault_steps)
    t0 = time.time()
    model = C.small_cnn(x.shape[1:])
    callbacks = [StepMarks(marks_path, fault_steps)]
    if hold_for_standby is not None:
        callbacks.append(HoldForStandby(marks_path, str(run_dir), hold_for_standby))
    resilient.fit(model, x, y, batch_size=batch, epochs=epochs, verbose=0, run_dir=run_dir, seed=0,
                  faults=faults, callbacks=callbacks, **({"policy": policy} if policy is not None else {}))
    wall = time.time() - t0
    j = C.read_journal(run_dir)
    marks = [json.loads(line) for line in open(marks_path) if line.strip()]
    firsts = [m for m in marks if m["what"] == "first_step"]
    regained = {m["fault_step"]: m["t"] for m in marks if m["what"] == "regained"}
    started = {e["attempt"]: e["_t"] for e in C.events(j, "attempt_started")}
    ready = {e["attempt"]: e for e in C.events(j, "worker_ready")}
    ended = {e["attempt"]: e for e in C.events(j, "attempt_ended")}
    pids = {e["pid"]: a for a, e in ready.items()}
    first_step = {pids[m["pid"]]: m for m in firsts if m["pid"] in pids}

    # The journal's own first_step event (newer versions), else the StepMarks callback's stamp.
    journal_first = {e["attempt"]: e["_t"] for e in C.events(j, "first_step")}
    first_t = {a: journal_first.get(a, m["t"]) for a, m in first_step.items()}
    source = "journal first_step" if journal_first else "StepMarks callback (no first_step event in the journal)"

    cold = {
        "attempt": 0,
        "start -> ready (spawn, import TF, load model)": ready[0]["_t"] - started[0],
        "ready -> first step (data pipeline, trace, step)": first_t[0] - ready[0]["_t"],
        "total": first_t[0] - started[0],
        "total (callback stamp)": first_step[0]["t"] - started[0],
    }
    recoveries = []
    for fe in C.events(j, "fault_fired"):
        a = fe["attempt"]
        nxt = a + 1
        if nxt not in first_t:
            continue
        rec = {
            "attempt": nxt,
            "fault_step": fe["step"],
            "resumed_from_step": ready[nxt].get("resumed_from_step"),
            "fault -> death noticed (attempt_ended)": ended[a]["_t"] - fe["_t"],
            "death -> next attempt_started (classify, backoff)": started[nxt] - ended[a]["_t"],
            "start -> ready (spawn, import TF, load model, restore)": ready[nxt]["_t"] - started[nxt],
            "ready -> first step (data pipeline, trace, step)": first_t[nxt] - ready[nxt]["_t"],
            "total": first_t[nxt] - fe["_t"],
            "total (callback stamp)": first_step[nxt]["t"] - fe["_t"],
        }
        rec["steps_retrained"] = fe["step"] - (rec["resumed_from_step"] or 0)
        # Whether the restart took a warm standby, and whether it had finished importing by then.
        used = C.events(j, "standby_used", attempt=nxt)
        ready_t = [e["_t"] for e in C.events(j, "standby_ready") if used and e.get("pid") == used[0]["pid"]]
        rec["standby"] = ({"used": True, "imported": used[0]["imported"], "waited_seconds": used[0]["waited_seconds"],
                           "ready_before_fault_s": fe["_t"] - ready_t[0] if ready_t else None}
                          if used else {"used": False})
        if fe["step"] in regained:
            rec["fault -> back at the fault's step"] = regained[fe["step"]] - fe["_t"]
        recoveries.append(rec)
    incidents = [{"kind": e["kind"], "step": e["step"], "action": e["action"]} for e in C.events(j, "incident")]
    held = [m for m in marks if m["what"] == "held"]
    return {"wall_s": wall, "cold": cold, "recoveries": recoveries, "incidents": incidents, "first_step_source": source,
            "held_for_standby": held[0] if held else None, "load": mon.between(t0, t0 + wall)}


# ----------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="shorter runs (~15 s trainings, one rehearsed crash)")
    ap.add_argument("--seconds", type=float, default=None, help="length of the plain training (default 60, quick 15)")
    ap.add_argument("--samples", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--keep", action="store_true", help="keep the run directories")
    args = ap.parse_args()
    budget = args.seconds or (15.0 if args.quick else 60.0)

    x, y = C.image_data(args.samples)
    steps_per_epoch = -(-args.samples // args.batch)
    tmp = Path(tempfile.mkdtemp(prefix="bench_overhead_"))
    print(f"bench_overhead: {args.samples} samples of 32x32x3, batch {args.batch} ({steps_per_epoch} steps/epoch), "
          f"~{budget:.0f} s trainings, order plain / resilient / plain; run dirs in {tmp}", flush=True)
    try:
        with C.CpuMonitor() as mon, C.TreeCpu() as cpu:
            print("  plain model.fit (1) ...", flush=True)
            plain_a = plain_fit(x, y, args.batch, budget, 1000, mon, cpu)
            epochs = plain_a["epochs"]
            print(f"  resilient.fit, {epochs} epochs ...", flush=True)
            res = resilient_fit(x, y, args.batch, epochs, tmp / "steady", mon, cpu)
            print(f"  plain model.fit (2), {epochs} epochs ...", flush=True)
            plain_b = plain_fit(x, y, args.batch, None, epochs, mon, cpu)
            if args.quick:
                fault_steps, rec_epochs = [steps_per_epoch + steps_per_epoch // 2], 2
            else:
                fault_steps, rec_epochs = [steps_per_epoch + steps_per_epoch // 2, 2 * steps_per_epoch + steps_per_epoch // 2], 3
            print(f"  resilient.fit with faults segfault@{fault_steps}, {rec_epochs} epochs ...", flush=True)
            rec = recovery_run(x, y, args.batch, rec_epochs, fault_steps, tmp / "recovery", mon)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    n = args.samples

    def rates(*runs):
        wall, cpu_, quiet = [], [], []
        for run in runs:
            wall += [n / d for d in run["epoch_s"][1:]]
            cpu_ += [n / c for c in run["epoch_cpu_s"][1:] if c > 0]
            quiet += [n / d for d, f, st in zip(run["epoch_s"][1:], run["epoch_foreign_cores"][1:], run["epoch_steal_cores"][1:])
                      if f == f and st == st and f + st < QUIET]
        return wall, cpu_, quiet

    plain_sps, plain_cpu, plain_quiet = rates(plain_a, plain_b)
    res_sps, res_cpu, res_quiet = rates(res)
    p_med, r_med = C.median(plain_sps), C.median(res_sps)
    thr_ratio = r_med / p_med
    cpu_ratio = C.median(res_cpu) / C.median(plain_cpu)
    quiet_ratio = (C.median(res_quiet) / C.median(plain_quiet)
                   if len(plain_quiet) >= 2 and len(res_quiet) >= 2 else float("nan"))
    plain_wall = (plain_a["wall_s"] + plain_b["wall_s"]) / 2
    wall_ratio = res["wall_s"] / plain_wall
    cpu_wall_ratio = res["cpu_s"] / ((plain_a["cpu_s"] + plain_b["cpu_s"]) / 2)
    cold_total = rec["cold"]["total"]
    first_rec = rec["recoveries"][0] if rec["recoveries"] else None
    rec_ratio = first_rec["total"] / cold_total if first_rec else float("nan")

    print()
    print("throughput and wall time (same model, data, batch and epochs; sps = samples/s over the epochs after the first)")
    rows = []
    for name, run in (("plain model.fit (1)", plain_a), ("resilient.fit", res), ("plain model.fit (2)", plain_b)):
        w, c, q = rates(run)
        rows.append([name, run["epochs"], run["epoch_s"][0], C.median(w), min(w), max(w), C.median(c), C.median(q),
                     len(q), run["wall_s"], run["cpu_s"], run["load"]["foreign_cores"], run["load"]["steal_cores"]])
    C.table(rows, ["", "epochs", "epoch0 s", "median sps", "min sps", "max sps", "per CPU-s", "quiet sps",
                   "quiet n", "wall s", "CPU s", "other procs (cores)", "steal (cores)"])
    for name, run in (("plain (1)", plain_a), ("resilient", res), ("plain (2)", plain_b)):
        print(f"  {name:<10} epoch s:", " ".join(f"{d:.2f}" for d in run["epoch_s"]),
              "| other procs:", " ".join(f"{f:.2f}" for f in run["epoch_foreign_cores"]),
              "| steal:", " ".join(f"{f:.2f}" for f in run["epoch_steal_cores"]))
    print(f"time between one epoch's end and the next one's begin (median): plain "
          f"{C.median(plain_a['between_epochs_s'] + plain_b['between_epochs_s']):.3f} s, resilient worker "
          f"{C.median(res['between_epochs_s']):.3f} s (max {max(res['between_epochs_s'] or [float('nan')]):.3f} s; "
          "epoch-end checkpoint, model.fit return, next epoch's pipeline)")
    ck_pct = 100 * res["checkpoint_seconds_total"] / max(1e-9, res["breakdown_s"]["training (ready -> last epoch_end)"])
    print(f"resilient checkpoints: {res['checkpoints']} ({', '.join(res['checkpoint_reasons'])}), "
          f"{res['checkpoint_seconds_total']:.2f} s in all = {ck_pct:.2f}% of training time, "
          f"{res['checkpoint_bytes']} bytes each")
    print("resilient.fit wall time, where it went:")
    C.table([[k, v] for k, v in res["breakdown_s"].items()], ["phase", "seconds"])
    print()
    print(f"cold start vs recovery after a rehearsed segfault (seconds; first step from the {rec['first_step_source']})")
    keys = ["start -> ready (spawn, import TF, load model)", "ready -> first step (data pipeline, trace, step)"]
    rows = [["cold start (attempt 0)", "-", "-", rec["cold"][keys[0]], rec["cold"][keys[1]], cold_total, "-", "-"]]
    for r in rec["recoveries"]:
        rows.append([
            f"recovery -> attempt {r['attempt']} (fault @{r['fault_step']})",
            r["fault -> death noticed (attempt_ended)"], r["death -> next attempt_started (classify, backoff)"],
            r["start -> ready (spawn, import TF, load model, restore)"],
            r["ready -> first step (data pipeline, trace, step)"], r["total"], r["steps_retrained"],
            r.get("fault -> back at the fault's step", float("nan")),
        ])
    C.table(rows, ["", "notice death", "classify+backoff", "start->ready", "ready->1st step", "total",
                   "steps redone", "back at fault step"])
    if first_rec:
        print(f"  the same from the callback's stamp: recovery {first_rec['total (callback stamp)']:.2f} s / cold start "
              f"{rec['cold']['total (callback stamp)']:.2f} s = "
              f"{first_rec['total (callback stamp)'] / rec['cold']['total (callback stamp)']:.3f}")
    print()
    print(f"info  steady-state ratio in samples per CPU-second (caller + worker): {cpu_ratio:.3f}; "
          f"over quiet epochs only (other processes + steal < {QUIET} cores): {quiet_ratio:.3f}")
    agg = lambda *runs: n * sum(len(r["epoch_s"]) - 1 for r in runs) / sum(sum(r["epoch_s"][1:]) for r in runs)  # noqa: E731
    mean_ratio = agg(res) / agg(plain_a, plain_b)
    print(f"info  steady-state ratio from total samples / total time of epochs 2..{epochs} (not the median): {mean_ratio:.3f}")
    print(f"info  whole-run CPU-seconds ratio (resilient / model.fit): {cpu_wall_ratio:.3f}")
    results = [
        C.summary("steady-state throughput ratio (resilient / model.fit)", thr_ratio, ">=", 0.97,
                  f"{r_med:.0f} vs {p_med:.0f} samples/s, median of epochs 2..{epochs}, plain pooled over both runs"),
        C.summary("whole-run wall-time ratio (resilient / model.fit)", wall_ratio, "<=", 1.10,
                  f"{res['wall_s']:.1f} s vs {plain_wall:.1f} s (mean of {plain_a['wall_s']:.1f}, {plain_b['wall_s']:.1f}), "
                  f"{epochs} epochs"),
        C.summary("recovery / cold start (first rehearsed segfault)", rec_ratio, "<=", 1.3,
                  f"{first_rec['total']:.2f} s vs {cold_total:.2f} s" if first_rec else "no recovery measured"),
    ]
    for r in rec["recoveries"][1:]:
        print(f"info  recovery / cold start after the crash at step {r['fault_step']}: {r['total'] / cold_total:.3f} "
              f"({r['total']:.2f} s; classify+backoff {r['death -> next attempt_started (classify, backoff)']:.2f} s)")
    spread = [max(r["epoch_s"][1:]) / min(r["epoch_s"][1:]) for r in (plain_a, res, plain_b) if len(r["epoch_s"]) > 2]
    if spread and min(spread) > 1.6:
        cpus = [c for r in (plain_a, res, plain_b) for c in r["epoch_cpu_s"][1:]]
        print(f"note: epoch wall times vary up to {max(spread):.1f}x within each run while CPU-seconds per epoch stay "
              f"within {min(cpus):.2f}-{max(cpus):.2f} s: the machine sometimes gives the training one core instead of two. "
              "Wall-clock medians then depend on which epochs were slow; the per-CPU-second ratio does not.")
    loads = [plain_a["load"]["foreign_cores"], res["load"]["foreign_cores"], plain_b["load"]["foreign_cores"]]
    loads = [v for v in loads if v == v]
    if loads and max(loads) - min(loads) > 0.2:
        print(f"note: other processes' CPU use differed between phases ({', '.join(f'{v:.2f}' for v in loads)} cores); "
              "the wall-clock ratios are biased by it; see the quiet-epoch and CPU-second ratios.")
    C.write_json("bench_overhead", {
        "args": vars(args), "environment": C.environment(), "samples": n, "batch": args.batch,
        "steps_per_epoch": steps_per_epoch, "plain_1": plain_a, "resilient": res, "plain_2": plain_b, "recovery": rec,
        "throughput_samples_per_s": {"plain_median": p_med, "resilient_median": r_med},
        "ratios_info": {"mean_based": mean_ratio, "per_cpu_second": cpu_ratio, "quiet_epochs": quiet_ratio, "whole_run_cpu_seconds": cpu_wall_ratio},
        "targets": results,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
