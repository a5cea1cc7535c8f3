"""The ``openvino`` engine: the frozen model converted once to OpenVINO IR, compiled for this CPU.

bf16 inference precision (``INFERENCE_PRECISION_HINT``) uses AMX tiles or
AVX512-BF16 where the CPU has them (bf16 products, f32 sums); it is offered
only there, since elsewhere OpenVINO would quietly compute in f32. On the
whole CIFAR-10 copy, lite0 heads on bf16 features scored within 0.3 points
of the same heads on f32 features (``bench/run.py``, figure 4). f32 is exact
to float rounding. The IR (``model.xml`` + ``model.bin``) is written as one
folder, atomically, so a killed conversion never leaves half an artefact.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

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
    """A compiled OpenVINO model on the CPU.

    Compiled for throughput by default: OpenVINO picks its streams (2 on these
    2-core machines), each batch is cut into one slice per stream and the
    slices run at once, each stream on its own core. Measured here under
    load, lite0 ran 60 against 43 img/s (f32) and 101 against 86 (bf16) than
    one request over both cores (``streams=1``); every image is computed
    alone, so the features are bit-identical either way.
    """

    name = "openvino"

    def __init__(self, path: Path, precision: str, streams: Optional[int] = None):
        import openvino as ov

        if precision not in _HINTS:
            raise FeatcacheError(f"OpenVINO precision {precision!r} is not one of {sorted(_HINTS)}.")
        self.precision = precision
        config = {"PERFORMANCE_HINT": "LATENCY" if streams == 1 else "THROUGHPUT",
                  "INFERENCE_PRECISION_HINT": _HINTS[precision], "INFERENCE_NUM_THREADS": os.cpu_count() or 1}
        if streams and streams > 1:
            config["NUM_STREAMS"] = int(streams)
        try:
            model = ov.Core().read_model(str(Path(path) / "model.xml"))
            self._compiled = ov.Core().compile_model(model, "CPU", config)
            self.streams = 1 if streams == 1 else int(self._compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        except Exception as exc:  # a damaged or foreign IR
            raise FeatcacheError(f"Cannot load OpenVINO model {path}: {brief(exc)}") from None
        self._requests = [self._compiled.create_infer_request() for _ in range(self.streams)]
        self._output = self._compiled.output(0)

    def __call__(self, batch) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if self.streams == 1 or batch.shape[0] < self.streams:
            result = self._requests[0].infer({0: batch})[self._output]
            return np.array(result, dtype=np.float32)  # a copy: the request reuses its output buffer
        slices = np.array_split(batch, self.streams)
        for request, part in zip(self._requests, slices):
            request.start_async({0: part})
        outputs = []
        for request in self._requests:
            request.wait()
            outputs.append(np.array(request.get_output_tensor(0).data, dtype=np.float32))
        return np.concatenate(outputs)


def load(model, artifact: Path, batch_size: int, precision: str) -> OpenVINOEngine:
    return OpenVINOEngine(artifact, precision)
