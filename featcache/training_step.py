"""A head's training-mode forward pass and Adam update on TensorFlow's fused kernels.

Why: at batch 1024 one Keras step of the 256-128-64 mlp ran about 950 ops (a tf.profiler
trace of one epoch: 46,545 op runs in 49 steps), most of them small element-wise ops of
BatchNormalization, dropout and Adam whose fixed cost outweighed their arithmetic; together
they took longer than the first layer's matrix products. Here a BatchNormalization is one
FusedBatchNormV3, an Adam update one ResourceApplyAdam per variable, and the first layer's
weight gradient is taken as (dz^T x)^T, which oneDNN ran faster than x^T dz. An epoch of
45,000 x 2,048 at batch 1024 took 0.84 s against 1.07 s through Keras' own training call and
Adam (``bench/bench_head.py --variant adam`` and ``--variant keras-adam``, two runs each).

The heads stay plain Keras models: the same variables are trained, and what is saved loads
without featcache. Layers without a fused kernel here run their own ``call``.
"""

from __future__ import annotations

from typing import Callable, Optional

import keras
import tensorflow as tf

# forward(x, seed) -> (outputs, from_logits); seed: int64 [2], distinct for every step.
Forward = Callable[[tf.Tensor, tf.Tensor], "tuple[tf.Tensor, bool]"]


class FusedAdam(keras.optimizers.Adam):
    """Keras' Adam with each variable's update as TensorFlow's one-op ``ResourceApplyAdam`` (the same formula)."""

    def update_step(self, gradient, variable, learning_rate):
        if self.amsgrad:
            return super().update_step(gradient, variable, learning_rate)
        index = self._get_variable_index(variable)
        dtype = variable.dtype
        step = tf.cast(self.iterations + 1, dtype)
        beta_1, beta_2 = tf.cast(self.beta_1, dtype), tf.cast(self.beta_2, dtype)
        tf.raw_ops.ResourceApplyAdam(
            var=variable.handle, m=self._momentums[index].handle, v=self._velocities[index].handle,
            beta1_power=tf.pow(beta_1, step), beta2_power=tf.pow(beta_2, step), lr=tf.cast(learning_rate, dtype),
            beta1=beta_1, beta2=beta_2, epsilon=tf.cast(self.epsilon, dtype), grad=tf.cast(gradient, dtype))


@tf.custom_gradient
def _data_matmul(x, kernel):
    """x @ kernel for an input that is data: no input gradient, and the kernel's as (dz^T x)^T."""

    def grad(dz):
        return None, tf.transpose(tf.matmul(dz, x, transpose_a=True))

    return tf.matmul(x, kernel), grad


def _chain(core) -> Optional[list]:
    """The core's layers in order when each takes the previous one's output (how heads are built), else None."""
    layers = [layer for layer in core.layers if not isinstance(layer, keras.layers.InputLayer)]
    if not layers or len(core.inputs) != 1 or len(core.outputs) != 1:
        return None
    for before, layer in zip(layers, layers[1:]):
        if layer.input is not before.output:
            return None
    return layers


def _plain(layer) -> bool:
    """float32, not quantised, no LoRA: the layer's math is exactly what the fused kernels compute."""
    return (layer.compute_dtype == "float32" and getattr(layer, "quantization_mode", None) is None
            and not getattr(layer, "lora_enabled", False))


def _dense(layer, h, data_input: bool, logits: bool):
    kernel = tf.convert_to_tensor(layer.kernel)  # read outside the custom gradient, which then sees a tensor
    h = _data_matmul(h, kernel) if data_input else tf.matmul(h, kernel)
    if layer.use_bias:
        h = tf.nn.bias_add(h, layer.bias)
    if logits or layer.activation is keras.activations.linear:
        return h
    return tf.nn.relu(h) if layer.activation is keras.activations.relu else layer.activation(h)


def _batch_norm(layer, h):
    """Training-mode BatchNormalization as one fused op, moving statistics updated as Keras does."""
    channels = h.shape[-1]
    rows = tf.cast(tf.shape(h)[0], h.dtype)
    gamma = layer.gamma if layer.scale else tf.ones([channels], h.dtype)
    beta = layer.beta if layer.center else tf.zeros([channels], h.dtype)
    y, mean, variance = tf.compat.v1.nn.fused_batch_norm(
        tf.reshape(h, [-1, 1, 1, channels]), gamma, beta, epsilon=layer.epsilon, is_training=True)[:3]
    # The fused op returns the batch variance with Bessel's correction; Keras averages the biased one.
    variance = tf.stop_gradient(variance) * (rows - 1.0) / rows
    momentum = layer.momentum
    layer.moving_mean.assign(layer.moving_mean * momentum + tf.stop_gradient(mean) * (1.0 - momentum))
    layer.moving_variance.assign(layer.moving_variance * momentum + variance * (1.0 - momentum))
    return tf.reshape(y, tf.shape(h))


