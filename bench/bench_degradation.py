"""How much throughput degradation keeps: the plan resilient settles on under a host-memory cap,
against the best batch size an exhaustive sweep finds under the same cap, and blind halving.

The model is built so that its memory grows with the batch on CPU: a 3x3 conv to 8 channels on
128x128x3 images followed by eight tanh layers at full resolution (each keeps its 0.5 MB/sample
activation for the backward pass), then pooling and a dense head: ~5 MB per sample in the
batch, at 100-300 samples/s on 2 cores. Everything runs in resilient workers, so all plans see the same
process, data pipeline and memory accounting:

1. calibrate: two uncapped runs (batch 128 and 256) give the worker's memory-cgroup peak
   (memory.max_usage_in_bytes, journaled as attempt_ended.cgroup_peak_bytes) per batch size;
   below ~batch 96 the worker's start-up peak dominates, so the slope comes from 128 and 256.
   The cap is footprint(128) - 16 samples' worth, ~footprint(112): batch 96 should fit, 128 not
   (override with --cap).
2. resilient.fit(batch_size=256, host_memory_limit=cap, policy=default with [probe] stable_steps=40):
   the kernel OOM-kills the worker in its memory cgroup; the host_oom ladder halves the batch,
   keeping the effective batch (256 = 64x4 ...), until it fits. Then the plan search measures the
   working plan's throughput and probes neighbouring micro-batches (up between the working and the
   failed one, down with more accumulation), keeping the fastest. The default policy waits 200 steps
   before measuring; 40 here so that the search fits in a few minutes of training (each plan is
   then measured from its step 11 over at least [probe] measure_seconds = 10 s of training). The run
   trains enough epochs (~16000 samples) for the search to finish and the settled plan to train on;
   the settled plan is the plan of the last attempt and its throughput is timed in that attempt.
3. sweep: resilient.fit(batch_size=b, same cap, no ladder, max_restarts=0) for b ascending in
   {8, 16, 32, 48, 64, 80, 96, 128, 192, 256} (quick: 16, 32, 64, 96, 128, 256) until the first
   OOM, each for ~2500 samples (~10 s of training); throughput of each plan that fits. These plans have no gradient accumulation, so they are
   the strict reference: the settled plan keeps the effective batch of 256 (accumulation costs a
   little) while a swept batch of 32 trains with another effective batch.
   Blind halving = the first of 256, 128, 64, ... that fits, without gradient accumulation.

Throughput: a callback carried into the worker stamps every training step; samples/s is
batch / median step interval, over the attempt's steps after the first two (no epoch boundaries).

Target: settled-plan throughput / best sweep throughput >= 0.9.

The search's own measurements (journal: throughput_measured, probe_started, probe_succeeded,
probe_rejected, probe_failed) are printed as a trace.

    python bench/bench_degradation.py            # ~10 min on 2 cores
    python bench/bench_degradation.py --quick    # ~6 min
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

import itertools

import _common as C
import keras

import resilient

REQUESTED = 256
HW = 128
TARGET = 0.9


class StepClock(keras.callbacks.Callback):
    """Carried into the worker: appends (pid, epoch, batch, time) for every training step."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        with open(self.path, "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "epoch": self.epoch, "batch": batch, "t": time.time()}) + "\n")


def build_model():
    keras.utils.set_random_seed(0)
    L = keras.layers
    inp = keras.Input((HW, HW, 3))
    h = L.Conv2D(8, 3, padding="same")(inp)
    for _ in range(8):
        h = L.Activation("tanh")(h)
    h = L.AveragePooling2D(8)(h)
    h = L.Flatten()(h)
    out = L.Dense(10)(h)
    model = keras.Model(inp, out, name="bench_memhungry")
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


MON = None  # the CpuMonitor of this run (other processes' CPU use per measurement)


