"""The backbone registry: one small record per network, as in timm.

A record says everything the rest of featcache needs to know about a
network without building it: how to build it, how its inputs are
preprocessed, its sizes and its feature width. ``create_backbone`` and
``list_backbones`` (in ``featcache.backbones``) are the only entry points.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional


@dataclass(frozen=True)
class BackboneSpec:
    """How to build and feed one backbone.

    ``builder(input_shape, weights)`` returns a Keras model without its
    classifier and without pooling: images in, a 4-D feature map out.
    ``weights`` is ``None`` or ``"imagenet"``; a weights file is loaded by
    ``create_backbone`` after building with ``None``.

    ``preprocess`` maps float32 RGB pixels in [0, 255] to what the network
    expects. ``preprocess_id`` names that mapping in cache keys, so two
    backbones sharing a preprocessing share its id.

    ``stages`` and ``default_cut`` say where a cached fine-tune may cut the
    network (``featcache.backbones.cuts``).

    ``imagenet_weights(cache_dir)`` is set for backbones whose ImageNet
    weights are not downloaded by Keras (the EfficientNet-Lite family): it
    returns the path of a Keras weights file, converting it on first use.
    """

    name: str
    family: str
    builder: Callable
    preprocess: Callable
    preprocess_id: str
    default_size: int
    min_size: int
    width: int
    weights_source: str
    imagenet_weights: Optional[Callable] = None
    aliases: tuple = field(default=())
    # Stage boundaries, where the network can be cut cleanly (``featcache.backbones.cuts``):
    # ('output', regex) takes the output of the last layer of each stage, ('input', regex) the input of the
    # first one; the regex's first group numbers the stage. None: only a layer name can be given.
    stages: Optional[tuple[str, str]] = None
    default_cut: str = "top:1"


_REGISTRY: dict[str, BackboneSpec] = {}


def register(spec: BackboneSpec) -> BackboneSpec:
    """Add a record; module import time is the only place this is called."""
    if spec.name in _REGISTRY:
        raise RuntimeError(f"backbone {spec.name!r} registered twice")
    _REGISTRY[spec.name] = spec
    return spec
