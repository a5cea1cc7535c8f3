"""Metrics, plots and the runs table of head and fine-tune runs.

``write_run`` fills a run folder (see ``featcache.runs`` for the store)::

    head.keras | model.keras      the trained model (written by the stage)
    settings.json                 how to redo the run
    record.json                   what came out of it (written last)
    confusion.txt, confusion.png  validation and test confusion matrices
    curves.png                    loss and accuracy per epoch (runs trained by epochs)
    classification_report.txt     scikit-learn's per-class precision/recall/F1, most confused pairs
    validation.csv, top_losses.png  per-image validation losses and the worst images (``interpretation``)

Head and fine-tune runs share the record format (``kind`` tells them apart), so
``featcache runs`` ranks both together by validation accuracy. Test accuracy is
reported, never used to choose.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import numpy as np

from . import fsio, interpretation
from .errors import FeatcacheError
from .runs import RECORD_FILE, RECORD_FORMAT, SETTINGS_FILE, Run, _float_or_none, _sort_key

# Above this many classes the confusion plot drops the per-cell numbers (unreadable otherwise).
_MAX_ANNOTATED_CLASSES = 20

PathLike = Union[str, os.PathLike]


def _write_json(path: Path, data: Any) -> None:
    """Whole or absent, with fsio's one-line error on a full disk or a read-only folder."""
    fsio.write_json(path, _plain(data), "run file")


def _plain(value: Any) -> Any:
    """JSON-ready copies of dataclasses, tuples, paths and numpy values."""
    if is_dataclass(value) and not isinstance(value, type):
        return _plain(asdict(value))
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


# --- metrics --------------------------------------------------------------------------


def evaluate(labels: np.ndarray, probs: np.ndarray, class_names: Sequence[str]) -> dict:
    """Accuracy, per-class accuracy (recall) and the confusion matrix of one split."""
    from sklearn.metrics import confusion_matrix

    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs)
    if probs.ndim != 2 or probs.shape != (labels.shape[0], len(class_names)):
        raise ValueError(f"Expected probabilities of shape ({labels.shape[0]}, {len(class_names)}); "
                         f"received {probs.shape}.")
    predicted = probs.argmax(axis=1)
    matrix = confusion_matrix(labels, predicted, labels=np.arange(len(class_names)))
    support = matrix.sum(axis=1)
    per_class = {str(name): (float(matrix[i, i] / support[i]) if support[i] else None)
                 for i, name in enumerate(class_names)}
    accuracy = float(np.mean(predicted == labels)) if labels.size else None
    return {"acc": accuracy, "per_class": per_class, "confusion": matrix, "predicted": predicted}


def _history_columns(history: Any) -> dict[str, list[float]]:
    """Keras ``History.history`` (dict of lists) or CSV-logger rows (list of dicts) as columns."""
    if history is None:
        return {}
    if hasattr(history, "history"):
        history = history.history
    if isinstance(history, Mapping):
        return {str(k): [float(v) for v in values] for k, values in history.items()}
    columns: dict[str, list[float]] = {}
    for row in history:
        for k, v in row.items():
            if k != "epoch":
                columns.setdefault(str(k), []).append(float(v))
    return columns


# --- writing a run ------------------------------------------------------------------


