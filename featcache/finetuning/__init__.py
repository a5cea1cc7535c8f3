"""Stage 3: fine-tune part of the backbone with the head, starting from a head trained on the cache.

Two modes share the start (``source.prepare``), the checks, the work folder
and the finished run: ``full`` runs the whole backbone on decoded images
every step (a GPU's mode; ``full.py``), ``cached`` runs the lower part once
into an activation cache and trains the top stages from it (the CPU's mode;
``cached.py``). Both end with the same image model::

    images -> Preprocess -> InferenceMode(backbone) -> head -> ClassNames -> probabilities
"""

from __future__ import annotations

from typing import Callable, Sequence

from ..errors import InvalidArgument
from ..settings import FeatureSettings
from .config import MODES, FinetuneConfig, parse_unfreeze, validate
from .model import build_model
from .source import Source

__all__ = ["MODES", "FinetuneConfig", "Source", "build_model", "finetune", "parse_unfreeze"]


def finetune(settings: FeatureSettings, config: FinetuneConfig = FinetuneConfig(),
             log: Callable[[str], None] = print, callbacks: Sequence = ()) -> dict:
    """Fine-tune the chosen head run's backbone and head; returns the run record (kind 'finetune').

    ``mode='auto'`` trains end to end where TensorFlow sees a GPU (or under a
    distribution strategy) and from cached activations elsewhere. Running the
    same call again after an interruption resumes from the last finished epoch.
    ``callbacks`` run after featcache's own (tests use them to interrupt a run).
    """
    from ..lookup import check_settings

    validate(config)
    check_settings(settings)
    if config.tta and len(set(settings.views)) < 2:
        raise InvalidArgument(f"--tta averages test over the cached views; pass two, e.g. --views orig,flip "
                              f"(received --views {','.join(settings.views)}).")
    if config.mode == "auto" and config.strategy != "none":
        has_gpu = True  # a strategy distributes end-to-end training; probing devices first would break it
    elif config.mode == "auto":
        import tensorflow as tf

        has_gpu = bool(tf.config.list_physical_devices("GPU"))
    else:
        has_gpu = config.mode == "full"
    resolved = config.resolved(has_gpu)
    if config.mode == "auto":
        why = ("a GPU (or a distribution strategy) is present" if resolved.mode == "full" else
               "no GPU here: the lower backbone runs once into an activation cache and the top stages train "
               "from it (--mode full trains end to end)")
        log(f"mode: {resolved.mode} ({why})")
    if resolved.mode == "full":
        from .full import finetune_full

        return finetune_full(settings, resolved, log, callbacks)
    from .cached import finetune_cached

    return finetune_cached(settings, resolved, log, callbacks)
