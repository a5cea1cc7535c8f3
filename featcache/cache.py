"""The HDF5 feature store: keys, atomic files, resumable parts, checks.

One file per key. A key covers everything that changes the numbers in it
(backbone, weights identity, input size, preprocessing, pooling, dtype,
dataset fingerprint, split, view). A file appears under its final name only
once complete; while extraction runs, finished chunks sit as small files in
a ``<name>.parts/`` folder, so a killed run resumes from the last chunk.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional, Union

import numpy as np

from . import fsio
from .errors import brief, FeatcacheError

SCHEMA_VERSION = 1
ARRAYS = ("features", "labels", "indices")
KEY_FIELDS = ("backbone", "weights", "size", "preprocess", "pooling", "dtype", "dataset", "split", "view")
_HASH_BLOCK_ROWS = 8192


@dataclass(frozen=True)
class FeatureKey:
    """The identity of one cached array; ``digest`` is its short key."""

    backbone: str
    weights: str
    size: int
    preprocess: str
    pooling: str
    dtype: str
    dataset: str
    split: str
    view: str = "orig"
    # The engine's arithmetic: 'f32', or 'bf16' (OpenVINO on AMX/AVX512-BF16 CPUs). bf16 features are not
    # interchangeable with f32 ones bit for bit, so bf16 enters the key; f32 does not, so caches made
    # before precision existed keep their keys.
    precision: str = "f32"

    @property
    def digest(self) -> str:
        fields_ = asdict(self)
        if fields_["precision"] == "f32":
            del fields_["precision"]
        text = json.dumps(fields_, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    @property
    def filename(self) -> str:
        return f"{self.backbone}-{self.size}-{self.split}-{self.view}-{self.digest}.h5"

    @classmethod
    def from_attrs(cls, attrs) -> "FeatureKey":
        values = {}
        for f in fields(cls):
            if f.name == "precision" and f.name not in attrs:
                continue  # written before precision was recorded: f32
            value = attrs[f.name]
            values[f.name] = int(value) if f.name == "size" else str(value)
        return cls(**values)


@dataclass
class FeatureSet:
    """Rows of one cache file, in memory: ``features[i]`` is image ``indices[i]`` of the split."""

    features: np.ndarray
    labels: np.ndarray
    indices: np.ndarray
    class_names: list[str]
    key: FeatureKey
    path: Path
    attrs: dict = field(default_factory=dict)

    @property
    def width(self) -> int:
        return int(self.features.shape[1])


# The name every cache file gets from ``FeatureKey.filename``; ``cache rm`` only deletes files named so.
_FILENAME = re.compile(r"^.+-\d+-[^-]+-[^-]+-[0-9a-f]{12}\.h5$")


def _rebuild_hint(path: Path, attrs: Optional[dict] = None) -> str:
    if attrs and "make_command" in attrs:
        return f"`featcache cache rm {path}` then `{attrs['make_command']}`"
    if attrs:
        return f"`featcache cache rm {path}` then the `make features` call that created it"
    # Without featcache's attributes nothing proves the file is ours: never suggest that featcache delete it.
    return "if featcache wrote it, move it aside and rerun the `make features` call that created it"


# --- writing -------------------------------------------------------------------

def _disk_error(exc: BaseException, path: Path, what: str) -> FeatcacheError:
    return fsio.disk_error(exc, path, what)


_RESUME_HINT = "Chunks already written are kept; free space or fix the folder, then rerun the same command to resume."


class HDF5Writer:
    """Builds one cache file under a temporary name and renames it when complete.

    Rows arrive in order through ``append``; checksums are computed on the
    way, so closing costs no second read.
    """

    def __init__(self, path: Path, n_rows: int, width: int, dtype: str):
        import h5py

        self.path = Path(path)
        self.tmp = fsio.temporary_name(self.path)
        self.n_rows, self.width, self.dtype = n_rows, width, dtype
        self.rows = 0
        self._file = None
        self._hashes = {name: hashlib.sha256() for name in ARRAYS}
        fsio.make_dirs(self.path.parent, "cache folder")
        # h5py meets a full disk with a RuntimeError mid-flush (and has crashed the process doing so):
        # refuse up front when the file cannot fit, so that case never starts.
        fsio.require_space(self.path.parent, expected_bytes(n_rows, width, dtype), f"cache file {self.path.name}")
        try:
            self._file = h5py.File(self.tmp, "w")
            chunk_rows = max(1, min(n_rows, (1 << 20) // max(1, width * np.dtype(dtype).itemsize)))
            self._file.create_dataset("features", (n_rows, width), dtype=dtype, chunks=(chunk_rows, width))
            self._file.create_dataset("labels", (n_rows,), dtype="int64")
            self._file.create_dataset("indices", (n_rows,), dtype="int64")
        except (OSError, RuntimeError) as exc:
            self.abort()
            raise _disk_error(exc, self.path, "cache file") from None

    def append(self, features: np.ndarray, labels: np.ndarray, indices: np.ndarray) -> None:
        n = features.shape[0]
        if self.rows + n > self.n_rows:
            raise FeatcacheError(f"{self.path}: more rows than the {self.n_rows} announced.")
        arrays = {"features": np.ascontiguousarray(features, dtype=self.dtype),
                  "labels": np.ascontiguousarray(labels, dtype=np.int64),
                  "indices": np.ascontiguousarray(indices, dtype=np.int64)}
        try:
            for name, array in arrays.items():
                self._file[name][self.rows:self.rows + n] = array
                self._hashes[name].update(memoryview(array).cast("B"))
        except (OSError, RuntimeError) as exc:
            self.abort()
            raise _disk_error(exc, self.path, "cache file") from None
        self.rows += n

    def commit(self, attrs: dict) -> Path:
        if self.rows != self.n_rows:
            self.abort()
            raise FeatcacheError(f"{self.path}: wrote {self.rows} of {self.n_rows} rows; not committed.")
        try:
            for name, value in attrs.items():
                self._file.attrs[name] = value if isinstance(value, (int, float, np.integer)) else str(value)
            self._file.attrs["checksums"] = json.dumps({k: h.hexdigest() for k, h in self._hashes.items()})
            self._file.attrs["schema_version"] = SCHEMA_VERSION
            self._file.attrs["n_rows"] = self.n_rows
            self._file.attrs["width"] = self.width
            self._file.attrs["complete"] = 1
            self._file.flush()
            self._file.close()
            self._file = None
            fsio.publish(self.tmp, self.path)
        except (OSError, RuntimeError) as exc:
            self.abort()
            raise _disk_error(exc, self.path, "cache file") from None
        return self.path

    def abort(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except Exception:  # a file whose last write failed may not close cleanly; it is discarded anyway
                pass
            self._file = None
        fsio.discard(self.tmp)


def expected_bytes(n_rows: int, width: int, dtype: str) -> int:
    """What a cache file of this shape takes on disk: the arrays plus a little HDF5 overhead."""
    return n_rows * (width * np.dtype(dtype).itemsize + 16) + (256 << 10)


def write_features(path: Union[str, Path], features: np.ndarray, labels: np.ndarray, indices: np.ndarray,
                   key: FeatureKey, class_names: list[str], extra_attrs: Optional[dict] = None) -> Path:
    """Write a complete cache file in one go (merges, tests, imports)."""
    features = np.asarray(features)
    writer = HDF5Writer(Path(path), features.shape[0], features.shape[1], key.dtype)
    for start in range(0, features.shape[0], _HASH_BLOCK_ROWS):
        stop = start + _HASH_BLOCK_ROWS
        writer.append(features[start:stop], labels[start:stop], indices[start:stop])
    return writer.commit(base_attrs(key, class_names, extra_attrs))


def base_attrs(key: FeatureKey, class_names: list[str], extra: Optional[dict] = None) -> dict:
    """The attributes every cache file carries besides its checksums."""
    import h5py
    import keras

    try:
        import tensorflow as tf

        tf_version = tf.__version__
    except ImportError:  # pragma: no cover
        tf_version = "absent"
    from . import __version__

    attrs = dict(asdict(key))
    attrs.update({
        "key": key.digest,
        "class_names": json.dumps(list(class_names)),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": json.dumps({"featcache": __version__, "tensorflow": tf_version, "keras": keras.__version__,
                                "h5py": h5py.__version__, "numpy": np.__version__}),
    })
    attrs.update(extra or {})
    return attrs


# --- resumable parts -------------------------------------------------------------

class DamagedChunk(FeatcacheError):
    """A chunk of an interrupted extraction could not be read back."""


class PartStore:
    """Finished chunks of an extraction in progress, one ``.npz`` file each.

    Each chunk file is written under a temporary name and renamed, so after
    a crash every chunk file present is whole; ``meta.json`` pins the
    settings a resumed run must match for the result to be bit-identical.
    """

    def __init__(self, final_path: Path, meta: dict):
        self.dir = final_path.with_name(final_path.name + ".parts")
        self.meta = meta
        self.discarded: Optional[dict] = None  # the settings of chunks dropped by ``open``, if any

    def open(self) -> int:
        """Create or reopen the folder; the number of whole chunks already done.

        Chunks made with other settings (batch size, engine, chunk size) would not
        resume bit-identically, so they are dropped and ``discarded`` says so.
        """
        meta_path = self.dir / "meta.json"
        try:
            if meta_path.exists():
                try:
                    old = json.loads(meta_path.read_text())
                except ValueError:
                    old = None
                if not isinstance(old, dict):
                    old = {"meta.json": "unreadable"}
                if old != self.meta:
                    self.discarded = {k: old.get(k, "absent") for k in sorted(set(old) | set(self.meta))
                                      if old.get(k) != self.meta.get(k)}
                    fsio.remove_owned(self.dir, self.dir.parent, "parts folder")
            fsio.make_dirs(self.dir, "extraction folder")
            if not meta_path.exists():
                fsio.write_bytes(meta_path, json.dumps(self.meta, sort_keys=True).encode(), "extraction settings")
        except OSError as exc:
            raise _disk_error(exc, self.dir, "extraction folder") from None
        done = 0
        while (self.dir / self._name(done)).exists():
            done += 1
        return done

    @staticmethod
    def _name(i: int) -> str:
        return f"chunk-{i:06d}.npz"

    def save(self, i: int, features: np.ndarray, labels: np.ndarray, indices: np.ndarray) -> None:
        import io

        buffer = io.BytesIO()
        np.savez(buffer, features=features, labels=labels, indices=indices)
        fsio.write_bytes(self.dir / self._name(i), buffer.getvalue(), "chunk", _RESUME_HINT)

    def load(self, i: int) -> dict:
        """Chunk ``i``; a damaged one is deleted with every later chunk, so a rerun extracts them again."""
        path = self.dir / self._name(i)
        try:
            with np.load(path, allow_pickle=False) as data:
                return {k: data[k] for k in ARRAYS}
        except Exception as exc:  # zipfile, OSError, KeyError, ValueError: all mean a damaged chunk
            later = sorted(p for p in self.dir.glob("chunk-*.npz") if p.name >= path.name)
            for chunk in later:
                fsio.remove_owned(chunk, self.dir, "damaged chunk")
            raise DamagedChunk(f"Chunk {path} of an interrupted extraction is unreadable ({type(exc).__name__}: "
                               f"{exc}); removed it and {len(later) - 1} later chunk(s): rerun the same command "
                               "to extract them again.") from None

    def remove_stale(self, final_path: Optional[Path] = None) -> int:
        """Delete temporary files a killed writer left in this folder and, given ``final_path`` (call
        under that key's lock), beside it."""
        stale = list(self.dir.glob(".*.tmp"))
        if final_path is not None:
            stale += list(final_path.parent.glob(f".{final_path.name}.*.tmp"))
        for path in stale:
            fsio.remove_owned(path, path.parent.parent, "temporary file")
        return len(stale)

    def remove(self) -> None:
        """Drop the folder once its chunks are in the final file."""
        if self.dir.is_dir():
            fsio.remove_owned(self.dir, self.dir.parent, "parts folder")


def lock_for(path: Path):
    """The inter-process lock guarding one key (a ``filelock.FileLock``)."""
    from filelock import FileLock

    return FileLock(str(path.with_name(path.name + ".lock")))


# --- reading and checking -------------------------------------------------------

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
