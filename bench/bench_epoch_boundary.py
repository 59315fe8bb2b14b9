"""The epoch boundary: one model.fit call per epoch (before) against one call for all the epochs (now).

Same small CNN and synthetic data, with validation data, side by side in one run:

- plain ``model.fit`` in this process (one call, the reference);
- ``resilient.fit`` with the worker forced to call ``model.fit`` once per epoch
  (``RESILIENT_FIT_PER_EPOCH=1``, what every attempt did before);
- ``resilient.fit`` as it is: one ``model.fit`` call for all the epochs of an attempt.

The resilient runs alternate (per-epoch, one-call, per-epoch, one-call; ``--quick``: one of each).
A callback carried into the worker stamps every epoch's end and the end of every epoch's first step.
The boundary after epoch ``e`` is first-step-end(``e+1``) - epoch-end(``e``), less that first step's
own time (the median step) and less the epoch-end checkpoint (the journal's ``checkpoint_saved``
seconds, written in that interval on both resilient sides): what is left is the fit call's set-up
(data adapter, distributed dataset, iterators, the validation iterator) and the iterator start.
"other procs": CPU cores that processes outside this run's tree used meanwhile (a shared machine);
boundaries are tens of milliseconds, so read the medians with that column.

    python bench/bench_epoch_boundary.py            # ~1 min on 2 cores
    python bench/bench_epoch_boundary.py --quick    # ~40 s
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

PER_EPOCH_ENV = "RESILIENT_FIT_PER_EPOCH"


class BoundaryMarks(keras.callbacks.Callback):
    """Appends to ``path`` the wall time of every epoch end, every epoch's first step end, and every step end."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.first = True
        self.epoch = -1
        self.last = 0.0

    def _mark(self, **fields):
        fields["t"] = time.time()
        with open(self.path, "a") as f:
            f.write(json.dumps(fields) + "\n")

    def on_epoch_begin(self, epoch, logs=None):
        self.first = True
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        now = time.time()
        if self.first:
            self.first = False
            self._mark(what="first_step_end", epoch=self.epoch)
        else:
            with open(self.path, "a") as f:
                f.write(json.dumps({"what": "step", "seconds": now - self.last}) + "\n")
        self.last = now

    def on_epoch_end(self, epoch, logs=None):
        self._mark(what="epoch_end", epoch=epoch)


def boundaries(marks: list[dict], ckpt_seconds: dict[int, float] | None) -> tuple[list[float], float]:
    """Per boundary: first-step-end(e+1) - epoch-end(e) - median step - epoch-end checkpoint of e; the median step."""
    steps = [m["seconds"] for m in marks if m["what"] == "step"]
    step = C.median(steps)
    ends = {m["epoch"]: m["t"] for m in marks if m["what"] == "epoch_end"}
    firsts = {m["epoch"]: m["t"] for m in marks if m["what"] == "first_step_end"}
    out = []
    for e in sorted(ends):
        if e + 1 in firsts:
            ckpt = (ckpt_seconds or {}).get(e, 0.0)
            out.append(firsts[e + 1] - ends[e] - step - ckpt)
    return out, step


def plain_run(x, y, xv, yv, epochs, batch, tmp):
    path = str(Path(tmp) / "plain.jsonl")
    model = C.small_cnn()
    model.fit(x, y, validation_data=(xv, yv), epochs=epochs, batch_size=batch, shuffle=True, verbose=0,
              callbacks=[BoundaryMarks(path)])
    marks = [json.loads(line) for line in open(path) if line.strip()]
    return boundaries(marks, None)


