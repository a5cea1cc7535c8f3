"""What a fine-tune run is asked to do, validated before any data or model is touched."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from typing import Any, Optional

from ..errors import InvalidArgument, choice_error
from ..heads import OPTIMIZERS


# Check (1): cached features are float16 by default (about 3 significant digits), and
# extraction batches differ from ours, so features must agree to within 1% + 0.01.
FEATURE_RTOL = 1e-2
FEATURE_ATOL = 1e-2
# bf16 caches (OpenVINO on AMX or AVX512-BF16) differ from Keras f32 value by value by more than any useful
# element-wise tolerance (lite0 @224 on CIFAR-10: 5-10% relative L2 per feature vector, single values by 0.5 of
# 5.5) while heads score the same; the direction of each vector is kept (cosine 0.9945-0.9988 over 32 images).
# So with bf16, check (1) compares each vector's cosine with the cached one.
BF16_MIN_COSINE = 0.98
# Check (2): validation accuracy before training must be within one point of the head's.
VAL_ACC_TOLERANCE = 0.01

# 'cached' trains the backbone's top stages from a cached activation map (the CPU's mode), 'full' runs the
# whole backbone every step (a GPU's mode); 'auto' is 'full' where TensorFlow sees a GPU, else 'cached'.
MODES = ("auto", "cached", "full")
SCHEDULES = ("cosine", "plateau")
# Cached: lite0's stages 6-7 from a linear head on 9,000 CIFAR-10 images, 3 epochs with a cosine decay
# (bench/finetune_lr.py): 3e-4 lifted validation from 81.7% to 87.5%, 1e-4 to 86.4% (one epoch at a constant
# 3e-4 lowered it to 81.1%: the decay matters). End to end, the whole network at 1e-5.
DEFAULT_LR = {"cached": 3e-4, "full": 1e-5}
DEFAULT_SCHEDULE = {"cached": "cosine", "full": "plateau"}


@dataclass(frozen=True)
class FinetuneConfig:
    """How to fine-tune; ``run`` picks the head run (default: best on validation for the cache)."""

    run: Optional[str] = None
    epochs: int = 5
    batch_size: int = 32
    mode: str = "auto"
    cut: Optional[str] = None  # cached mode: 'top:N' or a layer name; None is the backbone's default cut
    learning_rate: Optional[float] = None  # None: DEFAULT_LR of the mode
    schedule: Optional[str] = None  # None: DEFAULT_SCHEDULE of the mode
    optimizer: str = "adam"
    unfreeze: str = "all"
    flip: bool = True
    translate: float = 0.1
    tta: bool = False  # cached mode: also cache test's other views and report the view-averaged accuracy
    max_steps: Optional[int] = None
    subset: Optional[int] = None
    export: bool = True
    patience: int = 3
    mixed_precision: bool = False
    strategy: str = "none"
    check_images: int = 8
    seed: int = 0
    verbose: int = 2

    def training_digest(self) -> str:
        """What a resumed run must share with the interrupted one.

        Not the epochs, the output or the strategy: a run killed on two devices may resume on one.
        """
        skip = ("epochs", "verbose", "patience", "export", "strategy")
        fields = {k: v for k, v in asdict(self).items() if k not in skip}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:8]

    def resolved(self, has_gpu: bool) -> "FinetuneConfig":
        """The mode, learning rate and schedule this run uses, with 'auto' and the defaults decided."""
        mode = self.mode if self.mode != "auto" else ("full" if has_gpu else "cached")
        if self.tta and mode == "full":
            raise InvalidArgument("--tta averages the cached views of test, and a GPU here makes --mode auto train "
                                  "end to end; pass --mode cached to use it.")
        return replace(self, mode=mode,
                       learning_rate=self.learning_rate if self.learning_rate is not None else DEFAULT_LR[mode],
                       schedule=self.schedule or DEFAULT_SCHEDULE[mode])


# --- arguments -----------------------------------------------------------------------


def parse_unfreeze(text: str) -> tuple[str, Any]:
    """'all' | 'top:N' | 'from:LAYER' | 'above:CUT' -> ('all', None) | ('top', N) | ('from', 'LAYER') | ('above', CUT).

    ``above:CUT`` takes a cut as ``--cut`` does (``top:N`` stages or a layer): the
    layers a cached fine-tune at that cut would train, for an end-to-end run of the same.
    """
    text = (text or "").strip()
    if text == "all":
        return "all", None
    mode, _, arg = text.partition(":")
    if mode == "top" and arg:
        try:
            n = int(arg)
        except ValueError:
            n = 0
        if n < 1:
            raise InvalidArgument(f"--unfreeze top:N needs a positive integer N; received {text!r}.")
        return "top", n
    if mode in ("from", "above") and arg:
        return mode, arg
    raise InvalidArgument(f"Unknown unfreeze {text!r}; expected one of: 'all', 'top:N', 'from:LAYER', 'above:CUT'.")


def validate(config: FinetuneConfig) -> None:
    """Fail on a bad argument before loading data or building a model."""
    if config.optimizer not in OPTIMIZERS:
        raise choice_error("optimizer", OPTIMIZERS, config.optimizer)
    from ..distribute import check_strategy

    if config.mode not in MODES:
        raise choice_error("mode", MODES, config.mode)
    if config.schedule is not None and config.schedule not in SCHEDULES:
        raise choice_error("schedule", SCHEDULES, config.schedule)
    if config.mode == "cached" and config.strategy != "none":
        raise InvalidArgument(f"--strategy {config.strategy} distributes end-to-end training; use it with "
                              "--mode full (cached mode trains on one device).")
    check_strategy(config.strategy)
    if config.tta and config.mode == "full":
        raise InvalidArgument("--tta averages the cached views of test; it needs --mode cached or auto without a GPU.")
    parse_unfreeze(config.unfreeze)
    for name in ("epochs", "batch_size", "check_images"):
        if int(getattr(config, name)) < 1:
            raise InvalidArgument(f"{name.replace('_', ' ').capitalize()} must be a positive integer; "
                                  f"received {getattr(config, name)}.")
    for name in ("max_steps", "subset"):
        value = getattr(config, name)
        if value is not None and int(value) < 1:
            raise InvalidArgument(f"--{name.replace('_', '-')} must be a positive integer; received {value}.")
    if config.learning_rate is not None and not config.learning_rate > 0:
        raise InvalidArgument(f"Learning rate must be positive; received {config.learning_rate}.")
    if not 0.0 <= config.translate < 0.5:
        raise InvalidArgument(f"Translation must be a fraction in [0, 0.5); received {config.translate}.")
    if config.patience < 0:
        raise InvalidArgument(f"Patience must be >= 0; received {config.patience}.")

