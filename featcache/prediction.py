"""Top-k predictions of a fine-tuned model for image files of any size and colour mode.

The saved model holds its whole input pipeline (``Preprocess``: resize and the
backbone's preprocessing) and its class names (``ClassNames``), so serving
needs only the ``.keras`` file and raw RGB pixels.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np

from .decoding import read_image
from .errors import FeatcacheError, InvalidArgument, brief


@dataclass
class Prediction:
    """One image's top-k classes, best first."""

    path: str
    classes: list[str]
    probabilities: list[float]


def load_model(path: Union[str, Path]):
    """A featcache fine-tuned model and its class names; anything else is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise FeatcacheError(f"Model file {path} does not exist.")
    if path.suffix != ".keras" or not zipfile.is_zipfile(path):
        raise FeatcacheError(f"{path} is not a featcache model: expected a '.keras' file written by "
                             "`featcache finetune` (model.keras in its run folder).")
    import keras

    from . import layers as _layers  # noqa: F401  (registers Preprocess, InferenceMode and ClassNames)
    try:
        model = keras.saving.load_model(path, compile=False)
    except Exception as exc:  # Keras raises many types for foreign or broken files
        raise FeatcacheError(f"{path} is not a loadable featcache model ({type(exc).__name__}: {brief(exc)}).") from None
    layers = {type(layer).__name__: layer for layer in getattr(model, "layers", [])}
    if "Preprocess" not in layers or "ClassNames" not in layers:
        raise FeatcacheError(f"{path} is a Keras model but not a featcache model (it lacks the Preprocess and "
                             "ClassNames layers that `featcache finetune` puts in).")
    return model, list(layers["ClassNames"].class_names)


class Predictor:
    """A loaded featcache model; images of any size run one at a time (the model resizes them)."""

    def __init__(self, model_path: Union[str, Path]):
        self.model, self.class_names = load_model(model_path)

    def probabilities(self, image: np.ndarray) -> np.ndarray:
        return np.asarray(self.model(image[None].astype(np.float32), training=False))[0]

    def top_k(self, path: Union[str, Path], k: int = 3) -> Prediction:
        probs = self.probabilities(read_image(path))
        best = np.argsort(-probs, kind="stable")[:min(k, len(self.class_names))]
        return Prediction(str(path), [self.class_names[i] for i in best], [float(probs[i]) for i in best])


def predict(model_path: Union[str, Path], images: list[Union[str, Path]], top_k: int = 3) -> list[Prediction]:
    """Top-k classes with probabilities for each image; every image is read before the model loads."""
    if top_k < 1:
        raise InvalidArgument(f"--top-k must be a positive integer; received {top_k}.")
    if not images:
        raise InvalidArgument("No image given.")
    for path in images:
        read_image(path)
    predictor = Predictor(model_path)
    return [predictor.top_k(path, top_k) for path in images]