def run(x, y, batch, cap, run_dir: Path, policy, max_restarts, epochs=1):
    """One resilient.fit; returns status, the final plan, incidents and step timing of the last attempt."""
    clock = str(run_dir) + ".steps.jsonl"
    t0 = time.time()
    status, error = "completed", None
    try:
        resilient.fit(build_model(), x, y, batch_size=batch, epochs=epochs, verbose=0, run_dir=run_dir, seed=0,
                      host_memory_limit=cap, policy=policy, max_restarts=max_restarts, callbacks=[StepClock(clock)])
    except resilient.TrainingFailedError as e:
        status, error = "failed", str(e).splitlines()[0]
    wall = time.time() - t0
    j = C.read_journal(run_dir)
    incidents = [{"kind": e["kind"], "attempt": e["attempt"], "step": e["step"], "action": e["action"],
                  "memory_peak_bytes": e.get("memory_peak_bytes"), "detail": e["detail"]} for e in C.events(j, "incident")]
    ended = C.events(j, "attempt_ended")
    ready = C.events(j, "worker_ready")
    started = C.events(j, "attempt_started")
    plan = json.loads((run_dir / "plan.json").read_text())
    probe_events = [e["event"] for e in j if e["event"].startswith("probe_")]
    trace = [{"event": e["event"], "attempt": e.get("attempt"),
              "plan": describe(e.get("plan") or e.get("to") or {}), "samples_per_s": e.get("samples_per_s"),
              "reason": e.get("reason")}
             for e in j if e["event"] == "throughput_measured" or e["event"].startswith("probe_")]
    steps = [json.loads(line) for line in open(clock)] if os.path.exists(clock) else []
    out = {
        "run_dir": str(run_dir), "requested_batch": batch, "cap": cap, "status": status, "error": error, "wall_s": wall,
        "attempts": len(started), "incidents": incidents, "final_plan": plan,
        "memory_peak_bytes": [e.get("memory_peak_bytes") for e in ended],
        # The memory cgroup's own peak (what the kernel enforces; page cache included). Journaled as
        # attempt_ended.cgroup_peak_bytes by newer versions; older ones journaled it as memory_peak_bytes.
        "cgroup_peak_bytes": [e.get("cgroup_peak_bytes", e.get("memory_peak_bytes")) for e in ended],
        "enforcement": sorted({e.get("mechanism", "?") for e in C.events(j, "memory_enforcement")}),
        "probe_events": probe_events, "search_trace": trace,
    }
    if status == "completed" and ready:
        last_pid = ready[-1]["pid"]
        mine = [s for s in steps if s["pid"] == last_pid]
        dts = [b["t"] - a["t"] for a, b in itertools.pairwise(mine) if a["epoch"] == b["epoch"]][1:]  # drop the first two steps
        micro = plan["batch_size"]
        med = C.median(dts)
        t_first = mine[2]["t"] if len(mine) > 2 else t0
        out.update(
            other_cores=MON.between(t_first, mine[-1]["t"])["foreign_cores"] if MON and mine else float("nan"),
            step_s_median=med, steps_timed=len(dts), samples_per_s=micro / med if dts else float("nan"),
            settle_s=(mine[0]["t"] - started[0]["_t"]) if mine else float("nan"),
            last_attempt_start_to_first_step_s=(mine[0]["t"] - started[-1]["_t"]) if mine else float("nan"),
        )
    return out


def bench_policy(stable_steps: int) -> resilient.Policy:
    """The default preset with a shorter stable stretch before the plan search measures and probes."""
    default = resilient.load_policy("default")
    return default.model_copy(update={"probe": default.probe.model_copy(update={"stable_steps": stable_steps})})


