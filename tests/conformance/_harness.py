"""Side-by-side runs: the same program through ``model.fit`` and through ``resilient.fit``.

Each conformance test builds its model twice from the same seed, trains one copy with plain
``model.fit`` in this process and the other with ``resilient.fit`` (in a worker process, with or
without rehearsed faults), and compares what a Keras user looks at: the History (every key, every
value), the final weights, the optimizer's step count, and the state of the callback objects.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

import resilient


def clone_weights(model: Any, like: Any) -> Any:
    model.set_weights(like.get_weights())
    return model


def side_by_side(
    build: Callable[[], Any],
    reference_fit: Callable[[Any], Any],
    resilient_fit: Callable[[Any], Any],
) -> tuple[Any, Any, Any, Any]:
    """Run ``reference_fit(model_a)`` (plain Keras) and ``resilient_fit(model_b)`` on two identical models."""
    import keras

    keras.utils.set_random_seed(1234)
    a = build()
    keras.utils.set_random_seed(1234)
    b = build()
    clone_weights(b, a)
    ref = reference_fit(a)
    res = resilient_fit(b)
    assert isinstance(res, resilient.History)
    return a, ref, b, res


def assert_same_history(ref: Any, res: Any, *, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    assert sorted(res.history) == sorted(ref.history), (sorted(res.history), sorted(ref.history))
    assert list(res.epoch) == list(ref.epoch)
    for key, values in ref.history.items():
        np.testing.assert_allclose(res.history[key], values, rtol=rtol, atol=atol, err_msg=f"history[{key!r}]")


def assert_same_weights(a: Any, b: Any, *, atol: float = 1e-5) -> None:
    wa, wb = a.get_weights(), b.get_weights()
    assert len(wa) == len(wb)
    for i, (u, v) in enumerate(zip(wa, wb)):
        np.testing.assert_allclose(v, u, atol=atol, rtol=1e-5, err_msg=f"weight {i} ({a.weights[i].path})")
    assert int(b.optimizer.iterations.numpy()) == int(a.optimizer.iterations.numpy())
