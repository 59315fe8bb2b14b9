"""Device check for a machine with real NVIDIA GPUs (~5 min): what the CPU test suite can only emulate.

Each check prints one PASS / MISS line; at the end a figures table in Markdown, to paste into the
README's "Several GPUs" section, and everything measured in bench/out/gpu_check.json.

1. caller: ``import resilient`` turns on memory growth before TensorFlow, so a model built and
   compiled in this process (as in a notebook) leaves the GPU to the worker: this process holds
   less than 2 GB of GPU memory (NVML) after the runs, and resilient's own warning stays silent.
2. oom: a real ``ResourceExhaustedError`` under ``gpu_memory_limit`` (a cap on each device): a
   convolution at batch 1024 needs more than the cap; the ladder ``[mixed_precision, halve_batch]``
   heals it. The incidents are ``gpu_oom`` read from the worker's error, the run completes with a
   finite loss, in ``mixed_float16`` where the GPU has compute capability >= 7.0; over several GPUs
   the incident names the device that ran out.
3. nvml: the worker's GPU memory measured by the supervisor: the incident's GPU peak, and per-device
   figures in the journal's ``memory_sample`` lines for every GPU of the run.
4. devices: the same training on one GPU and on all of them (when there are several), the same
   global batch: samples/s, the final loss, the peak GPU memory of each device.

    python bench/gpu_check.py                 # every GPU this process sees
    CUDA_VISIBLE_DEVICES=0,1 python bench/gpu_check.py
    python bench/gpu_check.py --limit 2GB     # the gpu_memory_limit of the OOM check (default 1GB)

On a machine without a GPU (NVML sees none, or TensorFlow has no GPU support) it prints SKIP with
the reason and exits 0. Exit status 1 when a check misses.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import _common as C

# Before TensorFlow (which _common does not import): resilient turns on memory growth for this process.
import resilient

CALLER_GPU_LIMIT = 2 << 30  # resilient's own warning threshold (supervisor/gpu.py)
OOM_BATCH = 1024


def gpu_presence() -> tuple[int, str | None]:
    """(GPUs this process may use, None) or (0, why not): NVML first (no TensorFlow here), then TensorFlow."""
    from resilient._devices import visible_gpu_count
    from resilient.supervisor.memory import GpuMemory

    nvml = GpuMemory()
    if not nvml.available:
        return 0, "NVML sees no GPU here (no NVIDIA driver, no GPU, or no pynvml)"
    visible = visible_gpu_count(nvml.count)
    if not visible:
        return 0, f"NVML sees {nvml.count} GPU(s), but CUDA_VISIBLE_DEVICES hides them all"
    # TensorFlow without CUDA support sees none: ask it in a child, so this process does not touch the GPU yet.
    probe = subprocess.run(
        [sys.executable, "-c", "import tensorflow as tf; print(len(tf.config.list_physical_devices('GPU')))"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    lines = probe.stdout.strip().splitlines()
    seen = int(lines[-1]) if probe.returncode == 0 and lines and lines[-1].isdigit() else 0
    if not seen:
        return 0, f"NVML sees {visible} GPU(s), but TensorFlow sees none (a build without CUDA support?)"
    return seen, None


def conv_model(seed: int = 0) -> Any:
    """Two wide convolutions at 64x64: activations of ~1 GB per layer at batch 1024 in float32."""
    import keras

    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((64, 64, 3)),
        keras.layers.Conv2D(64, 3, padding="same", activation="relu"),
        keras.layers.Conv2D(64, 3, padding="same", activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(10),
    ], name="gpu_check_conv")
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    return model


def device_peaks(journal: list[dict[str, Any]]) -> list[int]:
    """The most the worker held on each GPU, over the journal's memory samples (NVML's order)."""
    peaks: list[int] = []
    for sample in C.events(journal, "memory_sample"):
        for i, held in enumerate(sample.get("gpu_bytes") or []):
            if i >= len(peaks):
                peaks.append(0)
            peaks[i] = max(peaks[i], held or 0)
    return peaks


def epoch_rate(journal: list[dict[str, Any]], samples_per_epoch: int) -> float:
    """Median samples/s of the epochs after the first (the journal's epoch_end times)."""
    ends = [C.parse_time(e["time"]) for e in C.events(journal, "epoch_end")]
    rates = [samples_per_epoch / (b - a) for a, b in itertools.pairwise(ends) if b > a]
    return C.median(rates) if rates else float("nan")


def check_oom(work: Path, devices: str, limit: str, capability: tuple[int, int] | None) -> dict[str, Any]:
    """A real OOM under the per-device cap, healed by the ladder."""
    x, y = C.image_data(2048, hw=64)
    policy = resilient.Policy(
        ladders={"gpu_oom": ["mixed_precision", resilient.steps.halve_batch(min_batch=16)]},
        probe={"enabled": False}, max_restarts=8)
    run_dir = work / f"oom-{devices}"
    started = time.monotonic()
    history = resilient.fit(conv_model(), x, y, epochs=2, batch_size=OOM_BATCH, seed=1, verbose=0, run_dir=run_dir,
                            devices=devices, gpu_memory_limit=limit, policy=policy)
    seconds = time.monotonic() - started
    journal = C.read_journal(run_dir)
    incidents = history.incidents
    loss = history.history["loss"][-1]
    return {"devices": devices, "seconds": seconds, "kinds": [i.kind for i in incidents],
            "sources": [i.evidence.get("source") for i in incidents],
            "details": [i.detail for i in incidents], "named": [i.device for i in incidents],
            "gpu_peaks": [i.gpu_memory_peak_bytes for i in incidents], "plan": history.plan.describe(),
            "precision": history.plan.precision, "replicas": history.plan.replicas, "loss": loss,
            "finite": math.isfinite(loss), "device_peaks": device_peaks(journal),
            "expect_mixed": capability is not None and capability >= (7, 0)}


def check_devices(work: Path, devices: str) -> dict[str, Any]:
    """The same training on ``devices``: samples/s, final loss, per-device peaks."""
    n, epochs, batch = 16384, 4, 512
    x, y = C.image_data(n, hw=32)
    run_dir = work / f"train-{devices}"
    history = resilient.fit(C.small_cnn(), x, y, epochs=epochs, batch_size=batch, seed=2, verbose=0,
                            run_dir=run_dir, devices=devices, policy="conservative")
    journal = C.read_journal(run_dir)
    return {"devices": devices, "replicas": history.plan.replicas, "plan": history.plan.describe(),
            "samples_per_s": epoch_rate(journal, n), "loss": history.history["loss"][-1],
            "incidents": [i.kind for i in history.incidents], "device_peaks": device_peaks(journal)}


def compute_capability() -> tuple[int, int] | None:
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    details = tf.config.experimental.get_device_details(gpus[0]) if gpus else {}
    cap = details.get("compute_capability")
    return tuple(cap) if cap else None


def line(ok: bool, name: str, text: str) -> bool:
    print(f"{'PASS' if ok else 'MISS'}  {name}: {text}", flush=True)
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", default="1GB", help="gpu_memory_limit of the OOM check (default 1GB)")
    args = parser.parse_args()

    gpus, why = gpu_presence()
    if not gpus:
        print(f"SKIP  gpu_check: {why}. Nothing to check on this machine; run it where NVIDIA GPUs are visible "
              "(see the README's \"Several GPUs\").", flush=True)
        return 0
    print(f"gpu_check: {gpus} GPU(s) visible to TensorFlow", flush=True)

    import warnings

    from resilient.supervisor.memory import GpuMemory

    nvml = GpuMemory()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        capability = compute_capability()  # TensorFlow initialises the GPU in this process, with memory growth
        results: dict[str, Any] = {"gpus": gpus, "compute_capability": capability, "limit": args.limit,
                                   "growth_env": os.environ.get("TF_FORCE_GPU_ALLOW_GROWTH")}
        oks: list[bool] = []
        with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
            work = Path(tmp)
            runs = ["gpu:0"] + (["all"] if gpus > 1 else [])
            results["oom"] = [check_oom(work, d, args.limit, capability) for d in runs]
            results["train"] = [check_devices(work, d) for d in runs]
        caller_gpu = nvml.used_by({os.getpid()})
    results["caller_gpu_bytes"] = caller_gpu
    # resilient's warning that the caller holds GPU memory (supervisor/gpu.py), not other ResourceWarnings.
    warned = [str(w.message) for w in caught
              if issubclass(w.category, ResourceWarning) and "of GPU memory" in str(w.message)]

    oks.append(line(results["growth_env"] == "true" and (caller_gpu or 0) < CALLER_GPU_LIMIT and not warned,
                    "caller", f"TF_FORCE_GPU_ALLOW_GROWTH={results['growth_env']}, this process holds "
                              f"{C.gb(caller_gpu):.2f} GB of GPU memory after the runs (< 2 GB), "
                              f"{len(warned)} warning(s)"))
    for oom in results["oom"]:
        healed = bool(oom["kinds"]) and set(oom["kinds"]) == {"gpu_oom"} and oom["finite"]
        reported = all(s == "worker report" for s in oom["sources"])
        mixed = oom["precision"] == "mixed_float16" or not oom["expect_mixed"]
        named = oom["replicas"] < 2 or all(n is not None for n in oom["named"])
        oks.append(line(healed and reported and mixed and named, f"oom ({oom['devices']})",
                        f"{len(oom['kinds'])} real OOM(s) under gpu_memory_limit={args.limit}, healed to "
                        f"{oom['plan']} in {oom['seconds']:.0f} s, loss {oom['loss']:.3f}; devices named: "
                        f"{oom['named']}; first: {oom['details'][0] if oom['details'] else '-'}"))
        oks.append(line(all(p for p in oom["gpu_peaks"]) and len([p for p in oom["device_peaks"] if p]) >= oom["replicas"],
                        f"nvml ({oom['devices']})", f"incident GPU peaks {[round(C.gb(p), 2) for p in oom['gpu_peaks']]}"
                        f" GB; per-device peaks {[round(C.gb(p), 2) for p in oom['device_peaks']]} GB"))
    for run in results["train"]:
        oks.append(line(not run["incidents"] and math.isfinite(run["loss"]), f"train ({run['devices']})",
                        f"{run['plan']}: {run['samples_per_s']:,.0f} samples/s, loss {run['loss']:.3f}"))
    if gpus == 1:
        print("note: one GPU here, so the run on all GPUs was not made", flush=True)

    print("\n| run | devices | plan at the end | samples/s | final loss | peak GPU memory per device |")
    print("|---|---|---|---|---|---|")
    for oom in results["oom"]:
        peaks = ", ".join(f"{C.gb(p):.2f}" for p in oom["device_peaks"]) or "-"
        print(f"| OOM under {args.limit} per device ({len(oom['kinds'])} OOMs healed) | {oom['devices']} | "
              f"{oom['plan']} | - | {oom['loss']:.3f} | {peaks} GB |")
    for run in results["train"]:
        peaks = ", ".join(f"{C.gb(p):.2f}" for p in run["device_peaks"]) or "-"
        print(f"| small CNN, 16384 images 32x32, 4 epochs | {run['devices']} | {run['plan']} | "
              f"{run['samples_per_s']:,.0f} | {run['loss']:.3f} | {peaks} GB |")
    print(f"\n(compute capability {capability}, {gpus} GPU(s); resilient {resilient.__version__})", flush=True)
    results["environment"] = C.environment()
    C.write_json("gpu_check", results)
    return 0 if all(oks) else 1


if __name__ == "__main__":
    sys.exit(main())
