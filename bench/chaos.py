"""A seeded chaos run: many non-degrading faults at random steps; the result must equal a clean run's.

    python bench/chaos.py --seed 7 --faults 30          # ~1 min per 6 faults on a 2-core CPU

Faults are drawn from segfault, abort, sigkill, hang, preempt and kill-during-save (``save_kill``:
SIGKILL in the middle of a checkpoint write), each at a distinct random global step. The run must
end with the clean run's weights (1e-6), History and ``optimizer.iterations``. Prints one line per
incident and a verdict; exits 1 on a mismatch. tests/test_chaos.py runs it with a fixed seed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import resilient
from resilient._rundir import RunDir

KINDS = ("segfault", "abort", "sigkill", "hang", "preempt", "save_kill")


def data(n: int = 384, features: int = 8):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, features)).astype("float32")
    y = (x[:, : features // 2].sum(axis=1) > x[:, features // 2 :].sum(axis=1)).astype("int32")
    return x[:320], y[:320], x[320:], y[320:]


def model():
    import keras

    keras.utils.set_random_seed(0)
    m = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dropout(0.1),
                          keras.layers.Dense(2)], name="chaos")
    m.compile(optimizer=keras.optimizers.Adam(1e-2),
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    return m


#: The incident each kind ends its attempt with (two faults meeting the run as the same incident at
#: the same step would read as "no progress" to the restart rules, so the draw keeps them apart).
INCIDENT = {"segfault": "crash", "abort": "crash", "sigkill": "killed", "save_kill": "killed", "hang": "hang",
            "preempt": "preempted"}


def _saves(step: int, every: int, steps_per_epoch: int, preempts: set[int]) -> bool:
    """Whether a checkpoint is written at global ``step``: every ``every`` steps, at an epoch end, after a preemption."""
    return step % every == 0 or step % steps_per_epoch == 0 or step - 1 in preempts


def _meets(kind: str, step: int, drawn: dict[int, str], every: int, steps_per_epoch: int) -> int:
    """The global step at which ``kind@step`` ends its attempt, given the faults ``drawn`` before it."""
    if kind == "preempt":
        return step + 1  # the worker finishes the step in flight, saves and exits
    if kind != "save_kill":
        return step
    preempts = {s for s, k in drawn.items() if k == "preempt"}
    at = step
    while not _saves(at, every, steps_per_epoch, preempts):
        at += 1
    return at  # the first checkpoint save at or after its step


def draw_faults(seed: int, count: int, total_steps: int, kinds: tuple[str, ...] = KINDS, *, every: int = 3,
                steps_per_epoch: int = 20) -> list[str]:
    """``count`` faults of random kinds at distinct random steps in [1, total_steps).

    A drawn kind gives way to the next one (in a seeded order) where it would meet the run as the
    same incident at the same step, from the same checkpoint, as an earlier fault: that is what "no
    progress" means, and the run would rightly stop there.
    """
    rng = np.random.default_rng(seed)
    if count >= total_steps:
        raise SystemExit(f"--faults {count} needs more than {count} steps; the run has {total_steps}")
    steps = sorted(rng.choice(np.arange(1, total_steps), size=count, replace=False).tolist())
    drawn: dict[int, str] = {}
    met: set[tuple[str, int]] = set()
    for step in steps:
        for index in rng.permutation(len(kinds)).tolist():
            kind = kinds[index]
            point = (INCIDENT[kind], _meets(kind, step, drawn, every, steps_per_epoch))
            if point in met:
                continue
            drawn[step] = kind
            met.add(point)
            break
        else:
            raise SystemExit(f"no fault kind fits at step {step}; draw fewer faults or use another seed")
    return [f"{kind}@{step}" for step, kind in sorted(drawn.items())]


def chaos(seed: int, count: int, workdir: Path, epochs: int = 4, batch_size: int = 16) -> dict:
    x, y, xv, yv = data()
    total = epochs * (len(x) // batch_size)
    every = 3
    faults = draw_faults(seed, count, total, every=every, steps_per_epoch=len(x) // batch_size)
    common = dict(epochs=epochs, batch_size=batch_size, validation_data=(xv, yv), seed=seed, verbose=0,
                  checkpoint_every=every, hang_timeout=3)
    t0 = time.monotonic()
    clean_model = model()
    clean = resilient.fit(clean_model, x, y, run_dir=workdir / "clean", **common)
    t_clean = time.monotonic() - t0
    t0 = time.monotonic()
    chaos_model = model()
    hurt = resilient.fit(chaos_model, x, y, run_dir=workdir / "chaos", faults=faults, max_restarts=2 * count + 5,
                         **common)
    t_chaos = time.monotonic() - t0
    worst = max(float(np.max(np.abs(a - b))) for a, b in zip(clean_model.get_weights(), chaos_model.get_weights()))
    same_history = sorted(clean.history) == sorted(hurt.history) and all(
        np.allclose(clean.history[k], hurt.history[k], rtol=1e-5, atol=1e-6) for k in clean.history)
    iterations = (int(clean_model.optimizer.iterations.numpy()), int(chaos_model.optimizer.iterations.numpy()))
    fired = [e["fault"] for e in RunDir(workdir / "chaos").read_events() if e["event"] == "fault_fired"]
    once = sorted(fired) == sorted(faults)
    return {"faults": faults, "fired": fired, "fired_once": once,
            "incidents": [(i.kind, i.step) for i in hurt.incidents], "max_weight_diff": worst,
            "same_history": same_history, "iterations": iterations, "seconds": (t_clean, t_chaos),
            "ok": worst <= 1e-6 and same_history and iterations[0] == iterations[1] and once}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--faults", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="resilient-chaos-") as tmp:
        out = chaos(args.seed, args.faults, Path(tmp), epochs=args.epochs)
    print(f"faults ({len(out['faults'])}): {', '.join(out['faults'])}")
    for kind, step in out["incidents"]:
        print(f"  incident {kind} at step {step}")
    print(f"max |weight difference| vs the clean run: {out['max_weight_diff']:.3g} (<= 1e-6)")
    print(f"history equal: {out['same_history']}; optimizer iterations clean/chaos: {out['iterations']}")
    print(f"every fault fired exactly once (journal): {out['fired_once']}")
    print(f"wall time clean {out['seconds'][0]:.1f} s, chaos {out['seconds'][1]:.1f} s")
    print("PASS" if out["ok"] else "FAIL")
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
