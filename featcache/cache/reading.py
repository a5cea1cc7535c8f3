"""Reading and checking cache files, and finding them by key, name or attributes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional, Union

import numpy as np

from ..errors import brief, FeatcacheError
from .keys import ARRAYS, SCHEMA_VERSION, FeatureKey, FeatureSet
from .writer import _HASH_BLOCK_ROWS


def _rebuild_hint(path: Path, attrs: Optional[dict] = None) -> str:
    if attrs and "make_command" in attrs:
        return f"`featcache cache rm {path}` then `{attrs['make_command']}`"
    if attrs:
        return f"`featcache cache rm {path}` then the `make features` call that created it"
    # Without featcache's attributes nothing proves the file is ours: never suggest that featcache delete it.
    return "if featcache wrote it, move it aside and rerun the `make features` call that created it"


def read_attrs(path: Union[str, Path]) -> dict:
    """A cache file's attributes; a file that is not a featcache cache is an error naming it."""
    import h5py

    path = Path(path)
    if not path.exists():
        raise FeatcacheError(f"Cache file {path} does not exist.")
    if path.is_dir():
        raise FeatcacheError(f"{path} is a folder, not a cache file.")
    try:
        with h5py.File(path, "r") as fh:
            attrs = {k: _plain(v) for k, v in fh.attrs.items()}
    except OSError as exc:
        raise FeatcacheError(
            f"Cache file {path} is not a readable HDF5 file ({brief(exc)}); "
            f"rebuild it: {_rebuild_hint(path)}.") from None
    if "schema_version" not in attrs or "key" not in attrs:
        raise FeatcacheError(f"{path} is an HDF5 file but not a featcache cache (no schema_version/key attributes).")
    return attrs


def _plain(value):
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


def check(path: Union[str, Path], full: bool = True) -> dict:
    """Check a cache file; returns its attributes or raises naming the file and the fix.

    The cheap part (schema, completeness, shapes, row counts) always runs;
    ``full`` also recomputes the checksums of every array.
    """
    import h5py

    path = Path(path)
    attrs = read_attrs(path)
    hint = _rebuild_hint(path, attrs)
    version = int(attrs["schema_version"])
    if version > SCHEMA_VERSION:
        raise FeatcacheError(
            f"{path} was written with cache schema {version}, newer than this featcache's "
            f"{SCHEMA_VERSION}; upgrade featcache or rebuild: {hint}.")
    if int(attrs.get("complete", 0)) != 1:
        raise FeatcacheError(f"{path} is incomplete; rebuild it: {hint}.")
    n, width = int(attrs["n_rows"]), int(attrs["width"])
    try:
        with h5py.File(path, "r") as fh:
            missing = [a for a in ARRAYS if a not in fh]
            if missing:
                raise FeatcacheError(f"{path} lacks dataset(s) {', '.join(missing)}; rebuild it: {hint}.")
            shapes = {a: fh[a].shape for a in ARRAYS}
            if shapes["features"] != (n, width) or shapes["labels"] != (n,) or shapes["indices"] != (n,):
                raise FeatcacheError(
                    f"{path} has shapes {shapes} but records {n} rows of width {width}; rebuild it: {hint}.")
            if full:
                for name in ARRAYS:
                    digest = hashlib.sha256()
                    dset = fh[name]
                    for start in range(0, n, _HASH_BLOCK_ROWS):
                        digest.update(memoryview(np.ascontiguousarray(dset[start:start + _HASH_BLOCK_ROWS])).cast("B"))
                    _check_digest(path, attrs, name, digest.hexdigest())
    except OSError as exc:
        raise FeatcacheError(f"{path} cannot be read ({brief(exc)}); rebuild it: {hint}.") from None
    return attrs


def _check_digest(path: Path, attrs: dict, name: str, digest: str) -> None:
    if digest != json.loads(attrs["checksums"]).get(name):
        raise FeatcacheError(f"{path}: checksum of '{name}' does not match; the file is corrupt. "
                             f"Rebuild it: {_rebuild_hint(path, attrs)}.")


def load_features(path: Union[str, Path], verify: bool = True) -> FeatureSet:
    """A checked cache file in memory; NaN or infinite features are an error.

    ``verify`` checksums the arrays once they are in memory: the file is read once, not twice.
    """
    import h5py

    path = Path(path)
    attrs = check(path, full=False)
    try:
        with h5py.File(path, "r") as fh:
            arrays = {name: fh[name][...] for name in ARRAYS}
    except OSError as exc:
        raise FeatcacheError(f"{path} cannot be read ({brief(exc)}); "
                             f"rebuild it: {_rebuild_hint(path, attrs)}.") from None
    if verify:
        for name, array in arrays.items():
            digest = hashlib.sha256(memoryview(np.ascontiguousarray(array)).cast("B")).hexdigest()
            _check_digest(path, attrs, name, digest)
    features, labels, indices = arrays["features"], arrays["labels"], arrays["indices"]
    if not np.all(np.isfinite(features)):
        bad = int(np.count_nonzero(~np.isfinite(features).all(axis=1)))
        raise FeatcacheError(f"{path} holds NaN or infinite features in {bad} row(s); "
                             f"rebuild it (try --dtype float32): {_rebuild_hint(path, attrs)}.")
    return FeatureSet(features, labels, indices, json.loads(attrs["class_names"]),
                      FeatureKey.from_attrs(attrs), path, attrs)


def list_caches(cache_dir: Union[str, Path]) -> list[dict]:
    """Attributes (plus ``path`` and ``bytes``) of every cache file in ``cache_dir``; unreadable files included as errors."""
    cache_dir = Path(cache_dir)
    rows = []
    if not cache_dir.is_dir():
        return rows
    for path in sorted(cache_dir.glob("*.h5")):
        try:
            attrs = read_attrs(path)
        except FeatcacheError as exc:
            attrs = {"error": str(exc)}
        attrs["path"] = str(path)
        attrs["bytes"] = path.stat().st_size
        rows.append(attrs)
    return rows


def resolve(cache_dir: Union[str, Path], key_or_path: str) -> Path:
    """A cache file from its path, file name or key digest."""
    if not str(key_or_path).strip():
        raise FeatcacheError("Give a cache key, file name or path (see `featcache cache ls`).")
    candidate = Path(key_or_path)
    if candidate.exists():
        return candidate
    cache_dir = Path(cache_dir)
    if (cache_dir / key_or_path).exists():
        return cache_dir / key_or_path
    matches = sorted(cache_dir.glob(f"*-{key_or_path}*.h5")) if cache_dir.is_dir() else []
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise FeatcacheError(f"Key {key_or_path!r} matches {len(matches)} files in {cache_dir}; give more of it.")
    raise FeatcacheError(f"No cache file or key {key_or_path!r} in {cache_dir} (see `featcache cache ls`).")


def find(cache_dir: Union[str, Path], match: dict) -> list[Path]:
    """Complete cache files whose attributes equal every item of ``match``."""
    found = []
    for attrs in list_caches(cache_dir):
        if "error" in attrs:
            continue
        attrs.setdefault("precision", "f32")  # files written before precision was recorded
        if all(str(attrs.get(k)) == str(v) for k, v in match.items()):
            found.append(Path(attrs["path"]))
    return found
