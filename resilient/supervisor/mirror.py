"""The mirror: verified background copies of a run directory to slow, unreliable storage (Google Drive).

The run directory lives on fast local disk; ``Mirror`` runs one thread in the supervisor's process that
copies to ``mirror_dir``:

- each checkpoint generation once it is committed locally: copied under ``checkpoints/.tmp-mirror-*``,
  verified on the mirror side against its manifest (sizes and SHA-256, ``CheckpointStore.verify``),
  then renamed to ``ckpt-<step>``; the newest ``keep`` generations stay there;
- the run's top-level files (run.json, plan.json, events.jsonl, model.keras, objects.pkl, result.json...),
  each under a temporary name then renamed, whenever they changed; ``data/`` once.

Training never waits for it: the worker's ``CheckpointSaved`` only wakes the thread, and every pass
copies the newest local generation, so a mirror that falls behind skips the generations in between. A
pass that meets an ``OSError`` (the mount dropped, a full quota) is retried with exponential backoff
(tenacity). Each verified generation journals ``mirror_synced`` (``step``, ``lag_seconds``: from the
local save to the verified copy). ``close`` flushes with a bounded wait and says what is on the mirror.

``restore_from_mirror`` is the other direction, for a new VM: an empty or older local run directory
takes the mirror's newest verified generation and run files. Partial copies (temporary names, a
generation whose manifest does not verify) are never used.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import tenacity

from .._checkpoint import Checkpoint, CheckpointStore, CorruptCheckpoint
from .._rundir import DIR_MODE, FILE_MODE, Journal, RunDir, fsync_dir

__all__ = ["Mirror", "MirrorState", "copy_file", "restore_from_mirror"]

#: How often the thread looks for changed run files (the journal) when no checkpoint woke it.
IDLE_INTERVAL = 5.0
#: A test seam, not a setting: each generation's copy takes at least this many seconds more (a float), to
#: rehearse a slow mount in tests and in bench/bench_mirror.py. Read when a ``Mirror`` is made; unset: no delay.
SLOW_ENV = "RESILIENT_MIRROR_SECONDS_PER_GENERATION"
_TMP_PREFIX = ".tmp-mirror-"
_SKIP = {".lock"}


def copy_file(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` (a fresh path), private and synced; the seam a test slows or breaks."""
    shutil.copyfile(src, dst)
    os.chmod(dst, FILE_MODE)
    with open(dst, "rb") as f:
        os.fsync(f.fileno())


@dataclass(frozen=True)
class MirrorState:
    """What the mirror holds: its newest verified generation's step (None: none yet) and the local newest.

    ``lag_seconds``: from the local save of the mirrored generation to its verified copy; ``saved_at``: that
    local save's wall-clock time (``time.time()``), from which the display tells the mirror's age live.
    """

    step: int | None
    local_step: int | None
    lag_seconds: float | None
    saved_at: float | None = None

    @property
    def behind_steps(self) -> int | None:
        """Steps the mirror lacks against the newest local checkpoint (None: unknown)."""
        if self.step is None or self.local_step is None:
            return None
        return max(0, self.local_step - self.step)

    def text(self, mirror: Path) -> str:
        if self.step is None:
            return f"no checkpoint is on the mirror {mirror} yet"
        behind = "" if not self.behind_steps else f", behind the local step {self.local_step}"
        return f"the mirror {mirror} holds the checkpoint of step {self.step}{behind}"