def _dropout(h, rate: float, seed):
    """Inverted dropout from 16-bit uniform draws, two per Philox word: half the random numbers of
    ``tf.nn.experimental.stateless_dropout``, which took 0.11 s per epoch for the mlp's three layers
    (with their ReLU, forward and backward, in a micro-benchmark) where this takes 0.07 s.
    The rate is rounded to a multiple of 1/65536 (0.5 exactly) and survivors scale by the inverse
    of the keep probability drawn, so the expected output equals the input as in Keras."""
    channels = h.shape[-1]
    dropped = min(65535, max(1, round(rate * 65536)))  # draws below this are dropped
    words = tf.random.stateless_uniform([tf.shape(h)[0], (channels + 1) // 2], seed, minval=None, maxval=None,
                                        dtype=tf.uint32)
    draws = tf.reshape(tf.bitcast(words, tf.uint16), [-1, 2 * ((channels + 1) // 2)])[:, :channels]
    keep = draws >= tf.constant(dropped, tf.uint16)
    return h * tf.where(keep, tf.constant(65536 / (65536 - dropped), h.dtype), tf.constant(0.0, h.dtype))


def _fusable_batch_norm(layer, h) -> bool:
    return (layer.trainable and layer.axis in (-1, 1) and len(h.shape) == 2 and h.shape[-1] is not None
            and not getattr(layer, "renorm", False) and not getattr(layer, "synchronized", False))


def training_forward(core) -> Forward:
    """``forward(x, seed)``: ``core(x, training=True)``, on fused kernels where the layer allows.

    Returns logits (``from_logits`` True) when the last layer is a softmax Dense, so the loss
    is the fused softmax cross-entropy. Each dropout layer draws its mask from ``seed`` folded
    with the layer's position. The core's input is data: it gets no gradient.
    A model that is not a chain of float32 layers without LoRA or quantisation (a
    mixed-precision policy, say) runs its own call: the same math, without the fused kernels.
    """
    layers = _chain(core)
    if layers is None or not all(_plain(layer) for layer in layers):
        return lambda x, seed: (core(x, training=True), False)
    last = layers[-1]
    # Exact types: a subclass may override ``call``, and then only its own call computes it.
    from_logits = type(last) is keras.layers.Dense and last.activation is keras.activations.softmax

    def forward(x, seed):
        h = x
        for i, layer in enumerate(layers):
            kind = type(layer)
            if kind is keras.layers.Dense:
                h = _dense(layer, h, data_input=i == 0, logits=from_logits and layer is last)
            elif kind is keras.layers.BatchNormalization and _fusable_batch_norm(layer, h):
                h = _batch_norm(layer, h)
            elif kind is keras.layers.Activation and layer.activation is keras.activations.relu:
                h = tf.nn.relu(h)
            elif kind is keras.layers.Dropout and layer.rate == 0:
                pass
            elif kind is keras.layers.Dropout and layer.noise_shape is None and 0 < layer.rate < 1 \
                    and len(h.shape) == 2 and h.shape[-1] is not None:
                h = _dropout(h, float(layer.rate), tf.random.experimental.stateless_fold_in(seed, i))
            else:
                h = layer(h, training=True)
        return h, from_logits

    return forward


@tf.function(autograph=False, reduce_retracing=True)  # one trace for any row count, not one per dataset
def standardize(x, mean, scale):
    """float32 (x - mean) / scale, as ``heads.Standardizer.transform`` and the ``Normalization`` layer compute it."""
    return (tf.cast(x, tf.float32) - mean) / scale


def training_loss(forward: Forward, x, y, seed):
    """(per-row losses, predicted classes) of one training batch."""
    outputs, from_logits = forward(x, seed)
    if from_logits:
        losses = tf.nn.sparse_softmax_cross_entropy_with_logits(y, outputs)
    else:
        losses = keras.losses.sparse_categorical_crossentropy(y, outputs)
    return losses, tf.argmax(outputs, axis=1, output_type=tf.int32)
