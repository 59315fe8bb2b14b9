"""What cannot reach the worker is refused in the caller, before any worker starts and before the run directory."""

from __future__ import annotations

import gc
import time
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import resilient
from resilient._carry import custom_objects_of, prove_carriable
from tests.conftest import make_data

# Far below the ~10-15 s a worker takes to start and fail.
FAST = 5.0


class NoKwargs(keras.layers.Layer):
    """Its get_config returns the base config, but __init__ takes no **kwargs: from_config fails."""

    def __init__(self, factor: float = 2.0):
        super().__init__()
        self.factor = factor

    def call(self, x):
        return x * self.factor

    def get_config(self):
        return {**super().get_config(), "factor": self.factor}


class NoConfig(keras.layers.Layer):
    """A constructor argument Keras cannot write into a config, and no get_config."""

    def __init__(self, table, **kwargs):
        super().__init__(**kwargs)
        self.table = table

    def call(self, x):
        return x


class GoodScale(keras.layers.Layer):
    """A custom layer as Keras asks for one (not registered: it travels in the custom objects)."""

    def __init__(self, factor: float = 2.0, **kwargs):
        super().__init__(**kwargs)
        self.factor = factor

    def call(self, x):
        return x * self.factor

    def get_config(self):
        return {**super().get_config(), "factor": self.factor}


class Unloadable:
    """Pickles fine, fails when loaded back (as an object whose state needs something the worker lacks)."""

    def __reduce__(self):
        return (_refuse_to_load, ())


def _refuse_to_load():
    raise RuntimeError("this object cannot be loaded back")


class HoldsUnloadable(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.thing = Unloadable()


def lowercase_standardize(text):
    return tf.strings.lower(text)


def _model_with(layer):
    model = keras.Sequential([keras.Input((8,)), layer, keras.layers.Dense(2)])
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def _refused(tmp_path, model, *args, **kwargs) -> str:
    run_dir = tmp_path / "run"
    start = time.monotonic()
    with pytest.raises(resilient.InvalidArgumentError) as info:
        resilient.fit(model, *args, run_dir=run_dir, verbose=0, **kwargs)
    assert time.monotonic() - start < FAST
    assert not run_dir.exists(), "a refused call must not create the run directory"
    return str(info.value)


def test_a_custom_layer_without_kwargs_is_refused_with_its_name_and_the_fix(tmp_path):
    x, y = make_data()
    message = _refused(tmp_path, _model_with(NoKwargs()), x, y)
    assert "NoKwargs" in message and "unexpected keyword argument" in message
    assert "**kwargs" in message and "get_config" in message and "builder" in message


def test_a_custom_layer_that_cannot_write_its_config_is_refused(tmp_path):
    x, y = make_data()
    message = _refused(tmp_path, _model_with(NoConfig(table=np.arange(3))), x, y)
    assert "NoConfig" in message and "get_config" in message and "builder" in message


def test_a_factory_holding_an_adapted_text_vectorization_with_a_custom_standardize_is_refused(tmp_path):
    vectorize = keras.layers.TextVectorization(max_tokens=20, output_sequence_length=4,
                                               standardize=lowercase_standardize)
    vectorize.adapt(["a b c", "b c d", "A D"])

    def make_dataset(plan):
        texts = tf.constant(["a b", "c d"] * 8)
        return tf.data.Dataset.from_tensor_slices((vectorize(texts), [0, 1] * 8)).batch(plan.batch_size)

    model = keras.Sequential([keras.Input((4,)), keras.layers.Embedding(20, 4), keras.layers.GlobalAveragePooling1D(),
                              keras.layers.Dense(2)])
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    message = _refused(tmp_path, model, make_dataset)
    assert "make_dataset" in message and "lowercase_standardize" in message
    assert "get_vocabulary()" in message and "module (a .py file)" in message


def test_a_callback_that_does_not_load_back_is_refused_with_its_index(tmp_path):
    x, y = make_data()
    model = _model_with(GoodScale())
    message = _refused(tmp_path, model, x, y, callbacks=[keras.callbacks.History(), HoldsUnloadable()])
    assert "callbacks[1] (HoldsUnloadable)" in message and "cannot be loaded back" in message


def test_a_builder_that_does_not_load_back_is_refused(tmp_path):
    thing = Unloadable()

    def build():
        assert thing is not None
        return _model_with(GoodScale())

    x, y = make_data()
    message = _refused(tmp_path, build, x, y)
    assert "builder" in message and "build" in message and "cannot be loaded back" in message


def test_a_good_custom_layer_is_proven_once_and_the_proven_file_is_the_one_placed(tmp_path):
    model = _model_with(GoodScale(3.0))
    start = time.monotonic()
    proven = prove_carriable(model, {"custom_objects": custom_objects_of(model)})
    assert time.monotonic() - start < FAST
    folder = proven.file.parent
    dest = tmp_path / "model.keras"
    proven.write_model(dest)
    with keras.saving.custom_object_scope({"GoodScale": GoodScale}), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")  # not built yet
        loaded = keras.saving.load_model(dest, safe_mode=False)
    assert loaded.layers[0].factor == 3.0
    for a, b in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)
    del proven
    gc.collect()
    assert not folder.exists(), "the temporary folder goes with the proof"


def test_a_proof_that_is_never_placed_leaves_nothing_behind():
    model = _model_with(GoodScale())
    proven = prove_carriable(model, {"custom_objects": custom_objects_of(model)})
    folder = proven.file.parent
    assert proven.file.exists()
    del proven
    gc.collect()
    assert not folder.exists()


@pytest.mark.parametrize("layer", [lambda: GoodScale(3.0), lambda: keras.layers.Lambda(lambda t: t * 3.0)],
                         ids=["custom_layer", "python_lambda"])
def test_what_is_proven_also_rebuilds_as_a_degradation_rebuilds_it(layer):
    # The load-back goes through from_config(get_config()) of the model and every layer: the same path as the
    # worker's rebuild for another precision or gradient accumulation, which therefore needs no check of its own
    # (the rebuild deserializes as the worker loads, safe_mode=False, so a Lambda's Python function rebuilds too).
    from resilient._plan import Plan
    from resilient.worker.model import _rebuild

    model = _model_with(layer())
    custom = custom_objects_of(model)
    prove_carriable(model, {"custom_objects": custom})
    rebuilt = _rebuild(model, Plan(batch_size=16, grad_accum_steps=2, precision="mixed_bfloat16"), custom)
    assert rebuilt.layers[0].dtype_policy.name == "mixed_bfloat16"
    assert rebuilt.optimizer.gradient_accumulation_steps == 2
    x = np.ones((2, 8), "float32")
    np.testing.assert_allclose(rebuilt.layers[0](x), 3 * x, rtol=1e-2)
