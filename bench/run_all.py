"""All of resilient's performance targets in one table, every figure a ratio measured side by side in one run.

The same small CNN (bench/_common.py: two conv blocks and a dense head, ~0.14 M parameters) on the same
synthetic-but-learnable 32x32x3 images, batch 64:

1. steady-state throughput, resilient.fit / model.fit: median samples/s over the epochs after the
   first (plain model.fit runs before and after resilient, pooled).               target >= 0.99
2. whole-run wall time of a ~60 s training, resilient.fit / model.fit (the worker's start, the
   storing of model and data and the final load included).                         target <= 1.05
3. recovery after a rehearsed segfault (fault -> first resumed step) / cold start of a fresh
   worker (spawn -> first step), with the warm standby worker and with it off.     target <= 0.35
   The fault comes in the third of four epochs, and the run with the standby holds at the end of the
   second until its standby is ready: the standby imports at the lowest CPU priority, so beside a
   training that keeps both cores busy it is ready only minutes in, as in the long runs the target is
   about. The hold is outside the figure; a standby used before it had imported is flagged.
4. steps redone: after a SIGKILL at a seeded random step (auto checkpoints) and after a real
   cgroup OOM kill of a worker whose memory climbs (pressure checkpoint), side by side with
   Keras's BackupAndRestore on the same training and the same kill.               target <= 2 (OOM)
5. checkpoint cost as a share of training time at the auto cadence, and the interval chosen.
                                                                                    target < 1%

    python bench/run_all.py            # ~9 min on 2 cores
    python bench/run_all.py --quick    # ~4 min (15 s trainings)
    python bench/run_all.py --only oom        # the cgroup OOM comparison alone, ~2 min
    python bench/run_all.py --only recovery   # the recovery phase alone, ~1 min

The OOM comparison's limit is the clean training's peak (a probe run of the same epochs without the
leak, the worker's memory cgroup's peak), plus a margin, plus what the leak holds after
LEAK_ROOM_EPOCHS epochs: the training's own peaks (epoch ends, checkpoints) always fit, so the leak
alone kills, mid-epoch, both resilient's worker and the Keras process.

"Steps redone" counts the training steps a run computed beyond an uninterrupted run of the same
length: a callback carried into every process (resilient's workers, Keras's processes alike) logs
each trained batch to a file, and the count is compared with epochs x steps per epoch. Keras's
BackupAndRestore saves weights (not the optimizer) every ``save_freq`` batches and, after a kill,
restarts the interrupted epoch from its first batch on the saved weights, so it both redoes steps
and trains the batches before its last save twice; that figure is printed too.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import itertools

import _common as C

#: The memory a leaking training adds per step (MiB) in the OOM comparison.
LEAK_MIB_PER_STEP = 1
#: The OOM comparison's limit: the clean training's peak (a probe run of the same epochs, whole worker, as
#: its memory cgroup counts it), plus this margin for what varies between runs, plus the memory the leak
#: holds after LEAK_ROOM_EPOCHS epochs. The clean training's own peaks (epoch ends, checkpoints) then fit
#: under the limit whatever has leaked by then, and only the leak kills: mid-epoch, after about that much.
PEAK_MARGIN_MIB = 64
LEAK_ROOM_EPOCHS = 2.25
#: The SIGKILL comparison trains on this many times the samples: epochs of a few seconds, so that the auto
#: cadence's interval checkpoints fall between the epoch-end ones.
SIGKILL_SAMPLES_FACTOR = 4


# ----------------------------------------------------------------------------- callbacks carried into workers


def _callbacks() -> tuple[type, type]:
    import keras

    class BatchLog(keras.callbacks.Callback):
        """Appends one line per trained batch (process id, the optimizer's step, the epoch) to ``path``."""

        def __init__(self, path: str) -> None:
            super().__init__()
            self.path = path
            self.epoch = 0

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def on_train_batch_end(self, batch, logs=None):
            with open(self.path, "a") as f:
                f.write(f"{os.getpid()} {int(self.model.optimizer.iterations.numpy())} {self.epoch}\n")

    class Leak(keras.callbacks.Callback):
        """Holds ``mib`` more MiB after every step, in the first process only (``marker`` records it).

        The memory is held by the class, not the instance: resilient checkpoints a callback's ``__dict__``,
        and a leak held there would be written with every checkpoint (a spike as large as the leak at each
        save, and the leak restored on resume), which is not the leak this comparison is about.
        """

        held: list[Any] = []  # noqa: RUF012 (the point: shared, out of the instance's checkpointed state)

        def __init__(self, marker: str, mib: int) -> None:
            super().__init__()
            self.marker = marker
            self.mib = mib
            self.on = False

        def on_train_begin(self, logs=None):
            self.on = not os.path.exists(self.marker)
            if self.on:
                Path(self.marker).write_text(str(os.getpid()))

        def on_train_batch_end(self, batch, logs=None):
            if self.on:
                import numpy as np

                self.held.append(np.ones(self.mib << 18, dtype="float32"))  # touched: resident

    return BatchLog, Leak


def batches_logged(path: Path) -> list[tuple[int, ...]]:
    if not path.exists():
        return []
    return [tuple(int(v) for v in line.split()) for line in path.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------- Keras's BackupAndRestore, in child processes


def keras_child(cfg: dict[str, Any]) -> None:
    """One plain Keras process: model.fit with BackupAndRestore; killed at ``kill_at`` (first process only)."""
    import keras

    BatchLog, Leak = _callbacks()
    x, y = C.image_data(cfg["samples"])
    model = C.small_cnn(x.shape[1:])

    class KillAt(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.count = 0

        def on_train_batch_end(self, batch, logs=None):
            self.count += 1
            if cfg["kill_at"] is not None and not os.path.exists(cfg["killed_marker"]) and self.count >= cfg["kill_at"]:
                Path(cfg["killed_marker"]).write_text("killed")
                os.kill(os.getpid(), signal.SIGKILL)

    class LoggedBackup(keras.callbacks.BackupAndRestore):
        """Keras's callback, noting the optimizer step of each save (what a restore brings back)."""

        def _save_model(self):
            super()._save_model()
            with open(cfg["log"] + ".saves", "a") as f:
                f.write(f"{os.getpid()} {int(self.model.optimizer.iterations.numpy())}\n")

    callbacks = [LoggedBackup(cfg["backup_dir"], save_freq=cfg["save_freq"]),
                 BatchLog(cfg["log"]), KillAt()]
    if cfg.get("leak_mib"):
        callbacks.append(Leak(cfg["leak_marker"], cfg["leak_mib"]))
    model.fit(x, y, batch_size=cfg["batch"], epochs=cfg["epochs"], shuffle=True, verbose=0, callbacks=callbacks)


def keras_backup_run(cfg: dict[str, Any], cgroup_limit: int | None = None) -> dict[str, Any]:
    """Run the Keras child until it finishes (restarting it after each kill, at most 5 times)."""
    group = None
    if cgroup_limit is not None:
        from resilient.supervisor.memory import MemoryCgroup

        group = MemoryCgroup.create(cgroup_limit, name=f"bench-keras-{os.getpid()}")
    ends = []
    try:
        for _ in range(5):
            proc = subprocess.Popen([sys.executable, __file__, "--keras-child", json.dumps(cfg)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            if group is not None:
                group.add(proc.pid)  # before TensorFlow is imported: the child's memory is all charged to it
            _, err = proc.communicate(timeout=900)
            ends.append(proc.returncode)
            if proc.returncode == 0:
                break
            if proc.returncode != -signal.SIGKILL:
                raise RuntimeError(f"Keras child failed (exit {proc.returncode}):\n{err.decode()[-2000:]}")
    finally:
        if group is not None:
            group.remove()
    return {"exits": ends}


# ----------------------------------------------------------------------------- measurements


def steps_redone(log: Path, clean_steps: int) -> dict[str, Any]:
    lines = batches_logged(log)
    pids = list(dict.fromkeys(line[0] for line in lines))
    return {"trained": len(lines), "clean": clean_steps, "redone": len(lines) - clean_steps, "processes": len(pids)}


def sigkill_comparison(args, tmp: Path) -> dict[str, Any]:
    """A SIGKILL at a seeded random step: resilient (auto checkpoints) vs BackupAndRestore."""
    import resilient

    BatchLog, _ = _callbacks()
    samples = SIGKILL_SAMPLES_FACTOR * args.samples  # epochs long enough for interval checkpoints between them
    steps_per_epoch = -(-samples // args.batch)
    epochs = 3
    clean = epochs * steps_per_epoch
    kill_at = random.Random(args.seed).randint(steps_per_epoch + 1, clean - 2)
    x, y = C.image_data(samples)

    log = tmp / "sigkill_resilient.log"
    run_dir = tmp / "sigkill_resilient"
    model = C.small_cnn(x.shape[1:])
    resilient.fit(model, x, y, batch_size=args.batch, epochs=epochs, verbose=0, run_dir=run_dir, seed=0,
                  faults=f"sigkill@{kill_at}", callbacks=[BatchLog(str(log))])
    j = C.read_journal(run_dir)
    ready = [e for e in C.events(j, "worker_ready") if e.get("attempt") == 1]
    saves = [e for e in C.events(j, "checkpoint_saved") if e.get("attempt", 0) == 0]
    res = steps_redone(log, clean)
    res["kill_at"] = kill_at
    res["resumed_from_step"] = ready[0].get("resumed_from_step") if ready else None
    res["checkpoints_before_kill"] = len(saves)

    out: dict[str, Any] = {"resilient": res, "kill_at": kill_at, "clean_steps": clean}
    interval_steps = interval_in_steps(j) or steps_per_epoch
    for label, freq in (("BackupAndRestore(save_freq='epoch')", "epoch"),
                        (f"BackupAndRestore(save_freq={interval_steps})", interval_steps)):
        tag = "epoch" if freq == "epoch" else "steps"
        klog = tmp / f"sigkill_keras_{tag}.log"
        cfg = {"samples": samples, "batch": args.batch, "epochs": epochs, "kill_at": kill_at,
               "save_freq": freq, "backup_dir": str(tmp / f"backup_{tag}"), "log": str(klog),
               "killed_marker": str(tmp / f"killed_{tag}")}
        run = keras_backup_run(cfg)
        k = steps_redone(klog, clean)
        k["exits"] = run["exits"]
        k["trained_twice"] = twice_from_log(klog, steps_per_epoch)
        out[label] = k
    return out


def twice_from_log(log: Path, steps_per_epoch: int) -> int:
    """Batches Keras trained twice on weights that already held them.

    After a kill BackupAndRestore loads the weights of its last save and starts over at the first
    batch of the epoch its metadata names (a save at an epoch's last batch still names that epoch:
    ``on_epoch_end`` has not run yet). The batches between that epoch's start and the save are in
    the weights and are trained again. The first process's saves are logged with their optimizer
    step (its optimizer started at 0: the global step); the second process's first line gives the
    epoch it restarted.
    """
    lines = batches_logged(log)
    pids = list(dict.fromkeys(line[0] for line in lines))
    if len(pids) < 2:
        return 0
    restart_epoch = next(line[2] for line in lines if line[0] == pids[1])
    saves = [line[1] for line in batches_logged(Path(str(log) + ".saves")) if line[0] == pids[0]]
    return max(0, saves[-1] - restart_epoch * steps_per_epoch) if saves else 0


def interval_in_steps(journal: list[dict[str, Any]]) -> int | None:
    steps = sorted(e["step"] for e in C.events(journal, "checkpoint_saved") if e.get("reason") == "interval")
    if len(steps) < 2:
        return None
    gaps = [b - a for a, b in itertools.pairwise(steps) if b > a]
    return int(C.median(gaps)) if gaps else None


def oom_comparison(args, tmp: Path) -> dict[str, Any]:
    """A worker whose memory climbs LEAK_MIB_PER_STEP per step is OOM-killed in a memory cgroup:
    resilient (pressure checkpoint) vs BackupAndRestore in a cgroup with the same limit."""
    import resilient
    from resilient.supervisor.memory import MemoryCgroup

    try:
        MemoryCgroup.create(1 << 30, name=f"bench-probe-{os.getpid()}").remove()
    except OSError as exc:
        return {"skipped": f"no writable memory cgroup here ({exc})"}
    BatchLog, Leak = _callbacks()
    steps_per_epoch = -(-args.samples // args.batch)
    epochs = 4
    clean = epochs * steps_per_epoch
    x, y = C.image_data(args.samples)

    # The clean training's footprint: a probe run of the same epochs without the leak, under a generous limit so that
    # the worker has its memory cgroup; the cgroup's peak (memory.peak: its epoch ends, checkpoints and final save,
    # page cache included, as the kernel charges it) plus what an adopted worker brought, charged outside the group.
    probe_dir = tmp / "oom_probe"
    resilient.fit(C.small_cnn(x.shape[1:]), x, y, batch_size=args.batch, epochs=epochs, verbose=0, run_dir=probe_dir,
                  seed=0, host_memory_limit="8GB", callbacks=[BatchLog(str(tmp / "oom_probe.log"))])
    probe = C.read_journal(probe_dir)
    carried = max((e.get("carried_bytes") or 0 for e in C.events(probe, "memory_enforcement")), default=0)
    group_peak = max((e.get("cgroup_peak_bytes") or 0 for e in C.events(probe, "attempt_ended")), default=0)
    if not group_peak:
        return {"skipped": "the probe run reported no cgroup peak"}
    peak = group_peak + carried
    leak_room = int(LEAK_ROOM_EPOCHS * steps_per_epoch) * LEAK_MIB_PER_STEP << 20
    limit = int(peak + (PEAK_MARGIN_MIB << 20) + leak_room)

    log = tmp / "oom_resilient.log"
    run_dir = tmp / "oom_resilient"
    failed = None
    try:
        resilient.fit(C.small_cnn(x.shape[1:]), x, y, batch_size=args.batch, epochs=epochs, verbose=0,
                      run_dir=run_dir, seed=0, host_memory_limit=limit,
                      policy=resilient.Policy(ladders={}),  # the same plan after the kill
                      callbacks=[BatchLog(str(log)), Leak(str(tmp / "oom_resilient.leaked"), LEAK_MIB_PER_STEP)])
    except resilient.TrainingFailedError as exc:  # reported, not raised: the other figures still print
        failed = str(exc).splitlines()[0]
    j = C.read_journal(run_dir)
    incidents = C.events(j, "incident")
    pressure = [e for e in C.events(j, "checkpoint_saved") if e.get("reason") == "memory_pressure"]
    ready = [e for e in C.events(j, "worker_ready") if e.get("attempt") == 1]
    res = steps_redone(log, clean)
    requests = C.events(j, "checkpoint_requested")
    res.update(failed=failed, incident=incidents[0]["kind"] if incidents else None,
               incident_step=incidents[0].get("step") if incidents else None,
               pressure_checkpoints=[e["step"] for e in pressure],
               pressure_requests={t: sum(r.get("trigger") == t for r in requests)
                                  for t in dict.fromkeys(r.get("trigger") for r in requests)},
               resumed_from_step=(ready[0].get("resumed_from_step") or 0) if ready else None)
    # Steps redone at the same plan: the host_oom ladder may change the batch after the kill, and then
    # the resumed attempt counts other steps; the journal's steps say it exactly.
    if res["incident_step"] is not None and res["resumed_from_step"] is not None:
        res["redone_by_journal"] = res["incident_step"] - res["resumed_from_step"]

    klog = tmp / "oom_keras.log"
    cfg = {"samples": args.samples, "batch": args.batch, "epochs": epochs, "kill_at": None, "save_freq": "epoch",
           "backup_dir": str(tmp / "backup_oom"), "log": str(klog), "killed_marker": str(tmp / "killed_oom"),
           "leak_mib": LEAK_MIB_PER_STEP, "leak_marker": str(tmp / "oom_keras.leaked")}
    run = keras_backup_run(cfg, cgroup_limit=limit)
    k = steps_redone(klog, clean)
    k["exits"] = run["exits"]
    k["killed"] = -signal.SIGKILL in run["exits"]
    k["trained_twice"] = twice_from_log(klog, steps_per_epoch)
    return {"limit_bytes": limit, "probe_peak_bytes": peak, "probe_carried_bytes": carried, "leak_room_bytes": leak_room,
            "resilient": res, "BackupAndRestore(save_freq='epoch')": k, "clean_steps": clean}


#: The recovery phase: epochs, the epoch of the fault (0-based; mid-epoch) and the one at whose end the run with
#: the standby holds until it is ready (see the module docstring, 3.).
RECOVERY_EPOCHS, RECOVERY_FAULT_EPOCH, RECOVERY_HOLD_EPOCH = 4, 2, 1


def recovery_pair(args, tmp: Path) -> dict[str, Any]:
    """bench_overhead's recovery run twice: with the warm standby (default) and with it off."""
    import bench_overhead as O

    steps_per_epoch = -(-args.samples // args.batch)
    fault_steps = [RECOVERY_FAULT_EPOCH * steps_per_epoch + steps_per_epoch // 2]
    out = {}
    x, y = C.image_data(args.samples)
    with C.CpuMonitor() as mon:
        for label, policy, hold in (("standby on", None, RECOVERY_HOLD_EPOCH), ("standby off", standby_off_policy(), None)):
            out[label] = O.recovery_run(x, y, args.batch, RECOVERY_EPOCHS, fault_steps,
                                        tmp / f"recovery_{label.replace(' ', '_')}", mon, policy=policy,
                                        hold_for_standby=hold)
    return out


def recovery_targets(rec: dict[str, Any]) -> list[tuple[Any, ...]]:
    """The recovery rows of the table (what, value, baseline, ratio, op, target, note); a standby that had not
    finished importing when the restart took it is flagged in the note."""
    cold = rec["standby off"]["cold"]["total"]
    rows = []
    for label in ("standby on", "standby off"):
        r = rec[label]["recoveries"][0] if rec[label]["recoveries"] else None
        value = r["total"] if r else float("nan")
        note = f"fault -> first resumed step {value:.2f} s; cold start (spawn -> first step, standby off) {cold:.2f} s"
        standby = r.get("standby", {}) if r else {}
        if standby.get("used"):
            note += f"; standby imported when used: {standby['imported']}"
            if not standby["imported"]:
                note += " [FLAG: the figure includes the rest of its import, not the scenario of the target]"
        elif label == "standby on":
            note += " [FLAG: the restart took no standby]"
        # The target is for the standby; the run without it is printed beside it, as information.
        op, target = ("<=", 0.35) if label == "standby on" else (None, None)
        rows.append((f"recovery after a segfault / cold start ({label}, s)", value, cold, value / cold, op, target, note))
    return rows


def print_recovery(rec: dict[str, Any]) -> None:
    """The recovery phase's own lines: per run, its phases, and the standby it took."""
    for label, run in rec.items():
        held = run.get("held_for_standby")
        for r in run["recoveries"]:
            phases = ", ".join(f"{k} {v:.2f}" for k, v in r.items() if isinstance(v, float) and "->" in k)
            print(f"  {label}: {phases}")
            standby = r.get("standby", {})
            if standby.get("used"):
                before = standby.get("ready_before_fault_s")
                when = ("never ready" if before is None else f"ready {before:.1f} s before the fault" if before >= 0
                        else f"ready {-before:.1f} s after the fault")
                if held:
                    when += f"; the run held {held['seconds']:.1f} s at the end of epoch {held['epoch'] + 1} for it"
                print(f"  {label}: standby imported when used: {standby['imported']} ({when})")
    sys.stdout.flush()  # before anything else writes (a child's output would come first)


def only_recovery(args: argparse.Namespace) -> int:
    """``--only recovery``: the recovery phase alone, its lines and targets."""
    tmp = Path(tempfile.mkdtemp(prefix="bench_recovery_"))
    print(f"run_all --only recovery: {args.samples} samples of 32x32x3, batch {args.batch}; run dirs in {tmp}",
          flush=True)
    try:
        rec = recovery_pair(args, tmp)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print_recovery(rec)
    results = []
    for what, _, _, ratio, op, target, note in recovery_targets(rec):
        if op is None:
            print(f"info  {what}: {ratio:.3f} (no target)  [{note}]")
            results.append({"name": what, "value": ratio, "op": "", "target": None, "verdict": "info", "note": note})
        else:
            results.append(C.summary(what, ratio, op, target, note))
    C.write_json("run_all_recovery", {"args": vars(args), "environment": C.environment(), "recovery": rec,
                                      "targets": results})
    return 0


def standby_off_policy() -> Any:
    import resilient

    return resilient.load_policy("default").model_copy(update={"runtime": resilient.policy.RuntimeSettings(standby="off")})


# ----------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="15 s trainings instead of 60 s")
    ap.add_argument("--samples", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0, help="seeds the step of the SIGKILL")
    ap.add_argument("--keep", action="store_true", help="keep the run directories")
    ap.add_argument("--only", choices=["oom", "recovery"],
                    help="run one phase alone (oom: the cgroup OOM comparison, ~2 min; recovery: ~1 min)")
    ap.add_argument("--keras-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.keras_child:
        keras_child(json.loads(args.keras_child))
        return 0
    if args.only == "oom":
        return only_oom(args)
    if args.only == "recovery":
        return only_recovery(args)

    import bench_overhead as O

    budget = 15.0 if args.quick else 60.0
    tmp = Path(tempfile.mkdtemp(prefix="bench_all_"))
    print(f"run_all: {args.samples} samples of 32x32x3, batch {args.batch}, ~{budget:.0f} s trainings; run dirs in {tmp}",
          flush=True)
    x, y = C.image_data(args.samples)
    try:
        with C.CpuMonitor() as mon, C.TreeCpu() as cpu:
            print("  [1/6] plain model.fit (1) ...", flush=True)
            plain_a = O.plain_fit(x, y, args.batch, budget, 1000, mon, cpu)
            epochs = plain_a["epochs"]
            print(f"  [2/6] resilient.fit, {epochs} epochs ...", flush=True)
            res = O.resilient_fit(x, y, args.batch, epochs, tmp / "steady", mon, cpu)
            print(f"  [3/6] plain model.fit (2), {epochs} epochs ...", flush=True)
            plain_b = O.plain_fit(x, y, args.batch, None, epochs, mon, cpu)
        print("  [4/6] recovery after a rehearsed segfault, standby on and off ...", flush=True)
        rec = recovery_pair(args, tmp)
        print_recovery(rec)
        print("  [5/6] SIGKILL at a random step: resilient vs BackupAndRestore ...", flush=True)
        kill = sigkill_comparison(args, tmp)
        print("  [6/6] cgroup OOM kill of a climbing worker: resilient vs BackupAndRestore ...", flush=True)
        oom = oom_comparison(args, tmp)
        steady_journal = C.read_journal(tmp / "steady")
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    n = args.samples
    plain_sps = [n / d for r in (plain_a, plain_b) for d in r["epoch_s"][1:]]
    res_sps = [n / d for d in res["epoch_s"][1:]]
    thr = C.median(res_sps) / C.median(plain_sps)
    plain_wall = (plain_a["wall_s"] + plain_b["wall_s"]) / 2
    wall = res["wall_s"] / plain_wall
    train_s = res["breakdown_s"]["training (ready -> last epoch_end)"]
    ck_share = res["checkpoint_seconds_total"] / max(1e-9, train_s)
    interval = auto_interval(steady_journal)

    rows: list[list[Any]] = []
    results = []

    def add(what, value, baseline, ratio, op, target, detail):
        if op is None:  # a figure printed for comparison, with no target of its own
            rows.append([what, value, baseline, ratio, "-", "info"])
            results.append({"name": what, "value": ratio, "op": "", "target": None, "verdict": "info", "note": detail})
            return
        rows.append([what, value, baseline, ratio, f"{op} {target}", C.verdict(ratio, op, target) if ratio == ratio else "n/a"])
        results.append(C.summary(what, ratio, op, target, detail))

    add("steady-state throughput (samples/s, median epoch)", C.median(res_sps), C.median(plain_sps), thr, ">=", 0.99,
        f"resilient {C.median(res_sps):.0f} vs model.fit {C.median(plain_sps):.0f} samples/s over epochs 2..{epochs}")
    add(f"whole-run wall time, {epochs} epochs (s)", res["wall_s"], plain_wall, wall, "<=", 1.05,
        f"{res['wall_s']:.1f} s vs {plain_wall:.1f} s")
    for row in recovery_targets(rec):
        add(*row)
    add("checkpoint cost, share of training time (auto cadence)", res["checkpoint_seconds_total"], train_s, ck_share,
        "<", 0.01, f"{res['checkpoints']} checkpoints in {train_s:.1f} s of training; auto interval {interval}")

    print()
    print("resilient vs plain Keras, measured side by side (value = resilient, baseline = model.fit or cold start)")
    C.table(rows, ["what", "value", "baseline", "ratio", "target", "verdict"])
    print()
    print(f"steps redone after a SIGKILL at step {kill['kill_at']} of {kill['clean_steps']} (seed {args.seed}):")
    krows = []
    for label, k in kill.items():
        if isinstance(k, dict):
            krows.append([label if label != "resilient" else "resilient.fit (auto checkpoints)", k["redone"],
                          k.get("trained_twice", 0), k["processes"]])
    C.table(krows, ["", "steps redone", "batches trained twice", "processes"])
    print(f"info  resilient resumed from step {kill['resilient']['resumed_from_step']} "
          f"({kill['resilient']['checkpoints_before_kill']} checkpoints before the kill); no target for a SIGKILL: "
          "it loses what was trained since the last checkpoint, half the auto interval on average")
    print()
    print_oom(oom, results)
    print()
    for s in results:
        target = f"target {s['op']} {s['target']}" if s["target"] is not None else "no target"
        print(f"{s['verdict']:<5} {s['name']}: {s['value']:.3f} ({target}) -- {s['note']}")
    C.write_json("run_all", {"args": vars(args), "environment": C.environment(), "plain_1": plain_a, "resilient": res,
                             "plain_2": plain_b, "recovery": rec, "sigkill": kill, "oom": oom, "targets": results})
    return 0


def print_oom(oom: dict[str, Any], results: list[dict[str, Any]]) -> None:
    """The OOM comparison's table; its target's summary goes to ``results``."""
    if "skipped" in oom:
        print(f"cgroup OOM comparison skipped: {oom['skipped']}")
        return
    r, k = oom["resilient"], oom["BackupAndRestore(save_freq='epoch')"]
    print(f"steps redone after a real cgroup OOM kill (limit {C.gb(oom['limit_bytes']):.2f} GB: the clean run's peak "
          f"{C.gb(oom['probe_peak_bytes']):.2f} GB + {PEAK_MARGIN_MIB} MiB + {LEAK_ROOM_EPOCHS:g} epochs of leak; "
          f"memory climbing {LEAK_MIB_PER_STEP} MiB/step):")
    C.table([["resilient.fit (pressure checkpoint)", r["redone"], r.get("redone_by_journal"), r["incident"],
              r["pressure_checkpoints"][-6:], 0],
             ["BackupAndRestore(save_freq='epoch')", k["redone"], "-", f"exits {k['exits']}", "-",
              k["trained_twice"]]],
            ["", "steps redone (batch log)", "by the journal", "incident", "last pressure checkpoints at",
             "batches trained twice"])
    print(f"info  pressure requests by trigger: {r.get('pressure_requests')}; "
          f"{len(r['pressure_checkpoints'])} pressure checkpoints; Keras killed by the same limit: {k.get('killed')}")
    redone = r.get("redone_by_journal", r["redone"])
    results.append(C.summary("steps redone after a cgroup OOM kill (pressure checkpoint)", redone, "<=", 2,
                             f"incident at step {r['incident_step']}, resumed from {r['resumed_from_step']}"))


def only_oom(args: argparse.Namespace) -> int:
    """``--only oom``: the cgroup OOM comparison alone, its table and target."""
    tmp = Path(tempfile.mkdtemp(prefix="bench_oom_"))
    print(f"run_all --only oom: {args.samples} samples of 32x32x3, batch {args.batch}; run dirs in {tmp}", flush=True)
    try:
        oom = oom_comparison(args, tmp)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    results: list[dict[str, Any]] = []
    print_oom(oom, results)  # C.summary prints the target's line
    C.write_json("run_all_oom", {"args": vars(args), "environment": C.environment(), "oom": oom, "targets": results})
    return 0


def auto_interval(journal: list[dict[str, Any]]) -> str:
    """The auto cadence's interval for the run's measured costs (the worker's rule, ``auto_interval``), and the
    checkpoints the run wrote by reason."""
    from resilient.worker.attempt import auto_interval as rule

    saves = C.events(journal, "checkpoint_saved")
    snap = C.median([s["snapshot_seconds"] for s in saves if s.get("snapshot_seconds") is not None])
    write = C.median([s["write_seconds"] for s in saves if s.get("write_seconds") is not None])
    reasons: dict[str, int] = {}
    for s in saves:
        reasons[s.get("reason", "?")] = reasons.get(s.get("reason", "?"), 0) + 1
    return (f"{rule(snap, write):.1f} s (median snapshot {1000 * snap:.1f} ms, write {1000 * write:.1f} ms); "
            f"checkpoints by reason: {reasons}")


if __name__ == "__main__":
    sys.exit(main())
