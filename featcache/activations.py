"""Activation caches: the backbone's activation map at a cut, stored like pooled features.

``featcache features --cut top:N`` runs the lower part of the backbone (up to
the cut, ``featcache.backbones.cuts``) once per image and view, and stores
each activation map flattened into a row of an ordinary cache file (float16
by default), with the cut in its key and the map's shape in its attributes.
Everything the pooled cache guarantees carries over unchanged: chunked,
resumable writes, checksums, ``cache verify``, one writer per key. A cached
fine-tune (``featcache.finetuning.cached``) trains the layers after the cut
from these files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from . import fsio
from .backbones import BackboneSpec
from .backbones.cuts import Cut, activation_shape, resolve_cut, split_at


@dataclass(frozen=True)
class CutInfo:
    """A resolved cut with the shape of its activation map at the input size in use."""

    cut: Cut
    shape: tuple[int, int, int]

    @property
    def width(self) -> int:
        """Values per image: one row of the cache file."""
        return int(np.prod(self.shape))

    def bytes_per_image(self, dtype: str) -> int:
        return self.width * np.dtype(dtype).itemsize


def describe_cut(spec: BackboneSpec, size: int, text: Optional[str]) -> CutInfo:
    """Resolve ``top:N`` / a layer name on a weightless build of the backbone (names and shapes only)."""
    base = spec.builder((size, size, 3), None)
    cut = resolve_cut(spec, base, text)
    split_at(base, cut)  # a cut that is not clean fails here, before anything is extracted
    return CutInfo(cut, activation_shape(base, cut))


def lower_model(pooled_backbone, cut: Cut):
    """The part of a ``create_backbone`` model below ``cut``: preprocessed images in, activation map out."""
    base = pooled_backbone.layers[1]
    lower, _ = split_at(base, cut)
    return lower


def require_disk(cache_dir: Path, needed: dict[str, int], log: Callable[[str], None]) -> None:
    """Say how much disk the files still to write take, and refuse before starting when it is not there.

    During assembly a file's chunks and the file itself coexist, so the peak is
    every file plus the largest one's chunks.
    """
    if not needed:
        return
    total = sum(needed.values()) + max(needed.values())
    free = fsio.free_bytes(cache_dir)
    shown = f"; {fsio.human_bytes(free)} free" if free is not None else ""
    log(f"activation cache: {len(needed)} file(s), {fsio.human_bytes(sum(needed.values()))} on disk "
        f"(up to {fsio.human_bytes(total)} while a file is assembled{shown})")
    fsio.require_space(cache_dir, total, "the activation cache",
                       "Free space, choose a higher cut (top:1 is the smallest), or point --cache-dir elsewhere.")


def cut_attrs(info: CutInfo) -> dict:
    """What an activation cache records beyond its key."""
    return {"activation_shape": json.dumps(list(info.shape))}


def activation_shape_of(attrs: dict) -> tuple[int, int, int]:
    """The (height, width, channels) an activation cache file records."""
    shape = json.loads(attrs.get("activation_shape", "null") or "null")
    if not isinstance(shape, list) or len(shape) != 3:
        from .errors import FeatcacheError

        raise FeatcacheError(f"{attrs.get('path', 'The cache file')} is not an activation cache "
                             "(no activation_shape attribute).")
    return tuple(int(d) for d in shape)
