"""End-to-end, the run's storage: a disk that fills up mid-run, damaged checkpoints, leftovers of
interrupted saves, and the memory cgroup of a caller killed with SIGKILL. Real workers, real files."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import resilient
from resilient._checkpoint import CheckpointStore
from resilient._rundir import RunDir
from resilient._status import summarize
from resilient.supervisor.memory import cgroup_support
from tests.conftest import make_data, make_model

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("no_leftover_processes")]

BATCH, EPOCHS, SEED = 32, 2, 3  # 256 samples: 8 steps an epoch, 16 in all


def big_model():
    """Big enough that one checkpoint (~140 KB with Adam's slots) is far more than a log or a report."""
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(1024, activation="relu"), keras.layers.Dense(2)],
                             name="big")
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def disk_filler(run_dir: Path, at_step: int, marker: Path):
    """A callback that, once per test (``marker``), fills the run's disk at ``at_step`` leaving a third of a checkpoint."""
    import keras

    class FillDisk(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.steps = 0

        def on_train_batch_end(self, batch, logs=None):
            self.steps = int(self.model.optimizer.iterations.numpy())
            if self.steps != at_step or marker.exists():
                return
            marker.write_text("fired")
            deadline = time.monotonic() + 30  # the step-4 checkpoint is written in the background
            while not list((run_dir / "checkpoints").glob("ckpt-*")) and time.monotonic() < deadline:
                time.sleep(0.01)
            newest = max((run_dir / "checkpoints").glob("ckpt-*"))
            leave = sum(p.stat().st_size for p in newest.iterdir()) // 3
            with open(run_dir.parent / "filler", "wb", buffering=0) as f:
                while shutil.disk_usage(run_dir).free > leave + 65536:
                    f.write(b"\0" * 65536)
                while shutil.disk_usage(run_dir).free > leave:
                    f.write(b"\0" * 4096)

    return FillDisk()


@pytest.mark.fault("disk_full", "checkpoint save", incident="disk_full",
                   outcome="DiskFullError naming the path and free space; a second fit after freeing space "
                           "completes with model.fit's weights", lost="5 steps (the background save at step 8 failed, "
                   "seen at step 9; resumed from step 4)", corrupted="no")
def test_a_disk_that_fills_up_mid_run_stops_clearly_and_resumes_once_freed(tmp_path, tiny_disk):
    x, y = make_data()
    disk = tiny_disk("4m")
    run_dir = disk / "run"
    marker = tmp_path / "filled"
    kwargs = dict(epochs=EPOCHS, batch_size=BATCH, seed=SEED, run_dir=run_dir, verbose=0, shuffle=False,
                  checkpoint_every=4)
    with pytest.raises(resilient.DiskFullError) as info:
        resilient.fit(big_model(), x, y, callbacks=[disk_filler(run_dir, 6, marker)], **kwargs)
    err, text = info.value, str(info.value)
    assert isinstance(err, resilient.TrainingFailedError)
    assert [i.kind for i in err.incidents] == ["disk_full"]  # the save at step 8 found no space; not retried
    # The save at step 8 is written in the background; its failure is raised at the next step boundary.
    assert (err.incidents[0].step, err.incidents[0].checkpoint_step) == (9, 4)
    assert err.path == str(run_dir) and err.free_bytes < err.needed_bytes
    assert f"disk full: {err.free_bytes / 1024:.1f} KiB free on {disk}" in text
    assert "No space left on device" in text and "call fit again with the same run_dir" in text
    assert "Last checkpoint: step 4" in text
    store = CheckpointStore(run_dir / "checkpoints")
    assert [store.verify(p).step for p in store.generations()] == [4]  # intact: the failed save left nothing
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))

    (disk / "filler").unlink()  # free the space; the same call resumes
    model = big_model()
    history = resilient.fit(model, x, y, callbacks=[disk_filler(run_dir, 6, marker)], **kwargs)
    assert history.epoch == [0, 1] and history.incidents == []
    ready = [e for e in RunDir(run_dir).read_events() if e["event"] == "worker_ready"]
    assert ready[-1]["resumed_from_step"] == 4
    ref = big_model()
    ref.fit(x, y, epochs=EPOCHS, batch_size=BATCH, shuffle=False, verbose=0)
    for got, want in zip(model.get_weights(), ref.get_weights(), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# -------------------------------------------------------------------------------------- damaged checkpoints


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A completed two-epoch run (checkpoints at steps 4, 8, 12, 16: the store keeps the newest three)."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    x, y = make_data()
    resilient.fit(make_model(), x, y, epochs=EPOCHS, batch_size=BATCH, seed=SEED, run_dir=run_dir, verbose=0,
                  checkpoint_every=4)
    return run_dir


def copy_run(finished: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    return run_dir


def damage(generation: Path) -> None:
    weights = generation / "weights.npz"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))


def tree(run_dir: Path) -> dict[str, str]:
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(run_dir.rglob("*"))}


@pytest.mark.fault("corrupt_checkpoint", "before start",
                   outcome="every generation damaged: fit refused with what to do; nothing changed on disk",
                   corrupted="all generations (detected, nothing discarded)")
