"""Writing a cache file: rows in order under a temporary name, checksummed on the way, renamed when whole."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Union

import numpy as np

from .. import fsio
from ..errors import FeatcacheError
from .keys import ARRAYS, SCHEMA_VERSION, FeatureKey

_HASH_BLOCK_ROWS = 8192


def _disk_error(exc: BaseException, path: Path, what: str) -> FeatcacheError:
    return fsio.disk_error(exc, path, what)

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
    from .. import __version__

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
