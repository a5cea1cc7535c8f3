"""Options shared by the commands that name a feature cache, and their conversion to settings."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ..errors import InvalidArgument
from ..settings import FeatureSettings

Backbone = Annotated[str, typer.Option("--backbone", "-b", help="Backbone name (see `featcache backbones`); "
                                       "join several with '+' to concatenate features in a head.")]
Weights = Annotated[str, typer.Option("--weights", "-w", help="'imagenet', 'none' or a Keras weights file path.")]
Data = Annotated[str, typer.Option("--data", "-d", help="'cifar10', 'digits', an image folder, a .tar.gz of one, or an .npz.")]
Size = Annotated[Optional[int], typer.Option("--size", "-s", help="Backbone input size in pixels (default: the backbone's own).")]
Pooling = Annotated[str, typer.Option("--pooling", help="Global pooling: 'avg' or 'max'.")]
Dtype = Annotated[str, typer.Option("--dtype", help="Stored feature dtype: 'float16' or 'float32'.")]
Precision = Annotated[str, typer.Option("--precision", help="Engine arithmetic: 'auto' (what is already "
                                        "cached, else the fastest measured here: bf16 only on a CPU with AMX or "
                                        "AVX512-BF16), 'f32' or 'bf16'; bf16 is part of the cache key.")]
CacheDir = Annotated[str, typer.Option("--cache-dir", help="Folder holding cache files.")]
Views = Annotated[str, typer.Option("--views", help="Comma-separated views: 'orig', 'flip' (horizontal mirror).")]
SkipCorrupt = Annotated[bool, typer.Option("--skip-corrupt", help="Skip unreadable images (counted and recorded) "
                                           "instead of stopping.")]


def _given(value: str, option: str, variable: str) -> str:
    """An empty value is refused, never replaced by a default: ``make features CACHE_DIR=`` must not write to ./cache."""
    if not str(value).strip():
        raise InvalidArgument(f"{option} is empty (in make, {variable}= with no value); give one or leave it out "
                              "for the default.")
    return value


def feature_settings(backbone: str, weights: str, data: str, size: Optional[int], pooling: str, dtype: str,
                     cache_dir: str, views: str = "orig", skip_corrupt: bool = False,
                     precision: str = "auto") -> FeatureSettings:
    """Settings from CLI values; an empty value is an error naming the option and its Makefile variable."""
    view_list = tuple(v.strip() for v in _given(views, "--views", "VIEWS").split(",") if v.strip())
    if not view_list:
        raise InvalidArgument(f"--views names no view; received {views!r} (e.g. 'orig' or 'orig,flip').")
    return FeatureSettings(
        backbone=_given(backbone, "--backbone", "BACKBONE"),
        weights=_given(weights, "--weights", "WEIGHTS"),
        data=_given(data, "--data", "DATA"),
        size=size,
        pooling=_given(pooling, "--pooling", "POOLING"),
        dtype=_given(dtype, "--dtype", "DTYPE"),
        cache_dir=_given(cache_dir, "--cache-dir", "CACHE_DIR"),
        views=view_list,
        skip_corrupt=skip_corrupt,
        precision=_given(precision, "--precision", "PRECISION"),
    )


def cache_folder(cache_dir: str) -> str:
    """The --cache-dir of the commands that read a cache folder: not empty, and a folder if it exists."""
    from pathlib import Path

    _given(cache_dir, "--cache-dir", "CACHE_DIR")
    if Path(cache_dir).exists() and not Path(cache_dir).is_dir():
        raise InvalidArgument(f"--cache-dir {cache_dir} is a file, not a cache folder.")
    return cache_dir