def describe(plan: dict) -> str:
    if not plan:
        return "-"
    return f"{plan['batch_size']}x{plan['grad_accum_steps']}" if plan.get("grad_accum_steps", 1) > 1 else str(plan["batch_size"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer samples and sweep points")
    ap.add_argument("--cap", type=float, default=None, help="host memory cap in GB (default: calibrated)")
    ap.add_argument("--samples", type=int, default=None, help="training samples (default 1024, quick 512)")
    ap.add_argument("--stable-steps", type=int, default=40, help="[probe] stable_steps for the resilient run")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    from resilient.supervisor.memory import cgroup_support

    ok, why = cgroup_support()
    print(f"bench_degradation: memory cgroup support: {ok} ({why})", flush=True)
    if not ok:
        print("MISS  no writable memory cgroup here; the psutil watchdog would enforce the cap instead. "
              "Run as root on a machine with cgroup v1 or a delegated v2 memory controller.")
        C.write_json("bench_degradation", {"environment": C.environment(), "cgroup": why, "targets": []})
        return 1

    n = args.samples or (512 if args.quick else 1024)
    x, y = C.image_data(n, hw=HW)
    tmp = Path(tempfile.mkdtemp(prefix="bench_degradation_"))
    no_ladder = resilient.Policy(ladders={})
    print(f"  {n} samples of {HW}x{HW}x3 ({x.nbytes / 1e6:.0f} MB), requested batch {REQUESTED}; run dirs in {tmp}",
          flush=True)
    calib = {}
    global MON
    MON = C.CpuMonitor().__enter__()
    try:
        # 1. calibration: footprints at 128 and 256 (smaller batches sit under the worker's start-up peak)
        if args.cap is None:
            for b in (128, 256):
                r = run(x, y, b, "32GB", tmp / f"calib-{b}", no_ladder, 0)
                calib[b] = r
                print(f"  calibration: batch {b}: worker memory-cgroup peak {C.gb(r['cgroup_peak_bytes'][-1]):.2f} GB "
                      f"(journal memory_peak_bytes {C.gb(r['memory_peak_bytes'][-1]):.2f} GB)", flush=True)
            p128, p256 = calib[128]["cgroup_peak_bytes"][-1], calib[256]["cgroup_peak_bytes"][-1]
            per_sample = max(1.0, (p256 - p128) / 128)
            cap_bytes = int(p128 - 16 * per_sample)  # ~ footprint(112): batch 96 fits, batch 128 does not
            print(f"  {per_sample / 1e6:.1f} MB per sample in the batch -> cap {cap_bytes / 1e9:.3f} GB "
                  f"(extrapolated footprint: 64 -> {(p128 - 64 * per_sample) / 1e9:.2f} GB, "
                  f"96 -> {(p128 - 32 * per_sample) / 1e9:.2f} GB, 128 -> {p128 / 1e9:.2f} GB)", flush=True)
        else:
            cap_bytes = int(args.cap * 1e9)
            per_sample = None
        cap = cap_bytes

        # 2. resilient under the cap, default policy
        policy = bench_policy(args.stable_steps)
        epochs = max(2, -(-16000 // n))
        print(f"  resilient.fit(batch_size={REQUESTED}, epochs={epochs}, host_memory_limit={cap / 1e9:.2f} GB, "
              f"policy=default with [probe] stable_steps={args.stable_steps}) ...", flush=True)
        settled = run(x, y, REQUESTED, cap, tmp / "resilient", policy, None, epochs=epochs)
        settled["probe"] = {**policy.probe.model_dump(), "events": settled["probe_events"]}
        print(f"    -> {settled['status']} after {settled['attempts']} attempt(s); final plan "
              f"{describe(settled['final_plan'])}", flush=True)

        # 3. exhaustive sweep, ascending until the first OOM
        sweep_sizes = [8, 16, 32, 48, 64, 80, 96, 128, 192, 256] if not args.quick else [16, 32, 64, 96, 128, 256]
        sweep = []
        sweep_epochs = max(1, -(-2500 // n))  # ~10 s of training per plan
        for b in sweep_sizes:
            r = run(x, y, b, cap, tmp / f"sweep-{b}", no_ladder, 0, epochs=sweep_epochs)
            kinds = [i["kind"] for i in r["incidents"]]
            fits = r["status"] == "completed"
            sweep.append({"batch": b, "fits": fits, "incident": kinds[0] if kinds else None, **r})
            print(f"  sweep: batch {b}: {'fits' if fits else 'does not fit (' + ','.join(kinds) + ')'}"
                  + (f", {r['samples_per_s']:.0f} samples/s" if fits else ""), flush=True)
            if not fits:
                break
    finally:
        MON.__exit__(None, None, None)
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    fitting = [s for s in sweep if s["fits"]]
    best = max(fitting, key=lambda s: s["samples_per_s"]) if fitting else None
    # Blind halving: 256, 128, 64, ... without accumulation; the first that fits. Sizes above the
    # sweep's first OOM are taken not to fit (memory grows with the batch).
    first_oom = min((s["batch"] for s in sweep if not s["fits"]), default=None)
    halving, b = None, REQUESTED
    while b >= 1 and halving is None:
        hit = next((s for s in sweep if s["batch"] == b), None)
        if hit is not None and hit["fits"]:
            halving = hit
        elif hit is None and (first_oom is None or b < first_oom):
            break  # not measured
        b //= 2
    print()
    print(f"cap {cap / 1e9:.2f} GB (memory cgroup), requested batch {REQUESTED}, {n} samples")
    rows = [[f"batch {s['batch']}", "yes" if s["fits"] else f"no ({s['incident']})",
             C.gb(s["cgroup_peak_bytes"][-1]), s.get("samples_per_s", float("nan")), s.get("step_s_median", float("nan")),
             s.get("steps_timed", 0), s.get("other_cores", float("nan"))]
            for s in sweep]
    C.table(rows, ["sweep plan", "fits", "cgroup peak GB", "samples/s", "median step s", "steps timed", "other procs (cores)"])
    print()
    print("resilient's attempts:")
    C.table([[i["attempt"], i["kind"], C.gb(settled["cgroup_peak_bytes"][k]), i["action"]]
             for k, i in enumerate(settled["incidents"])]
            + [[settled["attempts"] - 1, settled["status"], C.gb(settled["cgroup_peak_bytes"][-1]),
                f"settled on {describe(settled['final_plan'])}"]],
            ["attempt", "ended", "cgroup peak GB", "action"])
    searched = settled["attempts"] - 1 - len(settled["incidents"])
    print(f"time from the run's first attempt to the settled plan's first step: {settled.get('settle_s', float('nan')):.1f} s "
          f"({len(settled['incidents'])} attempt(s) ended by an incident, {searched} restart(s) of the plan search)")
    probe = settled["probe"]
    print(f"plan search ([probe] objective={probe['objective']}, stable_steps={probe['stable_steps']}, "
          f"max_probes={probe['max_probes']}, min_gain={probe['min_gain']}, min_batch={probe['min_batch']}):")
    C.table([[t["attempt"], t["event"], t["plan"], t["samples_per_s"] if t["samples_per_s"] is not None else "-",
              t["reason"] or ""] for t in settled["search_trace"]],
            ["attempt", "event", "plan", "samples/s (search)", "reason"])
    print()
    s_sps = settled.get("samples_per_s", float("nan"))
    best_sps = best["samples_per_s"] if best else float("nan")
    ratio = s_sps / best_sps
    rows = [
        ["resilient settled plan", describe(settled["final_plan"]), s_sps, ratio, settled.get("other_cores", float("nan"))],
        ["best of the sweep", best["batch"] if best else "-", best_sps, 1.0,
         best.get("other_cores", float("nan")) if best else float("nan")],
        ["blind halving (256, 128, ...)", halving["batch"] if halving else "-",
         halving["samples_per_s"] if halving else float("nan"),
         (halving["samples_per_s"] / best_sps) if halving else float("nan"),
         halving.get("other_cores", float("nan")) if halving else float("nan")],
    ]
    C.table(rows, ["", "plan", "samples/s", "/ best", "other procs (cores)"])
    print()
    results = [
        C.summary("settled-plan throughput / best sweep throughput", ratio, ">=", TARGET,
                  f"{describe(settled['final_plan'])} vs batch {best['batch'] if best else '-'}"),
    ]
    if halving:
        print(f"info  settled plan / blind halving: {s_sps / halving['samples_per_s']:.3f}; "
              f"blind halving / best: {halving['samples_per_s'] / best_sps:.3f}")
    C.write_json("bench_degradation", {
        "args": vars(args), "environment": C.environment(), "samples": n, "requested_batch": REQUESTED,
        "cap_bytes": cap, "per_sample_bytes": per_sample, "calibration": calib, "resilient": settled,
        "sweep": sweep, "best_batch": best["batch"] if best else None,
        "blind_halving_batch": halving["batch"] if halving else None, "targets": results,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