def resilient_run(x, y, xv, yv, epochs, batch, tmp, name, per_epoch):
    run_dir = Path(tmp) / name
    path = str(Path(tmp) / f"{name}.jsonl")
    if per_epoch:
        os.environ[PER_EPOCH_ENV] = "1"
    else:
        os.environ.pop(PER_EPOCH_ENV, None)
    try:
        resilient.fit(C.small_cnn(), x, y, validation_data=(xv, yv), epochs=epochs, batch_size=batch, seed=1,
                      verbose=0, run_dir=run_dir, callbacks=[BoundaryMarks(path)])
    finally:
        os.environ.pop(PER_EPOCH_ENV, None)
    journal = C.read_journal(run_dir)
    calls = C.events(journal, "fit_call")
    ckpt = {e["epoch"] - 1: float(e["seconds"]) for e in C.events(journal, "checkpoint_saved", reason="epoch_end")}
    marks = [json.loads(line) for line in open(path) if line.strip()]
    b, step = boundaries(marks, ckpt)
    return b, step, len(calls), C.median(list(ckpt.values()))


def measure(args, epochs: int, repeats: int, tmp: str, mon) -> None:
    x, y = C.image_data(args.samples)
    xv, yv = C.image_data(512, seed=1)
    print(f"{args.samples} samples, batch {args.batch} ({-(-args.samples // args.batch)} steps an epoch), "
          f"{epochs} epochs, validation 512 samples", flush=True)
    t0 = time.time()
    plain, plain_step = plain_run(x, y, xv, yv, epochs, args.batch, tmp)
    load = {"plain": [mon.between(t0, time.time())["foreign_cores"]]}
    rows = [["plain model.fit (one call)", "-", C.median(plain) * 1e3, min(plain) * 1e3, max(plain) * 1e3,
             plain_step * 1e3, "-", load["plain"][0]]]
    sides: dict[str, list[float]] = {"per_epoch": [], "all_epochs": []}
    calls: dict[str, int] = {}
    steps: dict[str, list[float]] = {}
    ckpts: dict[str, list[float]] = {}
    for i in range(repeats):
        for per_epoch in (True, False):
            key = "per_epoch" if per_epoch else "all_epochs"
            t0 = time.time()
            b, step, n_calls, ckpt = resilient_run(x, y, xv, yv, epochs, args.batch, tmp, f"{key}{i}", per_epoch)
            load.setdefault(key, []).append(mon.between(t0, time.time())["foreign_cores"])
            sides[key].extend(b)
            calls[key] = n_calls
            steps.setdefault(key, []).append(step)
            ckpts.setdefault(key, []).append(ckpt)
    for key, label in (("per_epoch", "resilient, one fit call per epoch (before)"),
                       ("all_epochs", "resilient, one fit call per attempt (now)")):
        rows.append([label, calls[key], C.median(sides[key]) * 1e3, min(sides[key]) * 1e3, max(sides[key]) * 1e3,
                     C.median(steps[key]) * 1e3, C.median(ckpts[key]) * 1e3, max(load[key])])
    print()
    C.table(rows, ["side", "fit calls", "boundary median ms", "min ms", "max ms", "step ms", "epoch-end ckpt ms",
                   "other procs (cores)"])
    before, now = C.median(sides["per_epoch"]), C.median(sides["all_epochs"])
    print(f"\nepoch boundary, median: {before * 1e3:.1f} ms before -> {now * 1e3:.1f} ms now "
          f"(saved {(before - now) * 1e3:.1f} ms an epoch; plain model.fit: {C.median(plain) * 1e3:.1f} ms)")
    C.write_json("bench_epoch_boundary", {"environment": C.environment(), "epochs": epochs, "samples": args.samples,
                                          "batch": args.batch, "boundaries_s": {"plain": plain, **sides},
                                          "fit_calls": calls, "step_s": steps, "epoch_end_checkpoint_s": ckpts,
                                          "foreign_cores": load})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer epochs, one run of each resilient side")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None, help="runs of each resilient side (default 2, --quick 1)")
    ap.add_argument("--samples", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    epochs = args.epochs or (4 if args.quick else 8)
    repeats = args.repeats or (1 if args.quick else 2)
    tmp = tempfile.mkdtemp(prefix="bench_boundary_")
    try:
        with C.CpuMonitor() as mon:
            measure(args, epochs, repeats, tmp, mon)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
