"""The checkpoint store (atomic, verified generations with fall-back) and the run directory's journal."""

from __future__ import annotations

import datetime as dt
import errno
import json
import os
from pathlib import Path

import pytest

from resilient._checkpoint import MANIFEST, CheckpointStore, CorruptCheckpoint, check_resumable
from resilient._errors import RunDirError
from resilient._rundir import Journal, RunDir, atomic_write_text


def writer_for(step: int, extra: bytes = b""):
    """A writer that puts two payload files, whose content depends on ``step``, into the checkpoint."""

    def write(folder: Path) -> None:
        (folder / "weights.bin").write_bytes(bytes([step % 256]) * 4096 + extra)
        (folder / "state.json").write_text(json.dumps({"step": step}))

    return write


def save(store: CheckpointStore, step: int, **meta: object):
    return store.save(step, {"epoch": step // 10, **meta}, writer_for(step))


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


# ------------------------------------------------------------------------------------------- save/load


def test_save_then_latest_round_trip(tmp_path):
    store = CheckpointStore(tmp_path / "ckpt")
    saved = save(store, 7, offset=224)
    assert saved.step == 7
    assert saved.path.name == "ckpt-000000000007"
    assert set(saved.files) == {"weights.bin", "state.json"}
    assert saved.nbytes == 4096 + len(json.dumps({"step": 7}))

    latest = store.latest()
    assert latest is not None
    assert latest.step == 7
    assert latest.path == saved.path
    assert latest.meta == {"epoch": 0, "offset": 224}
    assert latest.files == saved.files
    assert latest.file("weights.bin").read_bytes() == bytes([7]) * 4096
    assert json.loads(latest.file("state.json").read_text()) == {"step": 7}
    assert leftovers(store.root) == []


def test_manifest_lists_sizes_and_checksums(tmp_path):
    store = CheckpointStore(tmp_path)
    saved = save(store, 3)
    manifest = json.loads((saved.path / MANIFEST).read_text())
    assert manifest["step"] == 3
    assert manifest["meta"] == {"epoch": 0}
    assert manifest["created"].endswith("Z")
    assert manifest["files"]["weights.bin"]["bytes"] == 4096
    assert len(manifest["files"]["weights.bin"]["sha256"]) == 64


def test_empty_store(tmp_path):
    store = CheckpointStore(tmp_path / "never-created")
    assert store.generations() == []
    assert store.latest() is None
    assert store.latest_meta() is None


def test_latest_is_the_highest_step_not_the_last_written(tmp_path):
    store = CheckpointStore(tmp_path, keep=5)
    for step in (5, 100, 20):
        save(store, step)
    assert store.latest().step == 100
    assert [p.name for p in store.generations()] == ["ckpt-000000000100", "ckpt-000000000020", "ckpt-000000000005"]


@pytest.mark.parametrize("keep", [2, 3])
def test_generations_are_pruned_to_keep(tmp_path, keep):
    store = CheckpointStore(tmp_path, keep=keep)
    for step in range(1, 7):
        save(store, step * 10)
        assert len(store.generations()) == min(step, keep)
    assert [int(p.name.split("-")[1]) for p in store.generations()] == [60, 50, 40][:keep]


@pytest.mark.parametrize("keep", [1, 0, -1])
def test_keep_below_two_is_rejected(tmp_path, keep):
    with pytest.raises(ValueError) as info:
        CheckpointStore(tmp_path, keep=keep)
    assert f"Received: keep={keep}" in str(info.value)
    assert ">= 2" in str(info.value)


# ------------------------------------------------------------------------------------------ corruption


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def delete(path: Path) -> None:
    path.unlink()


def garble(path: Path) -> None:
    path.write_text('{"step": 20, "files": {')


@pytest.mark.parametrize(
    ("damage", "target", "reason"),
    [
        (flip_a_byte, "weights.bin", "checksum mismatch"),
        (truncate, "weights.bin", "has 2048 bytes, manifest says 4096"),
        (delete, "weights.bin", "missing weights.bin"),
        (delete, MANIFEST, "unreadable manifest"),
        (garble, MANIFEST, "unreadable manifest"),
    ],
    ids=["flipped-byte", "truncated-file", "deleted-file", "deleted-manifest", "torn-manifest"],
)
def test_damaged_newest_generation_is_skipped(tmp_path, damage, target, reason):
    store = CheckpointStore(tmp_path)
    save(store, 10)
    newest = save(store, 20)
    damage(newest.path / target)

    reported: list[tuple[Path, str]] = []
    latest = store.latest(on_corrupt=lambda path, why: reported.append((path, why)))
    assert latest is not None
    assert latest.step == 10
    assert latest.file("weights.bin").read_bytes() == bytes([10]) * 4096
    assert len(reported) == 1
    assert reported[0][0] == newest.path
    assert reported[0][1].startswith("ckpt-000000000020: ")
    assert reason in reported[0][1]


def test_verify_raises_corrupt_checkpoint(tmp_path):
    store = CheckpointStore(tmp_path)
    saved = save(store, 1)
    flip_a_byte(saved.path / "state.json")
    with pytest.raises(CorruptCheckpoint, match=r"state\.json checksum mismatch"):
        store.verify(saved.path)


def test_every_generation_damaged_gives_none(tmp_path):
    store = CheckpointStore(tmp_path)
    paths = [save(store, step).path for step in (1, 2, 3)]
    for path in paths:
        flip_a_byte(path / "weights.bin")
    reported: list[str] = []
    assert store.latest(on_corrupt=lambda path, why: reported.append(path.name)) is None
    assert reported == ["ckpt-000000000003", "ckpt-000000000002", "ckpt-000000000001"]


def test_damage_is_skipped_without_a_callback(tmp_path):
    store = CheckpointStore(tmp_path)
    save(store, 1)
    truncate(save(store, 2).path / "weights.bin")
    assert store.latest().step == 1


def test_structurally_wrong_manifest_is_skipped(tmp_path):
    store = CheckpointStore(tmp_path)
    save(store, 1)
    newest = save(store, 2)
    (newest.path / MANIFEST).write_text(json.dumps({"step": 2}))
    assert store.latest().step == 1


# ------------------------------------------------------------------------------------------- atomicity


def test_a_failing_writer_commits_nothing_and_leaves_no_temp_dir(tmp_path):
    store = CheckpointStore(tmp_path)
    save(store, 1)

    def broken(folder: Path) -> None:
        (folder / "weights.bin").write_bytes(b"half")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        store.save(2, {}, broken)
    assert [p.name for p in store.generations()] == ["ckpt-000000000001"]
    assert leftovers(tmp_path) == []
    assert store.latest().step == 1


def test_a_failing_writer_on_a_step_that_exists_keeps_the_old_one(tmp_path):
    store = CheckpointStore(tmp_path)
    save(store, 5)

    def broken(folder: Path) -> None:
        raise OSError("no space left on device")

    with pytest.raises(OSError):
        store.save(5, {}, broken)
    latest = store.latest()
    assert latest.step == 5
    assert latest.file("weights.bin").read_bytes() == bytes([5]) * 4096
    assert leftovers(tmp_path) == []


def test_saving_the_same_step_twice_replaces_it_whole(tmp_path):
    store = CheckpointStore(tmp_path)
    save(store, 9, reason="interval")

    def only_one_file(folder: Path) -> None:
        (folder / "weights.bin").write_bytes(b"new")

    second = store.save(9, {"epoch": 1, "reason": "epoch_end"}, only_one_file)
    assert [p.name for p in store.generations()] == ["ckpt-000000000009"]
    assert sorted(p.name for p in second.path.iterdir()) == ["manifest.json", "weights.bin"]  # state.json is gone
    latest = store.latest()
    assert latest.meta == {"epoch": 1, "reason": "epoch_end"}
    assert latest.file("weights.bin").read_bytes() == b"new"
    assert leftovers(tmp_path) == []


def test_stale_temp_dirs_of_killed_writers_are_not_generations(tmp_path):
    store = CheckpointStore(tmp_path)
    (tmp_path / ".tmp-deadbeef").mkdir()
    (tmp_path / ".tmp-deadbeef" / "weights.bin").write_bytes(b"partial")
    save(store, 1)
    assert [p.name for p in store.generations()] == ["ckpt-000000000001"]
    # Fresh ones may belong to a writer that is still running: they are left alone.
    assert (tmp_path / ".tmp-deadbeef").exists()
    old = dt.datetime.now().timestamp() - 7200
    os.utime(tmp_path / ".tmp-deadbeef", (old, old))
    save(store, 2)
    assert not (tmp_path / ".tmp-deadbeef").exists()


# ----------------------------------------------------------------------------------------- latest_meta


def test_latest_meta(tmp_path):
    store = CheckpointStore(tmp_path)
    save(store, 10, offset=320)
    newest = save(store, 20, offset=640)
    assert store.latest_meta() == {"step": 20, "epoch": 2, "offset": 640, "path": str(newest.path)}


def test_latest_meta_does_not_verify_payloads(tmp_path):
    store = CheckpointStore(tmp_path)
    save(store, 10)
    newest = save(store, 20)
    flip_a_byte(newest.path / "weights.bin")
    assert store.latest_meta()["step"] == 20  # cheap: manifest only
    assert store.latest().step == 10


def test_latest_meta_skips_an_unreadable_manifest(tmp_path):
    store = CheckpointStore(tmp_path)
    older = save(store, 10)
    (save(store, 20).path / MANIFEST).unlink()
    assert store.latest_meta() == {"step": 10, "epoch": 1, "path": str(older.path)}


# ---------------------------------------------------------------------------------------------- rundir


def parse_time(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def test_journal_lines_have_iso_utc_time_and_event(tmp_path):
    journal = Journal(tmp_path / "events.jsonl")
    before = dt.datetime.now(dt.timezone.utc)
    record = journal.write("attempt_started", attempt=0, plan={"batch_size": 32})
    journal.write("checkpoint_saved", epoch=0, step=5, seconds=0.1, bytes=10, path=tmp_path)
    journal.write("run_finished", status="completed")
    after = dt.datetime.now(dt.timezone.utc)

    lines = (tmp_path / "events.jsonl").read_text().splitlines()
    assert len(lines) == 3
    events = [json.loads(line) for line in lines]
    assert [e["event"] for e in events] == ["attempt_started", "checkpoint_saved", "run_finished"]
    assert events[0] == record
    assert events[0]["plan"] == {"batch_size": 32}
    assert events[1]["path"] == str(tmp_path)  # non-JSON values are made readable, not dropped
    for event in events:
        assert list(event)[:2] == ["time", "event"]
        assert event["time"].endswith("Z")
        stamp = parse_time(event["time"])
        assert stamp.utcoffset() == dt.timedelta(0)
        assert before - dt.timedelta(seconds=1) <= stamp <= after + dt.timedelta(seconds=1)


def test_journal_appends_across_instances(tmp_path):
    Journal(tmp_path / "events.jsonl").write("run_started")
    Journal(tmp_path / "events.jsonl").write("run_finished", status="failed")
    assert [e["event"] for e in RunDir(tmp_path).read_events()] == ["run_started", "run_finished"]


def test_read_events_skips_a_torn_last_line(tmp_path):
    run = RunDir(tmp_path)
    journal = Journal(run.events)
    journal.write("run_started")
    journal.write("attempt_started", attempt=0)
    with open(run.events, "a") as f:
        f.write('{"time": "2024-01-01T00:00:00.000Z", "event": "checkpoint_sa')
    events = run.read_events()
    assert [e["event"] for e in events] == ["run_started", "attempt_started"]


def test_read_events_of_a_missing_journal_is_empty(tmp_path):
    assert RunDir(tmp_path / "nothing").read_events() == []


def test_rundir_paths(tmp_path):
    run = RunDir(tmp_path)
    assert run.path.is_absolute()
    assert run.plan_json == tmp_path / "plan.json"
    assert run.events == tmp_path / "events.jsonl"
    assert run.checkpoints == tmp_path / "checkpoints"
    assert run.result_json == tmp_path / "result.json"
    assert run.attempt_dir(7) == tmp_path / "attempts" / "007"


def test_atomic_write_text(tmp_path):
    path = tmp_path / "plan.json"
    atomic_write_text(path, "first")
    assert path.read_text() == "first"
    atomic_write_text(path, "second, longer content")
    assert path.read_text() == "second, longer content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]  # no temp file left behind


def test_atomic_write_text_failure_keeps_the_old_content(tmp_path):
    path = tmp_path / "plan.json"
    atomic_write_text(path, "old")
    with pytest.raises(TypeError):
        atomic_write_text(path, None)  # type: ignore[arg-type]
    assert path.read_text() == "old"


def test_atomic_write_text_failure_leaves_no_temp_file(tmp_path):
    path = tmp_path / "plan.json"
    atomic_write_text(path, "old")
    with pytest.raises(TypeError):
        atomic_write_text(path, None)  # type: ignore[arg-type]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]


def test_atomic_file_replaces_only_when_the_block_completes(tmp_path):
    from resilient._rundir import atomic_file, atomic_path

    path = tmp_path / "x.npy"
    with atomic_file(path) as f:
        f.write(b"new")
    with pytest.raises(RuntimeError), atomic_file(path) as f:
        f.write(b"half")
        raise RuntimeError("interrupted mid-write")
    assert path.read_bytes() == b"new"
    with atomic_path(tmp_path / "model.keras") as tmp:
        assert tmp.suffix == ".keras" and tmp.parent == tmp_path  # Keras checks the suffix
        tmp.write_bytes(b"m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.keras", "x.npy"]


# ------------------------------------------------------------------------------------- on a full disk


def fill(disk: Path, leave: int = 0) -> Path:
    """Fill ``disk`` until at most ``leave`` bytes are free; the filler file."""
    import shutil

    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while shutil.disk_usage(disk).free > leave + 65536:
                f.write(b"\0" * 65536)
            while shutil.disk_usage(disk).free > leave:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    return filler


@pytest.mark.fault("disk_full", "checkpoint save", outcome="the store's save fails with ENOSPC; the older "
                   "generations verify and no temp dir is left", corrupted="no")
def test_a_save_on_a_full_disk_keeps_the_older_generations_and_no_temp_dir(tiny_disk):
    store = CheckpointStore(tiny_disk("1m") / "ckpt")
    save(store, 1)
    save(store, 2)
    fill(store.root.parent, leave=8192)
    with pytest.raises(OSError) as info:
        store.save(3, {}, writer_for(3, extra=b"x" * 65536))
    assert info.value.errno == errno.ENOSPC
    assert [store.verify(p).step for p in store.generations()] == [2, 1]
    assert leftovers(store.root) == []


def test_a_journal_line_the_full_disk_cut_short_is_removed(tiny_disk):
    disk = tiny_disk("1m")
    journal = Journal(disk / "events.jsonl")
    journal.write("run_started")
    fill(disk)
    with pytest.raises(OSError) as info:
        journal.write("incident", detail="x" * 20000)  # more than the slack of the journal's last page
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(disk / "events.jsonl")
    assert [e["event"] for e in RunDir(disk).read_events()] == ["run_started"]
    assert (disk / "events.jsonl").read_text().endswith("}\n")


# ------------------------------------------------------------------------------- resuming (check_resumable)


def damage(path: Path) -> None:
    (path / "weights.bin").write_bytes(b"damaged")


def test_a_run_whose_every_checkpoint_is_damaged_is_refused_untouched(tmp_path):
    store = CheckpointStore(tmp_path / "checkpoints")
    for step in (4, 8):
        save(store, step)
        damage(store.generations()[0])
    (tmp_path / "result.json").write_text("{}")
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    with pytest.raises(RunDirError) as info:
        check_resumable(tmp_path)
    text = str(info.value)
    assert f"Refusing to resume {tmp_path}: it holds 2 checkpoint generation(s) and none verifies" in text
    assert "ckpt-000000000008: weights.bin has 7 bytes" in text and "ckpt-000000000004:" in text
    assert "start the training over from step 0" in text
    assert f"delete {tmp_path / 'checkpoints'} and {tmp_path / 'result.json'}, or pass a new run_dir" in text
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before


def test_a_damaged_newest_checkpoint_is_warned_about_and_the_older_one_resumes(tmp_path):
    store = CheckpointStore(tmp_path / "checkpoints")
    save(store, 4)
    save(store, 8)
    damage(store.generations()[0])
    with pytest.warns(UserWarning, match=r"checkpoint ckpt-000000000008 in .* is damaged .*; the run resumes from "
                                         r"the older ckpt-000000000004 \(step 4\)"):
        assert check_resumable(tmp_path).step == 4


def test_a_run_without_checkpoints_resumes_from_the_start(tmp_path, recwarn):
    assert check_resumable(tmp_path) is None
    assert not recwarn.list


# ------------------------------------------------------------------------------------- background writes


def test_background_writer_runs_one_job_at_a_time_in_order(tmp_path):
    import threading
    import time

    from resilient._checkpoint import BackgroundWriter

    store, writer, threads = CheckpointStore(tmp_path / "ckpt"), BackgroundWriter(), []

    def job(step: int):
        def run() -> None:
            threads.append(threading.current_thread().name)
            time.sleep(0.05)
            save(store, step)

        return run

    writer.submit(job(1))
    assert writer.busy
    writer.submit(job(2))  # waits for step 1 first: one generation in flight, committed in order
    assert [p.name for p in store.generations()] == ["ckpt-000000000001"]
    assert writer.wait(timeout=10) and not writer.busy
    assert [store.verify(p).step for p in store.generations()] == [2, 1]
    assert threads == ["resilient-checkpoint-writer"] * 2


def test_a_background_write_error_is_raised_unchanged_on_the_callers_thread(tmp_path):
    from resilient._checkpoint import BackgroundWriter

    failure = OSError(errno.ENOSPC, "No space left on device")

    def full() -> None:
        raise failure

    writer = BackgroundWriter()
    writer.submit(full)
    while writer.busy:
        pass
    with pytest.raises(OSError) as info:
        writer.check()  # what the training thread calls between steps
    assert info.value is failure and info.value.errno == errno.ENOSPC  # classified as disk_full, as before
    writer.check()  # raised once
    writer.submit(full)
    with pytest.raises(OSError):
        writer.submit(lambda: None)  # the next save waits for the write, and meets its error
    assert writer.wait()
