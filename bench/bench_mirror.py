"""Does a slow mirror slow the training? The step rate with a mirror that takes 5 s per generation over the step
rate with no mirror, side by side in one run.

The same small CNN on the same synthetic 32x32x3 data, trained by resilient.fit with checkpoints every few
seconds (so the mirror always has a newer generation waiting, and skips to it), alternately:

- ``off``:  no mirror_dir;
- ``slow``: mirror_dir on a local folder, each generation's copy made to take 5 s more through the test seam
  ``RESILIENT_MIRROR_SECONDS_PER_GENERATION`` (resilient/supervisor/mirror.py), as a slow Drive mount would.

The step rate of a run: the median over its epochs (the first, with its tracing and warm-up, left out) of the
epoch's steps / seconds between consecutive journal ``epoch_end`` lines. Ratio = median(slow) / median(off)
over the runs of each kind; the ratio of total steps / total seconds is printed beside it.   target >= 0.99

    python bench/bench_mirror.py              # ~3.5 min on 2 cores: off / slow / off / slow
    python bench/bench_mirror.py --quick      # ~2 min: off / slow

See bench/README.md.
"""

from __future__ import annotations

import argparse
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

import resilient
from resilient.supervisor.mirror import SLOW_ENV


def run_once(kind: str, x, y, *, epochs: int, every: str, slow: float, root: Path, index: int) -> dict:
    run_dir = root / f"{kind}-{index}" / "local"
    mirror_dir = root / f"{kind}-{index}" / "drive" if kind == "slow" else None
    if kind == "slow":
        os.environ[SLOW_ENV] = str(slow)
    try:
        start = time.time()
        resilient.fit(C.small_cnn(), x, y, epochs=epochs, batch_size=64, seed=0, run_dir=run_dir, verbose=0,
                      checkpoint_every=every, mirror_dir=mirror_dir)
        wall = time.time() - start
    finally:
        os.environ.pop(SLOW_ENV, None)
    journal = C.read_journal(run_dir)
    ends = C.events(journal, "epoch_end")
    t0, t1 = C.parse_time(ends[0]["time"]), C.parse_time(ends[-1]["time"])
    steps = ends[-1]["step"] - ends[0]["step"]
    per_epoch = [(b["step"] - a["step"]) / (C.parse_time(b["time"]) - C.parse_time(a["time"]))
                 for a, b in itertools.pairwise(ends)]
    saved = C.events(journal, "checkpoint_saved")
    synced = C.events(journal, "mirror_synced")
    return {
        "kind": kind, "steps_per_s": C.median(per_epoch), "overall_steps_per_s": steps / (t1 - t0),
        "epoch_steps_per_s": per_epoch, "steps": steps, "seconds": t1 - t0, "wall": wall,
        "t0": t0, "t1": t1, "checkpoints": len(saved), "mirrored": len(synced),
        "mirror_lag_max": max((e.get("lag_seconds") or 0.0 for e in synced), default=float("nan")),
        "mirror_final_step": synced[-1]["step"] if synced else None, "final_step": ends[-1]["step"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one pair of runs (off / slow) instead of two")
    parser.add_argument("--slow", type=float, default=5.0, help="seconds each mirrored generation takes (5)")
    parser.add_argument("--every", default="3s", help="checkpoint_every of both runs (3s)")
    parser.add_argument("--epochs", type=int, default=12)
    args = parser.parse_args()

    x, y = C.image_data(8192)  # 128 steps an epoch at batch 64
    order = ["off", "slow"] * (1 if args.quick else 2)
    root = Path(tempfile.mkdtemp(prefix="bench-mirror-"))
    runs = []
    try:
        with C.CpuMonitor() as cpu:
            for i, kind in enumerate(order):
                r = run_once(kind, x, y, epochs=args.epochs, every=args.every, slow=args.slow, root=root, index=i)
                r.update(cpu.between(r["t0"], r["t1"]))
                runs.append(r)
                print(f"{kind:>4}: {r['steps_per_s']:.1f} steps/s (median epoch) over {r['steps']} steps ({r['seconds']:.1f} s); "
                      f"{r['checkpoints']} checkpoints, {r['mirrored']} mirrored", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print()
    C.table([[r["kind"], r["steps_per_s"], r["overall_steps_per_s"], r["seconds"], r["checkpoints"], r["mirrored"], r["mirror_lag_max"],
              r["foreign_cores"], r["steal_cores"]] for r in runs],
            ["run", "steps/s (median epoch)", "steps/s (total)", "seconds", "ckpts", "mirrored", "max lag s", "other procs", "steal"])
    off = C.median([r["steps_per_s"] for r in runs if r["kind"] == "off"])
    slow = C.median([r["steps_per_s"] for r in runs if r["kind"] == "slow"])
    total = (sum(r["steps"] for r in runs if r["kind"] == "slow") / sum(r["seconds"] for r in runs if r["kind"] == "slow")) / (
        sum(r["steps"] for r in runs if r["kind"] == "off") / sum(r["seconds"] for r in runs if r["kind"] == "off"))
    skipped = sum(r["checkpoints"] - r["mirrored"] for r in runs if r["kind"] == "slow")
    result = C.summary(f"step rate with a mirror taking {args.slow:g} s per generation / without a mirror",
                       slow / off, ">=", 0.99,
                       note=f"{slow:.1f} vs {off:.1f} steps/s; by total steps / total time {total:.3f}; "
                            f"the slow mirror skipped {skipped} generations")
    C.write_json("bench_mirror", {"environment": C.environment(), "args": vars(args), "runs": runs,
                                  "summary": [result]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
