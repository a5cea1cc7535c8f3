"""Deleting a cache file, only after proving it is featcache's own."""

from __future__ import annotations

from pathlib import Path
from typing import Union

from .. import fsio
from ..errors import FeatcacheError
from .keys import _FILENAME
from .parts import lock_for
from .reading import read_attrs, resolve
from .writer import _disk_error


def owned_cache(cache_dir: Union[str, Path], key_or_path: str) -> Path:
    """The cache file ``key_or_path`` names, proven featcache's own before anything deletes it.

    Ours means: inside ``cache_dir``, named as featcache names cache files, and
    opening with featcache's schema attributes whose key matches the name.
    Anything else is refused, untouched.
    """
    cache_dir = Path(cache_dir)
    if not str(key_or_path).strip():
        raise FeatcacheError("Give a cache key, file name or path (see `featcache cache ls`).")
    path = resolve(cache_dir, key_or_path)
    refuse = f"Refusing to delete {path}:"
    if not fsio.is_inside(path, cache_dir):
        raise FeatcacheError(f"{refuse} it is not inside the cache folder {cache_dir} (featcache deletes only its "
                             "own files there; pass --cache-dir if the cache lives elsewhere).")
    if path.is_dir() or not _FILENAME.match(path.name):
        raise FeatcacheError(f"{refuse} it is not named like a featcache cache file (<backbone>-<size>-<split>-"
                             "<view>-<key>.h5).")
    try:
        attrs = read_attrs(path)
    except FeatcacheError:
        raise FeatcacheError(f"{refuse} it does not open as a featcache cache (no readable schema attributes).") from None
    if not path.name.endswith(f"-{attrs.get('key')}.h5"):
        raise FeatcacheError(f"{refuse} its recorded key {attrs.get('key')!r} does not match its name.")
    return path


def remove(path: Path) -> list[Path]:
    """Delete a cache file ``owned_cache`` accepted, with its leftovers (parts folder, temporaries), under
    the key's lock.

    The lock file itself stays: deleting it would let a later process lock a new
    file while a writer still holds the old one.
    """
    from filelock import Timeout

    lock = lock_for(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise FeatcacheError(f"{path.name} is being written by another featcache process; "
                             "remove it once that run ends.") from None
    except OSError as exc:
        raise _disk_error(exc, path.parent, "lock in") from None
    try:
        removed = []
        root = path.parent
        parts = path.with_name(path.name + ".parts")
        for target in [path, parts, *fsio.stale_temporaries(path)]:
            if fsio.remove_owned(target, root, "cache leftover"):
                removed.append(target)
        return removed
    finally:
        lock.release()
