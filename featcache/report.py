"""Run folders, their records and the ranking of runs.

Every head run (and every fine-tune run) leaves a folder ``<cache_dir>/runs/<run_id>/``::

    head.keras | model.keras      the trained model
    settings.json                 how to redo the run
    record.json                   what came out of it (written last)
    confusion.txt, confusion.png  validation and test confusion matrices
    curves.png                    loss and accuracy per epoch (runs trained by epochs)
    classification_report.txt     scikit-learn's per-class precision/recall/F1

Head and fine-tune runs share the record format (``kind`` tells them apart), so
``featcache runs`` ranks both together by validation accuracy. Test accuracy is
reported, never used to choose. A head run is built in a hidden temporary
folder and renamed when complete, so a folder under its final name is whole.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import numpy as np

from .cache import fsync_dir
from .errors import FeatcacheError, choice_error

RECORD_FORMAT = 1
RUNS_FOLDER = "runs"
RECORD_FILE = "record.json"
SETTINGS_FILE = "settings.json"
MODEL_FILES = ("head.keras", "model.keras")
RUN_KINDS = ("head", "finetune")
# Above this many classes the confusion plot drops the per-cell numbers (unreadable otherwise).
_MAX_ANNOTATED_CLASSES = 20

PathLike = Union[str, os.PathLike]


@dataclass
class Run:
    """A finished run folder: its id, where it is, its record and its settings."""

    run_id: str
    path: Path
    record: dict
    settings: dict

    @property
    def kind(self) -> str:
        return str(self.record.get("kind", "head"))

    @property
    def val_acc(self) -> Optional[float]:
        return _float_or_none(self.record.get("val_acc"))

    @property
    def test_acc(self) -> Optional[float]:
        return _float_or_none(self.record.get("test_acc"))

    @property
    def model_path(self) -> Path:
        """``head.keras`` for head runs, ``model.keras`` for fine-tune runs."""
        for name in MODEL_FILES:
            if (self.path / name).exists():
                return self.path / name
        return self.path / MODEL_FILES[0]


def _float_or_none(value: Any) -> Optional[float]:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


# --- run ids and folders ------------------------------------------------------------


def runs_root(cache_dir: PathLike) -> Path:
    """Where runs for a cache folder live."""
    return Path(cache_dir) / RUNS_FOLDER


def new_run_id(label: str, backbone: str, when: Optional[float] = None) -> str:
    """``20261125-061502-mlp-efficientnet_lite0-ab12``: sortable by time, readable, unique enough."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(when))
    safe = re.sub(r"[^A-Za-z0-9_.+-]+", "_", f"{label}-{backbone}")
    return f"{stamp}-{safe}-{secrets.token_hex(2)}"


@contextmanager
def staged_run_dir(final: PathLike) -> Iterator[Path]:
    """A hidden temporary folder that becomes ``final`` only if the block finishes.

    ``list_runs`` ignores hidden folders, so an interrupted run never looks complete.
    """
    final = Path(final)
    if final.exists():
        raise FeatcacheError(f"Run folder {final} already exists; not overwriting it.")
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        tmp.mkdir(parents=True)
    except OSError as exc:
        raise FeatcacheError(f"Cannot create run folder {tmp}: {exc.strerror or exc}.") from None
    try:
        yield tmp
        if final.exists():
            raise FeatcacheError(f"Run folder {final} appeared while this run was being written; not overwriting it.")
        os.rename(tmp, final)
        fsync_dir(final.parent)
    except OSError as exc:  # a full disk or a permission error while the run is written
        shutil.rmtree(tmp, ignore_errors=True)
        raise FeatcacheError(f"Cannot write run folder {final}: {exc.strerror or exc}.") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise



