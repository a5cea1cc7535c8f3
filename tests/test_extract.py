import json

import h5py
import numpy as np
import pytest
from conftest import make_npz

import featcache.backbones
from featcache.cache import PartStore, load_features
from featcache.datasets import load_dataset
from featcache.errors import FeatcacheError, InvalidArgument
from featcache.extraction import ExtractOptions, extract
from featcache.settings import FeatureSettings

QUIET = ExtractOptions(progress=False, batch_size=4, chunk_rows=8)


def settings(data, cache_dir, **kw):
    return FeatureSettings(**{"backbone": "resnet50", "weights": "none", "data": str(data), "size": 32,
                              "cache_dir": str(cache_dir), **kw})


def test_features_written_with_attributes(image_folder, cache_dir):
    paths = extract(settings(image_folder, cache_dir), QUIET, log=lambda m: None)
    assert [p.name.split("-")[2] for p in paths] == ["train", "test"]
    with h5py.File(paths[0]) as fh:
        assert fh.attrs["backbone"] == "resnet50" and fh.attrs["size"] == 32
        assert fh["features"].shape == (18, 2048) and fh["features"].dtype == np.float16
        assert fh.attrs["complete"] == 1
    train = load_features(paths[0])
    assert np.array_equal(train.indices, np.arange(18))
    assert train.class_names == ["cat", "dog", "frog"]
    assert not list(cache_dir.glob("*.parts"))


def test_second_call_reuses_without_building(image_folder, cache_dir, monkeypatch):
    first = extract(settings(image_folder, cache_dir), QUIET, log=lambda m: None)
    stamps = [p.stat().st_mtime_ns for p in first]

    def no_build(*a, **k):
        raise AssertionError("backbone built on a warm cache")

    monkeypatch.setattr(featcache.backbones, "create_backbone", no_build)
    messages = []
    again = extract(settings(image_folder, cache_dir), QUIET, log=messages.append)
    assert again == first and [p.stat().st_mtime_ns for p in again] == stamps
    assert all("reusing" in m for m in messages)


def test_features_match_the_model_on_preprocessed_images(tmp_path, cache_dir):
    import tensorflow as tf

    from featcache.backbones import create_backbone
    from featcache.preprocessing import prepare_batch

    model = create_backbone("resnet50", None, 32)
    weights = tmp_path / "resnet50.weights.h5"
    model.layers[1].save_weights(weights)
    data = make_npz(tmp_path / "d.npz")
    path = extract(settings(data, cache_dir, dtype="float32", weights=str(weights)), QUIET, log=lambda m: None)[0]
    ds = load_dataset(str(data), cache_dir)
    expected = model(prepare_batch(tf.constant(ds["train"].images), "resnet50", 32)).numpy()
    cached = load_features(path)
    assert cached.key.weights.startswith("file:sha256:")
    np.testing.assert_allclose(cached.features, expected, rtol=1e-4, atol=1e-4)


def test_flip_view_is_a_separate_key(image_folder, cache_dir):
    paths = extract(settings(image_folder, cache_dir, views=("orig", "flip")),
                    ExtractOptions(progress=False, splits=("test",)), log=lambda m: None)
    orig, flip = (load_features(p) for p in paths)
    assert orig.key.view == "orig" and flip.key.view == "flip" and orig.key.digest != flip.key.digest
    assert not np.allclose(orig.features, flip.features)


