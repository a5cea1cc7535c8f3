"""Options shared by the commands that name a feature cache, and their conversion to settings."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ..settings import FeatureSettings

Backbone = Annotated[str, typer.Option("--backbone", "-b", help="Backbone name (see `featcache backbones`); "
                                       "join several with '+' to concatenate features in a head.")]
Weights = Annotated[str, typer.Option("--weights", "-w", help="'imagenet', 'none' or a Keras weights file path.")]
Data = Annotated[str, typer.Option("--data", "-d", help="'cifar10', 'digits', an image folder, a .tar.gz of one, or an .npz.")]
Size = Annotated[Optional[int], typer.Option("--size", "-s", help="Backbone input size in pixels (default: the backbone's own).")]
Pooling = Annotated[str, typer.Option("--pooling", help="Global pooling: 'avg' or 'max'.")]
Dtype = Annotated[str, typer.Option("--dtype", help="Stored feature dtype: 'float16' or 'float32'.")]
CacheDir = Annotated[str, typer.Option("--cache-dir", help="Folder holding cache files.")]
Views = Annotated[str, typer.Option("--views", help="Comma-separated views: 'orig', 'flip' (horizontal mirror).")]
SkipCorrupt = Annotated[bool, typer.Option("--skip-corrupt", help="Skip unreadable images (counted and recorded) "
                                           "instead of stopping.")]


def feature_settings(backbone: str, weights: str, data: str, size: Optional[int], pooling: str, dtype: str,
                     cache_dir: str, views: str = "orig", skip_corrupt: bool = False) -> FeatureSettings:
    """Settings from CLI values; empty strings (unset Makefile variables) mean the default."""
    defaults = FeatureSettings()
    view_list = tuple(v.strip() for v in (views or "orig").split(",") if v.strip())
    return FeatureSettings(
        backbone=backbone or defaults.backbone,
        weights=weights or defaults.weights,
        data=data or defaults.data,
        size=size,
        pooling=pooling or defaults.pooling,
        dtype=dtype or defaults.dtype,
        cache_dir=cache_dir or defaults.cache_dir,
        views=view_list,
        skip_corrupt=skip_corrupt,
    )
