"""How each export format is written and run back: ``keras``, ``savedmodel``, ``tflite``.

Every writer takes the run's image model (``featcache.image_model``) and a
temporary path; every loader returns a function from a float32 batch of raw
RGB pixels ``(n, h, w, 3)`` to class probabilities ``(n, classes)``, used by
the export's self-check and by ``featcache predict``.

- ``keras``: ``model.save``; loading it needs ``featcache.layers`` (its
  ``Preprocess`` and ``ClassNames`` layers are featcache's own).
- ``savedmodel``: ``tf.saved_model.save`` with one ``serving_default`` signature: ``images`` float32 ``(n, h, w, 3)`` of any
  size in; ``probabilities``, ``classes`` (the top class names) and
  ``class_names`` out. Runs with TensorFlow alone.
- ``tflite``: ``engines.tflite.convert_to_tflite`` (the engines' converter),
  optionally quantised; input ``(n, h, w, 3)`` float32 of any size (resize the
  input tensor first), probabilities out. Runs with LiteRT alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from ..errors import FeatcacheError, brief

Runner = Callable[[np.ndarray], np.ndarray]


def write_keras(model, path: Path, quantize: str, representative: Optional[Callable]) -> None:
    model.save(path)


def load_keras(path: Path) -> Runner:
    import keras

    from .. import layers as _layers  # noqa: F401  (registers Preprocess, InferenceMode, ClassNames)

    try:
        model = keras.saving.load_model(path, compile=False)
    except Exception as exc:  # Keras raises many types for a foreign or broken file
        raise FeatcacheError(f"Cannot load {path}: {type(exc).__name__}: {brief(exc)}") from None
    return keras_runner(model)


def keras_runner(model) -> Runner:
    """One traced function for batches of any size (no retracing per image size)."""
    import tensorflow as tf

    function = tf.function(lambda x: model(x, training=False), reduce_retracing=True,
                           input_signature=[tf.TensorSpec((None, None, None, 3), tf.float32)])
    return lambda batch: np.asarray(function(tf.constant(batch, tf.float32)), dtype=np.float32)


def write_savedmodel(model, path: Path, quantize: str, representative: Optional[Callable]) -> None:
    """``tf.saved_model.save`` of a small module around the model, with one serving signature.

    Not Keras 3's ``ExportArchive`` (what ``model.export`` uses): it stored every
    variable twice (``variables`` and ``_all_variables``), 30.7 MB for the lite0 mlp
    head's image model, whose weights take 15 MB.
    """
    import tensorflow as tf

    from ..image_model import class_names_of

    module = _serving_module(model, class_names_of(model))
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})


def _serving_module(model, names: Sequence[str]):
    import tensorflow as tf

    class Serving(tf.Module):
        """The image model and its class names."""

        def __init__(self):
            super().__init__(name="featcache_serving")
            self.model = model
            self.names = tf.constant(list(names))

        @tf.function(input_signature=[tf.TensorSpec((None, None, None, 3), tf.float32, name="images")])
        def serve(self, images):
            probabilities = self.model(images, training=False)
            return {"probabilities": probabilities,
                    "classes": tf.gather(self.names, tf.argmax(probabilities, axis=-1)),
                    "class_names": self.names}

    return Serving()


def load_savedmodel(path: Path) -> Runner:
    import tensorflow as tf

    loaded, names = open_savedmodel(path)
    serve = loaded.signatures["serving_default"]  # ``loaded`` stays referenced: the signature needs it alive
    return lambda batch, _keep=loaded: np.asarray(serve(images=tf.constant(batch, tf.float32))["probabilities"],
                                                  dtype=np.float32)


def open_savedmodel(path: Path):
    """(the loaded SavedModel, its class names); an error unless featcache exported it."""
    import tensorflow as tf

    try:
        loaded = tf.saved_model.load(str(path))
        serve = loaded.signatures["serving_default"]
    except Exception as exc:  # TensorFlow raises many types for a foreign or broken folder
        raise FeatcacheError(f"Cannot load SavedModel {path}: {type(exc).__name__}: {brief(exc)}") from None
    if "class_names" not in serve.structured_outputs:
        raise FeatcacheError(f"SavedModel {path} was not exported by featcache (its signature returns no class names).")
    probe = serve(images=tf.zeros((1, 8, 8, 3), tf.float32))
    return loaded, [n.decode() for n in np.asarray(probe["class_names"])]


def write_tflite(model, path: Path, quantize: str, representative: Optional[Callable]) -> None:
    from ..engines.tflite import convert_to_tflite

    convert_to_tflite(model, path, quantize=quantize, representative=representative,
                      hint="this model cannot be exported to TFLite; try --format savedmodel.")


def load_tflite(path: Path, batch_size: int = 1) -> Runner:
    from ..engines.tflite import TFLiteEngine

    return TFLiteEngine(path, batch_size)


def read_labels(path: Path) -> list[str]:
    """Class names from a ``labels.txt``, one per line."""
    try:
        names = [line.rstrip("\r") for line in path.read_text(encoding="utf-8").split("\n")]
    except (OSError, UnicodeDecodeError) as exc:
        raise FeatcacheError(f"Cannot read class names from {path}: {exc}.") from None
    while names and names[-1] == "":
        names.pop()
    if not names:
        raise FeatcacheError(f"{path} lists no class names.")
    return names


def labels_text(names: Sequence[str]) -> str:
    return "".join(f"{name}\n" for name in names)
