"""End-to-end: each input kind trains in real workers, with validation data, and resumes exactly after a kill.

One test per input kind: an uninterrupted run and a run killed (SIGKILL) in the middle of an epoch, which
must end with the same weights (1e-6) and the same per-epoch history.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

import resilient
from resilient._rundir import RunDir
from resilient.steps import lower_resolution
from tests.conftest import make_data, make_model
from tests.input_helpers import make_image_model, write_image_folder

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("no_leftover_processes")]


def fit_call_modes(run_dir) -> dict[int, list[str]]:
    """How each attempt called model.fit (the worker journals every call)."""
    out: dict[int, list[str]] = {}
    for e in RunDir(run_dir).read_events():
        if e["event"] == "fit_call":
            out.setdefault(e["attempt"], []).append(e["mode"])
    return out


def assert_same_training(model, hist, ref_model, ref):
    for a, b in zip(ref_model.get_weights(), model.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
    assert hist.epoch == ref.epoch
    assert set(hist.history) == set(ref.history)
    for key in ref.history:
        np.testing.assert_allclose(hist.history[key], ref.history[key], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------- image folder


@pytest.mark.fault("sigkill", "mid-epoch", incident="killed",
                   outcome="completed; weights and History exact (image folder)",
                   lost="1 step (since the checkpoint at step 4)", corrupted="no")
def test_image_folder_trains_with_a_validation_split_and_resumes_exactly(tmp_path, monkeypatch):
    folder = write_image_folder(tmp_path / "imgs")  # 60 PNGs, 3 classes; 48 train, 12 validation
    spec = resilient.data.image_folder(folder, image_size=(8, 8), validation_split=0.2)
    common = dict(epochs=3, batch_size=8, seed=5, verbose=0, checkpoint_every=4)  # 6 steps an epoch

    # The reference calls model.fit once per epoch (as every attempt did before one call trained them all).
    ref_model = make_image_model()
    with monkeypatch.context() as m:
        m.setenv("RESILIENT_FIT_PER_EPOCH", "1")
        ref = resilient.fit(ref_model, spec, run_dir=tmp_path / "ref", **common)
    assert list(fit_call_modes(tmp_path / "ref").values()) == [["per_epoch"] * 3]
    assert ref.epoch == [0, 1, 2] and ref.incidents == []
    assert {"loss", "accuracy", "val_loss", "val_accuracy"} <= set(ref.history)
    assert all(len(v) == 3 for v in ref.history.values())
    assert int(ref_model.optimizer.iterations.numpy()) == 18

    # Killed at step 5, in the middle of epoch 0: the new worker resumes from step 4 with an empty cache.
    model = make_image_model()
    # One fit call per attempt; its epochs read the in-memory cache once an epoch has stored every image.
    hist = resilient.fit(model, spec, run_dir=tmp_path / "killed", faults="sigkill@5", **common)
    assert [i.kind for i in hist.incidents] == ["killed"]
    assert hist.incidents[0].checkpoint_step == 4
    assert list(fit_call_modes(tmp_path / "killed").values()) == [["all_epochs"], ["all_epochs"]]
    assert_same_training(model, hist, ref_model, ref)


@pytest.mark.fault("gpu_oom", "mid-epoch", incident="gpu_oom",
                   outcome="completed at a lower resolution",
                   lost="1 step", corrupted="no")
def test_image_folder_lower_resolution_heals_a_gpu_oom(tmp_path):
    folder = write_image_folder(tmp_path / "imgs", per_class=8)
    spec = resilient.data.image_folder(folder, image_size=(12, 10), validation_split=0.25)
    policy = resilient.Policy(ladders={"gpu_oom": [lower_resolution(factor=0.5, min_size=4)]},
                              probe={"enabled": False, "stable_steps": 1, "max_probes": 0})
    hist = resilient.fit(make_image_model(), spec, epochs=2, batch_size=6, seed=2, verbose=0, policy=policy,
                         run_dir=tmp_path / "run", faults="gpu_oom@3", checkpoint_every=2)
    assert [i.kind for i in hist.incidents] == ["gpu_oom"]
    assert hist.incidents[0].plan_after.image_size == (6, 5)
    assert hist.plan.image_size == (6, 5)
    assert hist.epoch == [0, 1] and len(hist.history["val_loss"]) == 2


@pytest.mark.fault("segfault", "mid-epoch", incident="crash",
                   outcome="completed; the restart reads the folder's local copy (journal: folder_read), weights "
                           "equal a run without the copy", lost="1 step (since the checkpoint at step 4)", corrupted="no")
def test_an_image_folder_on_a_slow_mount_is_read_from_its_local_copy_after_a_crash(tmp_path, monkeypatch):
    from resilient.data import folder as folder_module
    from resilient.supervisor import folder_copy as copy_module

    folder = write_image_folder(tmp_path / "drive" / "imgs", per_class=8)  # 24 PNGs; 18 train, 6 validation
    spec = resilient.data.image_folder(folder, image_size=(8, 8), validation_split=0.25)
    common = dict(epochs=2, batch_size=6, seed=3, verbose=0, checkpoint_every=2)  # 3 steps an epoch
    ref_model = make_image_model()
    ref = resilient.fit(ref_model, spec, run_dir=tmp_path / "ref", **common)  # a local folder: no copy
    assert not (tmp_path / "ref.images").exists()

    # The same folder declared a Google Drive mount (the mount-table seam): copied to <run_dir>.images/x.
    mounts = tmp_path / "mounts"
    mounts.write_text(f"/dev/sda1 / ext4 rw 0 0\ndrive {tmp_path / 'drive'} fuse.drive rw 0 0\n")
    monkeypatch.setattr(folder_module, "MOUNTS", str(mounts))
    # The copy waits (bounded) until the first attempt has chosen where to read: that attempt reads the
    # original, as on a mount slower than the first steps; training does not wait for the copy.
    journal = tmp_path / "run" / "events.jsonl"
    copy_file = copy_module._copy_file

    def after_the_first_attempt_chose(src, target, size):
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and '"folder_read"' not in (journal.read_text() if journal.exists() else ""):
            time.sleep(0.05)
        copy_file(src, target, size)

    monkeypatch.setattr(copy_module, "_copy_file", after_the_first_attempt_chose)
    model = make_image_model()
    with pytest.warns(UserWarning, match=r"fuse.drive file system .* resilient copies it in the background"):
        hist = resilient.fit(model, spec, run_dir=tmp_path / "run", faults="segfault@5", **common)
    assert [i.kind for i in hist.incidents] == ["crash"]
    events = RunDir(tmp_path / "run").read_events()
    names = [e["event"] for e in events]
    done = next(e for e in events if e["event"] == "folder_copy_done")
    assert done["files"] == 24 and done["path"] == str(tmp_path / "run.images" / "x")
    assert names.index("folder_copy_started") < names.index("folder_copy_done")
    reads = {e["attempt"]: e for e in events if e["event"] == "folder_read"}
    assert reads[0]["from_copy"] is False and "no manifest" in reads[0]["reason"], reads
    assert reads[0]["path"] == str(folder)
    # The copy (24 small files) is complete long before the crash at step 5; the restarted worker reads it.
    assert reads[1]["from_copy"] is True and reads[1]["path"] == done["path"], reads
    assert names.index("folder_copy_done") < names.index("folder_read", names.index("incident"))
    assert_same_training(model, hist, ref_model, ref)


# ----------------------------------------------------------------------------------------- factory


def make_dataset(plan, epoch, seed):
    """A factory defined in a test module: carried to the worker, shuffled by (seed, epoch)."""
    import tensorflow as tf

    x, y = make_data(n=192)
    return tf.data.Dataset.from_tensor_slices((x, y)).shuffle(192, seed=seed + epoch).batch(plan.batch_size)


def make_validation(plan):
    import tensorflow as tf

    x, y = make_data(n=64, seed=1)
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(plan.batch_size)


@pytest.mark.fault("sigkill", "mid-epoch", incident="killed",
                   outcome="completed; weights and History exact (dataset factory)",
                   lost="1 step (since the checkpoint at step 9)", corrupted="no")
def test_factory_trains_with_a_validation_factory_and_resumes_exactly(tmp_path):
    common = dict(validation_data=make_validation, epochs=2, batch_size=32, seed=3, verbose=0, checkpoint_every=3)
    ref_model = make_model()
    ref = resilient.fit(ref_model, make_dataset, run_dir=tmp_path / "ref", **common)  # 6 steps an epoch
    assert ref.epoch == [0, 1] and "val_loss" in ref.history and "val_accuracy" in ref.history
    assert int(ref_model.optimizer.iterations.numpy()) == 12

    # Killed at step 10 (epoch 1); resumed from step 9: three batches of the re-created epoch skipped.
    model = make_model()
    hist = resilient.fit(model, make_dataset, run_dir=tmp_path / "killed", faults="sigkill@10", **common)
    assert [i.kind for i in hist.incidents] == ["killed"]
    assert hist.incidents[0].checkpoint_step == 9
    assert_same_training(model, hist, ref_model, ref)
    # A factory's dataset is made in Python for each epoch: one model.fit call per epoch, journaled with why.
    assert list(fit_call_modes(tmp_path / "killed").values()) == [["per_epoch"] * 2, ["per_epoch"]]
    why = {e.get("why") for e in RunDir(tmp_path / "killed").read_events() if e["event"] == "fit_call"}
    assert why == {"factory input: its dataset is made in Python for each epoch"}


# ----------------------------------------------------------------------------------------- PyDataset


def _pydataset_class():
    import keras

    class Batches(keras.utils.PyDataset):
        """Batches of a fixed size; on_epoch_end regroups the samples with the dataset's own seeded RNG."""

        def __init__(self, n: int = 256, batch: int = 32, seed: int = 0, **kwargs) -> None:
            super().__init__(**kwargs)
            self.x, self.y = make_data(n=n, seed=seed)
            self.batch = batch
            self.rng = np.random.default_rng(seed)
            self.perm = np.arange(n)

        def __len__(self) -> int:
            return math.ceil(len(self.x) / self.batch)

        def __getitem__(self, i):
            idx = self.perm[i * self.batch:(i + 1) * self.batch]
            return self.x[idx], self.y[idx]

        def on_epoch_end(self) -> None:
            self.perm = self.rng.permutation(len(self.x))

    return Batches


