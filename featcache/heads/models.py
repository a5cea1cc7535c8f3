"""Head models (standardisation inside, probabilities out), saved heads, optimizers."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from ..errors import FeatcacheError, brief, choice_error
from .config import OPTIMIZERS
from .standardize import Standardizer


def build_head(kind: str, width: int, n_classes: int, standardizer: Standardizer,
               units: Sequence[int] = (256, 128, 64), dropout: float = 0.5, seed: int = 0):
    """features (N, width) -> standardize -> [Dense, BatchNorm, ReLU, Dropout] x len(units) (mlp) -> softmax."""
    import keras

    if kind not in ("linear", "mlp"):
        raise choice_error("Keras head kind", ("linear", "mlp"), kind)
    inputs = keras.Input((width,), name="features")
    x = standardizer.layer()(inputs)
    if kind == "mlp":
        for i, n in enumerate(units, 1):
            x = keras.layers.Dense(int(n), use_bias=False, kernel_initializer=keras.initializers.HeNormal(seed + i),
                                   name=f"dense_{i}")(x)
            x = keras.layers.BatchNormalization(name=f"batchnorm_{i}")(x)
            x = keras.layers.Activation("relu", name=f"relu_{i}")(x)
            x = keras.layers.Dropout(dropout, seed=seed + i, name=f"dropout_{i}")(x)
    outputs = keras.layers.Dense(n_classes, activation="softmax", dtype="float32",
                                 kernel_initializer=keras.initializers.GlorotUniform(seed), name="probabilities")(x)
    return keras.Model(inputs, outputs, name=f"featcache_head_{kind}")


def load_head(path, width: Optional[int] = None, n_classes: Optional[int] = None):
    """A saved head; a feature width or class count other than the cache's is an error."""
    import keras

    path = Path(path)
    if not path.exists():
        raise FeatcacheError(f"Head model {path} does not exist.")
    try:
        model = keras.models.load_model(path, compile=False)
    except Exception as exc:  # Keras raises many types for a bad file
        first = brief(exc)
        raise FeatcacheError(f"Cannot load head {path}: {type(exc).__name__}: {first}") from None
    check_head(model, width, n_classes, str(path))
    return model


def check_head(model, width: Optional[int], n_classes: Optional[int], where: str) -> None:
    """The head takes features of ``width`` and predicts ``n_classes``; error naming both otherwise."""
    got_width, got_classes = model.input_shape[-1], model.output_shape[-1]
    if width is not None and got_width != width:
        raise FeatcacheError(f"Head {where} takes features of width {got_width} but the cache gives width {width}; "
                             f"it was trained on another backbone (or backbone combination).")
    if n_classes is not None and got_classes != n_classes:
        raise FeatcacheError(f"Head {where} predicts {got_classes} classes but the cache has {n_classes}.")


def _core(model):
    """The model after its ``standardize`` layer, sharing weights: trained on pre-standardised arrays."""
    import keras

    try:
        layer = model.get_layer("standardize")
    except ValueError:
        raise FeatcacheError(f"Model {model.name} has no 'standardize' Normalization layer; "
                             f"it is not a featcache head.") from None
    return layer, keras.Model(layer.output, model.output, name=f"{model.name}_core")


def make_optimizer(name: str, learning_rate: float):
    import keras

    if name not in OPTIMIZERS:
        raise choice_error("optimizer", OPTIMIZERS, name)
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate, momentum=0.9)
    return {"adam": keras.optimizers.Adam, "rmsprop": keras.optimizers.RMSprop}[name](learning_rate)