def test_a_run_whose_every_checkpoint_is_damaged_is_refused(finished_run, tmp_path):
    run_dir = copy_run(finished_run, tmp_path)
    for generation in CheckpointStore(run_dir / "checkpoints").generations():
        damage(generation)
    before = tree(run_dir)
    x, y = make_data()
    with pytest.raises(resilient.RunDirError) as info:
        resilient.fit(make_model(), x, y, epochs=EPOCHS + 1, batch_size=BATCH, seed=SEED, run_dir=run_dir, verbose=0)
    text = str(info.value)
    assert "none verifies" in text and "weights.npz checksum mismatch" in text
    assert "Restore a copy of the checkpoints" in text and f"delete {run_dir / 'checkpoints'}" in text
    assert tree(run_dir) == before
    assert "no checkpoint verifies: fit refuses to resume this run" in summarize(run_dir)


@pytest.mark.fault("corrupt_checkpoint", "worker start-up",
                   outcome="the newest generation damaged: resumed from the older one, said on the console and in "
                           "status; leftovers of killed saves removed", lost="4 steps (resumed from 12, not 16)",
                   corrupted="the damaged generation only (skipped)")
def test_a_damaged_newest_checkpoint_resumes_from_the_older_one_and_says_so(finished_run, tmp_path, capfd):
    run_dir = copy_run(finished_run, tmp_path)
    ckpts = run_dir / "checkpoints"
    newest = CheckpointStore(ckpts).generations()[0]
    assert newest.name == "ckpt-000000000016"
    damage(newest)
    for leftover in (".tmp-0123abcd", ".old-4567ef01"):  # what saves killed mid-way leave
        (ckpts / leftover).mkdir()
        (ckpts / leftover / "weights.npz").write_bytes(b"partial")
    assert "damaged checkpoint: ckpt-000000000016 (ckpt-000000000016: weights.npz checksum mismatch)" in summarize(run_dir)
    x, y = make_data()
    with pytest.warns(UserWarning, match="ckpt-000000000016 .* is damaged"):
        history = resilient.fit(make_model(), x, y, epochs=EPOCHS + 1, batch_size=BATCH, seed=SEED, run_dir=run_dir,
                                verbose=2, checkpoint_every=4)
    assert history.epoch == [0, 1, 2]
    out = capfd.readouterr().out
    assert "checkpoint ckpt-000000000016 is damaged (ckpt-000000000016: weights.npz checksum mismatch); skipped" in out
    events = RunDir(run_dir).read_events()
    assert [e["resumed_from_step"] for e in events if e["event"] == "worker_ready"][-1] == 12
    assert not [p.name for p in ckpts.iterdir() if p.name.startswith(".")]  # clean after the completed fit
    assert "damaged checkpoint skipped by attempt 1: ckpt-000000000016" in summarize(run_dir)


# ------------------------------------------------------------------------------------------ caller SIGKILL


CALLER = textwrap.dedent("""
    import sys
    import numpy as np
    import resilient
    from tests.conftest import make_data, make_model

    x, y = make_data(4096)
    resilient.fit(make_model(), x, y, epochs=200, batch_size=8, seed=1, run_dir=sys.argv[1], verbose=0,
                  host_memory_limit="2GB", checkpoint_every=50)
""")


@pytest.mark.fault("caller_sigkill", "mid-epoch",
                   outcome="the worker dies with its caller; the caller's memory cgroup is reaped by the next fit",
                   corrupted="no")
def test_the_memory_cgroup_of_a_caller_killed_with_sigkill_is_reaped_by_the_next_fit(tmp_path, capfd):
    supported, why = cgroup_support()
    if not supported:
        pytest.skip(f"needs writable memory cgroups: {why}")
    killed_run = tmp_path / "killed"
    caller = subprocess.Popen([sys.executable, "-c", CALLER, str(killed_run)], cwd=Path(__file__).parent.parent,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    group = _wait_for_training(caller, killed_run)
    os.kill(caller.pid, signal.SIGKILL)
    caller.wait()
    worker_pid = [e["pid"] for e in RunDir(killed_run).read_events() if e["event"] == "worker_ready"][-1]
    _wait_gone(worker_pid)  # PDEATHSIG: the worker follows its supervisor
    assert group.exists(), "the killed caller could not remove its cgroup"

    x, y = make_data()
    resilient.fit(make_model(), x, y, epochs=1, batch_size=BATCH, seed=SEED, run_dir=tmp_path / "next", verbose=2)
    assert not group.exists()
    assert f"removed the memory cgroup {group} left by a supervisor that was killed" in capfd.readouterr().out


def _wait_for_training(caller: subprocess.Popen, run_dir: Path, timeout: float = 120.0) -> Path:
    """The cgroup of the caller's worker, once that worker trains."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if caller.poll() is not None:
            pytest.fail(f"the caller exited early: {caller.stderr.read().decode()[-2000:]}")
        events = RunDir(run_dir).read_events() if (run_dir / "events.jsonl").exists() else []
        groups = [e["path"] for e in events if e["event"] == "memory_enforcement" and "path" in e]
        if groups and any(e["event"] == "checkpoint_saved" for e in events):
            return Path(groups[-1])
        time.sleep(0.2)
    caller.kill()
    pytest.fail("the caller's worker never started training")


def _wait_gone(pid: int, timeout: float = 20.0) -> None:
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return
        except psutil.NoSuchProcess:
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    pytest.fail(f"worker {pid} outlived its SIGKILLed caller")