class Mirror:
    """Copies a run directory to ``mirror`` on a background thread; ``notify`` wakes it, ``close`` flushes."""

    def __init__(self, run: RunDir, mirror: Path, *, journal: Journal, keep: int = 2,
                 copy: Callable[[Path, Path], None] | None = None, wait_max: float = 30.0,
                 on_state: Callable[[MirrorState], None] | None = None) -> None:
        self.run, self.mirror = run, RunDir(mirror)
        #: Told each new state (the mirror's thread; must not block): the live display's mirror figures.
        self.on_state = on_state
        self.journal = journal
        self.keep = max(1, keep)
        self._copy = copy
        self._wait_max = wait_max
        self._slow = _slow_seconds()
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self._state = MirrorState(step=_newest_verified_step(self.mirror), local_step=None, lag_seconds=None)
        self._copied: dict[str, tuple[int, int]] = {}  # run file name -> (size, mtime_ns) last copied
        self._data_done = False
        self._thread = threading.Thread(target=self._loop, name="resilient-mirror", daemon=True)

    @property
    def state(self) -> MirrorState:
        with self._lock:
            return self._state

    def start(self) -> None:
        # The folders above the mirror are created once, here, where fit has just checked the path; later a
        # missing parent means the mount dropped (``_sync_once``).
        with contextlib.suppress(OSError):
            self.mirror.path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        self._tell()  # what an earlier call left on the mirror
        self._thread.start()

    def notify(self, step: int | None = None) -> None:
        """A checkpoint was committed locally (called from the channel's reader thread): never blocks."""
        self._wake.set()

    def close(self, timeout: float = 30.0) -> MirrorState:
        """Flush: one last pass (the newest generation, the journal) within ``timeout`` seconds, then stop."""
        self._closing.set()
        self._wake.set()
        self._thread.join(timeout)
        with contextlib.suppress(OSError):
            local_step = _newest_local_step(CheckpointStore(self.run.checkpoints))
            with self._lock:
                old = self._state
                self._state = MirrorState(old.step, local_step, old.lag_seconds, old.saved_at)
        state = self.state
        # What the run leaves on the mirror: behind (a failing or slow mount) or not, and whether the last copy
        # was still running when the wait ran out.
        self._note("mirror_flushed", step=state.step, local_step=state.local_step, behind_steps=state.behind_steps,
                   timed_out=self._thread.is_alive(), path=str(self.mirror.path))
        self._tell()
        return state

    # ------------------------------------------------------------------ the thread

    def _loop(self) -> None:
        while True:
            self._wake.wait(IDLE_INTERVAL)
            self._wake.clear()
            closing = self._closing.is_set()
            try:
                self._retrying(self._sync_once)
            except Exception as exc:  # never let the thread die silently: the run goes on without it
                self._note("mirror_error", error=f"{type(exc).__name__}: {exc}")
                closing = closing or self._closing.is_set()  # the retries already made the flush's last try
            if closing:
                return

    def _retrying(self, action: Callable[[], None]) -> None:
        """``action`` retried on OSError with exponential backoff; while closing, at most one more try."""
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(OSError),
            wait=tenacity.wait_exponential(multiplier=0.5, max=self._wait_max),
            stop=_stop_when(self._closing.is_set),
            sleep=self._sleep, before_sleep=self._before_sleep, reraise=True,
        )
        retrying(action)

    def _sleep(self, seconds: float) -> None:
        # A flush request cuts the backoff short: close() waits a bounded time for one more try.
        self._closing.wait(seconds)

    def _before_sleep(self, retry_state: tenacity.RetryCallState) -> None:
        outcome = retry_state.outcome
        error = outcome.exception() if outcome is not None else None
        self._note("mirror_retry", attempt=retry_state.attempt_number, error=f"{type(error).__name__}: {error}",
                   wait_seconds=round(retry_state.upcoming_sleep, 2))

    def _sync_once(self) -> None:
        """One pass: the newest local generation (if the mirror lacks it), then the run files and the journal."""
        if not self.mirror.path.is_dir():
            # Only the mirror folder itself: a missing parent is a dropped mount, not a folder to create.
            self.mirror.path.mkdir(mode=DIR_MODE)
        self._sync_generation()
        self._sync_data()
        self._sync_run_files()

    def _sync_generation(self) -> None:
        local = CheckpointStore(self.run.checkpoints)
        current = self.state.step
        for path in local.generations():
            step = _step_of(path)
            if current is not None and step is not None and step <= current and not self._resaved(path, step, current):
                # Already there: the name says so, without hashing the local files on every idle pass.
                with self._lock:
                    old = self._state
                    self._state = MirrorState(current, step, old.lag_seconds, old.saved_at)
                if old.local_step != step:
                    self._tell()
                return
            try:
                ckpt = local.verify(path)
            except CorruptCheckpoint:
                continue  # pruned or being replaced while we looked: the next one down, or the next pass
            break
        else:
            return
        copied = self._copy_generation(ckpt)
        if copied is None:
            return  # the local generation was pruned mid-copy: the next pass takes the newer one
        saved_at = _saved_at(ckpt)
        lag = None if saved_at is None else round(max(0.0, time.time() - saved_at), 3)
        local_step = _newest_local_step(local)  # the worker may have saved again while this copy ran
        state = MirrorState(ckpt.step, max(ckpt.step, local_step or ckpt.step), lag, saved_at)
        with self._lock:
            self._state = state
        # ``behind_steps``: what the mirror lacks against the newest local checkpoint at this moment.
        self._note("mirror_synced", step=ckpt.step, epoch=ckpt.meta.get("epoch"), lag_seconds=lag,
                   behind_steps=state.behind_steps, local_step=state.local_step, bytes=ckpt.nbytes,
                   path=str(self.mirror.path))
        self._tell()
        self._prune()

    def _tell(self) -> None:
        if self.on_state is not None:
            with contextlib.suppress(Exception):  # a display's trouble never stops the copies
                self.on_state(self.state)

    def _resaved(self, path: Path, step: int, current: int) -> bool:
        """The mirrored step was saved again locally (an epoch end right after an interval save): copy it anew."""
        if step != current:
            return False
        try:
            return (path / "manifest.json").read_bytes() != (self.mirror.checkpoints / path.name / "manifest.json").read_bytes()
        except OSError:
            return False  # pruned while we looked, or the mount is away: the next pass decides

    def _copy_generation(self, ckpt: Checkpoint) -> Checkpoint | None:
        """Copy under a temporary name, verify there, rename into place; None when the source vanished."""
        root = self.mirror.checkpoints
        if not root.is_dir():
            root.mkdir(mode=DIR_MODE)
        tmp = root / f"{_TMP_PREFIX}{uuid.uuid4().hex}"
        tmp.mkdir(mode=DIR_MODE)
        try:
            for name in [*ckpt.files, "manifest.json"]:
                try:
                    self._copy_one(ckpt.path / name, tmp / name)
                except FileNotFoundError:
                    if ckpt.path.exists():
                        raise  # the mirror side is gone (a dropped mount): retried with backoff
                    shutil.rmtree(tmp, ignore_errors=True)
                    return None
            fsync_dir(tmp)
            if self._slow:
                time.sleep(self._slow)  # the test seam (SLOW_ENV): a mount this slow, blocking as a real one does
            try:
                copied = CheckpointStore(root).verify(tmp)
            except CorruptCheckpoint as exc:
                # Changed under us locally (replaced at the same step) or damaged in transit: try again.
                raise OSError(f"the copy of {ckpt.path.name} does not verify on the mirror: {exc}") from exc
            final = root / ckpt.path.name
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(root)
            return copied
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _prune(self) -> None:
        root = self.mirror.checkpoints
        for old in CheckpointStore(root).generations()[self.keep:]:
            shutil.rmtree(old, ignore_errors=True)
        for tmp in root.glob(f"{_TMP_PREFIX}*"):
            # Left by a supervisor killed mid-copy (this one copies one generation at a time).
            shutil.rmtree(tmp, ignore_errors=True)

    def _sync_run_files(self) -> None:
        """Top-level files that changed since the last pass, the journal last (it says what was synced)."""
        names = sorted(p.name for p in self.run.path.iterdir() if p.is_file() and _is_run_file(p.name))
        names.sort(key=lambda n: n == self.run.events.name)
        for name in names:
            src = self.run.path / name
            try:
                st = src.stat()
            except FileNotFoundError:
                continue
            key = (st.st_size, st.st_mtime_ns)
            if self._copied.get(name) == key:
                continue
            self._copy_atomic(src, self.mirror.path / name)
            self._copied[name] = key

    def _sync_data(self) -> None:
        """``data/``, once: the inputs are written before the supervisor starts and never change in a run."""
        if self._data_done:
            return
        if self.run.data_dir.is_dir():
            for src in sorted(self.run.data_dir.rglob("*")):
                dst = self.mirror.path / src.relative_to(self.run.path)
                # Never ``parents=True`` here: a folder above the mirror missing is a dropped mount, to retry.
                if src.is_dir():
                    dst.mkdir(mode=DIR_MODE, exist_ok=True)  # sorted: a folder comes before what it holds
                elif not (dst.exists() and dst.stat().st_size == src.stat().st_size):
                    if dst.parent == self.mirror.data_dir:
                        dst.parent.mkdir(mode=DIR_MODE, exist_ok=True)
                    self._copy_atomic(src, dst)
        self._data_done = True

    def _copy_atomic(self, src: Path, dst: Path) -> None:
        tmp = dst.with_name(f"{_TMP_PREFIX}{uuid.uuid4().hex}-{dst.name}")
        try:
            self._copy_one(src, tmp)
            os.replace(tmp, dst)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise

    def _copy_one(self, src: Path, dst: Path) -> None:
        (self._copy or copy_file)(src, dst)  # looked up at call time: tests replace the module's copy_file

    def _note(self, event: str, **fields: object) -> None:
        with contextlib.suppress(OSError):  # the local disk full: the supervisor reports it, not this thread
            self.journal.write(event, **fields)


