"""How much memory a forward pass needs, checked before it runs out.

An input size of 4000 px makes every activation map 300 times larger than at
224 px: the process would be killed by the kernel after minutes of swapping,
with no message. ``require_memory`` estimates the peak from the model's layer
shapes (no forward pass) and refuses, with the estimate, what cannot fit.
"""

from __future__ import annotations

import math
import os
from typing import Callable, Iterator, Optional

from .errors import FeatcacheError
from .fsio import human_bytes

# Live at once at the peak: a layer's input, its output and a residual branch or workspace.
_LIVE_MAPS = 3
# Above this share of the available memory a run is refused; above the half of it, warned about.
_REFUSE_SHARE = 0.9


def available_bytes() -> Optional[int]:
    """Memory the kernel can give without swapping (MemAvailable); None where it cannot tell."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _leaf_layers(model) -> Iterator:
    for layer in getattr(model, "layers", []):
        if getattr(layer, "layers", None):
            yield from _leaf_layers(layer)
        else:
            yield layer


def largest_activation(model) -> int:
    """Elements per image of the model's largest layer output (its input included)."""
    largest = 0
    for layer in _leaf_layers(model):
        try:
            shapes = layer.output if isinstance(layer.output, (list, tuple)) else [layer.output]
            for tensor in shapes:
                largest = max(largest, math.prod(int(d) for d in tensor.shape[1:] if d is not None))
        except (AttributeError, ValueError, TypeError):  # a layer without a single symbolic output
            continue
    return largest


def estimate_bytes(model, batch_size: int, bytes_per_value: int = 4, factor: float = 1.0) -> int:
    """Peak activation memory of one batch through ``model``; ``factor`` > 1 for training (gradients)."""
    return int(largest_activation(model) * _LIVE_MAPS * batch_size * bytes_per_value * factor)


def require_memory(model, batch_size: int, what: str, log: Callable[[str], None] = print,
                   factor: float = 1.0, available: Optional[int] = None) -> int:
    """Refuse before it starts a run whose activations cannot fit in memory; warn when they take half of it."""
    needed = estimate_bytes(model, batch_size, factor=factor)
    available = available_bytes() if available is None else available
    if available is None:
        return needed
    size = "x".join(str(d) for d in model.input_shape[1:3])
    if needed > _REFUSE_SHARE * available:
        raise FeatcacheError(
            f"{what} at input {size} with batch {batch_size} needs about {human_bytes(needed)} of memory for "
            f"activations and this machine has {human_bytes(available)} available; lower --size or --batch-size.")
    if needed > available / 2:
        log(f"warning: {what} at input {size} with batch {batch_size} needs about {human_bytes(needed)} of the "
            f"{human_bytes(available)} of memory available")
    return needed
