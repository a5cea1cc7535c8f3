"""Engines run a frozen feature model over preprocessed batches.

Every engine maps a float32 batch ``(n, size, size, 3)`` to float32
features ``(n, width)``; the choice may change results only by float
rounding (``tests/test_engines.py`` compares them). The engine is recorded
in a cache file's attributes but is not part of its key.

- ``keras``: the Keras model in a ``tf.function``; the only choice on a GPU.
- ``tflite``: the model converted once to a ``.tflite`` file (cached under
  ``artifact_dir``) and run by the TFLite interpreter with its default
  XNNPACK delegate on every core. It was the fastest on these CPUs (see
  ``bench/results/``), so ``auto`` picks it on a machine without a GPU,
  unless no artefact is cached yet and the job is too small to repay the
  conversion (``conversion_pays``), or the conversion fails.

Interpreter: ``ai_edge_litert.interpreter.Interpreter`` (LiteRT), not
``tf.lite.Interpreter``. Checked with TF 2.21 + ai-edge-litert 2.3.0: LiteRT
loads the flatbuffer written by TF 2.21's converter and reproduces the Keras
features (max abs diff 2.6e-5 on ResNet50), while ``tf.lite.Interpreter``
warns on every construction that it is deprecated and scheduled for
deletion. ``tf.lite.Interpreter`` remains the fallback when ai-edge-litert
is not installed (it is the ``featcache[tflite]`` extra).

Conversion freezes the variables into constants first
(``convert_variables_to_constants_v2``): converting the ``tf.function``
with resource variables produced a 0.3 MB model whose outputs were NaN.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional, Protocol

import numpy as np

from . import fsio
from .errors import brief, FeatcacheError, choice_error

ENGINES = ("auto", "keras", "tflite")
# What 'auto' picks without a GPU: the fastest measured on these machines
# (TFLite/XNNPACK beat Keras on ResNet50 and EfficientNet-Lite0 at 224; bench/results/).
CPU_ENGINE = "tflite"
GPU_ENGINE = "keras"
# Below this many 224-px-equivalent images, 'auto' does not convert (see conversion_pays).
AUTO_MIN_ROWS_AT_224 = 1000


class Engine(Protocol):
    name: str

    def __call__(self, batch) -> np.ndarray: ...


class KerasEngine:
    """A ``tf.function`` around the model in inference mode (no XLA: it was slower on CPU here)."""

    name = "keras"

    def __init__(self, model):
        import tensorflow as tf

        self._fn = tf.function(lambda x: model(x, training=False), reduce_retracing=True)

    def __call__(self, batch) -> np.ndarray:
        return np.asarray(self._fn(batch), dtype=np.float32)


class TFLiteEngine:
    """A ``.tflite`` model in the interpreter, input resized to the batch at hand.

    The input is kept at ``batch_size`` rows; a smaller batch (the last of a
    split) resizes the input and reallocates, and the next full batch
    resizes it back. Resizing costs one reallocation per split, where
    padding would compute up to ``batch_size - 1`` wasted rows.
    """

    name = "tflite"

    def __init__(self, path: Path, batch_size: int, num_threads: Optional[int] = None):
        interpreter_class = _interpreter_class()
        try:
            self._interpreter = interpreter_class(model_path=str(path), num_threads=num_threads or os.cpu_count())
        except (ValueError, RuntimeError) as exc:
            raise FeatcacheError(f"Cannot load TFLite model {path}: {brief(exc)}; "
                                 f"delete it to convert again.") from None
        self._input = self._interpreter.get_input_details()[0]
        self._output = self._interpreter.get_output_details()[0]
        self._shape: Optional[tuple] = None
        self._resize((int(batch_size),) + tuple(int(d) for d in self._input["shape"][1:]))

    def _resize(self, shape: tuple) -> None:
        self._interpreter.resize_tensor_input(self._input["index"], list(shape))
        self._interpreter.allocate_tensors()
        self._shape = shape

    def __call__(self, batch) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if batch.shape != self._shape:
            self._resize(batch.shape)
        self._interpreter.set_tensor(self._input["index"], batch)
        self._interpreter.invoke()
        return np.asarray(self._interpreter.get_tensor(self._output["index"]), dtype=np.float32)


def _interpreter_class() -> Callable:
    """LiteRT's interpreter when installed (see the module docstring), else TensorFlow's."""
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter
    except ImportError:
        import tensorflow as tf

        def construct(**kwargs):
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the deprecation notice, repeated on every construction
                return tf.lite.Interpreter(**kwargs)

        return construct


def gpu_visible() -> bool:
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def resolve_engine(name: str, gpu: bool = False) -> str:
    """Check ``name``; 'auto' becomes the fastest engine measured for the device.

    ``gpu`` says whether a GPU is visible; it is a parameter so that
    validating the name never imports TensorFlow (a warm-cache call stays light).
    """
    if name not in ENGINES:
        raise choice_error("engine", ENGINES, name)
    if name == "auto":
        return GPU_ENGINE if gpu else CPU_ENGINE
    return name


def tflite_path(model, artifact_dir: Path, artifact_id: str) -> Path:
    """Where the conversion of ``model`` lives: one file per model identity and TF/Keras version."""
    import keras
    import tensorflow as tf

    dtypes = sorted({str(getattr(layer, "compute_dtype", "float32")) for layer in _layers(model)} - {"float32"})
    suffix = f"-{'-'.join(dtypes)}" if dtypes else ""
    return Path(artifact_dir) / f"{artifact_id}-tf{tf.__version__}-keras{keras.__version__}{suffix}.tflite"


def _layers(model):
    for layer in model.layers:
        yield layer
        if hasattr(layer, "layers"):
            yield from _layers(layer)


def convert_to_tflite(model, path: Path) -> Path:
    """Convert ``model`` (batch dimension left dynamic) and write it atomically to ``path``."""
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    spec = tf.TensorSpec((None,) + tuple(model.input_shape[1:]), tf.float32)
    function = tf.function(lambda x: model(x, training=False)).get_concrete_function(spec)
    converter = tf.lite.TFLiteConverter.from_concrete_functions([convert_variables_to_constants_v2(function)],
                                                                model)
    try:
        flatbuffer = converter.convert()
    except Exception as exc:  # the converter raises its own types; all mean "cannot convert"
        raise FeatcacheError(f"TFLite conversion of {model.name} failed ({type(exc).__name__}); "
                             f"use --engine keras.") from None
    path = Path(path)
    fsio.write_bytes(path, flatbuffer, "TFLite model")
    return path


def conversion_pays(rows: Optional[int], size: int) -> bool:
    """Whether converting is worth it for ``rows`` images at ``size`` px when no artefact is cached yet.

    The conversion costs a roughly fixed 10-30 s here (it depends on the
    weights, not the input size), while the time TFLite saves grows with
    the FLOPs, i.e. with rows x size^2; ResNet50, the smaller win (1.46x),
    breaks even near 1,000 images at 224. Unknown ``rows`` means "large".
    """
    return rows is None or rows * (size / 224) ** 2 >= AUTO_MIN_ROWS_AT_224


def make_engine(name: str, model, artifact_dir: Path, artifact_id: str, batch_size: int,
                rows: Optional[int] = None) -> Engine:
    """The engine ``name`` for ``model``; converted artefacts are cached under ``artifact_dir``.

    ``auto`` on a CPU picks ``tflite`` when its artefact is already cached or
    ``rows`` (the images about to be extracted) repay the conversion, else
    ``keras`` (a few dozen images at 32 px run faster than one conversion).
    """
    path = tflite_path(model, artifact_dir, artifact_id)
    chosen = resolve_engine(name, gpu=gpu_visible() if name == "auto" else False)
    if name == "auto" and chosen == "tflite" and not path.exists():
        size = int(model.input_shape[1] or 224)
        chosen = "tflite" if conversion_pays(rows, size) else "keras"
    if chosen == "keras":
        return KerasEngine(model)
    if path.exists():
        try:
            return TFLiteEngine(path, batch_size)
        except FeatcacheError:  # a damaged artefact is only a cache: convert again
            pass
    try:
        convert_to_tflite(model, path)
        return TFLiteEngine(path, batch_size)
    except FeatcacheError:
        if name == "auto":  # asked for the fastest that works, not for TFLite
            return KerasEngine(model)
        raise
