"""What fit reads back from a completed run: result.json, and the callbacks' state of the final checkpoint."""

from __future__ import annotations

import json

import cloudpickle
import pytest

from resilient._checkpoint import CheckpointStore
from resilient._fit import _finished_result, _read_result
from resilient._rundir import RunDir
from resilient.worker.state import load_callbacks_into


def _result(run: RunDir, **fields) -> None:
    run.path.mkdir(parents=True, exist_ok=True)
    run.result_json.write_text(json.dumps({"history": {"loss": [1.0, 0.5]}, "epochs_done": [0, 1],
                                           "global_step": 16, "attempt": 0, **fields}))


@pytest.mark.parametrize(
    ("fields", "epochs", "finished"),
    [
        ({}, 2, True),  # the same epochs: nothing left to train
        ({}, 1, True),  # fewer: model.fit(initial_epoch=2, epochs=1) trains nothing either
        ({}, 3, False),  # more: the run trains on
        ({"stopped_early": True}, 5, True),  # a callback ended it: complete whatever epochs
        ({"stopped_early": False, "steps": 8}, 3, False),
    ],
)
def test_a_finished_run_is_recognised_by_the_epochs_it_trained(tmp_path, fields, epochs, finished):
    run = RunDir(tmp_path / "run")
    _result(run, **fields)
    assert (_finished_result(run, epochs) is not None) is finished


def test_no_result_or_an_unreadable_one_is_not_a_finished_run(tmp_path):
    run = RunDir(tmp_path / "run")
    assert _finished_result(run, 1) is None
    run.path.mkdir()
    run.result_json.write_text("{not json")
    assert _finished_result(run, 1) is None and _read_result(run) == {}
    run.result_json.write_text(json.dumps({"history": {}, "epochs_done": []}))  # epochs=0, an older result
    assert _finished_result(run, 0) is not None and _finished_result(run, 1) is None
    assert _read_result(run).get("steps") is None


class _Callback:
    """Stands in for a keras callback: attributes, set_params and set_model."""

    def __init__(self, values: list) -> None:
        self.values = values
        self.best = None
        self.seen: dict = {}

    def set_params(self, params):
        self.params = params

    def set_model(self, model):
        self.model = model


def _checkpoint_with(run: RunDir, states: list[dict]) -> None:
    def write(tmp):
        with open(tmp / "callbacks.pkl", "wb") as f:
            cloudpickle.dump(states, f)

    CheckpointStore(run.checkpoints).save(16, {"epoch": 2, "offset": 0}, write)


def test_callbacks_get_the_final_checkpoints_state_and_lists_are_filled_in_place(tmp_path):
    run = RunDir(tmp_path / "run")
    _checkpoint_with(run, [{"values": [1, 2], "best": 0.5, "seen": {"a": 1}, "new": 3}, {"values": [9]}])
    handed_out: list = []
    first, second = _Callback(handed_out), _Callback([])
    model, params = object(), {"verbose": 0, "epochs": 2, "steps": 8}
    load_callbacks_into([first, second], run, model=model, params=params)
    assert handed_out == [1, 2] and first.values is handed_out
    assert (first.best, first.seen, first.new) == (0.5, {"a": 1}, 3)
    assert second.values == [9]
    assert first.model is model and second.params == params


def test_callbacks_are_left_alone_without_a_checkpoint_or_with_an_unreadable_state(tmp_path):
    run = RunDir(tmp_path / "run")
    cb = _Callback([0])
    load_callbacks_into([cb], run, params={"steps": None})
    assert cb.values == [0] and cb.params == {"steps": None} and not hasattr(cb, "model")

    def write(tmp):
        (tmp / "callbacks.pkl").write_bytes(b"not a pickle")

    CheckpointStore(run.checkpoints).save(8, {}, write)
    with pytest.warns(UserWarning, match="could not be read back"):
        load_callbacks_into([cb], run)
    assert cb.values == [0]
