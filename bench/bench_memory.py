"""Does the worker's memory grow with the dataset? Peak RSS when training from a large NumPy array.

For two dataset sizes (default 0.5 GB and 1.5 GB of float32 32x32x3 images, made with
np.lib.format.open_memmap in a temporary folder so nothing holds them in RAM), side by side:

- plain model.fit on the memory-mapped array, in a fresh subprocess: its peak RSS (VmHWM,
  = getrusage ru_maxrss) and the peak of its anonymous / file-backed resident memory;
- resilient.fit on the same memmap: the worker's peak as the journal reports it
  (attempt_ended.memory_peak_bytes) and, sampled by this script from /proc/<worker>/status every
  0.1 s, the worker's VmHWM, RssAnon (heap: what cannot be reclaimed) and RssFile (pages of
  mapped files: the memmapped data, shared libraries; clean page cache the kernel can drop).

Target: the worker's peak RSS does not grow with the dataset size. The summary reports the
growth as a fraction of the extra data (peak at the large size - peak at the small size) /
(large - small); PASS below 0.10.

    python bench/bench_memory.py             # 0.5 GB and 1.5 GB, ~1.5 min (~2 min with --watchdog)
    python bench/bench_memory.py --quick     # 0.3 GB and 0.9 GB, one epoch each, ~1 min
    python bench/bench_memory.py --watchdog  # also: the large array under host_memory_limit, cgroups off
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import _common as C

SAMPLE_BYTES = 32 * 32 * 3 * 4
BATCH = 512
GROWTH_LIMIT = 0.10


def tiny_model():
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            keras.layers.Conv2D(8, 3, strides=2, activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(10),
        ],
        name="bench_tiny",
    )
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def make_memmap(folder: Path, gigabytes: float) -> tuple[Path, Path, int]:
    """x (n, 32, 32, 3) float32 and y (n,) int32 as .npy memmaps, written in chunks (never all in RAM)."""
    import numpy as np

    n = int(gigabytes * 1e9 // SAMPLE_BYTES)
    xp, yp = folder / "x.npy", folder / "y.npy"
    x = np.lib.format.open_memmap(xp, mode="w+", dtype="float32", shape=(n, 32, 32, 3))
    y = np.lib.format.open_memmap(yp, mode="w+", dtype="int32", shape=(n,))
    rng = np.random.default_rng(0)
    protos = rng.normal(size=(10, 32, 32, 3)).astype("float32")
    noise = rng.standard_normal(size=(4096, 32, 32, 3), dtype="float32")
    chunk = 4096
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        labels = rng.integers(0, 10, stop - start).astype("int32")
        y[start:stop] = labels
        x[start:stop] = 0.5 * protos[labels] + np.roll(noise, start // chunk, axis=0)[: stop - start]
    x.flush()
    y.flush()
    del x, y
    return xp, yp, n


# ----------------------------------------------------------------------------- /proc sampling


def proc_status(pid: int) -> dict[str, int] | None:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                    out[key] = int(rest.split()[0]) * 1024
    except OSError:
        return None
    return out


class PeakSampler:
    """Peaks of VmHWM, VmRSS, RssAnon, RssFile of a process found by ``find_pid`` (polled)."""

    def __init__(self, find_pid, interval: float = 0.1) -> None:
        self.find_pid = find_pid
        self.interval = interval
        self.peak: dict[str, int] = {}
        self.pids: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self):
        while not self._stop.wait(self.interval):
            for pid in self.find_pid():
                st = proc_status(pid)
                if not st:
                    continue
                self.pids.add(pid)
                for k, v in st.items():
                    self.peak[k] = max(self.peak.get(k, 0), v)


# ----------------------------------------------------------------------------- child: plain model.fit


def child_plain(xp: str, yp: str, epochs: int) -> None:
    import numpy as np

    peaks: dict[str, int] = {}
    stop = threading.Event()

    def sample():
        while not stop.wait(0.1):
            for k, v in (proc_status(os.getpid()) or {}).items():
                peaks[k] = max(peaks.get(k, 0), v)

    threading.Thread(target=sample, daemon=True).start()
    x = np.load(xp, mmap_mode="r")
    y = np.load(yp, mmap_mode="r")
    model = tiny_model()
    t0 = time.time()
    model.fit(x, y, batch_size=BATCH, epochs=epochs, verbose=0)
    seconds = time.time() - t0
    stop.set()
    for k, v in (proc_status(os.getpid()) or {}).items():
        peaks[k] = max(peaks.get(k, 0), v)
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("RESULT " + json.dumps({"ru_maxrss": maxrss, "peaks": peaks, "seconds": seconds}), flush=True)
    sys.stdout.flush()
    os._exit(0)


def run_plain(xp: Path, yp: Path, epochs: int) -> dict:
    cmd = [sys.executable, __file__, "--child-plain", str(xp), str(yp), "--epochs", str(epochs)]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    wall = time.time() - t0
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            out = json.loads(line[len("RESULT "):])
            out["wall_s"] = wall
            return out
    return {"error": f"exit {proc.returncode}: {proc.stderr[-2000:]}", "wall_s": wall}


# ----------------------------------------------------------------------------- resilient


def run_resilient(xp: Path, yp: Path, epochs: int, run_dir: Path) -> dict:
    import numpy as np
    import psutil

    import resilient

    x = np.load(xp, mmap_mode="r")
    y = np.load(yp, mmap_mode="r")
    me = psutil.Process()

    def workers():
        try:
            return [c.pid for c in me.children(recursive=True)]
        except psutil.Error:
            return []

    caller_before = proc_status(os.getpid()) or {}
    t0 = time.time()
    with PeakSampler(workers) as sampler, PeakSampler(lambda: [os.getpid()]) as caller:
        resilient.fit(tiny_model(), x, y, batch_size=BATCH, epochs=epochs, verbose=0, run_dir=run_dir, seed=0)
    wall = time.time() - t0
    j = C.read_journal(run_dir)
    ended = C.events(j, "attempt_ended")
    started = C.events(j, "attempt_started")[0]["_t"]
    ready = C.events(j, "worker_ready")[0]["_t"]
    return {
        "journal_memory_peak_bytes": ended[-1].get("memory_peak_bytes"),
        "attempts": len(ended),
        "worker_peaks": sampler.peak,
        "caller_peaks": caller.peak,
        "caller_rss_before": caller_before.get("VmRSS"),
        "wall_s": wall,
        "data_copy_s": started - t0,
        "train_s": C.events(j, "epoch_end")[-1]["_t"] - ready,
    }


def watchdog_check(xp: Path, yp: Path, limit: int, run_dir: Path) -> dict:
    """resilient.fit with host_memory_limit where no memory cgroup can be made (the psutil watchdog).

    Cgroup creation is switched off in this process only (MemoryCgroup.create raises OSError, as it
    does on a machine without writable cgroups); the limit sits between the worker's anonymous
    memory and its RSS, so a kill here means the watchdog counted reclaimable file pages.
    """
    import numpy as np

    import resilient
    import resilient.supervisor.process as sup

    def no_cgroup(cls, *a, **k):
        raise OSError("memory cgroups switched off by bench_memory --watchdog")

    saved = sup.MemoryCgroup.__dict__["create"]
    sup.MemoryCgroup.create = classmethod(no_cgroup)
    x = np.load(xp, mmap_mode="r")
    y = np.load(yp, mmap_mode="r")
    status = "completed"
    try:
        resilient.fit(tiny_model(), x, y, batch_size=BATCH, epochs=1, verbose=0, run_dir=run_dir, seed=0,
                      host_memory_limit=limit, max_restarts=2)
    except resilient.TrainingFailedError as e:
        status = "failed: " + str(e).splitlines()[0]
    finally:
        sup.MemoryCgroup.create = saved
    j = C.read_journal(run_dir)
    return {
        "limit": limit, "status": status,
        "mechanism": sorted({e.get("mechanism") for e in C.events(j, "memory_enforcement")}),
        "incidents": [{"kind": e["kind"], "detail": e["detail"], "action": e["action"]} for e in C.events(j, "incident")],
    }


# ----------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="0.3 GB and 0.9 GB")
    ap.add_argument("--sizes", type=float, nargs=2, default=None, metavar=("SMALL_GB", "LARGE_GB"))
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--watchdog", action="store_true",
                    help="also train the large array under a host_memory_limit enforced by the psutil watchdog "
                         "(cgroups switched off), set between the worker's anonymous memory and its RSS")
    ap.add_argument("--tmp", default=None, help="folder for the arrays and run dirs (default: system temp)")
    ap.add_argument("--child-plain", nargs=2, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_plain:
        child_plain(args.child_plain[0], args.child_plain[1], args.epochs)
        return 0
    sizes = args.sizes or ([0.3, 0.9] if args.quick else [0.5, 1.5])
    import resilient  # noqa: F401  (before TensorFlow)
    from resilient.data.arrays import IN_MEMORY_LIMIT

    tmp = Path(tempfile.mkdtemp(prefix="bench_memory_", dir=args.tmp))
    print(f"bench_memory: sizes {sizes} GB, batch {BATCH}, {args.epochs} epoch(s) each; files in {tmp}", flush=True)
    rows = []
    watchdog = None
    try:
        for gbs in sizes:
            folder = tmp / f"{gbs:g}GB"
            folder.mkdir()
            t0 = time.time()
            xp, yp, n = make_memmap(folder, gbs)
            nbytes = n * SAMPLE_BYTES
            print(f"  {gbs:g} GB: {n} samples written in {time.time() - t0:.1f} s"
                  + ("" if nbytes > IN_MEMORY_LIMIT else f" (NOTE: below the worker's {IN_MEMORY_LIMIT >> 20} MiB memmap threshold)"),
                  flush=True)
            print("    plain model.fit in a subprocess ...", flush=True)
            plain = run_plain(xp, yp, args.epochs)
            print("    resilient.fit ...", flush=True)
            res = run_resilient(xp, yp, args.epochs, folder / "run")
            rows.append({"gb": gbs, "samples": n, "data_bytes": nbytes, "plain": plain, "resilient": res})
            if args.watchdog and gbs == sizes[-1]:
                anon, hwm = res["worker_peaks"].get("RssAnon", 0), res["worker_peaks"].get("VmHWM", 0)
                limit = int((anon + hwm) / 2)
                print(f"    resilient.fit under the watchdog, host_memory_limit={limit / 1e9:.2f} GB "
                      f"(worker anon peak {anon / 1e9:.2f} GB, RSS peak {hwm / 1e9:.2f} GB) ...", flush=True)
                watchdog = watchdog_check(xp, yp, limit, folder / "run-watchdog")
            shutil.rmtree(folder, ignore_errors=True)  # free the disk before the next size
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print()
    table = []
    for r in rows:
        p, s = r["plain"], r["resilient"]
        pk, wk = p.get("peaks", {}), s["worker_peaks"]
        table.append([
            f"{r['gb']:g} GB", r["samples"], C.gb(p.get("ru_maxrss")), C.gb(pk.get("RssAnon")),
            C.gb(s["journal_memory_peak_bytes"]), C.gb(wk.get("VmHWM")), C.gb(wk.get("RssAnon")), C.gb(wk.get("RssFile")),
            C.gb(s["caller_peaks"].get("RssAnon")), p.get("seconds", float("nan")), s["train_s"],
        ])
    C.table(table, ["data", "samples", "fit peak RSS", "fit anon", "journal peak", "worker HWM", "worker anon",
                    "worker file", "caller anon", "fit train s", "res train s"])
    print("(GB = 1e9 bytes; 'fit' = plain model.fit in its own process; worker/caller columns sampled from /proc)")
    small, large = rows[0], rows[-1]
    d_data = large["data_bytes"] - small["data_bytes"]

    def growth(get):
        a, b = get(small), get(large)
        if a is None or b is None:
            return float("nan")
        return (b - a) / d_data

    g_journal = growth(lambda r: r["resilient"]["journal_memory_peak_bytes"])
    g_anon = growth(lambda r: r["resilient"]["worker_peaks"].get("RssAnon"))
    g_hwm = growth(lambda r: r["resilient"]["worker_peaks"].get("VmHWM"))
    g_plain = growth(lambda r: r["plain"].get("ru_maxrss"))
    print()
    print(f"info  plain model.fit peak RSS grows by {g_plain:.2f} x the extra data")
    print(f"info  worker VmHWM grows by {g_hwm:.2f} x the extra data; worker RssAnon by {g_anon:.2f} x")
    results = [
        C.summary("worker peak RSS growth per extra dataset byte (journal memory_peak_bytes)", g_journal, "<=",
                  GROWTH_LIMIT, f"{C.gb(small['resilient']['journal_memory_peak_bytes']):.2f} GB at {small['gb']:g} GB -> "
                  f"{C.gb(large['resilient']['journal_memory_peak_bytes']):.2f} GB at {large['gb']:g} GB"),
        C.summary("worker anonymous (non-reclaimable) memory growth per extra dataset byte", g_anon, "<=",
                  GROWTH_LIMIT, f"RssAnon {C.gb(small['resilient']['worker_peaks'].get('RssAnon')):.2f} -> "
                  f"{C.gb(large['resilient']['worker_peaks'].get('RssAnon')):.2f} GB"),
    ]
    if watchdog is not None:
        print(f"info  watchdog check (limit {watchdog['limit'] / 1e9:.2f} GB, mechanism {watchdog['mechanism']}): "
              f"{watchdog['status']}")
        for inc in watchdog["incidents"]:
            print(f"        {inc['kind']}: {inc['detail']} -> {inc['action']}")
    C.write_json("bench_memory", {
        "watchdog_check": watchdog,
        "args": vars(args), "environment": C.environment(), "batch": BATCH, "sizes_gb": sizes, "rows": rows,
        "growth": {"journal": g_journal, "worker_anon": g_anon, "worker_hwm": g_hwm, "plain_fit": g_plain},
        "targets": results,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
