"""What a checkpoint holds, in one place: written by the worker, read by the worker and by ``fit``.

A checkpoint (``checkpoints/ckpt-<step>/``, see ``resilient._checkpoint``) holds:

- ``weights.npz``: the model's weights, in ``model.weights`` order;
- ``optimizer.npz``: the optimizer's variables keyed by meaning (``optimizer_state``), not by position;
- ``metrics.npz``: the training metrics' running state (restored only inside the epoch it belongs to);
- ``rng.npz``: the layers' seed-generator states (Dropout's random state);
- ``callbacks.pkl``: the picklable part of each user callback's ``__dict__``;
- the manifest's ``meta``: a ``CheckpointMeta`` (where the training stood).

No TensorFlow or Keras import here: the caller's process loads the result with it (``load_into``,
``load_callbacks_into``, ``read_result``) and must not pay for the training machinery.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._checkpoint import Checkpoint, CheckpointStore
from .._protocol import CheckpointMeta, TrainingResult
from .._rundir import RunDir, atomic_write_text

# Attributes every Keras callback has that belong to this process, not to the callback's state.
_CALLBACK_OWN = {"model", "_model", "params", "_chief_worker_only", "_supports_tf_logs"}


def inner_optimizer(opt: Any) -> Any:
    """The optimizer under a ``LossScaleOptimizer`` (or ``opt`` itself)."""
    return getattr(opt, "inner_optimizer", opt)


# ------------------------------------------------------------------------------- optimizer by meaning


def _slot_keys(model: Any, optimizer: Any) -> dict[int, str]:
    """Optimizer variables keyed by meaning: ``slot:<index of the model variable>:<slot name>``.

    Keras names a slot after its model variable's path (``dense_kernel_momentum``); reading that
    back as (variable index, slot kind) identifies the state of one model variable whatever the
    layer names in this process, the optimizer's wrapping (LossScaleOptimizer) or its variable count.
    Variables that belong to no model variable (``learning_rate``) keep their own name.
    """
    prefixes = sorted(((v.path.replace("/", "_") + "_", i) for i, v in enumerate(model.trainable_variables)),
                      key=lambda p: -len(p[0]))
    keys = {}
    for ov in optimizer.variables:
        last = ov.path.rsplit("/", 1)[-1]
        for prefix, index in prefixes:
            if last.startswith(prefix):
                keys[id(ov)] = f"slot:{index}:{last[len(prefix):]}"
                break
        else:
            keys[id(ov)] = f"slot:{last}"
    return keys


def optimizer_state(model: Any) -> dict[str, np.ndarray]:
    """Optimizer variables keyed by meaning (slot name per model variable), not by position."""
    opt = model.optimizer
    inner = inner_optimizer(opt)
    out: dict[str, np.ndarray] = {}
    keys = _slot_keys(model, inner)
    for v in inner.variables:
        if v is inner._iterations:
            continue
        out[keys[id(v)]] = np.asarray(v.numpy())
    accum = inner.gradient_accumulation_steps or 1
    micro = int(inner._iterations.numpy())
    out["meta:iterations"] = np.asarray(micro // accum, dtype=np.int64)  # optimizer updates
    out["meta:micro_steps"] = np.asarray(micro % accum, dtype=np.int64)  # into an accumulation window
    out["meta:accum"] = np.asarray(accum, dtype=np.int64)
    if opt is not inner:
        for v in opt.variables:
            if v.path.endswith("dynamic_scale") or v.path.endswith("step_counter"):
                out["lso:" + v.path.rsplit("/", 1)[-1]] = np.asarray(v.numpy())
    return out


def carry_window(saved_accum: int, saved_micro: int, saved_batch: int | None, accum: int,
                 batch: int | None) -> tuple[int, float] | None:
    """Where a partly accumulated window continues under another micro-batch: (micro steps, scale).

    Keras accumulates the sum of per-micro-batch mean gradients and divides by the accumulation
    steps at the update, so ``m`` micro-steps of ``b`` samples hold ``m * b`` samples' worth. Under
    micro-batch ``b'`` with the same effective batch, that is ``m * b / b'`` micro-steps with the
    accumulators scaled by ``b / b'``: the update that ends the window is the one the old plan would
    have made. None when it does not map exactly (the window is then dropped).
    """
    if saved_micro == 0:
        return 0, 1.0
    if saved_accum == accum and (saved_batch is None or batch is None or saved_batch == batch):
        return saved_micro, 1.0
    if saved_batch is None or batch is None or saved_accum * saved_batch != accum * batch:
        return None
    samples = saved_micro * saved_batch
    if samples % batch or not 0 < samples // batch < accum:
        return None
    return samples // batch, saved_batch / batch


def restore_optimizer_state(model: Any, state: dict[str, Any], saved_batch: int | None = None,
                            batch: int | None = None) -> list[str]:
    """Assign saved state to the (possibly rebuilt) optimizer by meaning; returns keys not restored.

    ``iterations`` keeps counting optimizer updates across a change of gradient accumulation. A
    partly accumulated window (an epoch-end checkpoint can fall inside one) continues under a new
    micro-batch when it maps exactly (``carry_window``) and is dropped otherwise.
    """
    opt = model.optimizer
    inner = inner_optimizer(opt)
    if not inner.built:
        opt.build(model.trainable_variables)
    accum = inner.gradient_accumulation_steps or 1
    window = carry_window(int(state.get("meta:accum", 1)), int(state.get("meta:micro_steps", 0)), saved_batch,
                          accum, batch)
    micro, scale = window if window is not None else (0, 0.0)
    known = set()
    keys = _slot_keys(model, inner)
    for v in inner.variables:
        if v is inner._iterations:
            continue
        key = keys[id(v)]
        known.add(key)
        if key.endswith("gradient_accumulator"):
            if key in state and tuple(state[key].shape) == tuple(v.shape) and micro:
                v.assign(state[key] * scale)
            continue  # otherwise a fresh window (zeros)
        if key in state and tuple(state[key].shape) == tuple(v.shape):
            v.assign(state[key])
    skipped = [k for k in state if k.startswith("slot:") and k not in known]
    if "meta:iterations" in state:
        inner._iterations.assign(int(state["meta:iterations"]) * accum + micro)
    if opt is not inner:
        for v in opt.variables:
            name = "lso:" + v.path.rsplit("/", 1)[-1]
            if name in state:
                v.assign(state[name])
    return skipped


# ------------------------------------------------------------------------------- RNG and callbacks


def _seed_generators(model: Any) -> list[Any]:
    out = []
    for layer in model._flatten_layers(include_self=True):
        out.extend(getattr(layer, "_seed_generators", []) or [])
    return out


def seed_generator_states(model: Any) -> list[np.ndarray]:
    """The state of every seed generator in ``model`` (Keras does not save them with the model)."""
    return [np.asarray(sg.state.numpy()) for sg in _seed_generators(model)]


def restore_seed_generator_states(model: Any, states: Sequence[Any]) -> None:
    """Assign saved seed-generator states (Dropout's random state); a count that differs is left alone."""
    generators = _seed_generators(model)
    if len(generators) != len(states):
        return
    for sg, value in zip(generators, states):
        if tuple(sg.state.shape) == tuple(value.shape):
            sg.state.assign(value)


def callback_state(cb: Any) -> dict[str, Any]:
    """The picklable part of a callback's ``__dict__`` (its model and params excluded)."""
    import cloudpickle

    out = {}
    for key, value in vars(cb).items():
        if key in _CALLBACK_OWN:
            continue
        try:
            cloudpickle.dumps(value)
        except Exception:
            continue  # file writers, locks: rebuilt by the callback itself
        out[key] = value
    return out


def _update_state(obj: Any, state: dict[str, Any]) -> None:
    """Set ``obj``'s attributes to ``state``, filling lists, dicts and sets it already holds in place."""
    for key, value in state.items():
        old = obj.__dict__.get(key)
        if type(old) is type(value) and isinstance(old, list):
            old[:] = value
        elif type(old) is type(value) and isinstance(old, (dict, set)):
            old.clear()
            old.update(value)
        else:
            obj.__dict__[key] = value


# ------------------------------------------------------------------------------- files


def _read_arrays(ckpt: Checkpoint, name: str) -> list[np.ndarray]:
    """A positional ``.npz`` of ``ckpt`` in order ([] when the checkpoint has none)."""
    if not ckpt.file(name).exists():
        return []
    with np.load(ckpt.file(name)) as z:
        return [z[f"arr_{i}"] for i in range(len(z.files))]


def _read_optimizer(ckpt: Checkpoint) -> dict[str, np.ndarray]:
    with np.load(ckpt.file("optimizer.npz")) as z:
        return {k: z[k] for k in z.files}


def _assign_weights(ckpt: Checkpoint, model: Any, *, strict: bool) -> None:
    weights = _read_arrays(ckpt, "weights.npz")
    if strict and len(weights) != len(model.weights):
        raise RuntimeError(f"Checkpoint {ckpt.path} holds {len(weights)} weights; the model has {len(model.weights)}.")
    for var, value in zip(model.weights, weights):
        var.assign(value)


@dataclass
class Snapshot:
    """One checkpoint's content, copied to host memory at a step boundary: what ``write`` puts on disk.

    Everything is a copy (``Variable.numpy()`` copies; the callbacks' state is pickled), so the training
    may go on while a background thread writes it.
    """

    meta: CheckpointMeta
    weights: list[np.ndarray]
    optimizer: dict[str, np.ndarray]
    metrics: list[np.ndarray]
    rng: list[np.ndarray]
    callbacks: bytes  # cloudpickled list of each callback's state

    @property
    def nbytes(self) -> int:
        """Host memory the snapshot holds (its arrays and pickled callbacks)."""
        arrays = [*self.weights, *self.optimizer.values(), *self.metrics, *self.rng]
        return sum(int(a.nbytes) for a in arrays) + len(self.callbacks)


def snapshot(model: Any, meta: CheckpointMeta, metric_values: Sequence[Any], callbacks: Sequence[Any]) -> Snapshot:
    """Copy the training state of ``model`` (at ``meta.global_step``) to host memory: the fast half of a save."""
    import cloudpickle

    return Snapshot(
        meta=meta,
        weights=[np.asarray(w.numpy()) for w in model.weights],
        optimizer=optimizer_state(model),
        metrics=[np.array(v) for v in metric_values],
        rng=seed_generator_states(model),
        callbacks=cloudpickle.dumps([callback_state(cb) for cb in callbacks]),
    )


def write(store: CheckpointStore, snap: Snapshot, midway: Callable[[], None] | None = None) -> Checkpoint:
    """Write ``snap`` as one checkpoint generation (files fsynced, then renamed into place): the slow half.

    ``midway``: called after the first payload files are written, before the rest and the commit
    (a rehearsed ``save_kill`` dies there, leaving a half-written generation behind).
    """

    def write_files(tmp: Path) -> None:
        np.savez(tmp / "weights.npz", *snap.weights)
        np.savez(tmp / "optimizer.npz", **snap.optimizer)
        if midway is not None:
            midway()
        np.savez(tmp / "metrics.npz", *snap.metrics)
        np.savez(tmp / "rng.npz", *snap.rng)
        with open(tmp / "callbacks.pkl", "wb") as f:
            f.write(snap.callbacks)

    return store.save(snap.meta.global_step, snap.meta.model_dump(mode="json"), write_files)


def save(store: CheckpointStore, model: Any, meta: CheckpointMeta, metric_values: Sequence[Any],
         callbacks: Sequence[Any], midway: Callable[[], None] | None = None) -> Checkpoint:
    """Write one checkpoint of ``model`` (at ``meta.global_step``) with the training state around it, at once."""
    return write(store, snapshot(model, meta, metric_values, callbacks), midway)


@dataclass
class Restored:
    """What ``restore`` put into the model, and the rest of the checkpoint for the attempt to take up."""

    step: int
    meta: CheckpointMeta
    #: The epoch's running metrics, only for a checkpoint inside an epoch (None at an epoch boundary).
    metric_values: list[np.ndarray] | None
    callback_states: list[dict[str, Any]]
    #: Optimizer state keys that matched no variable of this model's optimizer.
    skipped: list[str]


def restore(ckpt: Checkpoint, model: Any, batch_size: int | None) -> Restored:
    """Load ``ckpt`` into ``model`` (built under a plan with micro-batch ``batch_size``)."""
    import cloudpickle

    meta = CheckpointMeta.model_validate(ckpt.meta)
    _assign_weights(ckpt, model, strict=True)
    saved_batch = (meta.plan or {}).get("batch_size")
    skipped = restore_optimizer_state(model, _read_optimizer(ckpt), saved_batch=saved_batch, batch=batch_size)
    # Only a resume inside an epoch continues its running metrics; at an epoch boundary the next
    # epoch starts them fresh, as Keras resets metrics at each epoch begin.
    metric_values = _read_arrays(ckpt, "metrics.npz") if meta.offset > 0 else None
    restore_seed_generator_states(model, _read_arrays(ckpt, "rng.npz"))
    with open(ckpt.file("callbacks.pkl"), "rb") as f:
        callback_states = cloudpickle.load(f)
    return Restored(ckpt.step, meta, metric_values, callback_states, skipped)


# ------------------------------------------------------------------------------- the result, for fit


def write_result(run: RunDir, result: TrainingResult) -> None:
    # json.dumps, not model_dump_json: a diverged metric stays NaN in result.json, as model.fit's History.
    atomic_write_text(run.result_json, json.dumps(result.model_dump(mode="json")))


def read_result(run: RunDir) -> TrainingResult | None:
    """The worker's ``result.json`` (None when absent or unreadable)."""
    try:
        return TrainingResult.model_validate(json.loads(run.result_json.read_text()))
    except (OSError, ValueError):  # pydantic's ValidationError is a ValueError
        return None


def load_into(model: Any, run: RunDir) -> None:
    """Load the newest verified checkpoint's weights, optimizer state and RNG state into ``model``."""
    ckpt = CheckpointStore(run.checkpoints).latest()
    if ckpt is None:
        return
    _assign_weights(ckpt, model, strict=False)
    restore_optimizer_state(model, _read_optimizer(ckpt))
    restore_seed_generator_states(model, _read_arrays(ckpt, "rng.npz"))


def load_callbacks_into(callbacks: Sequence[Any] | None, run: RunDir, model: Any = None,
                        params: dict[str, Any] | None = None) -> None:
    """Give the caller's callback objects the state they ended the training with (the newest checkpoint's).

    As after ``model.fit``: their attributes as the worker's callbacks left them, ``model`` (when given)
    and ``params``. Lists, dicts and sets already on a callback are filled in place, so a list the caller
    handed to a callback holds the values too.
    """
    cbs = list(callbacks or [])
    if not cbs:
        return
    states: list[dict[str, Any]] = []
    ckpt = CheckpointStore(run.checkpoints).latest()
    if ckpt is not None and ckpt.file("callbacks.pkl").exists():
        try:
            import cloudpickle

            with open(ckpt.file("callbacks.pkl"), "rb") as f:
                states = list(cloudpickle.load(f))
        except Exception as e:
            warnings.warn(f"resilient: the callbacks' state in {ckpt.path} could not be read back ({e!r}); the "
                          "callback objects keep the state they had before fit.", stacklevel=3)
    for cb, state in zip(cbs, states):
        _update_state(cb, state)
    for cb in cbs:
        if params is not None:
            cb.set_params(params)
        if model is not None:
            cb.set_model(model)
