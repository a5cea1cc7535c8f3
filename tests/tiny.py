"""Tiny registered backbones and runs of every kind on them, for export, predict and top-loss tests.

Two small random-weight convnets (``tiny_a``, ``tiny_b``) are registered for the test
session only, so a run of each kind (logreg, linear, mlp, concatenated ``tiny_a+tiny_b``,
two views, fine-tune) is made and exported in seconds. ``python tests/tiny.py ARGS`` runs
the featcache CLI with them registered (for subprocess tests).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

TINY = ("tiny_a", "tiny_b")


def _builder(filters: int):
    def build(input_shape, weights):
        import keras

        inputs = keras.Input(input_shape)
        x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="conv_1")(inputs)
        x = keras.layers.Conv2D(filters, 3, strides=2, padding="same", activation="relu", name="conv_2")(x)
        return keras.Model(inputs, x, name="tiny_backbone")

    return build


def tiny_a_preprocess(x):
    return x / 127.5 - 1.0


def tiny_b_preprocess(x):
    return x / 255.0


def register_tiny() -> None:
    """Register the tiny backbones once per process."""
    from featcache.backbones import _REGISTRY, BackboneSpec, register

    for name, filters, preprocess, pid in (("tiny_a", 16, tiny_a_preprocess, "test:[-1,1]"),
                                           ("tiny_b", 12, tiny_b_preprocess, "test:[0,1]")):
        if name not in _REGISTRY:
            register(BackboneSpec(name=name, family="test", builder=_builder(filters), preprocess=preprocess,
                                  preprocess_id=pid, default_size=24, min_size=16, width=filters,
                                  weights_source="random only (tests)", stages=("output", r"^conv_(\d+)$")))


def make_data(root: Path, n_train: int = 50, n_test: int = 4) -> Path:
    """Colour-coded images, files of 16 px (JPEG and PNG): 150 training images, enough to calibrate int8."""
    from conftest import make_image_folder  # not at import: conftest sets TF_CPP_MIN_LOG_LEVEL

    return make_image_folder(root, n_train=n_train, n_test=n_test, size=16)


def tiny_settings(data: Path, cache_dir: Path, backbone: str = "tiny_a", views=("orig",)):
    from featcache.settings import FeatureSettings

    return FeatureSettings(backbone=backbone, weights="none", data=str(data), size=24, cache_dir=str(cache_dir),
                           views=tuple(views))


def extract_tiny(settings) -> None:
    from featcache.extraction import ExtractOptions, extract

    for backbone in settings.backbones():
        for view in settings.views:
            one = type(settings)(**{**settings.__dict__, "backbone": backbone, "views": (view,)})
            extract(one, ExtractOptions(progress=False, batch_size=32, engine="keras"), log=lambda m: None)


def head_run(settings, kind: str = "mlp", **config):
    """A head run on the tiny caches (extracted first)."""
    from featcache.heads import HeadConfig, train_head

    extract_tiny(settings)
    defaults = dict(units=(16,), epochs=20, batch_size=32, val_fraction=0.2) if kind == "mlp" else \
        dict(epochs=30, batch_size=32, val_fraction=0.2)
    return train_head(settings, HeadConfig(kind=kind, **{**defaults, **config}))


def finetune_run(settings, head, mode: str = "full"):
    """A one-step fine-tune run started from ``head`` (a head run on ``settings``); ``mode='cached'`` trains
    the layers above ``conv_1`` from its activation cache."""
    from featcache.finetuning import FinetuneConfig, finetune
    from featcache.runs import load_run

    record = finetune(settings, FinetuneConfig(run=head.run_id, epochs=1, batch_size=16, unfreeze="top:1",
                                               max_steps=1, check_images=4, verbose=0, export=False, mode=mode),
                      log=lambda m: None)
    return load_run(settings.cache_dir, record["run_id"])


def pixels(seed: int, size: int, label: int) -> np.ndarray:
    """One colour-coded image like ``make_image_folder``'s."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 80, (size, size, 3), dtype=np.uint8)
    image[..., label] += 150
    return image


if __name__ == "__main__":
    register_tiny()
    from featcache.cli import main

    sys.argv[0] = "featcache"
    main()