def test_interrupted_extraction_resumes_bit_identical(image_folder, cache_dir, tmp_path, monkeypatch):
    clean_dir = tmp_path / "clean"
    clean = load_features(extract(settings(image_folder, clean_dir), QUIET, log=lambda m: None)[0])

    real_save = PartStore.save
    calls = {"n": 0}

    def crash_after_two(self, i, *arrays):
        if calls["n"] == 2:
            raise KeyboardInterrupt
        calls["n"] += 1
        return real_save(self, i, *arrays)

    monkeypatch.setattr(PartStore, "save", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        extract(settings(image_folder, cache_dir), QUIET, log=lambda m: None)
    assert not list(cache_dir.glob("*.h5")) and len(list(cache_dir.glob("*.parts/chunk-*.npz"))) == 2
    monkeypatch.setattr(PartStore, "save", real_save)
    messages = []
    resumed = load_features(extract(settings(image_folder, cache_dir), QUIET, log=messages.append)[0])
    assert any("resuming" in m and "row 16/18" in m for m in messages)
    assert np.array_equal(resumed.features, clean.features) and resumed.key == clean.key


@pytest.mark.parametrize("name, size", [("xception", 71), ("inceptionv3", 75), ("vgg19", 32),
                                        ("efficientnetv2s", 32)])
def test_named_backbones_end_to_end(tmp_path, cache_dir, name, size):
    data = make_npz(tmp_path / "d.npz", n_train=6, n_test=3)
    paths = extract(settings(data, cache_dir, backbone=name, size=size), QUIET, log=lambda m: None)
    loaded = load_features(paths[0])
    assert loaded.features.shape == (6, featcache.backbones.get_spec(name).width)
    assert loaded.key.backbone == name and loaded.key.size == size


@pytest.mark.parametrize("kw, error, message", [
    ({"backbone": "resnet51"}, InvalidArgument, "Unknown backbone"),
    ({"backbone": "xception", "size": 64}, InvalidArgument, "below the minimum of xception"),
    ({"views": ("sideways",)}, InvalidArgument, "Unknown view"),
    ({"dtype": "int8"}, InvalidArgument, "Unknown dtype"),
])
def test_bad_settings_fail_before_any_work(image_folder, cache_dir, kw, error, message):
    with pytest.raises(error, match=message):
        extract(settings(image_folder, cache_dir, **kw), QUIET, log=lambda m: None)
    assert not any(cache_dir.iterdir())


def test_nan_features_stop_extraction_without_a_cache_file(tmp_path, cache_dir, monkeypatch):
    from featcache import engines

    class NaNEngine:
        name, precision = "keras", "f32"

        def __call__(self, batch):
            out = np.ones((batch.shape[0], 2048), np.float32)
            out[0, 0] = np.nan
            return out

    monkeypatch.setattr(engines, "make_engine", lambda *a, **k: NaNEngine())
    with pytest.raises(FeatcacheError, match="NaN or infinite"):
        extract(settings(make_npz(tmp_path / "d.npz"), cache_dir), QUIET, log=lambda m: None)
    assert not list(cache_dir.glob("*.h5"))


def test_skipped_images_are_counted_and_recorded_in_the_cache(image_folder, cache_dir):
    bad = image_folder / "train" / "dog" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(FeatcacheError, match="broken.png"):
        extract(settings(image_folder, cache_dir), QUIET, log=lambda m: None)
    assert not list(cache_dir.glob("*.h5"))
    messages = []
    paths = extract(settings(image_folder, cache_dir, skip_corrupt=True), QUIET, log=messages.append)
    train = next(p for p in paths if "-train-" in p.name)
    with h5py.File(train) as fh:
        assert json.loads(fh.attrs["skipped_files"]) == [str(bad)] and fh.attrs["n_rows"] == 18
    assert any("skipped 1 unreadable file(s)" in m for m in messages), messages


HAS_BF16_OPENVINO = False
try:
    from featcache.engines import get_record as _record, native_bf16 as _native_bf16

    HAS_BF16_OPENVINO = not _record("openvino").available() and _native_bf16()
except ImportError:
    pass


def test_pixels_feed_records_itself_and_equals_the_prepared_feed(image_folder, cache_dir, tmp_path, monkeypatch):
    fed = load_features(extract(settings(image_folder, cache_dir, dtype="float32"), QUIET, log=lambda m: None)[0])
    assert fed.attrs["feed"] == "pixels 16x16"
    monkeypatch.setattr("featcache.feeding.fed_as_stored", lambda data, distributed: None)
    prepared = load_features(extract(settings(image_folder, tmp_path / "p", dtype="float32"), QUIET,
                                     log=lambda m: None)[0])
    assert prepared.attrs["feed"] == "prepared" and prepared.path.name == fed.path.name
    np.testing.assert_allclose(fed.features, prepared.features, rtol=1e-4, atol=1e-4)


def test_auto_precision_reuses_the_precision_already_cached(image_folder, cache_dir, monkeypatch):
    """Caches made in f32 are reused by '--precision auto' even where this machine would choose bf16."""
    first = extract(settings(image_folder, cache_dir, precision="f32"), QUIET, log=lambda m: None)
    monkeypatch.setattr("featcache.engines.recorded", lambda *a, **k: {"engine": "openvino", "precision": "bf16"})

    def no_build(*a, **k):
        raise AssertionError("the backbone was built")

    monkeypatch.setattr(featcache.backbones, "create_backbone", no_build)
    assert extract(settings(image_folder, cache_dir), QUIET, log=lambda m: None) == first


@pytest.mark.skipif(not HAS_BF16_OPENVINO, reason="needs openvino and a CPU with AMX or AVX512-BF16")
def test_bf16_extraction_is_its_own_key_and_resumes_bit_identical(image_folder, cache_dir, tmp_path, monkeypatch):
    opts = ExtractOptions(progress=False, batch_size=4, chunk_rows=8, engine="openvino")
    f32 = load_features(extract(settings(image_folder, tmp_path / "f32", precision="f32"), opts,
                                log=lambda m: None)[0])
    clean = load_features(extract(settings(image_folder, tmp_path / "clean", precision="bf16"), opts,
                                  log=lambda m: None)[0])
    assert clean.attrs["precision"] == "bf16" and clean.path.name != f32.path.name
    scale = np.abs(f32.features.astype(np.float32)).max()
    np.testing.assert_allclose(clean.features, f32.features, rtol=0.05, atol=0.02 * scale)  # README's tolerance
    real_save = PartStore.save
    calls = {"n": 0}

    def crash_after_one(self, i, *arrays):
        if calls["n"] == 1:
            raise KeyboardInterrupt
        calls["n"] += 1
        return real_save(self, i, *arrays)

    monkeypatch.setattr(PartStore, "save", crash_after_one)
    with pytest.raises(KeyboardInterrupt):
        extract(settings(image_folder, cache_dir, precision="bf16"), opts, log=lambda m: None)
    monkeypatch.setattr(PartStore, "save", real_save)
    messages = []
    resumed = load_features(extract(settings(image_folder, cache_dir), opts, log=messages.append)[0])
    assert any("resuming" in m for m in messages), "'auto' resumes the bf16 chunks in bf16"
    assert resumed.path.name == clean.path.name
    np.testing.assert_array_equal(resumed.features, clean.features)
