"""The run directory is private, checked before use, and cleaned of what interrupted saves left."""

from __future__ import annotations

import os
import stat
import subprocess

import numpy as np
import pytest

from resilient._checkpoint import CheckpointStore
from resilient._errors import RunDirError
from resilient._rundir import Journal, RunDir, atomic_write_text, check_run_dir_path


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_run_directories_and_files_are_private_whatever_the_umask(tmp_path, open_umask):
    run = RunDir(tmp_path / "runs" / "a")
    run.create()
    assert _mode(run.path) == 0o700
    atomic_write_text(run.plan_json, "{}")
    Journal(run.events).write("run_started")
    CheckpointStore(run.checkpoints).save(3, {"epoch": 0}, lambda d: np.save(d / "w.npy", np.zeros(2)))
    ckpt = CheckpointStore(run.checkpoints).latest()
    assert _mode(run.plan_json) == _mode(run.events) == 0o600
    assert _mode(run.checkpoints) == _mode(ckpt.path) == 0o700
    assert {_mode(p) for p in ckpt.path.iterdir()} == {0o600}


@pytest.mark.parametrize("why", ["writable by others", "owned by another user", "code file writable by others"])
def test_a_run_directory_others_could_have_written_is_refused(tmp_path, why):
    run = RunDir(tmp_path / "run")
    run.create()
    atomic_write_text(run.objects_file, "x")
    if why == "writable by others":
        os.chmod(run.path, 0o777)
    elif why == "owned by another user":
        if os.getuid() != 0:
            pytest.skip("changing a file's owner needs root")
        os.chown(run.path, 12345, 12345)
    else:
        os.chmod(run.objects_file, 0o666)
    with pytest.raises(RunDirError, match="A run directory is code") as err:
        run.check_trusted()
    assert "trust_run_dir=True" in str(err.value)


def test_your_own_private_run_directory_is_trusted(tmp_path):
    run = RunDir(tmp_path / "run")
    run.create()
    atomic_write_text(run.objects_file, "x")
    run.check_trusted()


@pytest.mark.parametrize("case", ["empty", "blank", "file", "under a file", "proc"])
def test_unusable_run_dir_paths_are_refused_with_the_path_and_what_to_do(tmp_path, case):
    (tmp_path / "f").write_text("not a directory")
    value = {"empty": "", "blank": "  ", "file": tmp_path / "f", "under a file": tmp_path / "f" / "run",
             "proc": "/proc/self/run"}[case]
    with pytest.raises(RunDirError) as err:
        check_run_dir_path(value)
    text = str(err.value)
    assert ("Expected a directory path" in text) if case in ("empty", "blank") else str(value) in text
    assert not (tmp_path / "f").is_dir()


def test_a_read_only_file_system_is_refused_before_anything_is_written(tmp_path):
    mnt = tmp_path / "ro"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {done.stderr.decode().strip()}")
    try:
        with pytest.raises(RunDirError, match="cannot be written"):
            check_run_dir_path(mnt / "run")
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_a_good_path_comes_back_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert check_run_dir_path("runs/a") == tmp_path / "runs" / "a"


def test_leftovers_of_interrupted_saves_are_removed_and_generations_kept(tmp_path):
    store = CheckpointStore(tmp_path / "checkpoints")
    store.save(1, {}, lambda d: np.save(d / "w.npy", np.zeros(2)))
    (store.root / ".tmp-dead").mkdir()
    (store.root / ".tmp-dead" / "weights.npz").write_bytes(b"half")
    (store.root / ".old-dead").mkdir()
    removed = store.remove_leftovers()
    assert sorted(p.name for p in removed) == [".old-dead", ".tmp-dead"]
    assert [p.name for p in store.root.iterdir()] == ["ckpt-000000000001"]


def test_survey_names_every_damaged_generation(tmp_path):
    store = CheckpointStore(tmp_path / "checkpoints")
    for step in (1, 2, 3):
        store.save(step, {}, lambda d: np.save(d / "w.npy", np.zeros(2)))
    for gen in store.generations():
        (gen / "w.npy").write_bytes(b"damaged")
    ckpt, damaged = store.survey()
    assert ckpt is None
    assert [p.name for p, _ in damaged] == ["ckpt-000000000003", "ckpt-000000000002", "ckpt-000000000001"]
