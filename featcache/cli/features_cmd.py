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
    cut: Annotated[Optional[str], typer.Option("--cut", help="Cache the activation map at a cut instead of pooled "
                                               "features: 'top:N' (the input of the last N stages) or a layer name; "
                                               "see `featcache backbones --cuts NAME`.")] = None,
) -> None:
    """Run the frozen backbone once over the dataset and cache pooled features (or activations at a cut) in HDF5."""
    from ..extraction import ExtractOptions, extract

    settings = feature_settings(backbone, weights, data, size, pooling, dtype, cache_dir, views, skip_corrupt,
                                precision)
    options = ExtractOptions(splits=tuple(s.strip() for s in split.split(",") if s.strip()), batch_size=batch_size,
                             engine=engine, chunk_rows=chunk_rows, mixed_precision=mixed_precision,
                             progress=progress, strategy=strategy, cut=cut)
    for path in extract(settings, options, log=typer.echo):
        typer.echo(str(path))


@app.command()
def backbones(
    cuts: Annotated[Optional[str], typer.Option("--cuts", help="List where NAME can be cut for a cached fine-tune: "
                                                "each cut's activation shape at SIZE and its cache size.")] = None,
    size: Size = None,
) -> None:
    """List the registered backbones with their sizes, widths and weight sources."""
    from ..backbones import get_spec, list_backbones

    if cuts is not None:
        _list_cuts(get_spec(cuts), size)
        return
    header = f"{'name':<20} {'family':<18} {'default':>7} {'min':>4} {'width':>6}  {'preprocess':<24} imagenet weights"
    typer.echo(header)
    typer.echo("-" * len(header))
    for name in list_backbones():
        spec = get_spec(name)
        source = "pip (featcache[lite])" if spec.imagenet_weights is not None else spec.weights_source.split(" (")[0]
        typer.echo(f"{spec.name:<20} {spec.family:<18} {spec.default_size:>7} {spec.min_size:>4} {spec.width:>6}  "
                   f"{spec.preprocess_id:<24} {source}")


def _list_cuts(spec, size: Optional[int]) -> None:
    """Stage boundaries from the lowest; ``top:N`` trains the last N stages (and what follows them)."""
    from ..activations import CutInfo
    from ..backbones import resolve_size
    from ..backbones.cuts import activation_shape, stage_cuts
    from ..fsio import human_bytes

    size = resolve_size(spec, size)
    base = spec.builder((size, size, 3), None)
    found = stage_cuts(spec, base)
    if not found:
        typer.echo(f"{spec.name} records no stage boundaries; name a layer with --cut LAYER (see model.summary()).")
        return
    typer.echo(f"{spec.name} at {size}px (default cut {spec.default_cut}); cache size per 1,000 images and view, float16")
    header = f"{'cut':<8} {'layer':<28} {'activation':>14} {'per 1,000':>10}"
    typer.echo(header)
    typer.echo("-" * len(header))
    for cut in found:
        info = CutInfo(cut, activation_shape(base, cut))
        shape = "x".join(str(d) for d in info.shape)
        typer.echo(f"top:{cut.top:<4} {cut.name:<28} {shape:>14} {human_bytes(1000 * info.bytes_per_image('float16')):>10}")