class _stop_when(tenacity.stop.stop_base):
    """Stop retrying once ``flag()`` is true (a flush: one more try, then give up)."""

    def __init__(self, flag: Callable[[], bool]) -> None:
        self.flag = flag

    def __call__(self, retry_state: tenacity.RetryCallState) -> bool:
        return self.flag()


def _slow_seconds() -> float:
    value = os.environ.get(SLOW_ENV, "").strip()
    if not value:
        return 0.0
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:  # NaN included
        raise ValueError(f"Invalid value for the environment variable {SLOW_ENV} (a test seam). Received: "
                         f"{value!r}. Expected seconds, a number >= 0; unset it for no delay.")
    return seconds


def _step_of(path: Path) -> int | None:
    try:
        return int(path.name.removeprefix("ckpt-"))
    except ValueError:
        return None


def _is_run_file(name: str) -> bool:
    return not name.startswith(".") and name not in _SKIP


def _saved_at(ckpt: Checkpoint) -> float | None:
    """The local save's wall-clock time (the manifest's ``created``), as ``time.time()``; None: unreadable."""
    try:
        manifest = (ckpt.path / "manifest.json").read_text()
        created = _dt.datetime.fromisoformat(json.loads(manifest)["created"].replace("Z", "+00:00"))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return created.timestamp()