def write_run(run_dir: PathLike, settings: Any, record: dict, class_names: Sequence[str],
              val_labels: np.ndarray, val_probs: np.ndarray, test_labels: np.ndarray, test_probs: np.ndarray,
              history: Any = None, val_images: Any = None) -> dict:
    """Write settings, metrics, plots and (last) ``record.json`` into ``run_dir``; return the full record.

    ``record`` holds what the stage knows (``kind``, ``run_id``, ``backbone``, ``seconds``,
    ...); this adds ``val_acc``, ``test_acc``, per-class accuracy and ``created``.
    ``history`` is Keras' ``History.history`` or a list of per-epoch rows. ``val_images``
    (``run_images.ImageRows``, the validation rows in order) lets the run draw ``top_losses.png``;
    without it, or when the dataset cannot be read, the record says why there is no picture.
    """
    run_dir = Path(run_dir)
    names = [str(c) for c in class_names]
    val = evaluate(val_labels, val_probs, names)
    test = evaluate(test_labels, test_probs, names)
    columns = _history_columns(history)
    full = {"format": RECORD_FORMAT, "kind": "head", "run_id": run_dir.name,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    full.update(record)
    full.update({
        "val_acc": val["acc"], "test_acc": test["acc"],
        "n_val": int(len(val_labels)), "n_test": int(len(test_labels)),
        "class_names": names,
        "val_per_class": val["per_class"], "test_per_class": test["per_class"],
    })
    if columns:
        full.setdefault("epochs_run", len(next(iter(columns.values()))))
        full["history"] = columns
    full["most_confused"] = interpretation.most_confused(val["confusion"], names)
    if val_images is not None and len(val_images) != len(val_labels):
        raise ValueError(f"{len(val_images)} validation image rows for {len(val_labels)} validation labels.")
    try:
        _write_json(run_dir / SETTINGS_FILE, settings)
        fsio.write_text(run_dir / "confusion.txt",
            _confusion_text("validation", val["confusion"], names) + "\n" + _confusion_text("test", test["confusion"], names))
        fsio.write_text(run_dir / "classification_report.txt",
            _classification_report("validation", val_labels, val["predicted"], names) + "\n"
            + _classification_report("test", test_labels, test["predicted"], names) + "\n"
            + interpretation.confused_text(full["most_confused"]))
        losses = interpretation.write_validation_table(run_dir / interpretation.VALIDATION_FILE, val_labels,
                                                        val_probs, names, None if val_images is None else val_images.rows)
        full.update(_top_losses(run_dir, val_images, val_labels, val_probs, losses, names))
        plot_confusion(run_dir / "confusion.png", val["confusion"], test["confusion"], names,
                       title=f"{full.get('backbone', '')} {full.get('head', full['kind'])}".strip())
        if columns:
            plot_curves(run_dir / "curves.png", columns, title=str(full.get("run_id", "")))
        _write_json(run_dir / RECORD_FILE, full)
    except OSError as exc:  # matplotlib writing a PNG
        raise fsio.disk_error(exc, run_dir, "run folder") from None
    return _plain(full)


def _top_losses(run_dir: Path, val_images: Any, labels: np.ndarray, probs: np.ndarray, losses: np.ndarray,
                names: Sequence[str]) -> dict:
    """Record fields of the top-loss picture: what it shows, or why it could not be drawn."""
    if val_images is None:
        return {"top_losses_note": "top_losses.png not drawn: the run does not say which dataset images it "
                                   "validated on"}
    fields: dict = {"val_images": {**val_images.source.describe(), "file": interpretation.VALIDATION_FILE}}
    try:
        fields["top_losses"] = interpretation.write_top_losses(run_dir, val_images, labels, np.asarray(probs),
                                                               losses, names)
    except fsio.DiskError:
        raise
    except FeatcacheError as exc:  # the dataset moved, changed or cannot be read: the run itself stands
        fields["top_losses_note"] = f"top_losses.png not drawn: {exc}"
    return fields


def _confusion_text(split: str, matrix: np.ndarray, names: Sequence[str]) -> str:
    width = max([len(n) for n in names] + [len(str(int(matrix.max()))) if matrix.size else 1, 5])
    lines = [f"{split} confusion matrix (rows: true class, columns: predicted class)",
             " " * width + " " + " ".join(f"{n:>{width}}" for n in names)]
    for name, row in zip(names, matrix):
        lines.append(f"{name:>{width}} " + " ".join(f"{int(v):>{width}}" for v in row))
    return "\n".join(lines) + "\n"


def _classification_report(split: str, labels: np.ndarray, predicted: np.ndarray, names: Sequence[str]) -> str:
    from sklearn.metrics import classification_report

    text = classification_report(labels, predicted, labels=np.arange(len(names)), target_names=list(names),
                                 digits=4, zero_division=0)
    return f"{split}\n{text}"


def _figure(width: float, height: float):
    """A matplotlib Figure drawn by the Agg canvas, without pyplot or any global backend switch."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def plot_confusion(path: PathLike, val_matrix: np.ndarray, test_matrix: np.ndarray, names: Sequence[str],
                   title: str = "") -> None:
    """Validation and test confusion matrices side by side (sklearn's display on an Agg figure)."""
    from sklearn.metrics import ConfusionMatrixDisplay

    n = len(names)
    side = min(24.0, max(4.0, 0.45 * n + 2.0))
    figure = _figure(2 * side, side)
    for ax, split, matrix in zip(figure.subplots(1, 2), ("validation", "test"), (val_matrix, test_matrix)):
        display = ConfusionMatrixDisplay(matrix, display_labels=list(names))
        display.plot(ax=ax, include_values=n <= _MAX_ANNOTATED_CLASSES, colorbar=False,
                     xticks_rotation="vertical", cmap="Blues")
        total = matrix.sum()
        accuracy = np.trace(matrix) / total if total else float("nan")
        ax.set_title(f"{split}: accuracy {accuracy:.4f}")
    if title:
        figure.suptitle(title)
    figure.savefig(path, dpi=80)


def plot_curves(path: PathLike, history: Mapping[str, Sequence[float]], title: str = "") -> None:
    """Loss and accuracy per epoch, train and validation."""
    figure = _figure(10, 4)
    for ax, metric in zip(figure.subplots(1, 2), ("loss", "accuracy")):
        for key, label in ((metric, "train"), (f"val_{metric}", "validation")):
            values = history.get(key)
            if values:
                ax.plot(range(1, len(values) + 1), values, marker="o", markersize=3, label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        figure.suptitle(title)
    figure.savefig(path, dpi=80)


def errors_line(record: Mapping[str, Any], folder: PathLike) -> str:
    """One line pointing at a run's worst validation images and its most confused pairs, for the CLI."""
    pairs = record.get("most_confused") or []
    confused = ", ".join(f"{p['true']} -> {p['predicted']} ({p['count']})" for p in pairs[:3]) or "none"
    picture = Path(folder) / interpretation.TOP_LOSSES_FILE
    shown = (f"worst validation images: {picture}" if picture.exists()
             else str(record.get("top_losses_note", "")).rstrip("."))
    return f"{shown}; most confused: {confused}"


def key_settings(record: Mapping[str, Any]) -> str:
    """The few settings that tell runs of one backbone apart, for the table."""
    if record.get("summary"):
        return str(record["summary"])
    parts = []
    if record.get("size"):
        parts.append(f"{record['size']}px")
    config = record.get("config") or {}
    if "learning_rate" in config:
        parts.append(f"lr {float(config['learning_rate']):g}")
    if config.get("unfreeze"):
        parts.append(f"unfreeze {config['unfreeze']}")
    if record.get("head_run"):
        parts.append(f"from {record['head_run']}")
    return " ".join(parts)


def runs_table(runs: Sequence[Run]) -> str:
    """A text table of runs, best validation accuracy first."""
    if not runs:
        return "no runs yet"
    rows = []
    for run in sorted(runs, key=_sort_key):
        r = run.record
        head = str(r.get("head") or "")
        if run.kind != "head":
            head = f"{run.kind}" + (f"({head})" if head else "")
        rows.append((
            run.run_id, str(r.get("backbone", "?")), head, key_settings(r),
            "-" if run.val_acc is None else f"{run.val_acc:.4f}",
            "-" if run.test_acc is None else f"{run.test_acc:.4f}",
            "-" if _float_or_none(r.get("seconds")) is None else f"{float(r['seconds']):.1f}",
        ))
    header = ("run", "backbone", "head", "settings", "val_acc", "test_acc", "seconds")
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    right = {4, 5, 6}

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(row) for row in rows])
