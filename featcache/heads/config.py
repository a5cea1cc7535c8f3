"""What a head is: its settings record and their checks."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ..errors import InvalidArgument, choice_error


KINDS = ("logreg", "linear", "mlp")
OPTIMIZERS = ("adam", "rmsprop", "sgd")
SPLITS = ("train", "test")
# A feature whose training variance is below this is constant: it is centred, not scaled.
MIN_VARIANCE = 1e-12
# Rows per forward pass when predicting (bounds memory, not speed).
PREDICT_ROWS = 16384
# Fields a sweep may vary; the validation split (val_fraction, seed) must stay fixed to compare runs.
SWEEPABLE = ("kind", "units", "dropout", "optimizer", "learning_rate", "epochs", "batch_size", "patience", "c_grid")
DEFAULT_GRID: dict[str, tuple] = {"kind": KINDS, "learning_rate": (1e-3, 3e-3), "dropout": (0.3, 0.5)}
Log = Optional[Callable[[str], None]]


@dataclass(frozen=True)
class HeadConfig:
    """How to train one head.

    The defaults are measured: batch 1024 needs 13% less CPU per epoch than 512
    (``bench/bench_head.py``), and on CIFAR-10 EfficientNet-Lite0 features Adam at 2e-3 and
    batch 1024 reached val/test 0.826/0.820 against 0.828/0.821 at 1e-3 and batch 256.
    ``c_grid`` and ``max_iter`` only concern ``logreg``; ``init`` continues from a saved head
    (a run id, run folder or ``head.keras`` path) instead of a new one, whose saved
    architecture then decides the kind, units and dropout the run records.
    """

    kind: str = "mlp"
    units: tuple[int, ...] = (256, 128, 64)
    dropout: float = 0.5
    optimizer: str = "adam"
    learning_rate: float = 2e-3
    epochs: int = 30
    batch_size: int = 1024
    patience: int = 5
    seed: int = 0
    val_fraction: float = 0.1
    c_grid: tuple[float, ...] = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
    max_iter: int = 300
    init: Optional[str] = None

    def summary(self) -> str:
        """The settings that tell heads apart, for tables."""
        if self.kind == "logreg":
            text = "C " + "/".join(f"{c:g}" for c in self.c_grid)
        else:
            text = f"{self.optimizer} lr {self.learning_rate:g} b{self.batch_size}"
            if self.kind == "mlp":
                text = f"{'-'.join(str(u) for u in self.units)} drop {self.dropout:g} " + text
        return text + (f" from {Path(self.init).name}" if self.init else "")


def validate_config(config: HeadConfig) -> None:
    """Fail on a bad argument before loading anything."""
    if config.kind not in KINDS:
        raise choice_error("head kind", KINDS, config.kind)
    if config.optimizer not in OPTIMIZERS:
        raise choice_error("optimizer", OPTIMIZERS, config.optimizer)
    if config.kind == "mlp" and (not config.units or any(int(u) < 1 for u in config.units)):
        raise InvalidArgument(f"MLP units must be positive integers, e.g. (256, 128, 64); received {config.units!r}.")
    if not 0.0 <= config.dropout < 1.0:
        raise InvalidArgument(f"Dropout must be in [0, 1); received {config.dropout}.")
    if not (config.learning_rate > 0 and math.isfinite(config.learning_rate)):
        raise InvalidArgument(f"Learning rate must be a positive finite number; received {config.learning_rate}.")
    if not 0 <= config.seed < 2 ** 32:
        raise InvalidArgument(f"Seed must be in [0, 2**32); received {config.seed}.")
    for name in ("epochs", "batch_size", "max_iter"):
        if int(getattr(config, name)) < 1:
            raise InvalidArgument(f"{name.replace('_', ' ').capitalize()} must be a positive integer; "
                                  f"received {getattr(config, name)}.")
    if config.patience < 0:
        raise InvalidArgument(f"Patience must be >= 0; received {config.patience}.")
    if not 0.0 < config.val_fraction < 1.0:
        raise InvalidArgument(f"Validation fraction must be in (0, 1); received {config.val_fraction}.")
    if not config.c_grid or any(not c > 0 for c in config.c_grid):
        raise InvalidArgument(f"The logreg C grid must hold positive values; received {config.c_grid!r}.")
    if config.init and config.kind == "logreg":
        raise InvalidArgument("A head continued from --init trains with Keras; use kind 'linear' or 'mlp' "
                              "(a logreg head's saved model is a linear Keras head).")


def parse_units(text: str) -> tuple[int, ...]:
    """'256,128,64' -> (256, 128, 64)."""
    try:
        units = tuple(int(u) for u in str(text).split(",") if u.strip())
    except ValueError:
        units = ()
    if not units or any(u < 1 for u in units):
        raise InvalidArgument(f"Units must be comma-separated positive integers like '256,128,64'; received {text!r}.")
    return units
