"""Settings records shared by the library, the CLI and the Makefile.

``FeatureSettings`` names one feature cache the way a user does (backbone,
weights, data, size, ...); ``featcache.cache`` turns it into exact keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

VIEWS = ("orig", "flip")
DTYPES = ("float16", "float32")


@dataclass(frozen=True)
class FeatureSettings:
    """Everything a user chooses that changes cached features, plus where they live.

    ``backbone`` may join several names with '+' (``efficientnet_lite0+efficientnet_lite2``)
    when a head reads concatenated features; extraction takes one at a time.
    """

    backbone: str = "xception"
    weights: str = "imagenet"
    data: str = "cifar10"
    size: Optional[int] = None
    pooling: str = "avg"
    dtype: str = "float16"
    cache_dir: str = "cache"
    views: tuple[str, ...] = ("orig",)
    skip_corrupt: bool = False
    # 'auto' (what is cached already, else the fastest engine measured here), 'f32' or 'bf16'; see
    # featcache.engines and extraction._Runner.resolve_precision.
    precision: str = "auto"

    def backbones(self) -> list[str]:
        return [b.strip() for b in self.backbone.split("+") if b.strip()]

    def make_command(self) -> str:
        """The ``make features`` call that creates this cache, for error messages."""
        parts = [f"make features BACKBONE={self.backbone}"]
        if self.weights != "imagenet":
            parts.append(f"WEIGHTS={self.weights}")
        if self.data != "cifar10":
            parts.append(f"DATA={self.data}")
        if self.size is not None:
            parts.append(f"SIZE={self.size}")
        if self.cache_dir != "cache":
            parts.append(f"CACHE_DIR={self.cache_dir}")
        if tuple(self.views) != ("orig",):
            parts.append(f"VIEWS={','.join(self.views)}")
        if self.pooling != "avg":
            parts.append(f"POOLING={self.pooling}")
        if self.dtype != "float16":
            parts.append(f"DTYPE={self.dtype}")
        if self.precision != "auto":
            parts.append(f"PRECISION={self.precision}")
        return " ".join(parts)
