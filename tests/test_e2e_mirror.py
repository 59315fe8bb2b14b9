"""mirror_dir with real workers: a new VM resumes from the mirror into an empty run_dir, exactly; a supervisor
killed while a copy is in flight leaves a partial copy that the next resume ignores."""

from __future__ import annotations

import os
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
from resilient.supervisor import mirror as mirror_module
from tests.conftest import make_data, make_model

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("no_leftover_processes")]

ROOT = Path(__file__).resolve().parent.parent


def _events(run_dir: Path, name: str) -> list[dict]:
    return [e for e in RunDir(run_dir).read_events() if e["event"] == name]


@pytest.mark.fault("sigkill", "mid-epoch", incident="killed",
                   outcome="TrainingFailedError (max_restarts=0); a new VM (empty run_dir) resumes from the mirror; "
                           "weights and History exact", lost="2 steps (since the checkpoint at step 9)",
                   corrupted="no")
def test_a_new_vm_resumes_from_the_mirror_into_an_empty_run_dir_exactly(tmp_path, monkeypatch, capsys):
    x, y = make_data()
    ref_model = make_model()
    ref = resilient.fit(ref_model, x, y, epochs=2, batch_size=32, seed=4, run_dir=tmp_path / "ref", verbose=0,
                        checkpoint_every=3)

    real_copy = mirror_module.copy_file

    def slow_copy(src: Path, dst: Path) -> None:  # a slow mount: training must not wait for it
        time.sleep(0.02)
        real_copy(src, dst)

    monkeypatch.setattr(mirror_module, "copy_file", slow_copy)
    drive = tmp_path / "drive" / "run"
    # The first VM dies for good at step 11; only the mirror survives it.
    with pytest.raises(resilient.TrainingFailedError):
        resilient.fit(make_model(), x, y, epochs=2, batch_size=32, seed=4, run_dir=tmp_path / "vm1", verbose=1,
                      checkpoint_every=3, faults="sigkill@11", max_restarts=0, mirror_dir=drive)
    assert "the mirror" in capsys.readouterr().out  # the flush says what is on the mirror
    synced = _events(tmp_path / "vm1", "mirror_synced")
    assert synced and synced[-1]["step"] == 9 and all(e["lag_seconds"] >= 0 for e in synced)
    saved = [e["step"] for e in _events(tmp_path / "vm1", "checkpoint_saved")]
    assert saved == sorted(saved) and 9 in saved  # the worker's saves went on, in order, whatever the mirror did

    model = make_model()
    history = resilient.fit(model, x, y, epochs=2, batch_size=32, seed=4, run_dir=tmp_path / "vm2", verbose=1,
                            checkpoint_every=3, faults="sigkill@11", max_restarts=0, mirror_dir=drive)
    out = capsys.readouterr().out
    assert "restored the run from the mirror" in out and "step 9" in out
    assert history.incidents == []  # the fault fired on the first VM (faults_fired.json came from the mirror)
    assert history.epoch == [0, 1]
    for a, b in zip(ref_model.get_weights(), model.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
    np.testing.assert_allclose(history.history["loss"], ref.history["loss"], rtol=1e-6)
    assert _events(tmp_path / "vm2", "worker_ready")[-1]["resumed_from_step"] == 9
    # The flush at the end left the finished run on the mirror: its last checkpoint and its result.
    assert CheckpointStore(drive / "checkpoints").latest().step == 16
    assert (drive / "result.json").exists()
    assert _events(drive, "run_finished")[-1]["status"] == "completed"


KILLED_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    sys.path.insert(0, {root!r})
    from tests.conftest import make_data, make_model
    import resilient
    from resilient.supervisor import mirror

    real = mirror.copy_file
    drive = Path({drive!r})

    def copy_then_hang(src, dst):
        # Once one generation is on the mirror, the next generation's copy stops halfway through a file.
        if dst.parent.name.startswith(".tmp-mirror-") and list((drive / "checkpoints").glob("ckpt-*")):
            dst.write_bytes(src.read_bytes()[: max(1, src.stat().st_size // 2)])
            Path({flag!r}).write_text("in flight")
            time.sleep(3600)
        real(src, dst)

    mirror.copy_file = copy_then_hang
    x, y = make_data()
    resilient.fit(make_model(), x, y, epochs=2, batch_size=32, seed=4, run_dir={run_dir!r}, verbose=0,
                  checkpoint_every=3, mirror_dir=str(drive))
    """
)


@pytest.mark.fault("caller_sigkill", "checkpoint save", incident="none (the supervisor is gone)",
                   outcome="the mirror's partial copy is ignored; a new VM resumes from its newest verified "
                           "generation and completes", lost="the steps since the newest verified mirrored checkpoint",
                   corrupted="no (the partial copy is never used)")
def test_a_supervisor_killed_mid_copy_leaves_a_partial_copy_that_the_resume_ignores(tmp_path):
    drive, flag = tmp_path / "drive" / "run", tmp_path / "copy-in-flight"
    script = KILLED_SCRIPT.format(root=str(ROOT), drive=str(drive), flag=str(flag), run_dir=str(tmp_path / "vm1"))
    sup = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not flag.exists() and sup.poll() is None:
            time.sleep(0.1)
        assert flag.exists(), f"no copy was in flight: {sup.stderr.read().decode()[-2000:] if sup.poll() else ''}"
        os.kill(sup.pid, signal.SIGKILL)  # the VM dies mid-copy
        sup.wait(timeout=10)
    finally:
        if sup.poll() is None:
            sup.kill()
            sup.wait()
    partial = list((drive / "checkpoints").glob(".tmp-mirror-*"))
    assert partial, "the kill left no partial copy"
    [verified] = [p.name for p in CheckpointStore(drive / "checkpoints").generations()]
    verified_step = int(verified.removeprefix("ckpt-"))

    x, y = make_data()
    history = resilient.fit(make_model(), x, y, epochs=2, batch_size=32, seed=4, run_dir=tmp_path / "vm2",
                            verbose=0, checkpoint_every=3, mirror_dir=drive)
    assert history.epoch == [0, 1]
    assert _events(tmp_path / "vm2", "worker_ready")[-1]["resumed_from_step"] == verified_step
    local = [p.name for p in (tmp_path / "vm2" / "checkpoints").iterdir()]
    assert not any(name.startswith(".tmp") for name in local)
    assert not list((drive / "checkpoints").glob(".tmp-mirror-*"))  # the next mirror tidied it away


def test_a_mirror_that_vanishes_mid_run_is_caught_up_and_the_run_completes(tmp_path):
    import keras

    mount, away, run_dir = tmp_path / "mnt", tmp_path / "mnt-away", tmp_path / "local"
    events, dropped = run_dir / "events.jsonl", tmp_path / "dropped"

    def on_batch_end(batch: int, logs: dict) -> None:  # runs in the worker
        import time as _time
        from pathlib import Path as _Path

        step = batch + 1
        if step == 4 and not _Path(dropped).exists():  # once, in the first epoch
            _Path(dropped).touch()
            _Path(mount).rename(away)  # the Drive mount drops mid-run
        if step == 7 and _Path(away).exists():
            deadline = _time.monotonic() + 60
            # Training went on; the mount comes back once the mirror has met it missing (bounded).
            while _time.monotonic() < deadline and '"mirror_retry"' not in _Path(events).read_text():
                _time.sleep(0.05)
            _Path(away).rename(mount)

    x, y = make_data()
    history = resilient.fit(make_model(), x, y, epochs=2, batch_size=32, seed=4, run_dir=run_dir, verbose=0,
                            checkpoint_every=2, mirror_dir=mount / "run",
                            callbacks=[keras.callbacks.LambdaCallback(on_train_batch_end=on_batch_end)])
    assert history.epoch == [0, 1] and history.incidents == []
    names = [e["event"] for e in RunDir(run_dir).read_events()]
    assert "mirror_retry" in names
    assert "mirror_synced" in names[names.index("mirror_retry"):]  # caught up after it came back
    assert CheckpointStore(mount / "run" / "checkpoints").latest().step == 16
    assert _events(mount / "run", "run_finished")[-1]["status"] == "completed"


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MiB tmpfs mounted for the test (root, CAP_SYS_ADMIN); skipped, with the reason, where not permitted."""
    mount = tmp_path / "drive"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mount)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN): {proc.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, check=False)


@pytest.mark.fault("disk_full", "mid-epoch", incident="none (the mirror is not the training)",
                   outcome="the run completes; the journal says the mirror failed (ENOSPC) and how far behind it is; "
                           "only verified generations on the mirror", lost="0 steps", corrupted="no")
def test_a_mirror_on_a_tmpfs_that_fills_up_never_stops_the_training(small_tmpfs, tmp_path):
    import keras

    run_dir, mirror = tmp_path / "local", small_tmpfs / "run"
    events, filled = run_dir / "events.jsonl", tmp_path / "filled"

    def on_batch_end(batch: int, logs: dict) -> None:  # runs in the worker
        import time as _time
        from pathlib import Path as _Path

        if batch + 1 == 5 and not _Path(filled).exists():  # once, in the first epoch
            _Path(filled).touch()
            deadline = _time.monotonic() + 60  # one generation on the mirror first (bounded)
            while _time.monotonic() < deadline and '"mirror_synced"' not in _Path(events).read_text():
                _time.sleep(0.05)
            try:  # then the "Drive quota" runs out: a file takes all the room left
                with open(_Path(small_tmpfs) / "filler", "wb") as f:
                    while True:
                        f.write(b"\0" * 65536)
                        f.flush()
            except OSError:
                pass

    x, y = make_data()
    history = resilient.fit(make_model(), x, y, epochs=2, batch_size=32, seed=4, run_dir=run_dir, verbose=0,
                            checkpoint_every=2, mirror_dir=mirror,
                            callbacks=[keras.callbacks.LambdaCallback(on_train_batch_end=on_batch_end)])
    assert history.epoch == [0, 1] and history.incidents == []  # training went on, unharmed
    assert _events(run_dir, "run_finished")[-1]["status"] == "completed"
    failures = _events(run_dir, "mirror_retry") + _events(run_dir, "mirror_error")
    assert failures and any("No space left on device" in e["error"] for e in failures), failures
    [flushed] = _events(run_dir, "mirror_flushed")
    assert flushed["local_step"] == 16 and flushed["step"] < 16 and flushed["behind_steps"] == 16 - flushed["step"]
    # Only whole, verified generations on the mirror: a copy that met the full disk was removed, never renamed.
    store = CheckpointStore(mirror / "checkpoints")
    assert next(int(p.name.removeprefix("ckpt-")) for p in store.generations()) == flushed["step"]
    for path in store.generations():
        store.verify(path)
    assert not [p for p in mirror.rglob(".tmp-mirror-*")]
    from resilient._status import summarize

    text = summarize(run_dir, mirror_dir=mirror)
    assert "behind the local checkpoint (step 16)" in text and "mirror failing since" in text
    assert f"on the mirror {mirror}: step {flushed['step']}" in text
