"""Engines run a frozen feature model over preprocessed batches.

Every engine maps a float32 batch ``(n, size, size, 3)`` to float32
features ``(n, width)``; the choice may change results only by float
rounding (a test compares them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from .errors import choice_error

ENGINES = ("auto", "keras")


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


def resolve_engine(name: str) -> str:
    """'auto' picks the fastest engine measured for this device."""
    if name not in ENGINES:
        raise choice_error("engine", ENGINES, name)
    return "keras" if name == "auto" else name


def make_engine(name: str, model, artifact_dir: Path, artifact_id: str, batch_size: int) -> Engine:
    """The engine ``name`` for ``model``; converted artefacts are cached under ``artifact_dir``."""
    name = resolve_engine(name)
    return KerasEngine(model)