def _write_json(path: Path, data: Any) -> None:
    """Whole or absent: written under a temporary name, then renamed."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as fh:
        json.dump(_plain(data), fh, indent=2, sort_keys=False)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


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
              history: Any = None) -> dict:
    """Write settings, metrics, plots and (last) ``record.json`` into ``run_dir``; return the full record.

    ``record`` holds what the stage knows (``kind``, ``run_id``, ``backbone``, ``seconds``,
    ...); this adds ``val_acc``, ``test_acc``, per-class accuracy and ``created``.
    ``history`` is Keras' ``History.history`` or a list of per-epoch rows.
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
    try:
        _write_json(run_dir / SETTINGS_FILE, settings)
        (run_dir / "confusion.txt").write_text(
            _confusion_text("validation", val["confusion"], names) + "\n" + _confusion_text("test", test["confusion"], names))
        (run_dir / "classification_report.txt").write_text(
            _classification_report("validation", val_labels, val["predicted"], names) + "\n"
            + _classification_report("test", test_labels, test["predicted"], names))
        plot_confusion(run_dir / "confusion.png", val["confusion"], test["confusion"], names,
                       title=f"{full.get('backbone', '')} {full.get('head', full['kind'])}".strip())
        if columns:
            plot_curves(run_dir / "curves.png", columns, title=str(full.get("run_id", "")))
        _write_json(run_dir / RECORD_FILE, full)
    except OSError as exc:
        raise FeatcacheError(f"Cannot write run folder {run_dir}: {exc.strerror or exc}.") from None
    return _plain(full)


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


# --- reading and ranking ------------------------------------------------------------------


def read_run(path: Path) -> Optional[Run]:
    """A run folder as a ``Run``; None when it has no readable ``record.json`` (unfinished or foreign)."""
    try:
        record = json.loads((path / RECORD_FILE).read_text())
    except (OSError, ValueError):
        return None
    try:
        settings = json.loads((path / SETTINGS_FILE).read_text())
    except (OSError, ValueError):
        settings = {}
    if not isinstance(record, dict):
        return None
    return Run(run_id=path.name, path=path, record=record, settings=settings if isinstance(settings, dict) else {})


def _sort_key(run: Run) -> tuple:
    val = run.val_acc
    return (val is None, -(val or 0.0), run.run_id)


def list_runs(cache_dir: PathLike, kind: Optional[str] = None) -> list[Run]:
    """Finished runs (folders with a readable ``record.json``), best validation accuracy first.

    ``cache_dir`` is the cache folder (runs live in its ``runs/``) or, when it has no
    ``runs/``, a folder holding run folders itself (``train_head(runs_dir=...)``).
    """
    if kind is not None and kind not in RUN_KINDS:
        raise choice_error("run kind", RUN_KINDS, kind)
    cache_dir = Path(cache_dir)
    root = runs_root(cache_dir) if runs_root(cache_dir).is_dir() else cache_dir
    if not root.is_dir():
        return []
    runs = []
    for path in sorted(root.iterdir()):
        if path.name.startswith(".") or not path.is_dir():
            continue
        run = read_run(path)
        if run is not None and (kind is None or run.kind == kind):
            runs.append(run)
    return sorted(runs, key=_sort_key)


def load_run(cache_dir: PathLike, run: str) -> Run:
    """A run from its folder path, its id, or a unique part of its id."""
    if not str(run).strip():
        raise FeatcacheError("An empty run id names no run (see `featcache runs`).")
    candidate = Path(run)
    if candidate.is_file() and candidate.name in MODEL_FILES + (RECORD_FILE,):
        candidate = candidate.parent
    if candidate.is_dir() and (candidate / RECORD_FILE).exists():
        found = read_run(candidate)
        if found is None:
            raise FeatcacheError(f"Run folder {candidate} has an unreadable {RECORD_FILE}.")
        return found
    runs = list_runs(cache_dir)
    exact = [r for r in runs if r.run_id == run]
    matches = exact or [r for r in runs if run in r.run_id]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise FeatcacheError(f"No run {run!r} in {runs_root(cache_dir)} (see `featcache runs`).")
    raise FeatcacheError(f"Run {run!r} matches {len(matches)} runs in {runs_root(cache_dir)}; give more of its id.")


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
