import json

import h5py
import numpy as np
import pytest

from featcache import cache
from featcache.cache import FeatureKey, PartStore, check, list_caches, load_features, resolve, write_features
from featcache.errors import FeatcacheError

KEY = FeatureKey("resnet50", "none", 32, "caffe|resize:bilinear", "avg", "float16", "abc123", "train", "orig")


def _write(path, n=20, width=8, key=KEY):
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(n, width)).astype(np.float16)
    return write_features(path, feats, np.arange(n) % 3, np.arange(n), key, ["a", "b", "c"]), feats


def test_key_digest_changes_with_every_field():
    digests = {KEY.digest}
    for field, value in [("backbone", "vgg19"), ("weights", "imagenet"), ("size", 64), ("preprocess", "x"),
                         ("pooling", "max"), ("dtype", "float32"), ("dataset", "zzz"), ("split", "test"),
                         ("view", "flip")]:
        digests.add(FeatureKey(**{**KEY.__dict__, field: value}).digest)
    assert len(digests) == 10
    assert KEY.filename.startswith("resnet50-32-train-orig-")


def test_roundtrip(tmp_path):
    path, feats = _write(tmp_path / KEY.filename)
    loaded = load_features(path)
    assert np.array_equal(loaded.features, feats) and loaded.key == KEY
    assert loaded.class_names == ["a", "b", "c"] and loaded.attrs["complete"] == 1
    assert not list(tmp_path.glob(".*.tmp"))


def test_flipped_bytes_are_detected(tmp_path):
    path, _ = _write(tmp_path / KEY.filename, n=200, width=64)
    with h5py.File(path, "r") as fh:
        offset = fh["features"].id.get_chunk_info(0).byte_offset
    with open(path, "r+b") as fh:
        fh.seek(offset + 100)
        byte = fh.read(1)
        fh.seek(offset + 100)
        fh.write(bytes([byte[0] ^ 0xFF]))
    check(path, full=False)  # shapes and flags still fine
    with pytest.raises(FeatcacheError, match="checksum of 'features'.*corrupt"):
        check(path)
    with pytest.raises(FeatcacheError, match="corrupt"):
        load_features(path)


def test_truncated_file_refused(tmp_path):
    path, _ = _write(tmp_path / KEY.filename, n=500, width=64)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(FeatcacheError, match=str(path.name)):
        load_features(path)


def test_foreign_hdf5_refused(tmp_path):
    path = tmp_path / "foreign.h5"
    with h5py.File(path, "w") as fh:
        fh["x"] = np.zeros(3)
    with pytest.raises(FeatcacheError, match="not a featcache cache"):
        load_features(path)


def test_newer_schema_refused(tmp_path):
    path, _ = _write(tmp_path / KEY.filename)
    with h5py.File(path, "r+") as fh:
        fh.attrs["schema_version"] = cache.SCHEMA_VERSION + 1
    with pytest.raises(FeatcacheError, match="newer"):
        load_features(path)


def test_incomplete_flag_refused(tmp_path):
    path, _ = _write(tmp_path / KEY.filename)
    with h5py.File(path, "r+") as fh:
        fh.attrs["complete"] = 0
    with pytest.raises(FeatcacheError, match="incomplete"):
        load_features(path)


def test_nan_features_refused(tmp_path):
    feats = np.ones((4, 3), np.float32)
    feats[2, 1] = np.nan
    key = FeatureKey(**{**KEY.__dict__, "dtype": "float32"})
    path = write_features(tmp_path / key.filename, feats, np.arange(4) % 2, np.arange(4), key, ["a", "b"])
    with pytest.raises(FeatcacheError, match="NaN"):
        load_features(path)


def test_list_resolve_remove(tmp_path):
    path, _ = _write(tmp_path / KEY.filename)
    (tmp_path / "junk.h5").write_bytes(b"nope")
    rows = list_caches(tmp_path)
    assert {r["path"] for r in rows} == {str(path), str(tmp_path / "junk.h5")}
    assert any("error" in r for r in rows)
    assert resolve(tmp_path, KEY.digest) == path
    assert resolve(tmp_path, str(path)) == path
    with pytest.raises(FeatcacheError, match="No cache"):
        resolve(tmp_path, "ffffffffffff")
    cache.remove(path)
    assert not path.exists()


def test_part_store_resume_and_reset(tmp_path):
    final = tmp_path / KEY.filename
    store = PartStore(final, {"key": "k", "n_rows": 10})
    assert store.open() == 0
    store.save(0, np.zeros((4, 2)), np.zeros(4), np.arange(4))
    store.save(1, np.zeros((4, 2)), np.zeros(4), np.arange(4, 8))
    assert PartStore(final, {"key": "k", "n_rows": 10}).open() == 2
    # other settings: old parts are discarded rather than mixed in
    assert PartStore(final, {"key": "k", "n_rows": 11}).open() == 0
    assert json.loads((store.dir / "meta.json").read_text())["n_rows"] == 11


def test_remove_refuses_a_key_being_written_and_keeps_the_lock_file(tmp_path):
    path, _ = _write(tmp_path / KEY.filename)
    lock = cache.lock_for(path)
    with lock:
        with pytest.raises(FeatcacheError, match="being written by another featcache process"):
            cache.remove(path)
    assert path.exists()
    cache.remove(path)
    assert not path.exists() and path.with_name(path.name + ".lock").exists()
