"""The fused training step computes what Keras' own training call and Adam compute."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from featcache import heads
from featcache.training_step import FusedAdam, training_forward, training_loss

WIDTH, CLASSES = 12, 4


def _core(dropout=0.0, seed=0):
    standardizer = heads.Standardizer(np.zeros(WIDTH), np.ones(WIDTH))
    return heads._core(heads.build_head("mlp", WIDTH, CLASSES, standardizer, (16, 8), dropout, seed))[1]


def _batch(rows=64, seed=0):
    rng = np.random.default_rng(seed)
    return (tf.constant(rng.normal(size=(rows, WIDTH)).astype(np.float32) * 3 + 1),
            tf.constant(rng.integers(0, CLASSES, rows).astype(np.int32)))


def _moving(core):
    return [v.numpy() for v in core.non_trainable_variables]


SEED = tf.constant([1, 2], tf.int64)


def test_forward_and_moving_statistics_match_keras():
    x, _ = _batch()
    ours, theirs = _core(), _core()
    logits, from_logits = training_forward(ours)(x, SEED)
    assert from_logits
    np.testing.assert_allclose(tf.nn.softmax(logits).numpy(), theirs(x, training=True).numpy(), atol=1e-5)
    for a, b in zip(_moving(ours), _moving(theirs)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert not np.allclose(_moving(ours)[0], 0.0)  # the moving mean did move


def test_gradients_match_keras():
    x, y = _batch()
    ours, theirs = _core(), _core()
    forward = training_forward(ours)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(training_loss(forward, x, y, SEED)[0])
    ours_grads = tape.gradient(loss, ours.trainable_variables)
    with tf.GradientTape() as tape:
        their_loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, theirs(x, training=True)))
    their_grads = tape.gradient(their_loss, theirs.trainable_variables)
    np.testing.assert_allclose(loss.numpy(), their_loss.numpy(), rtol=1e-5)
    assert len(ours_grads) == len(their_grads) == 8  # 2 kernels, 2 x (gamma, beta), output kernel and bias
    for variable, a, b in zip(ours.trainable_variables, ours_grads, their_grads):
        assert a is not None, variable.path
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-6, err_msg=variable.path)


def test_fused_adam_matches_keras_adam():
    rng = np.random.default_rng(0)
    start = [rng.normal(size=(5, 3)).astype(np.float32), rng.normal(size=(3,)).astype(np.float32)]
    ours, theirs = [keras.Variable(v) for v in start], [keras.Variable(v) for v in start]
    fused, plain = FusedAdam(0.01), keras.optimizers.Adam(0.01)
    for step in range(3):
        grads = [tf.constant(rng.normal(size=v.shape).astype(np.float32)) for v in start]
        fused.apply(grads, ours)
        plain.apply(grads, theirs)
    for a, b, s in zip(ours, theirs, start):
        assert not np.allclose(a.numpy(), s)
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)  # updates are ~1e-2


@pytest.mark.parametrize("width, rate", [(1000, 0.5), (999, 0.3)])
def test_dropout_masks_depend_on_the_seed_only(width, rate):
    inputs = keras.Input((width,))
    hidden = keras.layers.Dense(width, use_bias=False, kernel_initializer="identity")(inputs)
    model = keras.Model(inputs, keras.layers.Dropout(rate)(hidden))
    forward = training_forward(model)
    x = tf.ones((40, width))
    out, from_logits = forward(x, SEED)
    assert not from_logits and out.shape == (40, width)
    values = out.numpy()
    np.testing.assert_allclose(np.unique(values), [0.0, 1 / (1 - rate)], rtol=1e-5)  # dropped, or kept and scaled
    assert abs(np.mean(values == 0.0) - rate) < 0.02
    assert abs(np.mean(values[:, -1] == 0.0) - rate) < 0.2  # the last column is masked too (odd widths)
    np.testing.assert_array_equal(forward(x, SEED)[0].numpy(), values)
    assert not np.array_equal(forward(x, SEED + 1)[0].numpy(), values)


def test_two_dropout_layers_draw_independent_masks():
    inputs = keras.Input((500,))
    h = keras.layers.Dense(500, use_bias=False, kernel_initializer="identity")(inputs)
    model = keras.Model(inputs, keras.layers.Dropout(0.5)(keras.layers.Dropout(0.5)(h)))
    out = training_forward(model)(tf.ones((40, 500)), SEED)[0].numpy()
    assert abs(np.mean(out == 0.0) - 0.75) < 0.02  # 0.5 if both layers drew the same mask


def test_linear_head_matches_keras():
    standardizer = heads.Standardizer(np.zeros(WIDTH), np.ones(WIDTH))
    _, core = heads._core(heads.build_head("linear", WIDTH, CLASSES, standardizer))
    core.get_layer("probabilities").bias.assign(np.arange(CLASSES, dtype=np.float32))
    x, y = _batch()
    logits, from_logits = training_forward(core)(x, SEED)
    assert from_logits
    np.testing.assert_allclose(tf.nn.softmax(logits).numpy(), core(x, training=True).numpy(), atol=1e-6)


def test_steps_in_a_graph_train_like_keras():
    """Three steps of the fused forward and FusedAdam in a graph loop (as fit_keras runs them) against
    Keras' own training call and Adam, eagerly: every weight and moving statistic agrees."""
    x, y = _batch(96)
    ours, theirs = _core(), _core()
    forward, fused, plain = training_forward(ours), FusedAdam(0.01), keras.optimizers.Adam(0.01)
    fused.build(ours.trainable_variables)

    def step(i):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(training_loss(forward, x[i * 32:(i + 1) * 32], y[i * 32:(i + 1) * 32], SEED)[0])
        fused.apply(tape.gradient(loss, ours.trainable_variables), ours.trainable_variables)
        return i + 1

    tf.function(lambda: tf.while_loop(lambda i: i < 3, step, [tf.constant(0)]), autograph=False)()
    for i in range(3):
        with tf.GradientTape() as tape:
            probs = theirs(x[i * 32:(i + 1) * 32], training=True)
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y[i * 32:(i + 1) * 32], probs))
        plain.apply(tape.gradient(loss, theirs.trainable_variables), theirs.trainable_variables)
    for a, b in zip(ours.weights, theirs.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-5, err_msg=a.path)
    assert not np.allclose(ours.get_layer("batchnorm_1").moving_mean.numpy(), 0.0)


