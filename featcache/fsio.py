"""Every write and every delete featcache makes goes through here.

Writes are atomic: the data goes to a hidden temporary name beside the
target (``.<name>.<pid>.tmp``), is fsynced and renamed over the target, and
the temporary is removed on any failure. A full disk, a read-only file
system or a permission error becomes one ``DiskError`` line naming what
could not be written and why, the same wherever it happens.

Deletes are guarded: ``remove_owned`` refuses any path that does not sit
inside the folder featcache owns (symlinks are not followed out of it).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Union

from .errors import FeatcacheError

PathLike = Union[str, os.PathLike]
# Below this much free space, an error without an errno (h5py's RuntimeError) is taken for a full disk.
_NEARLY_FULL_BYTES = 1 << 20


class DiskError(FeatcacheError):
    """A write failed because of the file system (full, read-only, no permission)."""


def reason(exc: BaseException, folder: Optional[Path] = None) -> str:
    """The cause of a failed write in a few words."""
    code = getattr(exc, "errno", None)
    if code == errno.ENOSPC or code == errno.EDQUOT:
        return "the disk is full"
    if code == errno.EROFS:
        return "the file system is read-only"
    if code in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if code == errno.ENOTDIR:
        return "a part of the path is a file, not a folder"
    if code == errno.EEXIST:
        return "a file of that name is in the way"
    if folder is not None and nearly_full(folder):
        return "the disk is full"
    text = getattr(exc, "strerror", None) or (str(exc).strip().splitlines() or [""])[0]
    return text or type(exc).__name__


def nearly_full(folder: Path) -> bool:
    """True when the file system holding ``folder`` (or its nearest existing parent) has under 1 MB free."""
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free < _NEARLY_FULL_BYTES
    except OSError:
        return False


def disk_error(exc: BaseException, path: PathLike, what: str, hint: str = "") -> DiskError:
    """The one-line error for a failed write of ``what`` at ``path``."""
    path = Path(path)
    text = f"Cannot write {what} {path}: {reason(exc, path.parent)}."
    return DiskError(f"{text} {hint}".strip())


def temporary_name(path: PathLike, suffix: str = "") -> Path:
    """``.<name>.<pid>.tmp<suffix>``: hidden, per process; ``suffix`` for writers that insist on one (Keras)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp{suffix}")


def stale_temporaries(path: PathLike) -> list[Path]:
    """Temporaries that writers of ``path`` (any process) left behind."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    return sorted(path.parent.glob(f".{path.name}.*.tmp*"))


def fsync_dir(path: PathLike) -> None:
    """Make a rename in ``path`` durable; best effort where folders cannot be fsynced."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    if path.is_dir():
        os.sync()  # one call for a folder of any size (an extracted dataset holds 60,000 files)
        fsync_dir(path)
    else:
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())


def discard(tmp: Path) -> None:
    """Remove a temporary this process made (file or folder); never raises."""
    tmp = Path(tmp)
    try:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
    except OSError:
        pass


@contextmanager
def atomic_path(path: PathLike, what: str, hint: str = "", replace: bool = True,
                suffix: str = "") -> Iterator[Path]:
    """A temporary path to write ``path`` under (a file, or a folder the block creates).

    When the block finishes, the temporary is fsynced and renamed to ``path``;
    on any error it is removed and nothing appears under ``path``. OSErrors
    (and errors raised while the disk is nearly full) become a ``DiskError``
    naming ``what``. ``replace=False`` refuses to overwrite an existing ``path``.
    """
    path = Path(path)
    tmp = temporary_name(path, suffix)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise disk_error(exc, path, what, hint) from None
    discard(tmp)
    try:
        yield tmp
        if not tmp.exists():
            raise FeatcacheError(f"Nothing was written for {what} {path}.")
        _fsync_tree(tmp)
        if not replace and path.exists():
            raise FeatcacheError(f"{what.capitalize()} {path} already exists; not overwriting it.")
        if tmp.is_dir() and path.is_dir() and replace:
            raise FeatcacheError(f"{what.capitalize()} {path} already exists; not overwriting a folder.")
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except FeatcacheError:
        discard(tmp)
        raise
    except OSError as exc:
        discard(tmp)
        raise disk_error(exc, path, what, hint) from None
    except BaseException as exc:
        discard(tmp)
        if isinstance(exc, RuntimeError) and nearly_full(path.parent):  # h5py reports ENOSPC this way
            raise disk_error(exc, path, what, hint) from None
        raise


def publish(tmp: PathLike, path: PathLike) -> Path:
    """fsync a finished temporary (file or folder) and rename it to ``path``; OSErrors propagate."""
    tmp, path = Path(tmp), Path(path)
    _fsync_tree(tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return path


def free_bytes(folder: PathLike) -> Optional[int]:
    """Free space on the file system holding ``folder`` (or its nearest existing parent); None if unknown."""
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def require_space(folder: PathLike, needed: int, what: str, hint: str = "") -> None:
    """Refuse, before writing anything, a write of ``needed`` bytes that cannot fit."""
    free = free_bytes(folder)
    if free is not None and free < needed:
        raise DiskError(f"Cannot write {what} in {folder}: it needs about {human_bytes(needed)} and the disk has "
                        f"{human_bytes(free)} free. {hint}".strip())


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def write_bytes(path: PathLike, data: bytes, what: str = "file", hint: str = "") -> Path:
    with atomic_path(path, what, hint) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
    return Path(path)


def write_text(path: PathLike, text: str, what: str = "file", hint: str = "") -> Path:
    return write_bytes(path, text.encode("utf-8"), what, hint)


def write_json(path: PathLike, obj: Any, what: str = "file", hint: str = "") -> Path:
    return write_text(path, json.dumps(obj, indent=2) + "\n", what, hint)


def make_dirs(path: PathLike, what: str = "folder") -> Path:
    """``mkdir -p`` with the one-line error (a CACHE_DIR that is a file, a read-only parent)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise disk_error(exc, path, what) from None
    if not path.is_dir():
        raise DiskError(f"Cannot write {what} {path}: it exists and is not a folder.")
    return path


# --- deleting only what is ours ----------------------------------------------------------


def is_inside(path: PathLike, root: PathLike) -> bool:
    """Whether ``path`` lies strictly inside ``root`` once symlinks in its parents are resolved."""
    path, root = Path(path), Path(root)
    try:
        parent = path.parent.resolve(strict=False)
        real_root = root.resolve(strict=False)
    except OSError:
        return False
    candidate = parent / path.name
    return candidate != real_root and real_root in candidate.parents


def remove_owned(path: PathLike, root: PathLike, what: str = "file") -> bool:
    """Delete ``path`` (file, symlink or folder) only if it lies inside ``root``; True if something went.

    A symlink is removed itself, never followed. Anything outside ``root`` is
    refused with an error and left untouched.
    """
    path = Path(path)
    if not is_inside(path, root):
        raise FeatcacheError(f"Refusing to delete {path}: it is not inside featcache's folder {root}.")
    try:
        if path.is_symlink() or path.is_file():
            path.unlink()
            return True
        if path.is_dir():
            shutil.rmtree(path)
            return True
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise FeatcacheError(f"Cannot delete {what} {path}: {reason(exc)}.") from None
    return False