def _newest_local_step(store: CheckpointStore) -> int | None:
    for path in store.generations():
        step = _step_of(path)
        if step is not None:
            return step
    return None


def _newest_verified_step(run: RunDir) -> int | None:
    try:
        ckpt = CheckpointStore(run.checkpoints).latest()
    except OSError:
        return None
    return None if ckpt is None else ckpt.step


# ---------------------------------------------------------------------------- resume on a new VM


def restore_from_mirror(run: RunDir, mirror_path: Path, *, trust: bool = False,
                        check: Callable[[RunDir], None] | None = None,
                        say: Callable[[str], None] | None = None) -> int | None:
    """Bring the mirror's run into ``run`` when the local one is missing or older; the step restored, or None.

    Older means: the newest verified local generation has fewer steps than the mirror's newest verified
    one (or there is none). A partial copy on the mirror (a temporary name, a generation that does not
    verify) is never used. A local directory another live process trains in is left alone.

    ``check(mirror)`` runs first whenever the mirror holds a run, before anything local is touched: fit
    refuses there a mirror that holds another run (another model, other data, another seed than the local
    run's), which would otherwise be restored or, with a newer local run, overwritten by this one's copies.
    """
    mirror = RunDir(mirror_path)
    if not mirror.exists():
        return None
    if check is not None:
        check(mirror)
    remote = CheckpointStore(mirror.checkpoints).latest()
    if remote is None:
        return None
    local = CheckpointStore(run.checkpoints).latest() if run.exists() else None
    if local is not None and local.step >= remote.step:
        return None
    if not trust:
        mirror.check_trusted()  # its pickles and model run once restored: the same rule as resuming it
    run.create()
    fd = os.open(run.lock_file, os.O_RDWR | os.O_CREAT, FILE_MODE)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return None  # another process trains here; fit's own lock refuses this call
        _restore(run, mirror, remote)
    finally:
        os.close(fd)
    where = "an empty" if local is None else f"an older (step {local.step})"
    if say is not None:
        say(f"restored the run from the mirror {mirror.path} (checkpoint of step {remote.step}) into "
            f"{where} local run directory {run.path}")
    return remote.step


def _restore(run: RunDir, mirror: RunDir, remote: Checkpoint) -> None:
    """Copy the run files, ``data/`` and the verified generation; the generation verified again locally."""
    if not mirror.result_json.exists():
        run.result_json.unlink(missing_ok=True)  # the local run's result is older than the mirror's checkpoint
    for src in sorted(mirror.path.iterdir()):
        if src.is_file() and _is_run_file(src.name):
            _local_copy(src, run.path / src.name)
    if mirror.data_dir.is_dir():
        for src in sorted(mirror.data_dir.rglob("*")):
            dst = run.path / src.relative_to(mirror.path)
            if src.is_dir():
                run.private_dir(dst)
            else:
                run.private_dir(dst.parent)
                _local_copy(src, dst)
    root = run.private_dir(run.checkpoints)
    tmp = root / f".tmp-{uuid.uuid4().hex}"  # the store's own temporary prefix: remove_leftovers clears it
    tmp.mkdir(mode=DIR_MODE)
    for src in remote.path.iterdir():
        copy_file(src, tmp / src.name)
    CheckpointStore(root).verify(tmp)  # CorruptCheckpoint if the mirror changed while we copied
    final = root / remote.path.name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(root)


def _local_copy(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.restore{os.getpid()}")
    copy_file(src, tmp)
    os.replace(tmp, dst)

