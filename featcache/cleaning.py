"""``featcache clean``: empty a cache folder of what featcache made in it, and of nothing else.

The folder itself is checked first (not empty, not ``/``, not a home folder
or a parent of one, not a project checkout), then every entry is matched
against the names featcache gives its own artefacts; anything else is kept
and listed. Symlinks are removed as links, never followed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Union

from . import fsio
from .cache import _FILENAME, owned_cache
from .errors import FeatcacheError

_TEMPORARY = re.compile(r"^\..+\.\d+\.tmp(?:\.weights\.h5)?$")
_SIDECAR = re.compile(r"^(?P<file>.+\.h5)\.(?:lock|parts|worker\d+\.parts|worker\d+)$")
_PROJECT_MARKERS = (".git", "pyproject.toml", "setup.py")


@dataclass
class CleanReport:
    removed: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)
    busy: list[Path] = field(default_factory=list)


def _is_temporary(path: Path) -> bool:
    return bool(_TEMPORARY.match(path.name))


def _run_entry(path: Path) -> bool:
    return _is_temporary(path) or (path.is_dir() and not path.is_symlink() and (
        (path / "record.json").is_file() or path.name.startswith(".finetune-")))


def _dataset_entry(path: Path) -> bool:
    if _is_temporary(path) or re.match(r"^scan-[0-9a-f]{12}\.json$", path.name):
        return True
    return path.is_dir() and not path.is_symlink() and (path / ".featcache-extracted").is_file()


def _engine_entry(path: Path) -> bool:
    return _is_temporary(path) or bool(re.match(r"^.+-tf\d[\w.+-]*-keras\d[\w.+-]*", path.name))


def _weights_entry(path: Path) -> bool:
    return _is_temporary(path) or path.name.endswith("_imagenet.weights.h5")


def _converted_entry(path: Path) -> bool:
    return _is_temporary(path) or bool(re.match(r"^[0-9a-f]{32}\.png$", path.name))


# Sub-folders featcache creates in a cache folder, with the test an entry must pass to be featcache's.
_SUBFOLDERS: dict[str, Callable[[Path], bool]] = {
    "runs": _run_entry, "datasets": _dataset_entry, "engines": _engine_entry, "weights": _weights_entry,
}


def check_cache_dir(cache_dir: Union[str, Path]) -> Path:
    """The folder to clean, or an error when it could be anything but a cache folder."""
    if not str(cache_dir).strip():
        raise FeatcacheError("Refusing to clean: CACHE_DIR is empty (give the cache folder, e.g. CACHE_DIR=cache).")
    path = Path(cache_dir).expanduser()
    if not path.exists():
        raise FeatcacheError(f"Nothing to clean: the cache folder {path} does not exist.")
    if not path.is_dir():
        raise FeatcacheError(f"Refusing to clean {path}: it is a file, not a cache folder.")
    real = path.resolve()
    home = Path.home().resolve()
    if real == Path(real.anchor) or real == home or real in home.parents:
        raise FeatcacheError(f"Refusing to clean {path}: it is the root or a home folder, not a cache folder.")
    found = [m for m in _PROJECT_MARKERS if (real / m).exists()]
    if found:
        raise FeatcacheError(f"Refusing to clean {path}: it holds {found[0]}, so it is a project folder, "
                             "not a cache folder.")
    return path


def clean(cache_dir: Union[str, Path]) -> CleanReport:
    """Remove featcache's artefacts from ``cache_dir``; everything unrecognised is kept and reported."""
    root = check_cache_dir(cache_dir)
    report = CleanReport()
    keys: dict[str, list[Path]] = {}
    for entry in sorted(root.iterdir()):
        if entry.name == ".gitkeep":
            continue
        base = _cache_file_of(root, entry)
        if entry.name in _SUBFOLDERS and entry.is_dir() and not entry.is_symlink():
            _clean_subfolder(entry, _SUBFOLDERS[entry.name], report)
        elif base:
            keys.setdefault(base, []).append(entry)
        else:
            report.kept.append(entry)
    for base, entries in keys.items():
        _clean_key(root / base, entries, report)
    return report


def _clean_key(path: Path, entries: list[Path], report: CleanReport) -> None:
    """One key's file, parts, temporaries and lock, under that lock: a running extraction is left alone."""
    from filelock import Timeout

    from .cache import lock_for

    lock = lock_for(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        report.busy.extend(entries)
        return
    except OSError as exc:
        raise fsio.disk_error(exc, path.parent, "lock in") from None
    try:
        for entry in entries:
            if not entry.name.endswith(".lock"):
                _remove(entry, path.parent, report)
    finally:
        lock.release()
    _remove(Path(lock.lock_file), path.parent, report)


def _cache_file_of(root: Path, entry: Path) -> str:
    """The cache file name ``entry`` belongs to (itself, its lock, parts or a temporary), or ''."""
    if entry.is_symlink():
        return ""
    if _FILENAME.match(entry.name) and entry.is_file():
        try:
            owned_cache(root, str(entry))
        except FeatcacheError:
            return ""
        return entry.name
    sidecar = _SIDECAR.match(entry.name)
    if sidecar and _FILENAME.match(sidecar.group("file")):
        ok = entry.is_file() if entry.name.endswith(".lock") else entry.is_dir()
        return sidecar.group("file") if ok else ""
    if _is_temporary(entry):
        name = entry.name[1:].rsplit(".", 2)[0]
        return name if _FILENAME.match(name) else ""
    return ""


def _clean_subfolder(folder: Path, owned: Callable[[Path], bool], report: CleanReport) -> None:
    for entry in sorted(folder.iterdir()):
        if folder.name == "datasets" and entry.name == "converted" and entry.is_dir() and not entry.is_symlink():
            _clean_subfolder(entry, _converted_entry, report)
        elif owned(entry):
            _remove(entry, folder, report)
        else:
            report.kept.append(entry)
    if not any(folder.iterdir()):
        folder.rmdir()
        report.removed.append(folder)


def _remove(entry: Path, root: Path, report: CleanReport) -> None:
    if fsio.remove_owned(entry, root, "cache entry"):
        report.removed.append(entry)
