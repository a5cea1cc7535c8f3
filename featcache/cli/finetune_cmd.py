"""``featcache finetune``."""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from .app import app
from .options import Backbone, CacheDir, Data, Dtype, Pooling, Precision, Size, SkipCorrupt, Views, Weights, feature_settings


@app.command()
def finetune(
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
    run: Annotated[Optional[str], typer.Option("--run", help="Head run id (or a unique part) to start "
                                                "from; default: the best head on validation for this cache.")] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", help="Epochs (default 5).")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Images per batch (default 32).")] = None,
    mode: Annotated[str, typer.Option(help="'auto' (full with a GPU, else cached), 'cached' (train the top stages "
                                      "from cached activations at --cut) or 'full' (end to end).")] = "auto",
    cut: Annotated[Optional[str], typer.Option("--cut", help="Cached mode: 'top:N' or a layer name (default: the "
                                               "backbone's; see `featcache backbones --cuts NAME`).")] = None,
    learning_rate: Annotated[Optional[float], typer.Option("--lr", "--learning-rate", help="Learning rate (default "
                                                           "3e-4 cached, 1e-5 full).")] = None,
    schedule: Annotated[Optional[str], typer.Option(help="'cosine' (default cached) or 'plateau' (halve on a "
                                                    "validation plateau; default full).")] = None,
    optimizer: Annotated[str, typer.Option(help="'adam', 'rmsprop' or 'sgd' (momentum 0.9).")] = "adam",
    unfreeze: Annotated[str, typer.Option(help="Full mode: 'all', 'top:N' (the last N backbone layers with weights) or "
                                          "'from:LAYER'; BatchNormalization layers always stay frozen.")] = "all",
    flip: Annotated[bool, typer.Option(help="Full mode: random horizontal flips while training (cached mode draws "
                                       "one of the cached --views per image).")] = True,
    translate: Annotated[float, typer.Option(help="Full mode: random translation while training, as a fraction of "
                                             "the image (0 turns it off).")] = 0.1,
    tta: Annotated[bool, typer.Option("--tta", help="Cached mode: also cache the other --views of test and report "
                                      "the accuracy averaged over them.")] = False,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", help="Cap on steps per epoch.")] = None,
    subset: Annotated[Optional[int], typer.Option("--subset", help="Use at most N images (stratified) of "
                                                  "each of train, validation and test.")] = None,
    export: Annotated[bool, typer.Option(help="Also export a TensorFlow SavedModel for serving.")] = True,
    patience: Annotated[int, typer.Option(help="Early-stopping patience in epochs.")] = 3,
    mixed_precision: Annotated[bool, typer.Option("--mixed-precision", help="float16 compute (GPU).")] = False,
    strategy: Annotated[str, typer.Option(help="'none', 'mirrored' (all local GPUs) or 'multiworker' "
                                          "(TF_CONFIG).")] = "none",
    seed: Annotated[int, typer.Option(help="Seed for shuffling and augmentation.")] = 0,
) -> None:
    """Fine-tune the backbone's top with the head, starting from a head trained on the cache."""
    from ..finetuning import FinetuneConfig, finetune as run_finetune

    settings = feature_settings(backbone, weights, data, size, pooling, dtype, cache_dir, views, skip_corrupt,
                                precision)
    defaults = FinetuneConfig()
    config = FinetuneConfig(
        run=run, epochs=defaults.epochs if epochs is None else epochs,
        batch_size=defaults.batch_size if batch_size is None else batch_size,
        mode=mode, cut=cut, learning_rate=learning_rate, schedule=schedule, optimizer=optimizer, unfreeze=unfreeze,
        flip=flip, translate=translate, tta=tta,
        max_steps=max_steps, subset=subset, export=export, patience=patience, mixed_precision=mixed_precision,
        strategy=strategy, seed=seed,
        verbose=1 if sys.stdout.isatty() else 2)  # a live bar with steps/s and ETA on a terminal; a line per epoch in logs
    try:
        record = run_finetune(settings, config, log=typer.echo)
    except KeyboardInterrupt:
        print("featcache: interrupted; rerun the same command to resume from the last finished epoch.",
              file=sys.stderr)
        raise typer.Exit(130)
    if record.get("run_id") is None:  # a non-chief worker of --strategy multiworker: the chief writes the run
        typer.echo("worker done; the chief writes the run")
        return
    from ..report import errors_line
    from ..runs import runs_root

    typer.echo(errors_line(record, runs_root(settings.cache_dir) / record["run_id"]))  # the result line stays last
    typer.echo(f"run {record['run_id']}: val_acc {record['val_acc']:.4f}  test_acc {record['test_acc']:.4f}  "
               f"({record['seconds']:.0f}s; see `featcache runs`)")

