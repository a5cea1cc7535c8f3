"""The run store: run ids, run folders, reading and listing finished runs.

Every head run (and every fine-tune run) leaves a folder ``<cache_dir>/runs/<run_id>/``
with its model, ``settings.json`` and ``record.json`` (written last; see ``featcache.report``
for what else it holds). A run folder is built under a hidden temporary name and renamed
when complete, so a folder under its final name is whole; ``list_runs`` skips hidden ones.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Union

from .errors import FeatcacheError, choice_error
from .fsio import fsync_dir

RECORD_FORMAT = 1
RUNS_FOLDER = "runs"
RECORD_FILE = "record.json"
SETTINGS_FILE = "settings.json"
MODEL_FILES = ("head.keras", "model.keras")
RUN_KINDS = ("head", "finetune")

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


# --- reading and listing ----------------------------------------------------------


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
