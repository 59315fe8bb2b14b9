"""The mirror (supervisor/mirror.py) with real files and its real thread: verified copies, a mirror that
vanishes and comes back, a slow mirror that training never waits for, and restoring a run on a new VM."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import resilient
from resilient._checkpoint import CheckpointStore
from resilient._rundir import Journal, RunDir
from resilient.supervisor import mirror as mirror_module
from resilient.supervisor.mirror import Mirror, restore_from_mirror


def _run(path: Path) -> RunDir:
    run = RunDir(path)
    run.create()
    (run.path / "run.json").write_text('{"stand-in": "run spec"}')
    (run.path / "plan.json").write_text('{"batch_size": 32}')
    run.private_dir(run.data_dir)
    (run.data_dir / "x.npy").write_bytes(b"x" * 1000)
    Journal(run.events).write("run_started")
    return run


def _save(run: RunDir, step: int, size: int = 2000) -> None:
    def writer(tmp: Path) -> None:
        (tmp / "weights.bin").write_bytes(os.urandom(size))
        (tmp / "state.json").write_text(json.dumps({"step": step}))

    CheckpointStore(run.checkpoints, keep=3).save(step, {"epoch": 0}, writer)


def _events(run: RunDir, name: str) -> list[dict]:
    return [e for e in run.read_events() if e["event"] == name]


def _until(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_each_generation_is_copied_verified_and_the_newest_two_are_kept(tmp_path):
    run = _run(tmp_path / "run")
    target = tmp_path / "drive" / "run"
    (tmp_path / "drive").mkdir()
    mirror = Mirror(run, target, journal=Journal(run.events), keep=2)
    mirror.start()
    try:
        _save(run, 1)
        mirror.notify(1)
        assert _until(lambda: mirror.state.step == 1)
        for step in (2, 3):
            _save(run, step)
            mirror.notify(step)
        assert _until(lambda: mirror.state.step == 3)
    finally:
        state = mirror.close(timeout=10)
    assert state.step == 3 and state.local_step == 3
    store = CheckpointStore(target / "checkpoints")
    assert [p.name for p in store.generations()] == ["ckpt-000000000003", "ckpt-000000000002"]
    for path in store.generations():
        store.verify(path)  # sizes and SHA-256 against the manifest, on the mirror side
    assert not list((target / "checkpoints").glob(".tmp-*"))
    assert (target / "run.json").read_text() == (run.path / "run.json").read_text()
    assert (target / "data" / "x.npy").read_bytes() == (run.data_dir / "x.npy").read_bytes()
    synced = _events(run, "mirror_synced")
    assert synced[-1]["step"] == 3 and synced[-1]["lag_seconds"] >= 0
    # The mirrored journal is the local one, mirror_synced lines included (copied last); the flush's own line,
    # written after its last copy, is local only.
    local = [e["event"] for e in run.read_events()]
    assert local[-1] == "mirror_flushed" and [e["event"] for e in RunDir(target).read_events()] == local[:-1]
    [flushed] = _events(run, "mirror_flushed")
    assert (flushed["step"], flushed["local_step"], flushed["behind_steps"], flushed["timed_out"]) == (3, 3, 0, False)
    assert "the mirror" in state.text(target) and "step 3" in state.text(target)


def test_a_mirror_that_vanishes_is_retried_with_backoff_and_catches_up_when_it_returns(tmp_path):
    run = _run(tmp_path / "run")
    mount = tmp_path / "mnt"
    mount.mkdir()
    target = mount / "run"
    mirror = Mirror(run, target, journal=Journal(run.events), keep=2, wait_max=0.1)
    mirror.start()
    try:
        _save(run, 1)
        mirror.notify(1)
        assert _until(lambda: mirror.state.step == 1)
        mount.rename(tmp_path / "mnt-away")  # the Drive mount drops
        _save(run, 2)
        mirror.notify(2)
        assert _until(lambda: len(_events(run, "mirror_retry")) >= 2), "no retry was journaled"
        assert not mount.exists(), "the mirror re-created a dropped mount's folder on the local disk"
        assert mirror.state.step == 1
        (tmp_path / "mnt-away").rename(mount)  # ...and comes back
        assert _until(lambda: mirror.state.step == 2), "the mirror did not catch up"
    finally:
        mirror.close(timeout=10)
    retry = _events(run, "mirror_retry")[0]
    assert "FileNotFoundError" in retry["error"] and retry["wait_seconds"] <= 0.1
    assert [e["step"] for e in _events(run, "mirror_synced")] == [1, 2]
    CheckpointStore(target / "checkpoints").verify(target / "checkpoints" / "ckpt-000000000002")


def test_a_slow_mirror_never_blocks_and_skips_to_the_newest_generation(tmp_path):
    run = _run(tmp_path / "run")
    target = tmp_path / "drive"
    gate, copying = threading.Event(), threading.Event()

    def slow_copy(src: Path, dst: Path) -> None:
        if dst.parent.name.startswith(".tmp-mirror-"):
            copying.set()
            gate.wait(30)  # the mount stalls on the first generation
        mirror_module.copy_file(src, dst)

    mirror = Mirror(run, target, journal=Journal(run.events), keep=2, copy=slow_copy)
    mirror.start()
    try:
        _save(run, 1)
        mirror.notify(1)
        assert copying.wait(20)
        for step in range(2, 6):  # training goes on while the copy hangs: saves and notify return at once
            _save(run, step)
            mirror.notify(step)
        assert mirror.state.step is None
        gate.set()
        assert _until(lambda: mirror.state.step == 5)
    finally:
        gate.set()
        mirror.close(timeout=10)
    synced = [e["step"] for e in _events(run, "mirror_synced")]
    assert synced[-1] == 5 and not {2, 3, 4} & set(synced)  # fell behind: skipped to the newest
    assert not list((target / "checkpoints").glob(".tmp-*"))


def test_the_flush_at_the_end_is_bounded_when_the_mirror_hangs(tmp_path):
    run = _run(tmp_path / "run")
    release = threading.Event()

    def stuck(src: Path, dst: Path) -> None:
        release.wait(60)
        mirror_module.copy_file(src, dst)

    mirror = Mirror(run, tmp_path / "drive", journal=Journal(run.events), copy=stuck)
    mirror.start()
    _save(run, 1)
    mirror.notify(1)
    started = time.monotonic()
    state = mirror.close(timeout=0.5)
    assert time.monotonic() - started < 10
    assert state.step is None and "no checkpoint is on the mirror" in state.text(tmp_path / "drive")
    release.set()


def _mirrored(tmp_path: Path, steps: tuple[int, ...]) -> Path:
    """A mirror holding verified generations ``steps``, as the thread leaves them."""
    run = _run(tmp_path / "src")
    mirror = Mirror(run, tmp_path / "drive", journal=Journal(run.events), keep=3)
    for step in steps:
        _save(run, step)
        mirror._sync_once()
    return tmp_path / "drive"


def test_restore_takes_the_newest_verified_generation_and_never_a_partial_copy(tmp_path):
    drive = _mirrored(tmp_path, (2, 4))
    ckpts = drive / "checkpoints"
    # A supervisor killed mid-copy left a temporary copy of a newer generation, and a newer generation is damaged.
    partial = ckpts / ".tmp-mirror-0123"
    shutil.copytree(ckpts / "ckpt-000000000004", partial)
    (partial / "manifest.json").write_text(json.dumps({"step": 9, "files": {}}))
    damaged = ckpts / "ckpt-000000000007"
    shutil.copytree(ckpts / "ckpt-000000000004", damaged)
    (damaged / "weights.bin").write_bytes(b"cut")
    said: list[str] = []
    local = RunDir(tmp_path / "vm2" / "run")
    assert restore_from_mirror(local, drive, say=said.append) == 4
    assert [p.name for p in CheckpointStore(local.checkpoints).generations()] == ["ckpt-000000000004"]
    assert CheckpointStore(local.checkpoints).latest().step == 4
    assert (local.path / "run.json").exists() and (local.data_dir / "x.npy").exists()
    assert (local.path.stat().st_mode & 0o777) == 0o700 and ((local.path / "run.json").stat().st_mode & 0o777) == 0o600
    assert "restored the run from the mirror" in said[0] and "step 4" in said[0] and "empty" in said[0]


def test_restore_replaces_an_older_local_run_and_leaves_a_newer_one(tmp_path):
    drive = _mirrored(tmp_path, (2, 4))
    older = _run(tmp_path / "older")
    _save(older, 3)
    (older.result_json).write_text("{}")  # an older run's result must not survive the restore
    assert restore_from_mirror(older, drive) == 4
    assert CheckpointStore(older.checkpoints).latest().step == 4
    assert not older.result_json.exists()
    newer = _run(tmp_path / "newer")
    _save(newer, 5)
    assert restore_from_mirror(newer, drive) is None
    assert CheckpointStore(newer.checkpoints).latest().step == 5
    assert restore_from_mirror(RunDir(tmp_path / "x"), tmp_path / "no-mirror") is None


def test_a_mirror_others_could_have_written_is_not_restored(tmp_path):
    drive = _mirrored(tmp_path, (2,))
    os.chmod(drive, 0o777)  # writable by anyone: its pickles could be anyone's
    local = RunDir(tmp_path / "vm2")
    with pytest.raises(resilient.RunDirError, match="Refusing to resume"):
        restore_from_mirror(local, drive)
    assert not local.path.exists()
    assert restore_from_mirror(local, drive, trust=True) == 2


@pytest.mark.parametrize("case", ["file", "run_dir itself"])
def test_an_unusable_mirror_dir_is_refused_before_anything_is_written(tmp_path, case):
    from tests.conftest import make_data, make_model

    (tmp_path / "a-file").write_text("")
    value = tmp_path / "a-file" if case == "file" else tmp_path / "run"
    x, y = make_data()
    with pytest.raises(resilient.RunDirError) as info:
        resilient.fit(make_model(), x, y, run_dir=tmp_path / "run", mirror_dir=value, verbose=0)
    assert "mirror_dir" in str(info.value) and str(value) in str(info.value)
    assert not (tmp_path / "run").exists()


def test_a_step_saved_again_locally_is_copied_again(tmp_path):
    run = _run(tmp_path / "run")
    mirror = Mirror(run, tmp_path / "drive", journal=Journal(run.events))
    _save(run, 8)  # an interval save...
    mirror._sync_once()
    _save(run, 8)  # ...replaced by the epoch end's save at the same step
    mirror._sync_once()
    name = "checkpoints/ckpt-000000000008/manifest.json"
    assert (tmp_path / "drive" / name).read_bytes() == (run.path / name).read_bytes()
    mirror._sync_once()  # nothing new: no copy, no journal line
    assert [e["step"] for e in _events(run, "mirror_synced")] == [8, 8]


# ---------------------------------------------------------------------------- in the supervisor (scripted worker)

from tests.test_supervisor import (  # noqa: E402 - the supervisor harness and its fixtures
    HELLO,
    _interrupt_when_ready,
    beat,
    no_leftover_workers,  # noqa: F401 - a fixture
    supervise,  # noqa: F401 - a fixture
)


@pytest.mark.fault("ctrl_c", "mid-epoch", incident="none (run_finished: interrupted)",
                   outcome="KeyboardInterrupt; the mirror is flushed first and the console says which step it holds",
                   lost="steps since the last checkpoint (the mirror holds it)", corrupted="no")
def test_ctrl_c_flushes_the_mirror_and_says_what_is_on_it(supervise, monkeypatch, tmp_path):  # noqa: F811
    script = {"default": [HELLO, beat(2), {"do": "checkpoint"}, {"do": "stamp", "name": "ready"},
                          {"do": "await_sigterm", "save_seconds": 0.2}]}
    drive = tmp_path / "drive"
    gate = threading.Event()

    def held(src: Path, dst: Path) -> None:  # the mirror copies only once Ctrl-C came: the flush does it
        gate.wait(20)
        mirror_module.copy_file(src, dst)

    h = supervise(script, kill_grace=0.5, preempt_grace=5.0, mirror_dir=drive, mirror_copy=held)
    _interrupt_when_ready(monkeypatch, h)
    ready = h.run.attempt_dir(0) / "ready"
    threading.Thread(target=lambda: (_until(ready.exists), gate.set()), daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        h.supervisor.run()
    assert CheckpointStore(drive / "checkpoints").latest().step == 2
    assert [e["step"] for e in h.events("mirror_synced")] == [2]
    assert f"the mirror {drive} holds the checkpoint of step 2" in h.stream.getvalue()
    assert "run_finished" in [e["event"] for e in RunDir(drive).read_events()]  # the journal went last


# ---------------------------------------------------------------------------- whose run the mirror holds


def _spec_on(path: Path, fingerprint: str, seed: int) -> None:
    from resilient._plan import Plan
    from resilient._rundir import ArraysData, RunSpec
    from tests.conftest import make_data

    RunDir(path).write_spec(RunSpec(epochs=2, seed=seed, data=ArraysData(x="data/x.npy", y="data/y.npy", samples=256),
                                    model_fingerprint=fingerprint, initial_plan=Plan(batch_size=32)))
    x, y = make_data()
    (path / "data").mkdir(mode=0o700, exist_ok=True)
    np.save(path / "data" / "x.npy", x)
    np.save(path / "data" / "y.npy", y)


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_a_mirror_holding_another_models_run_is_refused_before_anything_is_restored(tmp_path):
    from tests.conftest import make_data, make_model

    drive = _mirrored(tmp_path, (2, 4))  # verified generations: without the check they would be restored
    _spec_on(drive, fingerprint="f" * 64, seed=1)
    x, y = make_data()
    with pytest.raises(resilient.RunDirError) as info:
        resilient.fit(make_model(), x, y, run_dir=tmp_path / "vm2", mirror_dir=drive, verbose=0)
    text = str(info.value)
    assert f"The mirror_dir {drive} holds the run of another model (fingerprint ffffffffffff" in text
    assert "Nothing was restored" in text and "new folder as mirror_dir" in text
    assert not (tmp_path / "vm2").exists()


def test_a_mirror_holding_another_run_of_the_same_model_is_refused_and_the_local_run_untouched(tmp_path):
    from resilient._fit import _fingerprint
    from tests.conftest import make_data, make_model

    model = make_model()
    fingerprint, _ = _fingerprint(model, False)
    drive = _mirrored(tmp_path, (2, 4))
    _spec_on(drive, fingerprint=fingerprint, seed=1)
    local = _run(tmp_path / "local")  # an older run of the same model, another seed: restoring would mix them
    _save(local, 3)
    _spec_on(local.path, fingerprint=fingerprint, seed=2)
    before = _tree(local.path)
    x, y = make_data()
    with pytest.raises(resilient.RunDirError) as info:
        resilient.fit(model, x, y, run_dir=local.path, mirror_dir=drive, verbose=0)
    assert f"run_dir {local.path} and mirror_dir {drive} hold different runs (seed 2 and 1" in str(info.value)
    assert _tree(local.path) == before
    # The same run (the local seed is the mirror's): restored as before.
    _spec_on(local.path, fingerprint=fingerprint, seed=1)
    assert restore_from_mirror(local, drive, check=lambda mirror: None) == 4


def test_the_slow_mirror_seam_makes_each_generation_take_that_long(tmp_path, monkeypatch):
    run = _run(tmp_path / "run")
    _save(run, 1)
    monkeypatch.setenv(mirror_module.SLOW_ENV, "0.3")
    mirror = Mirror(run, tmp_path / "drive", journal=Journal(run.events))
    start = time.monotonic()
    mirror._sync_once()
    assert time.monotonic() - start >= 0.3
    assert CheckpointStore(tmp_path / "drive" / "checkpoints").latest().step == 1
    monkeypatch.setenv(mirror_module.SLOW_ENV, "soon")
    with pytest.raises(ValueError, match=r"RESILIENT_MIRROR_SECONDS_PER_GENERATION.*Received: 'soon'"):
        Mirror(run, tmp_path / "drive", journal=Journal(run.events))
