"""What fit refuses before any worker starts, with the path or the array, what is wrong and what to do:
unusable run_dir paths, arguments of the wrong type, damaged files in a run directory it would resume, a
run directory others could have written, and NaN or Inf in the arrays. No worker is started here."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

import resilient
from tests.conftest import make_data, make_model
from tests.fixtures import make_rundir_v0 as v0

FIXTURE = Path(__file__).parent / "fixtures" / "rundir_v0"
REFUSED = dict(incident="none", outcome="refused before start; nothing written", lost="0", corrupted="no")


def _snapshot(root: Path) -> dict[Path, tuple[int, int]]:
    return {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*")}


# ----------------------------------------------------------------------------------- run_dir and arguments


@pytest.mark.parametrize("case", ["empty", "file", "under a file", "proc"])
def test_an_unusable_run_dir_is_refused_before_anything_is_written(tmp_path, monkeypatch, case):
    monkeypatch.chdir(tmp_path)  # run_dir="" used to mean the current directory
    (tmp_path / "f").write_text("a file")
    value = {"empty": "", "file": tmp_path / "f", "under a file": tmp_path / "f" / "run",
             "proc": "/proc/self/run"}[case]
    x, y = make_data(32)
    with pytest.raises(resilient.RunDirError) as err:
        resilient.fit(make_model(), x, y, run_dir=value, verbose=0)
    text = str(err.value)
    assert "run_dir" in text and (case == "empty" or str(value) in text)
    assert "Pass" in text or "Expected a directory path" in text  # what to do
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


@pytest.mark.parametrize("name", ["faults", "callbacks", "trust_run_dir"])
def test_arguments_of_the_wrong_type_are_refused_with_what_was_expected(tmp_path, name):
    x, y = make_data(32)
    with pytest.raises(resilient.InvalidArgumentError, match=f"Invalid value for argument `{name}`. Received: {name}=5"):
        resilient.fit(make_model(), x, y, run_dir=tmp_path / "run", verbose=0, **{name: 5})
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------- damaged run directories


def _old_run(tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(FIXTURE, run_dir)
    return run_dir


def _resume(run_dir: Path, **kwargs):
    x, y, xv, yv = v0.data()
    return resilient.fit(v0.model(), x, y, validation_data=(xv, yv), run_dir=run_dir, **{**v0.ARGS, **kwargs})


@pytest.mark.parametrize("damage", ["plan.json", "run.json", "data/x.npy", "model.keras"])
def test_a_damaged_file_is_named_before_resuming_is_announced_and_nothing_is_touched(tmp_path, capsys, damage):
    run_dir = _old_run(tmp_path)
    path = run_dir / damage
    if damage.endswith(".json"):
        path.write_text('{"batch_size": ')
    else:
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size // 2)
    before = _snapshot(run_dir)
    with pytest.raises(resilient.RunDirError) as err:
        _resume(run_dir, verbose=1)
    text = str(err.value)
    assert str(path) in text and ("cannot be read" in text or "damaged" in text)
    assert "delete it" in text or "Pass another run_dir" in text  # what to do
    assert "mmap length" not in text and "File not found" not in text and "validation error" not in text
    assert "resuming run" not in capsys.readouterr().out
    assert _snapshot(run_dir) == before


# ----------------------------------------------------------------------------------- trust


@pytest.mark.parametrize("how", ["group-writable", "world-writable code file", "group-writable checkpoint file",
                                 "another owner"])
def test_a_run_directory_others_could_have_written_is_not_resumed(tmp_path, how):
    run_dir = _old_run(tmp_path)
    if how == "group-writable":
        os.chmod(run_dir, 0o770)
    elif how == "world-writable code file":
        os.chmod(run_dir / "objects.pkl", 0o666)
    elif how == "group-writable checkpoint file":  # each generation holds a callbacks.pkl a resume unpickles
        os.chmod(sorted((run_dir / "checkpoints").iterdir())[-1] / "manifest.json", 0o664)
    else:
        if os.getuid() != 0:
            pytest.skip("changing an owner needs root")
        os.chown(run_dir, 12345, 12345)
    before = _snapshot(run_dir)
    with pytest.raises(resilient.RunDirError, match="A run directory is code") as err:
        _resume(run_dir)
    assert "trust_run_dir=True" in str(err.value) and str(run_dir) in str(err.value)
    assert _snapshot(run_dir) == before


# ----------------------------------------------------------------------------------- NaN and Inf


@pytest.mark.fault("bad_data", "before start", **REFUSED)
@pytest.mark.parametrize("where", ["x", "sample_weight", "x_val", "val_sample_weight"])
def test_nan_or_inf_in_an_array_is_refused_up_front_naming_the_array_the_index_and_the_count(tmp_path, where):
    x, y = make_data(64)
    xv, yv = make_data(16, seed=1)
    sw, vsw = np.ones(64, "float32"), np.ones(16, "float32")
    arrays = {"x": x, "sample_weight": sw, "x_val": xv, "val_sample_weight": vsw}
    bad = arrays[where]
    if bad.ndim == 2:
        bad[5, 3], bad[9, 0] = np.nan, np.inf
        first = "(5, 3)"
    else:
        bad[5], bad[9] = np.nan, -np.inf
        first = "5"
    t0 = time.monotonic()
    with pytest.raises(resilient.InvalidArgumentError) as err:
        resilient.fit(make_model(), x, y, sample_weight=sw, validation_data=(xv, yv, vsw), run_dir=tmp_path / "run",
                      verbose=0)
    assert time.monotonic() - t0 < 5
    text = str(err.value)
    assert f"`{where}`" in text and "2 non-finite values" in text and f"the first at index {first}" in text
    assert "np.nan_to_num" in text  # what to do
    assert not (tmp_path / "run").exists()


@pytest.mark.fault("bad_data", "before start", **REFUSED)
def test_a_memmap_is_checked_in_chunks_to_its_last_sample(tmp_path, monkeypatch):
    from resilient.data import arrays

    monkeypatch.setattr(arrays, "FINITE_CHUNK_BYTES", 1024)  # many chunks over a small file
    x = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype="float32", shape=(4096, 8))
    x[:] = make_data(4096)[0]
    x[4095, 7] = np.nan
    x.flush()
    y = make_data(4096)[1]
    loaded = np.load(tmp_path / "x.npy", mmap_mode="r")
    seen = []
    real = np.asarray
    monkeypatch.setattr(arrays.np, "asarray", lambda a, *k, **kw: seen.append(getattr(a, "shape", None)) or real(a, *k, **kw))
    with pytest.raises(resilient.InvalidArgumentError, match=r"1 non-finite value \(NaN or Inf\), the first at index \(4095, 7\)"):
        resilient.fit(make_model(), loaded, y, run_dir=tmp_path / "run", verbose=0)
    assert (4096, 8) not in seen[2:]  # after the first conversions, only chunks of it were read
    assert not (tmp_path / "run").exists()
