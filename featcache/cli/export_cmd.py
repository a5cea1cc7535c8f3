"""``featcache export`` and ``featcache predict``: ship a run, and use any form of it."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from .app import app
from .options import CacheDir, cache_folder

Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Also show TensorFlow's own start-up and "
                                       "conversion messages.")]


@app.command()
def export(
    run: Annotated[str, typer.Argument(help="Run id (or a unique part of one, see `featcache runs`) or run folder.")],
    format: Annotated[str, typer.Option("--format", "-f", help="'keras', 'savedmodel' or 'tflite'.")] = "tflite",
    quantize: Annotated[str, typer.Option("--quantize", "-q", help="TFLite only: 'none', 'float16' (weights) or "
                                          "'int8' (calibrated on training images).")] = "none",
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="Where to write it (default: the run "
                                               "folder's exports/); labels.txt goes beside it.")] = None,
    cache_dir: CacheDir = "cache",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing export; accept a quantised export "
                                        "that loses more than 2 points of validation accuracy.")] = False,
    calibration_images: Annotated[int, typer.Option("--calibration-images", help="Training images int8 "
                                                    "calibrates on.")] = 300,
    verbose: Verbose = False,
) -> None:
    """Export a run as one image model (raw RGB pixels of any size in, class probabilities out), self-checked."""
    from ..exporters import ExportOptions, export_run
    from ..fsio import human_bytes

    options = ExportOptions(format=format, quantize=quantize, out=out, force=force,
                            calibration_images=calibration_images)
    entry = export_run(run, cache_folder(cache_dir), options, log=typer.echo)
    typer.echo(f"wrote {entry['path']} ({human_bytes(entry['bytes'])}) and {entry['labels']}; validation accuracy "
               f"{entry['val_acc']:.4f} (run: {entry['recorded_val_acc']:.4f}) in {entry['seconds']:.0f}s")


@app.command()
def predict(
    model: Annotated[str, typer.Argument(help="A run id (or unique part), a run folder, a .keras image model, "
                                         "a .tflite export or a SavedModel export folder.")],
    images: Annotated[list[str], typer.Argument(help="Image files (any size; greyscale, RGBA, palette are fine).")],
    top_k: Annotated[int, typer.Option("--top-k", "-k", help="Classes to show per image.")] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON list of {path, classes, probabilities}.")] = False,
    cache_dir: CacheDir = "cache",
    verbose: Verbose = False,
) -> None:
    """Print the top-k classes with probabilities for each image."""
    from ..prediction import predict as run_predict

    results = run_predict(model, images, top_k=top_k, cache_dir=cache_folder(cache_dir))
    if as_json:
        typer.echo(json.dumps([r.as_dict() for r in results], indent=2))
        return
    for result in results:
        shown = "  ".join(f"{name} {p:.3f}" for name, p in zip(result.classes, result.probabilities))
        typer.echo(f"{result.path}: {shown}")
