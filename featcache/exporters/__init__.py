"""Export any run as one image model people can ship; exporters are a table keyed by format.

    featcache.export_run("mlp-efficientnet_lite0", "cache", ExportOptions(format="tflite", quantize="int8"))

Every export, whatever the run kind (logreg, linear or mlp head, concatenated backbones,
several views, fine-tune) and format:

1. checks its arguments and destination before any model is built: a missing or
   read-only folder, an existing file without ``force``, int8 without enough training
   images to calibrate on are one-line errors;
2. builds the run's image model (``featcache.image_model``): raw RGB pixels of any size
   in, probabilities out, with the cache's exact preprocessing inside;
3. writes it under a hidden temporary name (``featcache.fsio``), ``labels.txt`` beside it;
4. runs the written file on the run's validation images, read from the dataset, and
   compares its accuracy with the run's recorded ``val_acc``: float exports must match
   within 0.5 points, quantised ones within 2 (``force`` accepts a larger drop, and says
   so). A failed check leaves nothing behind;
5. renames it into place and appends the result to the run's record (``exports``).
"""

from __future__ import annotations

import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

import numpy as np

from .. import fsio
from ..errors import FeatcacheError, InvalidArgument, choice_error
from ..runs import RECORD_FILE, Run, load_run
from . import formats

FLOAT_TOLERANCE = 0.005
QUANTIZED_TOLERANCE = 0.02
# int8 calibrates on this many training images by default, and refuses fewer than the minimum.
CALIBRATION_IMAGES = 300
MIN_CALIBRATION_IMAGES = 100
LABELS_FILE = "labels.txt"
# Written inside a SavedModel folder, so that --force replaces only a folder featcache exported.
MARKER_FILE = "featcache_export.txt"
PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class Exporter:
    """One format: its file ending ('' for a folder), the quantisations it offers, how to write and run it."""

    name: str
    suffix: str
    quantizations: tuple
    write: Callable  # (image model, temporary path, quantize, representative) -> None
    load: Callable  # (path) -> runner: float32 batch (n, h, w, 3) -> probabilities

    def default_name(self, quantize: str) -> str:
        stem = "saved_model" if not self.suffix else "model"
        return stem + ("" if quantize == "none" else f"-{quantize}") + self.suffix


EXPORTERS = {
    "keras": Exporter("keras", ".keras", ("none",), formats.write_keras, formats.load_keras),
    "savedmodel": Exporter("savedmodel", "", ("none",), formats.write_savedmodel, formats.load_savedmodel),
    "tflite": Exporter("tflite", ".tflite", ("none", "float16", "int8"), formats.write_tflite, formats.load_tflite),
}
FORMATS = tuple(EXPORTERS)
QUANTIZATIONS = ("none", "float16", "int8")


@dataclass(frozen=True)
class ExportOptions:
    """What to export and where; ``out`` defaults to ``<run folder>/exports/<model name>``."""

    format: str = "tflite"
    quantize: str = "none"
    out: Optional[str] = None
    force: bool = False
    calibration_images: int = CALIBRATION_IMAGES
    batch_size: int = 32
    seed: int = 0


def validate_options(options: ExportOptions) -> Exporter:
    """The exporter for ``options``; a bad combination fails before any run is read."""
    if options.format not in EXPORTERS:
        raise choice_error("export format", FORMATS, options.format)
    if options.quantize not in QUANTIZATIONS:
        raise choice_error("quantisation", QUANTIZATIONS, options.quantize)
    exporter = EXPORTERS[options.format]
    if options.quantize not in exporter.quantizations:
        raise InvalidArgument(f"--quantize {options.quantize} is for --format tflite; a {options.format} export "
                              "is float32 (use --quantize none).")
    if options.calibration_images < MIN_CALIBRATION_IMAGES:
        raise InvalidArgument(f"int8 calibration needs at least {MIN_CALIBRATION_IMAGES} images; "
                              f"received {options.calibration_images}.")
    if options.batch_size < 1:
        raise InvalidArgument(f"Batch size must be a positive integer; received {options.batch_size}.")
    if options.out is not None and not str(options.out).strip():
        raise InvalidArgument("--out is empty; give a path or leave it out for the run folder's exports/.")
    return exporter


def export_path(run: Run, options: ExportOptions) -> Path:
    exporter = EXPORTERS[options.format]
    if options.out:
        return Path(options.out).expanduser()
    return run.path / "exports" / exporter.default_name(options.quantize)


def _check_destination(out: Path, exporter: Exporter, names: list[str], force: bool, default: bool) -> None:
    """Refuse a destination that cannot or must not be written, before anything is built."""
    folder = out.parent
    if not default and not folder.is_dir():
        raise FeatcacheError(f"Cannot write the export {out}: the folder {folder} does not exist.")
    if folder.is_dir():
        try:
            fd, probe = tempfile.mkstemp(prefix=".featcache-probe-", dir=folder)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise fsio.disk_error(exc, out, "the export") from None
    if out.exists() or out.is_symlink():
        if not force:
            raise FeatcacheError(f"{out} already exists; pass --force to replace it, or choose another --out.")
        if out.is_dir() != (not exporter.suffix) or (out.is_dir() and not (out / MARKER_FILE).is_file()):
            raise FeatcacheError(f"{out} exists and is not a featcache {exporter.name} export; not replacing it.")
    labels = folder / LABELS_FILE
    if labels.is_file() and not force and labels.read_text(errors="replace") != formats.labels_text(names):
        raise FeatcacheError(f"{labels} lists other class names than this run's; choose another folder for "
                             "--out, or pass --force to replace it.")


