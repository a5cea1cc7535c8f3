"""The ``keras`` engine: the Keras model in a ``tf.function``; the only one on a GPU or under tf.distribute."""

from __future__ import annotations

import numpy as np


class KerasEngine:
    """A ``tf.function`` around the model in inference mode (no XLA: it was 7x slower on these CPUs)."""

    name = "keras"
    precision = "f32"

    def __init__(self, model):
        import tensorflow as tf

        self._fn = tf.function(lambda x: model(x, training=False), reduce_retracing=True)

    def __call__(self, batch) -> np.ndarray:
        return np.asarray(self._fn(batch), dtype=np.float32)


def load(model, artifact, batch_size: int, precision: str) -> KerasEngine:
    return KerasEngine(model)