@pytest.mark.fault("sigkill", "mid-epoch", incident="killed",
                   outcome="completed; weights and History exact (PyDataset)",
                   lost="1 step (since the checkpoint at step 12)", corrupted="no")
def test_pydataset_trains_and_resumes_exactly(tmp_path, monkeypatch):
    batches = _pydataset_class()
    common = dict(epochs=3, seed=9, verbose=0, checkpoint_every=3)
    # The reference calls model.fit once per epoch (as every attempt did before one call trained them all).
    ref_model = make_model()
    with monkeypatch.context() as m:
        m.setenv("RESILIENT_FIT_PER_EPOCH", "1")
        ref = resilient.fit(ref_model, batches(workers=2), validation_data=batches(n=64, seed=1),
                            run_dir=tmp_path / "ref", **common)  # 8 batches an epoch
    assert list(fit_call_modes(tmp_path / "ref").values()) == [["per_epoch"] * 3]
    assert ref.epoch == [0, 1, 2] and "val_loss" in ref.history
    assert int(ref_model.optimizer.iterations.numpy()) == 24

    # Killed at step 13 (epoch 1): resumed from step 12, four batches into the epoch, after replaying
    # on_epoch_end for epoch 0 so the dataset regroups its samples as it did.
    model = make_model()
    hist = resilient.fit(model, batches(workers=2), validation_data=batches(n=64, seed=1),
                         run_dir=tmp_path / "killed", faults="sigkill@13", **common)
    assert [i.kind for i in hist.incidents] == ["killed"]
    assert hist.incidents[0].checkpoint_step == 12
    assert list(fit_call_modes(tmp_path / "killed").values()) == [["all_epochs"], ["all_epochs"]]
    assert_same_training(model, hist, ref_model, ref)
