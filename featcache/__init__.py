"""featcache: run a frozen backbone once, cache its features, train heads from the cache.

Public API (imported lazily so that ``import featcache`` does not import TensorFlow)::

    featcache.extract(FeatureSettings(...))          # stage 1: features -> HDF5 cache
    featcache.train_head(FeatureSettings(...), HeadConfig(...))   # stage 2: head from the cache
    featcache.finetune(...)                          # stage 3: top stages + head (cached on CPU, end to end on GPU)
    featcache.create_backbone(name, weights, input_size)
    featcache.list_backbones(); featcache.load_dataset(source)
    featcache.predict(model_or_run, images)          # a run id, a .keras, .tflite or SavedModel export
    featcache.export_run(run, cache_dir, ExportOptions(format="tflite"))   # ship it, self-checked

No public name is also the name of a submodule (the modules are ``extraction``,
``finetuning``, ``prediction``, ``exporters``...): importing a submodule sets it as an attribute
of the package, which would replace a function of the same name.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "extract": "featcache.extraction",
    "ExtractOptions": "featcache.extraction",
    "FeatureSettings": "featcache.settings",
    "create_backbone": "featcache.backbones",
    "list_backbones": "featcache.backbones",
    "get_spec": "featcache.backbones",
    "load_dataset": "featcache.datasets",
    "validation_split": "featcache.datasets",
    "load_features": "featcache.cache",
    "train_head": "featcache.heads",
    "HeadConfig": "featcache.heads",
    "finetune": "featcache.finetuning",
    "FinetuneConfig": "featcache.finetuning",
    "FeatcacheError": "featcache.errors",
    "predict": "featcache.prediction",
    "export_run": "featcache.exporters",
    "ExportOptions": "featcache.exporters",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'featcache' has no attribute {name!r}")
