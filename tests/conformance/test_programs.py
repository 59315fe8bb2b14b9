"""Real programs, as Keras users write them, through model.fit and through resilient.fit.

Small, generated or package-shipped data; each program compared with and without rehearsed
faults (a crash or kill resumes from an epoch-end or mid-epoch checkpoint, so the History must
still be model.fit's: the metrics of a resumed epoch are that epoch's alone).
"""

from __future__ import annotations

import numpy as np
import pytest

import resilient
from tests.conformance._harness import assert_same_history, assert_same_weights, side_by_side

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("no_leftover_processes")]


def _digits(n: int = 480):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images[:n, :, :, None] / 16.0).astype("float32")
    y = d.target[:n].astype("int32")
    return x, y


# ------------------------------------------------------------------------------ a convnet with Dropout


def _convnet():
    import keras

    model = keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(8, 3, activation="relu", padding="same"),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dropout(0.3),
        keras.layers.Dense(10, activation="softmax"),
    ], name="convnet")
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


@pytest.mark.parametrize("faults", [None, pytest.param("segfault@11", marks=pytest.mark.fault(
    "segfault", "mid-epoch", incident="crash", outcome="completed; weights and History = model.fit (Dropout)",
    lost="5 steps (since the epoch-end checkpoint at step 6)", corrupted="no"))])
def test_convnet_with_dropout(tmp_path, faults):
    x, y = _digits()
    xv, yv = x[-96:], y[-96:]
    x, y = x[:-96], y[:-96]  # 384 samples: 6 steps of 64 per epoch
    a, ref, b, res = side_by_side(
        _convnet,
        lambda m: m.fit(x, y, epochs=3, batch_size=64, validation_data=(xv, yv), shuffle=False, verbose=0),
        lambda m: resilient.fit(m, x, y, epochs=3, batch_size=64, validation_data=(xv, yv), shuffle=False,
                                verbose=0, seed=5, run_dir=tmp_path / "run", faults=faults),
    )
    assert [i.kind for i in res.incidents] == ([] if faults is None else ["crash"])
    assert_same_history(ref, res)
    assert_same_weights(a, b)


# ------------------------------------------------------------------------------ BatchNormalization


def _batchnorm():
    import keras

    model = keras.Sequential([
        keras.Input((64,)),
        keras.layers.Dense(32),
        keras.layers.BatchNormalization(),
        keras.layers.Activation("relu"),
        keras.layers.Dense(10),
    ], name="bn")
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy", keras.metrics.SparseTopKCategoricalAccuracy(k=3, name="top3")])
    return model


@pytest.mark.fault("sigkill", "mid-epoch", incident="killed", outcome="completed; weights and History = model.fit "
                   "(BatchNorm)", lost="5 steps (since the epoch-end checkpoint at step 12)", corrupted="no")
def test_batchnorm_model_killed_after_an_epoch_end(tmp_path):
    x, y = _digits()
    x = x.reshape(len(x), 64)
    xv, yv = x[-96:], y[-96:]
    x, y = x[:-96], y[:-96]
    # 12 steps of 32 per epoch; the kill lands mid-epoch 1 with only epoch-end checkpoints behind it.
    a, ref, b, res = side_by_side(
        _batchnorm,
        lambda m: m.fit(x, y, epochs=3, batch_size=32, validation_data=(xv, yv), shuffle=False, verbose=0),
        lambda m: resilient.fit(m, x, y, epochs=3, batch_size=32, validation_data=(xv, yv), shuffle=False,
                                verbose=0, seed=5, run_dir=tmp_path / "run", faults="sigkill@17",
                                checkpoint_every=1000),
    )
    assert [i.kind for i in res.incidents] == ["killed"]
    assert_same_history(ref, res)
    assert_same_weights(a, b)


# ------------------------------------------------------------------------------ a custom layer