def test_lora_or_mixed_precision_runs_the_models_own_call():
    core = _core()
    core.get_layer("probabilities").enable_lora(2)
    x, _ = _batch()
    probs, from_logits = training_forward(core)(x, SEED)
    assert not from_logits  # softmax outputs are never taken for logits
    np.testing.assert_allclose(probs.numpy(), core(x, training=True).numpy(), atol=1e-6)
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        mixed = _core()
    finally:
        keras.mixed_precision.set_global_policy("float32")
    probs, from_logits = training_forward(mixed)(x, SEED)
    assert not from_logits and probs.dtype == tf.float32


def test_a_subclassed_layer_runs_its_own_call():
    class Doubled(keras.layers.Dense):
        def call(self, inputs):
            return 2.0 * super().call(inputs)

    inputs = keras.Input((WIDTH,))
    model = keras.Model(inputs, Doubled(CLASSES)(inputs))
    x, _ = _batch()
    out, from_logits = training_forward(model)(x, SEED)
    assert not from_logits
    np.testing.assert_allclose(out.numpy(), model(x, training=True).numpy(), atol=1e-6)


def test_other_layers_run_their_own_call():
    inputs = keras.Input((WIDTH,))
    h = keras.layers.Dense(6, activation="tanh")(inputs)
    h = keras.layers.LayerNormalization()(h)
    model = keras.Model(inputs, keras.layers.Dense(CLASSES, activation="softmax")(h))
    x, _ = _batch()
    logits, from_logits = training_forward(model)(x, SEED)
    assert from_logits
    np.testing.assert_allclose(tf.nn.softmax(logits).numpy(), model(x, training=True).numpy(), atol=1e-6)


def test_a_model_that_is_not_a_chain_runs_its_own_call():
    inputs = keras.Input((WIDTH,))
    branch = keras.layers.Dense(WIDTH)(inputs)
    model = keras.Model(inputs, keras.layers.Dense(CLASSES, activation="softmax")(keras.layers.Add()([inputs, branch])))
    x, _ = _batch()
    probs, from_logits = training_forward(model)(x, SEED)
    assert not from_logits
    np.testing.assert_allclose(probs.numpy(), model(x, training=True).numpy(), atol=1e-6)


@pytest.mark.parametrize("rows", [1, 3])
def test_tiny_batches_keep_moving_statistics_finite(rows):
    x, _ = _batch(rows)
    ours, theirs = _core(), _core()
    training_forward(ours)(x, SEED)
    theirs(x, training=True)
    for a, b in zip(_moving(ours), _moving(theirs)):
        assert np.all(np.isfinite(a))
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
