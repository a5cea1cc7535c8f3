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
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Union

from .errors import FeatcacheError, choice_error
from .fsio import atomic_path, disk_error

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

    ``list_runs`` ignores hidden folders, so an interrupted run never looks complete;
    a full disk or a read-only folder ends in ``fsio``'s one-line error with nothing left behind.
    """
    final = Path(final)
    if final.exists():
        raise FeatcacheError(f"Run folder {final} already exists; not overwriting it.")
    with atomic_path(final, "run folder", replace=False) as tmp:
        try:
            tmp.mkdir()
        except OSError as exc:
            raise disk_error(exc, final, "run folder") from None
        yield tmp


# --- reading and listing ----------------------------------------------------------


def record_problem(path: Path) -> Optional[str]:
    """Why a run folder's ``record.json`` cannot be read, or None when it can (or there is none)."""
    record_path = path / RECORD_FILE
    if not record_path.exists():
        return None
    try:
        record = json.loads(record_path.read_text())
    except UnicodeDecodeError:
        return f"{RECORD_FILE} is not text"
    except ValueError as exc:
        return f"{RECORD_FILE} is not valid JSON ({exc})"
    except OSError as exc:
        return f"{RECORD_FILE} cannot be read ({exc.strerror or exc})"
    if not isinstance(record, dict):
        return f"{RECORD_FILE} holds a {type(record).__name__}, not a record"
    return None


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


def unreadable_runs(cache_dir: PathLike) -> list[tuple[Path, str]]:
    """Run folders whose ``record.json`` exists but cannot be read, with the reason: reported, never hidden."""
    cache_dir = Path(cache_dir)
    root = runs_root(cache_dir) if runs_root(cache_dir).is_dir() else cache_dir
    if not root.is_dir():
        return []
    found = []
    for path in sorted(root.iterdir()):
        if path.name.startswith(".") or not path.is_dir():
            continue
        problem = record_problem(path)
        if problem is not None:
            found.append((path, problem))
    return found


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
            raise FeatcacheError(f"Run folder {candidate} cannot be used: its {record_problem(candidate)}.")
        return found
    runs = list_runs(cache_dir)
    exact = [r for r in runs if r.run_id == run]
    matches = exact or [r for r in runs if run in r.run_id]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        broken = [(path, why) for path, why in unreadable_runs(cache_dir) if run in path.name]
        if broken:
            path, why = broken[0]
            raise FeatcacheError(f"Run {path.name} cannot be used: its {why}.")
        raise FeatcacheError(f"No run {run!r} in {runs_root(cache_dir)} (see `featcache runs`).")
    raise FeatcacheError(f"Run {run!r} matches {len(matches)} runs in {runs_root(cache_dir)}; give more of its id.")
