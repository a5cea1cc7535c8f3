"""The ``tflite`` engine: the model converted once to a ``.tflite`` file, run by LiteRT with XNNPACK.

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
from typing import Callable, Optional

import numpy as np

from .. import fsio
from ..errors import FeatcacheError, brief


class TFLiteEngine:
    """A ``.tflite`` model in the interpreter, input resized to the batch at hand.

    The input is kept at ``batch_size`` rows; a smaller batch (the last of a
    split) resizes the input and reallocates, and the next full batch
    resizes it back. Resizing costs one reallocation per split, where
    padding would compute up to ``batch_size - 1`` wasted rows.
    """

    name = "tflite"
    precision = "f32"

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


QUANTIZATIONS = ("none", "float16", "int8")


def convert_to_tflite(model, path: Path, quantize: str = "none", representative: Optional[Callable] = None,
                      hint: str = "use --engine keras.") -> Path:
    """Convert ``model`` (batch dimension left dynamic, other dimensions as the model has them) to ``path``.

    ``quantize``: ``none`` (float32), ``float16`` (weights stored as float16) or ``int8``
    (weights and activations, calibrated on ``representative()``: lists of one float32
    input batch each; the model keeps float32 input and output). Written atomically.
    """
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    if quantize not in QUANTIZATIONS:
        raise ValueError(f"Unknown quantisation {quantize!r}; expected one of: {', '.join(QUANTIZATIONS)}.")
    if quantize == "int8" and representative is None:
        raise ValueError("int8 quantisation needs representative input batches to calibrate on.")
    spec = tf.TensorSpec((None,) + tuple(model.input_shape[1:]), tf.float32)
    function = tf.function(lambda x: model(x, training=False)).get_concrete_function(spec)
    converter = tf.lite.TFLiteConverter.from_concrete_functions([convert_variables_to_constants_v2(function)],
                                                                model)
    if quantize != "none":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantize == "float16":
        converter.target_spec.supported_types = [tf.float16]
    elif quantize == "int8":
        converter.representative_dataset = representative
    try:
        flatbuffer = converter.convert()
    except Exception as exc:  # the converter raises its own types; all mean "cannot convert"
        raise FeatcacheError(f"TFLite conversion of {model.name} failed ({type(exc).__name__}); {hint}") from None
    path = Path(path)
    fsio.write_bytes(path, flatbuffer, "TFLite model")
    return path


def available() -> str:
    """Empty when the engine can run here, else why not."""
    return ""


def convert(model, path: Path) -> Path:
    return convert_to_tflite(model, path)


def load(model, artifact: Path, batch_size: int, precision: str) -> "TFLiteEngine":
    return TFLiteEngine(artifact, batch_size)
