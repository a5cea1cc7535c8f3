"""``featcache features`` and ``featcache backbones``."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from .app import app
from .options import Backbone, CacheDir, Data, Dtype, Pooling, Precision, Size, SkipCorrupt, Views, Weights, feature_settings


@app.command()
def features(
    backbone: Backbone = "xception",
    weights: Weights = "imagenet",
    data: Data = "cifar10",
    size: Size = None,
    pooling: Pooling = "avg",
    dtype: Dtype = "float16",
    precision: Precision = "auto",
    cache_dir: CacheDir = "cache",
    views: Views = "orig",
    skip_corrupt: SkipCorrupt = False,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Images per batch (default 32 on CPU, 128 on GPU).")] = None,
    engine: Annotated[str, typer.Option(help="'auto' (fastest measured on this machine), 'keras', 'tflite' or 'openvino'.")] = "auto",
    split: Annotated[str, typer.Option(help="Comma-separated splits to extract.")] = "train,test",
    chunk_rows: Annotated[int, typer.Option(help="Rows per resumable chunk.")] = 1024,
    mixed_precision: Annotated[bool, typer.Option("--mixed-precision", help="float16 compute (GPU).")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    strategy: Annotated[str, typer.Option(help="'none', 'mirrored' (local GPUs/devices) or 'multiworker' "
                                               "(one process per worker, TF_CONFIG).")] = "none",
) -> None:
    """Run the frozen backbone once over the dataset and cache pooled features (HDF5)."""
    from ..extraction import ExtractOptions, extract

    settings = feature_settings(backbone, weights, data, size, pooling, dtype, cache_dir, views, skip_corrupt,
                                precision)
    options = ExtractOptions(splits=tuple(s.strip() for s in split.split(",") if s.strip()), batch_size=batch_size,
                             engine=engine, chunk_rows=chunk_rows, mixed_precision=mixed_precision,
                             progress=progress, strategy=strategy)
    for path in extract(settings, options, log=typer.echo):
        typer.echo(str(path))


@app.command()
def backbones() -> None:
    """List the registered backbones with their sizes, widths and weight sources."""
    from ..backbones import get_spec, list_backbones

    header = f"{'name':<20} {'family':<18} {'default':>7} {'min':>4} {'width':>6}  {'preprocess':<24} imagenet weights"
    typer.echo(header)
    typer.echo("-" * len(header))
    for name in list_backbones():
        spec = get_spec(name)
        source = "pip (featcache[lite])" if spec.imagenet_weights is not None else spec.weights_source.split(" (")[0]
        typer.echo(f"{spec.name:<20} {spec.family:<18} {spec.default_size:>7} {spec.min_size:>4} {spec.width:>6}  "
                   f"{spec.preprocess_id:<24} {source}")
