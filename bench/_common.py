"""Shared helpers for the benchmark scripts (not part of the package).

Everything here is plain measurement plumbing: synthetic data, the small models the scripts
train, journal parsing, a CPU-contention monitor, and the table / summary / JSON output.
"""

from __future__ import annotations

import datetime as _dt
import itertools
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

BENCH_DIR = Path(__file__).resolve().parent
OUT_DIR = BENCH_DIR / "out"


# ----------------------------------------------------------------------------- data and models


def image_data(n: int, hw: int = 32, channels: int = 3, classes: int = 10, seed: int = 0) -> tuple[Any, Any]:
    """Synthetic but learnable images: a per-class random prototype plus twice as much noise."""
    import numpy as np

    rng = np.random.default_rng(seed)
    protos = rng.normal(size=(classes, hw, hw, channels)).astype("float32")
    y = rng.integers(0, classes, n).astype("int32")
    x = np.empty((n, hw, hw, channels), dtype="float32")
    chunk = 4096
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        x[start:stop] = 0.5 * protos[y[start:stop]] + rng.standard_normal(
            size=(stop - start, hw, hw, channels), dtype="float32"
        )
    return x, y


def small_cnn(input_shape: tuple[int, ...] = (32, 32, 3), classes: int = 10, seed: int = 0) -> Any:
    """The small image classifier of bench_overhead: two conv blocks and a dense head."""
    import keras

    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input(input_shape),
            keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(classes),
        ],
        name="bench_cnn",
    )
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


# ----------------------------------------------------------------------------- journal


