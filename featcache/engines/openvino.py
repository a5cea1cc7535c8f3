"""The ``openvino`` engine: the frozen model converted once to OpenVINO IR, compiled for this CPU.

bf16 inference precision (``INFERENCE_PRECISION_HINT``) uses AMX tiles or
AVX512-BF16 where the CPU has them; measured on this project's Xeon (AMX) it
ran ResNet50 about 4-8x and EfficientNet-Lite0 about 4-5x faster than Keras,
with head accuracy unchanged (``bench/results/``). f32 is exact to float
rounding. The IR (``model.xml`` + ``model.bin``) is written as one folder,
atomically, so a killed conversion never leaves half an artefact.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .. import fsio
from ..errors import FeatcacheError, brief

_HINTS = {"f32": "f32", "bf16": "bf16"}


def available() -> str:
    """Empty when the engine can run here, else why not."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return "the openvino package is not installed (pip install openvino)"
    return ""


def version() -> str:
    import openvino

    return openvino.__version__.split("-")[0]


def convert(model, path: Path) -> Path:
    """Trace the model with a dynamic batch, convert it and save the IR folder atomically at ``path``."""
    import openvino as ov
    import tensorflow as tf

    spec = tf.TensorSpec((None,) + tuple(model.input_shape[1:]), tf.float32)
    function = tf.function(lambda x: model(x, training=False)).get_concrete_function(spec)
    try:
        converted = ov.convert_model(function)
    except Exception as exc:  # OpenVINO's frontends raise their own types; all mean "cannot convert"
        raise FeatcacheError(f"OpenVINO conversion of {model.name} failed ({type(exc).__name__}: {brief(exc)}); "
                             "use --engine keras or tflite.") from None
    with fsio.atomic_path(path, "OpenVINO model") as tmp:
        tmp.mkdir()
        ov.save_model(converted, str(tmp / "model.xml"), compress_to_fp16=False)
    return Path(path)


class OpenVINOEngine:
    """A compiled OpenVINO model on the CPU, one synchronous request (the batch fills both cores)."""

    name = "openvino"

    def __init__(self, path: Path, precision: str, num_threads: int = 0):
        import openvino as ov

        if precision not in _HINTS:
            raise FeatcacheError(f"OpenVINO precision {precision!r} is not one of {sorted(_HINTS)}.")
        self.precision = precision
        core = ov.Core()
        try:
            model = core.read_model(str(Path(path) / "model.xml"))
            config = {"INFERENCE_PRECISION_HINT": _HINTS[precision], "PERFORMANCE_HINT": "LATENCY",
                      "INFERENCE_NUM_THREADS": num_threads or os.cpu_count() or 1}
            self._compiled = core.compile_model(model, "CPU", config)
        except Exception as exc:  # a damaged or foreign IR
            raise FeatcacheError(f"Cannot load OpenVINO model {path}: {brief(exc)}") from None
        self._request = self._compiled.create_infer_request()
        self._output = self._compiled.output(0)

    def __call__(self, batch) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        result = self._request.infer({0: batch})[self._output]
        return np.array(result, dtype=np.float32)  # a copy: the request reuses its output buffer


def load(model, artifact: Path, batch_size: int, precision: str) -> OpenVINOEngine:
    return OpenVINOEngine(artifact, precision)
