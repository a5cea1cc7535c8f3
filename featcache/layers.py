"""featcache's own Keras layers, registered once under the package name ``featcache``.

Every image model featcache saves (fine-tuned models, exports) is built from
Keras layers plus these three, so loading one needs only ``import featcache.layers``:

- ``Preprocess``: resize + the backbone's preprocessing, raw RGB pixels in [0, 255] in;
- ``InferenceMode``: runs a wrapped (sub)model with ``training=False`` whatever the caller says;
- ``ClassNames``: identity on the probabilities, carrying the class names in the saved file.
"""

from __future__ import annotations

from typing import Sequence

import keras

from .backbones import get_spec
from .preprocessing import prepare_batch


@keras.saving.register_keras_serializable(package="featcache")
class Preprocess(keras.layers.Layer):
    """Resize + the backbone's preprocessing inside a model: raw RGB pixels in [0, 255] in.

    Saved with the fine-tuned model so that ``predict`` feeds it raw images of any size.
    ``view`` ('orig' or 'flip') applies a cached view first, so an exported head trained on
    several views averages over the same views as its validation score did.
    """

    def __init__(self, backbone: str, size: int, view: str = "orig", **kwargs):
        super().__init__(**kwargs)
        self.backbone = get_spec(backbone).name
        self.size = int(size)
        self.view = str(view)

    def call(self, images):
        return prepare_batch(images, self.backbone, self.size, self.view)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.size, self.size, 3)

    def get_config(self) -> dict:
        config = {**super().get_config(), "backbone": self.backbone, "size": self.size}
        if self.view != "orig":  # models saved without a view keep loading in older featcache versions
            config["view"] = self.view
        return config


@keras.saving.register_keras_serializable(package="featcache")
class InferenceMode(keras.layers.Wrapper):
    """Runs the wrapped backbone with ``training=False`` whatever the outer call says.

    In Keras 3 a nested functional model called with ``training=False`` at build
    time still receives the outer ``training=True`` during ``fit``; this wrapper
    keeps BatchNormalization (and stochastic depth) in inference mode, as the
    Keras transfer-learning guide intends, while gradients still flow.
    """

    def call(self, inputs, training=None):
        return self.layer(inputs, training=False)

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)


@keras.saving.register_keras_serializable(package="featcache")
class ClassNames(keras.layers.Layer):
    """Identity on the probabilities; carries the class names inside the saved model for ``predict``."""

    def __init__(self, class_names: Sequence[str], **kwargs):
        super().__init__(**kwargs)
        self.class_names = [str(c) for c in class_names]

    def call(self, inputs):
        return inputs

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        return {**super().get_config(), "class_names": list(self.class_names)}