def _representative(images, failures: list) -> Callable:
    """int8 calibration batches (one raw image each); a read error is kept to be raised after conversion."""
    def batches() -> Iterator[list]:
        try:
            for position in range(len(images)):
                yield [images.image(position)[None].astype(np.float32)]
        except FeatcacheError as exc:
            failures.append(exc)
            raise
    return batches


def evaluate(runner: Callable, images, labels: np.ndarray, batch_size: int) -> float:
    """Accuracy of a runner on images (``run_images.ImageRows``) against their labels."""
    predicted = np.full(len(images), -1, dtype=np.int64)
    for positions, batch in images.batches(batch_size):
        predicted[positions] = np.asarray(runner(batch)).argmax(axis=1)
    return float(np.mean(predicted == labels)) if len(labels) else float("nan")


def self_check(accuracy: float, recorded: float, n: int, quantized: bool, force: bool,
               log: Callable[[str], None]) -> dict:
    """Compare the export's validation accuracy with the run's; raise when it does not hold."""
    tolerance = QUANTIZED_TOLERANCE if quantized else FLOAT_TOLERANCE
    difference = accuracy - recorded
    passed = abs(difference) <= tolerance + 1e-9
    text = (f"self-check: validation accuracy {accuracy:.4f} on {n} images against the run's {recorded:.4f} "
            f"({100 * difference:+.2f} points; tolerance {100 * tolerance:g})")
    if not passed and not (quantized and force):
        hint = "; --force accepts it" if quantized else ""
        raise FeatcacheError(f"Export refused, nothing written: {text}{hint}.")
    log(text + ("" if passed else ": accepted with --force"))
    return {"val_acc": accuracy, "recorded_val_acc": recorded, "difference": difference, "tolerance": tolerance,
            "n_val": n, "passed": passed, "forced": not passed}


@contextmanager
def _replacing(out: Path, is_folder: bool, force: bool) -> Iterator[None]:
    """Move an existing folder export aside while the new one is made; restore it on failure."""
    if not (is_folder and force and out.is_dir()):
        yield
        return
    aside = fsio.temporary_name(out, ".replaced")
    os.replace(out, aside)
    try:
        yield
    except BaseException:
        if not out.exists():
            os.replace(aside, out)
        raise
    fsio.remove_owned(aside, out.parent, "replaced export")


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def export_run(run: Union[str, Run], cache_dir: PathLike = "cache", options: ExportOptions = ExportOptions(),
               log: Callable[[str], None] = print) -> dict:
    """Export a run (id, unique part of one, folder, or ``Run``) and check the file; returns what the record keeps."""
    from ..image_model import build_image_model
    from ..run_images import training_images, validation_images

    exporter = validate_options(options)
    start = time.perf_counter()
    run = run if isinstance(run, Run) else load_run(cache_dir, str(run))
    names = [str(n) for n in run.record.get("class_names") or []]
    recorded = run.val_acc
    if recorded is None or not names:
        raise FeatcacheError(f"Run {run.run_id} records no validation accuracy or class names; nothing to check "
                             "an export against.")
    out = export_path(run, options)
    _check_destination(out, exporter, names, options.force, default=options.out is None)
    val_images, labels = validation_images(run, str(cache_dir))
    val_images.source.get()  # a moved or changed dataset fails here, before a model is built
    representative, failures = None, []
    if options.quantize == "int8":
        calibration = training_images(val_images, options.calibration_images, options.seed)
        if len(calibration) < MIN_CALIBRATION_IMAGES:
            raise FeatcacheError(f"int8 needs at least {MIN_CALIBRATION_IMAGES} training images to calibrate on; "
                                 f"run {run.run_id}'s dataset has {len(calibration)} besides its validation images. "
                                 "Use --quantize float16 or none.")
        representative = _representative(calibration, failures)
        log(f"int8: calibrating on {len(calibration)} training images")
    model = build_image_model(run, cache_dir)
    log(f"exporting run {run.run_id} as {exporter.name}" + ("" if options.quantize == "none" else
                                                             f" ({options.quantize})") + f" to {out}")
    if options.out is None:
        fsio.make_dirs(out.parent, "exports folder")
    with _replacing(out, not exporter.suffix, options.force):
        with fsio.atomic_path(out, "the export", suffix=exporter.suffix) as tmp:
            try:
                exporter.write(model, tmp, options.quantize, representative)
            except FeatcacheError:
                if failures:
                    raise failures[0] from None
                raise
            if not exporter.suffix:
                fsio.write_text(tmp / MARKER_FILE, f"featcache {exporter.name} export of run {run.run_id}\n",
                                "export marker")
            log(f"written ({fsio.human_bytes(_size(tmp))}); checking it on the run's {len(labels)} validation images")
            runner = exporter.load(tmp)
            accuracy = evaluate(runner, val_images, labels, options.batch_size)
            check = self_check(accuracy, recorded, len(labels), options.quantize != "none", options.force, log)
            fsio.write_text(out.parent / LABELS_FILE, formats.labels_text(names), "class names")
    entry = {"format": exporter.name, "quantize": options.quantize, "path": str(out),
             "labels": str(out.parent / LABELS_FILE), "bytes": _size(out), **check,
             "seconds": round(time.perf_counter() - start, 2), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    _record_export(run, entry)
    return entry


def _record_export(run: Run, entry: dict) -> None:
    """Append the export to the run's record (read fresh, written whole)."""
    import json

    path = run.path / RECORD_FILE
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FeatcacheError(f"The export is written, but {path} could not be read to note it ({exc}).") from None
    record["exports"] = [e for e in record.get("exports") or [] if e.get("path") != entry["path"]] + [entry]
    fsio.write_json(path, record, "run record")
    run.record = record
