"""A run in progress (hidden, resumable work folder) and the finished run folder it becomes."""

from __future__ import annotations

import csv
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import keras

from .. import fsio
from ..errors import FeatcacheError
from ..settings import FeatureSettings
from .config import FinetuneConfig

# --- the work folder (resumable) and the finished run folder ------------------------------


def work_dir_for(settings: FeatureSettings, head_run, config: FinetuneConfig) -> Path:
    """Where an unfinished run keeps its backup, logs and history: hidden (``list_runs`` skips it) and
    named after the head run and the training settings, so the same call finds it again to resume."""
    from .. import runs

    return runs.runs_root(settings.cache_dir) / f".finetune-{head_run.run_id}-{config.training_digest()}"


def discard_work_dir(work_dir: Path) -> None:
    """Delete a fine-tune work folder, after proving it is one (its hidden ``.finetune-`` name, in runs/)."""
    if not work_dir.name.startswith(".finetune-"):
        raise FeatcacheError(f"Refusing to delete {work_dir}: it is not a featcache fine-tune work folder.")
    fsio.remove_owned(work_dir, work_dir.parent, "fine-tune work folder")


def lock_run(work_dir: Path):
    """The lock of one fine-tune's work folder (held for the run): two identical calls must not share it."""
    from filelock import FileLock, Timeout

    fsio.make_dirs(work_dir.parent, "runs folder")
    lock = FileLock(str(work_dir) + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise FeatcacheError(f"Another featcache finetune is running these settings (lock {lock.lock_file}).") from None
    return lock


def unlock_run(lock, work_dir: Path) -> None:
    lock.release()
    if not work_dir.exists():  # the run is written: its lock file has nothing left to guard
        Path(lock.lock_file).unlink(missing_ok=True)


def open_work_dir(work_dir: Path) -> bool:
    """Create the work folder; True when it holds a backup to resume from."""
    if (work_dir / "backup").is_dir():
        return True
    if work_dir.exists():  # killed before its first epoch finished: nothing worth keeping
        discard_work_dir(work_dir)
    fsio.make_dirs(work_dir, "fine-tune work folder")
    return False


def base_record(config: FinetuneConfig, source, head_run, checks: dict) -> dict:
    """What every fine-tune run records, in either mode: where it started and what it checked."""
    from .config import FEATURE_ATOL, FEATURE_RTOL, VAL_ACC_TOLERANCE

    return {
        "kind": "finetune",
        "mode": config.mode,
        "head": head_run.record.get("head"),
        "backbone": source.backbone,
        "weights": source.weights,
        "size": source.size,
        "pooling": source.pooling,
        "preprocess": source.preprocess,
        "head_run": head_run.run_id,
        "head_val_acc": head_run.record.get("val_acc"),
        "config": asdict(config),
        "checks": {**checks, "feature_rtol": FEATURE_RTOL, "feature_atol": FEATURE_ATOL,
                   "val_acc_tolerance": VAL_ACC_TOLERANCE},
    }


def finish_run(work_dir: Path, settings: FeatureSettings, config: FinetuneConfig, model, record: dict,
               class_names: list[str], val: tuple, test: tuple, log: Callable[[str], None], val_images=None) -> dict:
    """The finished run folder, written through ``featcache.report`` (staged, renamed when whole)."""
    from .. import report, runs

    run_id = runs.new_run_id("finetune", record["backbone"])
    final = runs.runs_root(settings.cache_dir) / run_id
    history = read_history(work_dir / "history.csv")
    with runs.staged_run_dir(final) as tmp:
        model.save(tmp / "model.keras")
        for name in ("history.csv", "logs"):
            if (work_dir / name).exists():
                shutil.move(str(work_dir / name), str(tmp / name))
        record = {**record, "run_id": run_id, "epochs_run": len(history), "model": str(final / "model.keras")}
        run_settings = {"features": asdict(settings), "finetune": asdict(config), "head_run": record["head_run"]}
        record = report.write_run(tmp, run_settings, record, class_names, *val, *test, history=history,
                                  val_images=val_images)
    discard_work_dir(work_dir)
    log(f"wrote {final / 'model.keras'}")
    if config.export:  # the exporter table, self-checked on validation like `featcache export`
        from ..exporters import ExportOptions, export_run

        try:
            export_run(runs.read_run(final), settings.cache_dir,
                       ExportOptions(format="savedmodel", out=str(final / "saved_model")), log=log)
        except FeatcacheError as exc:  # the trained run stays whole; only the export is missing
            log(f"warning: the SavedModel export failed ({exc}); the run is complete without it. Retry with "
                f"`featcache export {run_id} --format savedmodel`.")
        record = runs.read_run(final).record
    return record


# --- the run ------------------------------------------------------------------------------


class ResumeLog(keras.callbacks.Callback):
    """Says where training starts, so a resumed run says that it resumed."""

    def __init__(self, log: Callable[[str], None]):
        super().__init__()
        self.log, self.first = log, True

    def on_epoch_begin(self, epoch, logs=None):
        if self.first and epoch > 0:
            self.log(f"resuming from the backup at epoch {epoch + 1}")
        self.first = False


def has_tensorboard() -> bool:
    """TensorFlow's summary ops need the separate ``tensorboard`` package; without it only the CSV log is kept."""
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


def read_history(path: Path) -> list[dict]:
    """Rows of the CSV log: one per finished epoch, including those before a resume."""
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        return [{k: (int(v) if k == "epoch" else float(v)) for k, v in row.items() if v not in (None, "")}
                for row in csv.DictReader(fh)]



def training_callbacks(work_dir: Path, config: FinetuneConfig, resuming: bool,
                       log: Callable[[str], None]) -> tuple[list, Path]:
    """Backup (resume after a kill), best checkpoint on validation, early stopping, the plateau schedule,
    CSV and TensorBoard logs; returns them with the best checkpoint's path."""
    best_path = work_dir / "best.weights.h5"
    checkpoint = keras.callbacks.ModelCheckpoint(best_path, monitor="val_accuracy", mode="max",
                                                 save_best_only=True, save_weights_only=True)
    earlier = [row["val_accuracy"] for row in read_history(work_dir / "history.csv") if "val_accuracy" in row]
    if resuming and earlier:
        checkpoint.best = max(earlier)  # the best epoch before the interruption still counts
    own = [
        keras.callbacks.BackupAndRestore(str(work_dir / "backup")),
        checkpoint,
        keras.callbacks.EarlyStopping(monitor="val_accuracy", mode="max", patience=config.patience),
        keras.callbacks.CSVLogger(str(work_dir / "history.csv"), append=True),
        ResumeLog(log),
    ]
    if config.schedule == "plateau":
        own.insert(3, keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5,
                                                        patience=max(1, config.patience // 2),
                                                        min_lr=config.learning_rate / 100))
    if has_tensorboard():
        own.append(keras.callbacks.TensorBoard(str(work_dir / "logs"), write_graph=False, profile_batch=0))
    else:
        log("note: no TensorBoard logs (the tensorboard package is not installed); history.csv has the curves")
    return own, best_path
