"""Top-k predictions for image files of any size and colour mode, from any form of a run.

``predict`` takes the run itself or what was exported from it:

- a run id (or a unique part of one, looked up under ``cache_dir``) or a run folder:
  the run's image model is built in memory (``featcache.image_model``), head runs included;
- a ``.keras`` image model (a fine-tune run's ``model.keras`` or a keras export): it holds
  its input pipeline (``Preprocess``) and its class names (``ClassNames``);
- a ``.tflite`` export, with the ``labels.txt`` written beside it;
- a SavedModel export folder (its signature returns the class names).

Images are decoded exactly as extraction decodes them (``featcache.decoding``) and fed as
raw RGB pixels; every form resizes and preprocesses inside the model, so the same image
gets the same top class from each form of one run (``tests/test_predict.py``).
"""

from __future__ import annotations

import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Union

import numpy as np

from .decoding import read_image
from .errors import FeatcacheError, InvalidArgument, brief

PathLike = Union[str, Path]


@dataclass
class Prediction:
    """One image's top-k classes, best first."""

    path: str
    classes: list[str]
    probabilities: list[float]

    def as_dict(self) -> dict:
        return asdict(self)


def load_model(path: PathLike):
    """A featcache image model (``.keras``) and its class names; anything else is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise FeatcacheError(f"Model file {path} does not exist.")
    if path.suffix != ".keras" or not zipfile.is_zipfile(path):
        raise FeatcacheError(f"{path} is not a featcache model: expected a run id, a '.keras' image model (a "
                             "fine-tune run's model.keras or a `featcache export`), a '.tflite' export or a "
                             "SavedModel export folder.")
    import keras

    from . import layers as _layers  # noqa: F401  (registers Preprocess, InferenceMode and ClassNames)
    from .image_model import find_layers

    try:
        model = keras.saving.load_model(path, compile=False)
    except Exception as exc:  # Keras raises many types for foreign or broken files
        raise FeatcacheError(f"{path} is not a loadable featcache model ({type(exc).__name__}: {brief(exc)}).") from None
    if not find_layers(model, "Preprocess") or not find_layers(model, "ClassNames"):
        raise FeatcacheError(f"{path} is a Keras model but not a featcache model (it lacks the Preprocess and "
                             "ClassNames layers that featcache's image models carry; a head.keras takes "
                             "features, not images: give its run id instead).")
    return model, list(find_layers(model, "ClassNames")[0].class_names)


class Predictor:
    """Probabilities for raw RGB images, one at a time (every form resizes them itself)."""

    def __init__(self, model_path: PathLike = None, *, runner: Callable = None, class_names: list = None,
                 model=None):
        if model_path is not None:
            model, class_names = load_model(model_path)
        if model is not None:
            from .exporters.formats import keras_runner

            runner = keras_runner(model)
        self.model = model
        self.runner = runner
        self.class_names = [str(c) for c in class_names]

    def probabilities(self, image: np.ndarray) -> np.ndarray:
        probs = np.asarray(self.runner(image[None].astype(np.float32)))[0]
        if probs.shape != (len(self.class_names),):
            raise FeatcacheError(f"The model gives {probs.shape[-1]} outputs for {len(self.class_names)} class names.")
        return probs

    def top_k(self, path: PathLike, k: int = 3) -> Prediction:
        probs = self.probabilities(read_image(path))
        best = np.argsort(-probs, kind="stable")[:min(k, len(self.class_names))]
        return Prediction(str(path), [self.class_names[i] for i in best], [float(probs[i]) for i in best])


def open_predictor(target: PathLike, cache_dir: PathLike = "cache") -> Predictor:
    """A predictor for a run id or folder, a ``.keras`` model, a ``.tflite`` export or a SavedModel folder."""
    from .runs import RECORD_FILE, load_run, runs_root

    path = Path(target)
    if path.is_dir() and (path / "saved_model.pb").is_file():
        from .exporters.formats import load_savedmodel, open_savedmodel

        _, names = open_savedmodel(path)
        return Predictor(runner=load_savedmodel(path), class_names=names)
    if path.is_file() and path.suffix == ".tflite":
        return _tflite_predictor(path)
    if path.is_file() and path.name != RECORD_FILE:
        return Predictor(path)
    if not path.exists() and (path.suffix in (".keras", ".tflite") or "/" in str(target)):
        raise FeatcacheError(f"Model file {path} does not exist.")
    if path.is_dir() and not (path / RECORD_FILE).is_file():
        raise FeatcacheError(f"{path} is a folder but neither a run folder nor a SavedModel export.")
    try:
        run = load_run(cache_dir, str(target))
    except FeatcacheError as exc:
        if "No run" not in str(exc):
            raise
        raise FeatcacheError(f"{target!r} is neither a model file nor a run in {runs_root(cache_dir)} "
                             "(see `featcache runs`).") from None
    from .image_model import build_image_model, class_names_of

    model = build_image_model(run, cache_dir)
    return Predictor(model=model, class_names=class_names_of(model))


def _tflite_predictor(path: Path) -> Predictor:
    from .exporters import LABELS_FILE
    from .exporters.formats import load_tflite, read_labels

    labels = path.parent / LABELS_FILE
    if not labels.is_file():
        raise FeatcacheError(f"{path} has no {LABELS_FILE} beside it; `featcache export` writes one with the "
                             "class names in the model's output order.")
    return Predictor(runner=load_tflite(path), class_names=read_labels(labels))


def predict(model: PathLike, images: list[PathLike], top_k: int = 3, cache_dir: PathLike = "cache") -> list[Prediction]:
    """Top-k classes with probabilities for each image; every image is read before the model loads.

    ``model`` is a run id (or unique part, under ``cache_dir``), a run folder, a ``.keras``
    image model, a ``.tflite`` export or a SavedModel export folder.
    """
    if isinstance(top_k, bool) or top_k < 1:
        raise InvalidArgument(f"--top-k must be a positive integer; received {top_k}.")
    if not images:
        raise InvalidArgument("No image given.")
    for path in images:
        read_image(path)
    predictor = open_predictor(model, cache_dir)
    return [predictor.top_k(path, top_k) for path in images]
