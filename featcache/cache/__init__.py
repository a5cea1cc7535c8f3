"""The HDF5 feature store: keys, atomic files, resumable parts, checks.

One file per key. A key covers everything that changes the numbers in it
(backbone, weights identity, input size, preprocessing, pooling, dtype,
dataset fingerprint, split, view). A file appears under its final name only
once complete; while extraction runs, finished chunks sit as small files in
a ``<name>.parts/`` folder, so a killed run resumes from the last chunk.
"""

from .keys import _FILENAME, ARRAYS, KEY_FIELDS, SCHEMA_VERSION, FeatureKey, FeatureSet
from .parts import DamagedChunk, PartStore, lock_for
from .reading import check, find, list_caches, load_features, read_attrs, resolve
from .removal import owned_cache, remove
from .writer import HDF5Writer, _disk_error, base_attrs, expected_bytes, write_features

__all__ = ["ARRAYS", "KEY_FIELDS", "SCHEMA_VERSION", "DamagedChunk", "FeatureKey", "FeatureSet", "HDF5Writer",
           "PartStore", "base_attrs", "check", "expected_bytes", "find", "list_caches", "load_features", "lock_for",
           "owned_cache", "read_attrs", "remove", "resolve", "write_features"]
