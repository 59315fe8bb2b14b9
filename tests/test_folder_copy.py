"""The local copy of an image folder on a slow mount (data/local_copy.py, supervisor/folder_copy.py), with real
files: when a copy is made (a slow mount declared through the mount-table seam, room or none), that it verifies,
and that a partial copy is never read."""

from __future__ import annotations

import os
import shutil
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from resilient._rundir import Journal, RunDir
from resilient.data import folder as folder_module
from resilient.data.folder import FolderIndex, list_folder, with_local_copy
from resilient.data.local_copy import (
    MANIFEST,
    FolderCopyJob,
    choose_root,
    copy_dir,
    copy_refusal,
    room_needed,
    verify_copy,
)
from resilient.supervisor.folder_copy import FolderCopier

Usage = namedtuple("Usage", "total used free")
GiB = 1 << 30


def write_pngs(root: Path, classes: int = 2, per_class: int = 20) -> Path:
    """``root/class{c}/{i:02d}.png``: 40 small RGB PNGs."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray((rng.random((10, 12, 3)) * 255).astype("uint8")).save(root / f"class{c}" / f"{i:02d}.png")
    return root


@pytest.fixture
def drive(tmp_path, monkeypatch):
    """``tmp_path/drive`` declared a Google Drive (FUSE) mount through the mount-table seam; the rest local."""
    mounts = tmp_path / "mounts"
    mounts.write_text(f"/dev/sda1 / ext4 rw 0 0\ndrive {tmp_path / 'drive'} fuse.drive rw 0 0\n")
    monkeypatch.setattr(folder_module, "MOUNTS", str(mounts))
    return tmp_path / "drive"


def job_of(root: Path, role: str = "x") -> FolderCopyJob:
    from resilient.data import image_folder

    files, _labels, _names = list_folder(image_folder(root, image_size=(10, 12)))
    return FolderCopyJob(role=role, root=str(root), files=files)


def copier(tmp_path, job, free=100 * GiB) -> tuple[FolderCopier, RunDir]:
    run = RunDir(tmp_path / "run")
    run.path.mkdir(parents=True)
    return FolderCopier(run.path, (job,), Journal(run.events),
                        disk_usage=lambda path: Usage(200 * GiB, 200 * GiB - free, free)), run


def events(run: RunDir) -> list[dict]:
    return [e for e in run.read_events() if e["event"].startswith("folder_copy")]


def test_the_choice_needs_room_for_the_bytes_plus_a_margin_on_a_local_disk():
    assert room_needed(100 * 2**20) == 110 * 2**20 + GiB
    assert copy_refusal(total_bytes=5 * GiB, free_bytes=7 * GiB, dest="/content", dest_fstype="ext4") is None
    why = copy_refusal(total_bytes=5 * GiB, free_bytes=6 * GiB, dest="/content", dest_fstype="ext4")
    assert why.startswith("no room: the copy needs 6.5 GiB free") and "6.0 GiB is free at /content" in why
    why = copy_refusal(total_bytes=1, free_bytes=100 * GiB, dest="/content/drive/runs", dest_fstype="fuse.drive")
    assert "fuse.drive file system too" in why


def test_a_folder_on_a_slow_mount_is_copied_and_the_copy_verifies(tmp_path, drive):
    root = write_pngs(drive / "cats")
    job = job_of(root)
    copy, run = copier(tmp_path, job)
    copy.start()
    assert copy.wait(30)
    got = events(run)
    assert [e["event"] for e in got] == ["folder_copy_started", "folder_copy_done"]
    total = sum(os.path.getsize(root / f) for f in job.files)
    assert got[1]["files"] == 40 and got[1]["bytes"] == total and got[1]["seconds"] >= 0
    dest = copy_dir(run.path, "x")
    assert dest == tmp_path / "run.images" / "x"  # beside run_dir, not in it (the mirror copies run_dir)
    assert oct(dest.stat().st_mode & 0o777) == "0o700"
    for rel in job.files:
        assert (dest / rel).read_bytes() == (root / rel).read_bytes()
    assert not [p for p in dest.rglob("*.part")]
    assert verify_copy(dest, str(root), job.files) is None
    assert choose_root(run.path, "x", str(root), job.files)[0] == str(dest)
    # The worker's index: only the root changes; files, labels and split stay.
    index = FolderIndex(folder=folder_module.ImageFolder(path=str(root), image_size=(10, 12)), root=str(root),
                        files=job.files, labels=None, class_names=None, train=(3, 1, 2), validation=())
    local, note = with_local_copy(index, run, "x")
    assert local.root == str(dest) and local.model_dump(exclude={"root"}) == index.model_dump(exclude={"root"})
    assert note["from_copy"] is True and note["files"] == 40
    # A second call finds the complete copy and keeps it.
    FolderCopier(run.path, (job,), Journal(run.events), disk_usage=lambda path: Usage(0, 0, 0)).copy(job)
    assert events(run)[-1]["event"] == "folder_copy_skipped" and "already there" in events(run)[-1]["reason"]


def test_a_partial_copy_is_not_read_and_the_next_copy_completes_it(tmp_path, drive):
    root = write_pngs(drive / "cats")
    job = job_of(root)
    copy, run = copier(tmp_path, job)
    copy.copy(job)
    dest = copy_dir(run.path, "x")
    (dest / MANIFEST).unlink()  # as if the VM died before the copy's last file
    (dest / job.files[-1]).unlink()
    root_used, note = choose_root(run.path, "x", str(root), job.files)
    assert root_used == str(root) and note["from_copy"] is False and "no manifest" in note["reason"]
    # The next copy keeps the files already there and copies the rest.
    copy.copy(job)
    started, done = events(run)[-2:]
    assert started["event"] == "folder_copy_started" and done["event"] == "folder_copy_done"
    assert started["present_bytes"] == started["bytes"] - os.path.getsize(root / job.files[-1])
    assert verify_copy(dest, str(root), job.files) is None
    # A copy whose file was cut short after its manifest was written does not verify either.
    with open(dest / job.files[0], "r+b") as f:
        f.truncate(10)
    assert "bytes" in verify_copy(dest, str(root), job.files)
    assert choose_root(run.path, "x", str(root), job.files)[0] == str(root)
    # The manifest of another listing (the folder changed on resume) does not stand for this one.
    assert "files" in verify_copy(dest, str(root), job.files[:-1])
    # A copy stopped by the end of the run writes no manifest.
    shutil.rmtree(dest)
    copy._stop.set()
    copy.copy(job)
    assert not (dest / MANIFEST).exists() and choose_root(run.path, "x", str(root), job.files)[0] == str(root)


def test_no_copy_without_room_or_off_a_slow_mount_and_a_failed_copy_is_journaled(tmp_path, drive):
    root = write_pngs(drive / "cats")
    job = job_of(root)
    copy, run = copier(tmp_path, job, free=GiB)  # 40 small files, but not the 1 GiB margin
    said: list[str] = []
    copy.say = said.append
    copy.copy(job)
    (skipped,) = events(run)
    assert skipped["event"] == "folder_copy_skipped" and skipped["reason"].startswith("no room")
    assert skipped["files"] == 40
    assert "is read from its fuse.drive mount, not copied: no room" in said[0]
    assert not copy_dir(run.path, "x").exists()
    assert choose_root(run.path, "x", str(root), job.files) == (str(root), None)  # no copy folder: nothing to say
    # A folder on local disk: nothing copied, nothing journaled.
    local = write_pngs(tmp_path / "local")
    copy.copy(job_of(local))
    assert len(events(run)) == 1 and not copy_dir(run.path, "x").exists()
    # A file gone between fit's listing and the copy: folder_copy_failed names it; the worker reads the original.
    gone = FolderCopyJob(role="validation_data", root=str(root), files=(*job.files, "class0/99.png"))
    copy2, run2 = copier(tmp_path / "b", gone)
    copy2.start()
    assert copy2.wait(30)
    (failed,) = events(run2)
    assert failed["event"] == "folder_copy_failed" and "99.png" in failed["error"]
    assert choose_root(run2.path, "validation_data", str(root), gone.files)[0] == str(root)