def parse_time(iso: str) -> float:
    """Journal time (ISO 8601 UTC, ``...Z``) -> POSIX seconds."""
    return _dt.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def read_journal(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    out = []
    with open(Path(run_dir) / "events.jsonl") as f:
        for line in f:
            line = line.strip()
            if line:
                ev = json.loads(line)
                ev["_t"] = parse_time(ev["time"])
                out.append(ev)
    return out


def events(journal: list[dict[str, Any]], name: str, **match: Any) -> list[dict[str, Any]]:
    return [e for e in journal if e["event"] == name and all(e.get(k) == v for k, v in match.items())]


def median(values: list[float]) -> float:
    import statistics

    return float(statistics.median(values)) if values else float("nan")


# ----------------------------------------------------------------------------- contention


class CpuMonitor:
    """Samples machine-wide CPU use, the share taken by processes outside our own tree, and steal.

    The benchmarks share a 2-core machine with whoever else works on it; a phase that ran while
    something else was busy is flagged so its ratio can be read with that in mind.
    """

    def __init__(self, interval: float = 0.5) -> None:
        import psutil

        self._psutil = psutil
        self.interval = interval
        self.samples: list[tuple[float, float, float, float]] = []  # (time, busy %, foreign cores, steal cores)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-cpu-monitor", daemon=True)

    def __enter__(self) -> CpuMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _own_tree(self) -> set[int]:
        psutil = self._psutil
        me = psutil.Process()
        pids = {me.pid}
        try:
            pids.update(c.pid for c in me.children(recursive=True))
        except psutil.Error:
            pass
        return pids

    def _run(self) -> None:
        psutil = self._psutil
        ncpu = psutil.cpu_count() or 1
        prev: dict[int, float] = {}
        last = time.monotonic()
        psutil.cpu_percent(None)
        steal0 = getattr(psutil.cpu_times(), "steal", 0.0)
        while not self._stop.wait(self.interval):
            now = time.monotonic()
            dt = now - last
            last = now
            total = psutil.cpu_percent(None)
            own = self._own_tree()
            foreign = 0.0
            cur: dict[int, float] = {}
            for p in psutil.process_iter(["pid"]):
                try:
                    t = p.cpu_times()
                    cur[p.pid] = t.user + t.system
                except psutil.Error:
                    continue
            for pid, cpu in cur.items():
                if pid in own or pid not in prev:
                    continue
                foreign += max(0.0, cpu - prev[pid]) / dt
            prev = cur
            steal1 = getattr(psutil.cpu_times(), "steal", 0.0)
            steal, steal0 = max(0.0, steal1 - steal0) / dt, steal1
            self.samples.append((time.time(), total, min(foreign, float(ncpu)), steal))

    def between(self, t0: float, t1: float) -> dict[str, float]:
        """Average machine load, other processes' CPU use and hypervisor steal (cores) between two times."""
        sel = [s for s in self.samples if t0 <= s[0] <= t1]
        if not sel:
            return {"cpu_busy_pct": float("nan"), "foreign_cores": float("nan"), "steal_cores": float("nan")}
        return {
            "cpu_busy_pct": round(sum(s[1] for s in sel) / len(sel), 1),
            "foreign_cores": round(sum(s[2] for s in sel) / len(sel), 2),
            "steal_cores": round(sum(s[3] for s in sel) / len(sel), 2),
        }


class TreeCpu:
    """CPU seconds used by this process plus its live children, sampled every ``interval`` seconds.

    ``at(t)`` interpolates the cumulative CPU time at wall time ``t``, so the CPU spent in any
    window (an epoch between two journal events) can be read afterwards. Children are summed
    while alive; a child's CPU after its last sample is lost, so read windows while it runs.
    """

    def __init__(self, interval: float = 0.1) -> None:
        import psutil

        self._psutil = psutil
        self.interval = interval
        self.samples: list[tuple[float, float]] = []
        self._dead: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-tree-cpu", daemon=True)

    def __enter__(self) -> TreeCpu:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _sample(self) -> None:
        psutil = self._psutil
        me = psutil.Process()
        t = me.cpu_times()
        total = t.user + t.system
        alive: dict[int, float] = {}
        try:
            kids = me.children(recursive=True)
        except psutil.Error:
            kids = []
        for k in kids:
            try:
                kt = k.cpu_times()
                alive[k.pid] = kt.user + kt.system
            except psutil.Error:
                continue
        for pid, cpu in self._last.items():  # children gone since the last sample keep their last reading
            if pid not in alive:
                self._dead[pid] = cpu
        self._last = alive
        self.samples.append((time.time(), total + sum(alive.values()) + sum(self._dead.values())))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def at(self, t: float) -> float:
        s = self.samples
        if not s:
            return float("nan")
        if t <= s[0][0]:
            return s[0][1]
        for (t0, c0), (t1, c1) in itertools.pairwise(s):
            if t0 <= t <= t1:
                return c0 + (c1 - c0) * (t - t0) / max(1e-9, t1 - t0)
        return s[-1][1]

    def between(self, t0: float, t1: float) -> float:
        return self.at(t1) - self.at(t0)


# ----------------------------------------------------------------------------- output


def environment() -> dict[str, Any]:
    import psutil

    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "ram_bytes": psutil.virtual_memory().total,
        "loadavg_at_start": os.getloadavg(),
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    for name in ("tensorflow", "keras", "numpy", "resilient"):
        mod = sys.modules.get(name)
        if mod is not None:
            info[name] = getattr(mod, "__version__", "?")
    info["git"] = git_state()
    return info


def git_state() -> dict[str, Any]:
    """The commit the package was measured at, and whether resilient/ had uncommitted changes."""
    import subprocess

    root = BENCH_DIR.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "resilient", "policies"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"head": head, "resilient_dirty": bool(dirty)}


def verdict(value: float, op: str, target: float) -> str:
    if value != value:  # NaN
        return "MISS"
    ok = value >= target if op == ">=" else value <= target
    return "PASS" if ok else "MISS"


def summary(name: str, value: float, op: str, target: float, note: str = "") -> dict[str, Any]:
    v = verdict(value, op, target)
    print(f"{v}  {name}: {value:.3f} (target {op} {target})" + (f"  [{note}]" if note else ""), flush=True)
    return {"name": name, "value": value, "op": op, "target": target, "verdict": v, "note": note}


def table(rows: list[list[Any]], header: list[str]) -> None:
    cells = [[str(c) for c in header]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for j, r in enumerate(cells):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            print("  ".join("-" * w for w in widths))
    sys.stdout.flush()


def _fmt(c: Any) -> str:
    if isinstance(c, float):
        if c != c:
            return "-"
        if abs(c) >= 1000:
            return f"{c:,.0f}"
        if abs(c) >= 10:
            return f"{c:.1f}"
        return f"{c:.3f}"
    return str(c)


def write_json(name: str, payload: dict[str, Any]) -> Path:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    path = OUT_DIR / f"{name}.json"
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, default=_json_default)
    print(f"results written to {path}", flush=True)
    return path


def _json_default(obj: Any) -> Any:
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
    except ImportError:
        pass
    if isinstance(obj, Path):
        return str(obj)
    return repr(obj)


def gb(n: float | None) -> float:
    return float("nan") if n is None else n / 1e9
