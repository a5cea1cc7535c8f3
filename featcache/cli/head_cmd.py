"""``featcache head`` and ``featcache runs``."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from .app import app
from .options import (Backbone, CacheDir, Data, Dtype, Pooling, Precision, Size, SkipCorrupt, Views, Weights, cache_folder,
                      feature_settings)


@app.command()
def head(
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
    kind: Annotated[Optional[str], typer.Option("--head", "-H", help="'logreg', 'linear' or 'mlp' (default mlp; "
                                                "with --sweep all three).")] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", help="Maximum epochs; early stopping on "
                                                  "validation loss (default 30).")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Rows per step (default 1024).")] = None,
    learning_rate: Annotated[Optional[float], typer.Option("--lr", "--learning-rate", help="Learning rate "
                                                           "(default 0.002; with --sweep 0.001 and 0.003).")] = None,
    optimizer: Annotated[str, typer.Option(help="'adam', 'rmsprop' or 'sgd' (momentum 0.9).")] = "adam",
    dropout: Annotated[Optional[float], typer.Option(help="Dropout after each MLP layer (default 0.5; "
                                                     "with --sweep 0.3 and 0.5).")] = None,
    units: Annotated[Optional[str], typer.Option(help="MLP layer widths, e.g. '256,128,64'.")] = None,
    val_fraction: Annotated[float, typer.Option("--val-fraction", help="Share of train images held out for "
                                                "validation (stratified, by image).")] = 0.1,
    seed: Annotated[int, typer.Option(help="Seed of the validation split, initialisation and shuffling.")] = 0,
    patience: Annotated[Optional[int], typer.Option(help="Early-stopping patience in epochs (default 5).")] = None,
    init: Annotated[Optional[str], typer.Option("--init", help="Continue training a saved head: a run id, "
                                                "a run folder or a head.keras path.")] = None,
    sweep: Annotated[bool, typer.Option("--sweep", help="Train a small grid over head kind, learning rate and "
                                        "dropout on features loaded once; options given fix their axis.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Print every epoch.")] = False,
) -> None:
    """Train a classifier head from cached features (no backbone is built) and record the run."""
    from .. import heads
    from ..errors import InvalidArgument
    from ..report import errors_line, runs_table

    if init and kind:
        raise InvalidArgument(f"--head {kind} cannot be combined with --init: a continued head keeps the kind "
                              "it was saved with.")
    settings = feature_settings(backbone, weights, data, size, pooling, dtype, cache_dir, views, skip_corrupt,
                                precision)
    given = {"kind": kind, "epochs": epochs, "batch_size": batch_size, "learning_rate": learning_rate,
             "dropout": dropout, "patience": patience,
             "units": heads.parse_units(units) if units is not None else None}
    given = {k: v for k, v in given.items() if v is not None}
    config = heads.HeadConfig(**given, optimizer=optimizer, val_fraction=val_fraction, seed=seed, init=init)
    if sweep:
        grid = {k: v for k, v in heads.DEFAULT_GRID.items() if k not in given}
        runs = heads.sweep(settings, grid, base=config, log=typer.echo)
        typer.echo(runs_table(runs))
        best = runs[0]
        typer.echo(f"best {best.run_id}: val {best.val_acc:.4f}  test {best.test_acc:.4f}  ({len(runs)} runs in "
                   f"{best.path.parent})")
        return
    run = heads.train_head(settings, config, log=typer.echo if verbose else None)
    record = run.record
    typer.echo(errors_line(record, run.path))  # before the result line, which stays last
    typer.echo(f"{record['head']} on {record['backbone']}: val {run.val_acc:.4f}  test {run.test_acc:.4f}  "
               f"{record['seconds']:.1f}s (+{record['load_seconds']:.1f}s loading)  {run.path}")


@app.command()
def runs(
    cache_dir: CacheDir = "cache",
    kind: Annotated[Optional[str], typer.Option("--kind", help="Only 'head' or 'finetune' runs.")] = None,
) -> None:
    """All head and fine-tune runs, best validation accuracy first."""
    from ..report import runs_table
    from ..runs import list_runs, unreadable_runs

    typer.echo(runs_table(list_runs(cache_folder(cache_dir), kind=kind)))
    for path, problem in unreadable_runs(cache_dir):
        typer.echo(f"featcache: not listed: run folder {path}: its {problem}.", err=True)
