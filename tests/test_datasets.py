import numpy as np
import pytest
from conftest import make_npz

from featcache.datasets import load_dataset, stratified_subset, validation_split
from featcache.errors import FeatcacheError, InvalidArgument


def test_missing_path(tmp_path, cache_dir):
    with pytest.raises(FeatcacheError, match="not found"):
        load_dataset(tmp_path / "nope", cache_dir)


def test_npz_loads_and_fingerprints(tmp_path, cache_dir):
    ds = load_dataset(make_npz(tmp_path / "d.npz"), cache_dir)
    assert ds["train"].images.shape == (12, 8, 8, 3) and ds.class_names == ["0", "1", "2"]
    assert len(ds["train"].fingerprint) == 16


@pytest.mark.parametrize("override, message", [
    ({"y_train": np.arange(11) % 3}, "12 images but y_train has 11"),
    ({"y_test": np.array([0, 1, -1, 0, 1, 2])}, "negative label"),
    ({"y_test": np.array([0, 1, 5, 0, 1, 2]), "class_names": np.array(["a", "b", "c"])}, "out of range"),
    ({"x_train": np.zeros((12, 8), np.uint8)}, "shape"),
    ({"y_train": np.array(list("abcabcabcabc"))}, "labels must be integer class indices"),
    ({"y_train": (np.arange(12) % 3).astype(complex)}, "complex128 values"),
    ({"y_train": np.arange(12) % 3 == 0}, "bool values"),
    ({"y_train": np.arange(12) % 3 + 0.5}, "non-integer labels"),
    ({"y_train": np.where(np.arange(12) == 0, 50_000, np.arange(12) % 3)}, "labels run up to 50000"),
    ({"y_train": np.where(np.arange(12) == 0, 1_000_000, np.arange(12) % 3)}, "at most 100000 classes"),
    ({"y_train": np.zeros(12, int), "y_test": np.zeros(6, int)}, "single training class"),
    ({"y_train": np.arange(12) % 2, "class_names": np.array(["a", "b", "c"])}, "c have no training images"),
    ({"x_train": np.full((12, 8, 8, 3), 300.0)}, "from 300 to 300"),
    ({"x_train": np.full((12, 8, 8, 3), np.nan)}, "NaN"),
    ({"x_train": np.full((12, 8, 8, 3), "a")}, "images must be uint8 or float"),
])
def test_npz_bad_input(tmp_path, cache_dir, override, message):
    with pytest.raises(FeatcacheError, match=message):
        load_dataset(make_npz(tmp_path / "d.npz", **override), cache_dir)


def test_npz_float_ranges_are_defined(tmp_path, cache_dir):
    rng = np.random.default_rng(0)
    unit = rng.random((12, 8, 8, 3))
    ds = load_dataset(make_npz(tmp_path / "unit.npz", x_train=unit), cache_dir)
    assert np.array_equal(ds["train"].images, np.rint(unit * 255).astype(np.uint8))
    assert ds["train"].images.max() > 200  # scaled, not rounded to 0/1
    wide = unit * 255
    ds = load_dataset(make_npz(tmp_path / "wide.npz", x_train=wide), cache_dir)
    assert np.array_equal(ds["train"].images, np.rint(wide).astype(np.uint8))


def test_npz_greyscale_becomes_rgb(tmp_path, cache_dir):
    grey = np.random.default_rng(0).integers(0, 255, (12, 8, 8), dtype=np.uint8)
    ds = load_dataset(make_npz(tmp_path / "d.npz", x_train=grey), cache_dir)
    assert ds["train"].images.shape == (12, 8, 8, 3)


def test_validation_split_stratified_seeded():
    labels = np.repeat(np.arange(4), 50)
    train, val = validation_split(labels, 0.1, seed=3)
    assert len(val) == 20 and np.bincount(labels[val]).tolist() == [5, 5, 5, 5]
    assert not set(train) & set(val) and len(train) + len(val) == 200
    again = validation_split(labels, 0.1, seed=3)
    assert np.array_equal(again[1], val)
    assert not np.array_equal(validation_split(labels, 0.1, seed=4)[1], val)
    with pytest.raises(InvalidArgument):
        validation_split(labels, 1.5)


def test_stratified_subset_keeps_class_mix():
    labels = np.repeat(np.arange(5), 40)
    rows = stratified_subset(labels, 50)
    assert np.bincount(labels[rows]).tolist() == [10] * 5


def test_digits_builtin(cache_dir):
    ds = load_dataset("digits", cache_dir)
    assert ds["train"].images.dtype == np.uint8 and ds["train"].images.shape[1:] == (8, 8, 3)
    assert len(ds["train"]) + len(ds["test"]) == 1797 and len(ds.class_names) == 10


def test_cifar10_offline_names_the_url_the_reason_and_local_copies(cache_dir, monkeypatch):
    import keras

    def offline():
        try:
            raise OSError("[Errno -2] Name or service not known")
        except OSError as exc:
            raise Exception("URL fetch failure") from exc

    monkeypatch.setattr(keras.datasets.cifar10, "load_data", offline)
    with pytest.raises(FeatcacheError, match=r"cs.toronto.edu.*Name or service not known.*cifar10-jpeg.tar.gz"):
        load_dataset("cifar10", cache_dir)


