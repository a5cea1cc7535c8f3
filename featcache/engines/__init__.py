"""Engines run a frozen model over batches; ``auto`` picks the fastest measured on this machine.

Every engine maps a float32 batch to float32 outputs (pooled features or an
activation map). Engines of one precision differ only by float rounding
(``tests/test_engines.py`` compares them), so the engine is recorded in a
cache file's attributes but is not part of its key; the precision (``f32`` or
``bf16``) is.

Each engine is a record in a small registry (``registry.py``), like the
backbones: its name, whether it can run here, how to convert a model to its
artefact (cached under ``CACHE_DIR/engines/``, named by model identity and
library versions), how to load it, the precisions it runs and whether it
runs under tf.distribute. ``make_engine`` is the one path for all of them:
reuse the cached artefact, else convert, else (for ``auto``) fall back to the
next fastest with the reason. How ``auto`` decides is in ``auto.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from ..errors import FeatcacheError
from .auto import candidates, choose, conversion_pays, decision_path, measure, recorded
from .keras import KerasEngine
from .machine import BF16_FLAGS, cpu_flags, machine_id, native_bf16
from .registry import (ENGINES, PRECISIONS, Engine, EngineRecord, artifact_path, build, check_precision,
                       get_record, list_engines, resolve_engine, tflite_path)
from .tflite import TFLiteEngine, convert_to_tflite


def make_engine(name: str, model, artifact_dir: Path, artifact_id: str, batch_size: int,
                rows: Optional[int] = None, precision: str = "f32", gpu: Optional[bool] = None,
                log: Callable[[str], None] = lambda message: None, size: Optional[int] = None) -> Engine:
    """The engine ``name`` at ``precision``, or for ``auto`` (either) the fastest measured here.

    The engine's ``precision`` attribute says what it computes in; on a GPU
    ``auto`` is Keras f32 (the converted engines here are CPU ones). ``rows`` images at
    ``size`` px (default: the model's input size) is the work at hand, which decides
    whether a first conversion pays.
    """
    resolve_engine(name)
    check_precision(precision, name)
    if gpu is None:
        gpu = name == "auto" and _gpu_listed()
    pairs = candidates(name, precision, gpu=gpu)
    if not pairs:
        if name != "auto":
            build(name, model, artifact_dir, artifact_id, batch_size, precision)  # raises the reason
        raise FeatcacheError(f"No engine here runs precision {precision}.")
    if len(pairs) == 1:
        return build(pairs[0][0], model, artifact_dir, artifact_id, batch_size, pairs[0][1])
    size = size or int(model.input_shape[1] or 224)
    return choose(model, artifact_dir, artifact_id, batch_size, pairs, rows, size, name, precision, log)


def _gpu_listed() -> bool:
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


__all__ = ["BF16_FLAGS", "ENGINES", "PRECISIONS", "Engine", "EngineRecord", "KerasEngine", "TFLiteEngine",
           "artifact_path", "build", "candidates", "check_precision", "choose", "conversion_pays", "convert_to_tflite",
           "cpu_flags", "decision_path", "get_record", "list_engines", "machine_id", "make_engine", "measure",
           "native_bf16", "recorded", "resolve_engine", "tflite_path"]
