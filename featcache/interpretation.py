"""What a run got wrong: per-image validation losses, the top-loss picture, the most confused pairs.

In the spirit of fastai's ``ClassificationInterpretation``: every run folder gets

    validation.csv    one row per validation image: its row in the dataset, true and predicted
                      class, the probability of each and the loss (cross-entropy of the true class)
    top_losses.png    the validation images with the highest loss, each titled
                      predicted / true / probability of the prediction

and its record lists the most confused (true, predicted) class pairs. Images come from
the dataset (``featcache.run_images``), never from the cache, which holds only features.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from . import fsio
from .errors import FeatcacheError

VALIDATION_FILE = "validation.csv"
TOP_LOSSES_FILE = "top_losses.png"
TOP_LOSSES = 16
MOST_CONFUSED = 10
# Images larger than this (pixels per side) are shrunk for the picture only.
THUMBNAIL = 192
_MIN_PROBABILITY = 1e-7


def per_image_losses(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Cross-entropy of the true class for each image (probabilities clipped at 1e-7)."""
    labels = np.asarray(labels, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)[np.arange(labels.size), labels]
    return -np.log(np.clip(p, _MIN_PROBABILITY, 1.0))


def top_loss_positions(losses: np.ndarray, n: int = TOP_LOSSES) -> np.ndarray:
    """Positions of the ``n`` highest losses, highest first (ties: the earlier image first)."""
    order = np.argsort(-np.asarray(losses), kind="stable")
    return order[:max(0, int(n))]


def most_confused(matrix: np.ndarray, names: Sequence[str], n: int = MOST_CONFUSED) -> list[dict]:
    """Off-diagonal cells of a confusion matrix (rows: true), largest first; ties in class order."""
    matrix = np.asarray(matrix)
    pairs = [(int(matrix[t, p]), t, p) for t in range(matrix.shape[0]) for p in range(matrix.shape[1])
             if t != p and matrix[t, p] > 0]
    pairs.sort(key=lambda c: (-c[0], c[1], c[2]))
    return [{"true": str(names[t]), "predicted": str(names[p]), "count": count} for count, t, p in pairs[:n]]


def confused_text(pairs: Sequence[dict]) -> str:
    """The pairs as report lines."""
    if not pairs:
        return "most confused (validation): none, every validation image is right\n"
    width = max(len(p["true"]) for p in pairs)
    lines = ["most confused (validation; true -> predicted: images)"]
    lines += [f"  {p['true']:>{width}} -> {p['predicted']}: {p['count']}" for p in pairs]
    return "\n".join(lines) + "\n"


def write_validation_table(path: Path, labels: np.ndarray, probs: np.ndarray, names: Sequence[str],
                           rows: Optional[np.ndarray] = None) -> np.ndarray:
    """``validation.csv`` (position, dataset row, classes, probabilities, loss); returns the losses."""
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs)
    predicted = probs.argmax(axis=1)
    losses = per_image_losses(labels, probs)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["position", "row", "true", "predicted", "p_true", "p_predicted", "loss"])
    for i in range(labels.size):
        writer.writerow([i, "" if rows is None else int(rows[i]), names[labels[i]], names[predicted[i]],
                         f"{probs[i, labels[i]]:.6g}", f"{probs[i, predicted[i]]:.6g}", f"{losses[i]:.6g}"])
    fsio.write_text(path, buffer.getvalue(), "run file")
    return losses


def read_validation_table(path: Path) -> list[dict]:
    """The rows of a ``validation.csv``; an error naming the file when it cannot be read."""
    try:
        with open(path, newline="") as fh:
            return list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise FeatcacheError(f"Cannot read {path}: {exc}.") from None


def _thumbnail(image: np.ndarray) -> np.ndarray:
    if max(image.shape[:2]) <= THUMBNAIL:
        return image
    from PIL import Image

    picture = Image.fromarray(image)
    picture.thumbnail((THUMBNAIL, THUMBNAIL))
    return np.asarray(picture)


def plot_top_losses(path: Path, images: Sequence[np.ndarray], titles: Sequence[str], title: str = "",
                    wrong: Optional[Sequence[bool]] = None) -> None:
    """A grid of images, one title each (read left to right, top to bottom); wrong predictions titled in red."""
    from .report import _figure

    n = len(images)
    if n == 0:
        raise FeatcacheError("No validation image to draw.")
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    figure = _figure(2.2 * cols, 2.4 * rows + 0.4)
    axes = np.atleast_1d(figure.subplots(rows, cols)).reshape(-1)
    for ax in axes:
        ax.axis("off")
    wrong = list(wrong) if wrong is not None else [False] * n
    for ax, image, text, bad in zip(axes, images, titles, wrong):
        ax.imshow(_thumbnail(image), interpolation="nearest")
        ax.set_title(text, fontsize=8, color="tab:red" if bad else "black")
    if title:
        figure.suptitle(title, fontsize=9)
    figure.savefig(path, dpi=80)


def write_top_losses(run_dir: Path, images, labels: np.ndarray, probs: np.ndarray, losses: np.ndarray,
                     names: Sequence[str], n: int = TOP_LOSSES) -> list[dict]:
    """``top_losses.png`` from the run's validation images (``run_images.ImageRows``); returns what it shows."""
    positions = top_loss_positions(losses, n)
    predicted = np.asarray(probs).argmax(axis=1)
    shown, pictures, titles = [], [], []
    for position in positions:
        position = int(position)
        true, guess = int(labels[position]), int(predicted[position])
        probability = float(probs[position, guess])
        pictures.append(images.image(position))
        titles.append(f"{names[guess]} / {names[true]}\n{probability:.2f}")
        shown.append({"position": position, "row": int(images.rows[position]), "true": names[true],
                      "predicted": names[guess], "probability": round(probability, 6),
                      "loss": round(float(losses[position]), 6)})
    target = run_dir / TOP_LOSSES_FILE
    with fsio.atomic_path(target, "run file", suffix=".png") as tmp:
        plot_top_losses(tmp, pictures, titles, title="validation images with the highest loss: "
                                                      "predicted / true / probability of the prediction",
                        wrong=[s["true"] != s["predicted"] for s in shown])
    return shown