def _custom_layer_model():
    import keras

    @keras.saving.register_keras_serializable(package="conformance")
    class Scale(keras.layers.Layer):
        def __init__(self, init: float = 1.0, **kwargs):
            super().__init__(**kwargs)
            self.init = init

        def build(self, shape):
            self.scale = self.add_weight(shape=(shape[-1],), initializer=keras.initializers.Constant(self.init))

        def call(self, x):
            return x * self.scale

        def get_config(self):
            return {**super().get_config(), "init": self.init}

    model = keras.Sequential([keras.Input((64,)), Scale(0.5), keras.layers.Dense(16, activation="tanh"),
                              keras.layers.Dense(10)], name="custom")
    model.compile(optimizer="rmsprop", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return model


@pytest.mark.parametrize("builder", [False, True], ids=["compiled", "builder"])
def test_custom_layer_model(tmp_path, builder):
    x, y = _digits()
    x = x.reshape(len(x), 64)

    def run(m):
        import keras

        if builder:
            weights = m.get_weights()

            def build():
                model = _custom_layer_model()
                model.set_weights(weights)
                return model

            keras.utils.set_random_seed(0)
            h = resilient.fit(build, x, y, epochs=2, batch_size=48, shuffle=False, verbose=0, seed=5,
                              run_dir=tmp_path / "run", faults="abort@13")
            m.set_weights(h.model.get_weights())
            m.optimizer.build(m.trainable_variables)
            m.optimizer.iterations.assign(h.model.optimizer.iterations)
            return h
        return resilient.fit(m, x, y, epochs=2, batch_size=48, shuffle=False, verbose=0, seed=5,
                             run_dir=tmp_path / "run", faults="abort@13")

    a, ref, b, res = side_by_side(
        _custom_layer_model,
        lambda m: m.fit(x, y, epochs=2, batch_size=48, shuffle=False, verbose=0),
        run,
    )
    assert [i.kind for i in res.incidents] == ["crash"]
    assert_same_history(ref, res)
    assert_same_weights(a, b)


# ------------------------------------------------------------------------------ text, TextVectorization in a factory

_TEXTS = [
    " ".join(words)
    for words in (
        np.random.default_rng(3).choice(
            ["good", "great", "fine", "bad", "awful", "poor", "the", "a", "film", "plot", "was", "very"], size=(320, 7)
        )
    )
]
_LABELS = np.array([int(sum(w in {"good", "great", "fine"} for w in t.split()) >
                        sum(w in {"bad", "awful", "poor"} for w in t.split())) for t in _TEXTS], dtype="int32")


def _make_text_dataset(plan):
    import tensorflow as tf

    vectorize = tf.keras.layers.TextVectorization(max_tokens=32, output_sequence_length=7)
    vectorize.adapt(_TEXTS)
    ds = tf.data.Dataset.from_tensor_slices((_TEXTS, _LABELS)).batch(plan.batch_size)
    return ds.map(lambda t, y: (vectorize(t), y))


def _text_model():
    import keras

    model = keras.Sequential([keras.Input((7,), dtype="int64"), keras.layers.Embedding(32, 8),
                              keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(1, activation="sigmoid")],
                             name="text")
    model.compile(optimizer="adam", loss="binary_crossentropy", metrics=["accuracy"])
    return model


def test_text_classifier_with_a_text_vectorization_factory(tmp_path):
    a, ref, b, res = side_by_side(
        _text_model,
        lambda m: m.fit(_make_text_dataset(resilient.Plan(batch_size=32)), epochs=3, verbose=0),
        lambda m: resilient.fit(m, _make_text_dataset, epochs=3, batch_size=32, verbose=0, seed=5,
                                run_dir=tmp_path / "run", faults="segfault@14"),
    )
    assert [i.kind for i in res.incidents] == ["crash"]
    assert_same_history(ref, res)
    assert_same_weights(a, b)


# ------------------------------------------------------------------------------ callbacks


def _callbacks(tmp_path, name):
    import keras

    return [
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=1, min_delta=0.02),
        keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=0, min_delta=0.05),
        keras.callbacks.ModelCheckpoint(str(tmp_path / f"{name}.keras"), monitor="val_accuracy",
                                        save_best_only=True),
    ]


def test_early_stopping_reduce_lr_and_model_checkpoint(tmp_path):
    x, y = _digits()
    x = x.reshape(len(x), 64)
    xv, yv = x[-96:], y[-96:]
    x, y = x[:-96], y[:-96]
    ref_cbs = _callbacks(tmp_path, "ref")
    res_cbs = _callbacks(tmp_path, "res")

    def build():
        import keras

        model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(32, activation="relu"),
                                  keras.layers.Dense(10)], name="cbs")
        model.compile(optimizer=keras.optimizers.Adam(0.03),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
        return model

    a, ref, b, res = side_by_side(
        build,
        lambda m: m.fit(x, y, epochs=12, batch_size=64, validation_data=(xv, yv), shuffle=False, verbose=0,
                        callbacks=ref_cbs),
        lambda m: resilient.fit(m, x, y, epochs=12, batch_size=64, validation_data=(xv, yv), shuffle=False,
                                verbose=0, callbacks=res_cbs, seed=5, run_dir=tmp_path / "run",
                                faults="segfault@9"),
    )
    assert len(ref.epoch) < 12, "the program should stop early for this test to mean something"
    assert_same_history(ref, res)
    assert_same_weights(a, b)
    assert (tmp_path / "res.keras").exists()
    es_ref, rl_ref, mc_ref = ref_cbs
    es_res, rl_res, mc_res = res_cbs
    assert (es_res.wait, es_res.stopped_epoch, es_res.best) == (es_ref.wait, es_ref.stopped_epoch, es_ref.best)
    assert (rl_res.wait, rl_res.best, rl_res.cooldown_counter) == (rl_ref.wait, rl_ref.best, rl_ref.cooldown_counter)
    assert mc_res.best == mc_ref.best
    assert res.params == ref.params
