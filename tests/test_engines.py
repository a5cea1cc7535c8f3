import numpy as np
import pytest
from conftest import make_npz

from featcache import engines
from featcache.cache import load_features
from featcache.engines import KerasEngine, TFLiteEngine, make_engine, resolve_engine, tflite_path
from featcache.errors import InvalidArgument
from featcache.extraction import ExtractOptions, extract
from featcache.settings import FeatureSettings


@pytest.fixture(scope="module")
def tiny_model():
    """A few-kilobyte conv net: converts in a second, so artefact tests stay cheap."""
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, x, name="tiny_features")


def test_resolve_engine_checks_names_and_picks_by_device():
    assert resolve_engine("auto") == engines.CPU_ENGINE == "tflite"
    assert resolve_engine("auto", gpu=True) == "keras"
    assert resolve_engine("tflite", gpu=True) == "tflite"
    with pytest.raises(InvalidArgument, match="Unknown engine 'onnx'; expected one of: 'auto', 'keras', 'tflite'"):
        resolve_engine("onnx")


def test_auto_converts_only_when_the_work_repays_it(tiny_model, tmp_path):
    assert make_engine("auto", tiny_model, tmp_path, "tiny", batch_size=2, rows=50).name == "keras"
    assert not list(tmp_path.iterdir())
    assert make_engine("auto", tiny_model, tmp_path, "tiny", batch_size=2, rows=None).name == "tflite"
    # once an artefact exists, even a small job uses it
    assert make_engine("auto", tiny_model, tmp_path, "tiny", batch_size=2, rows=50).name == "tflite"
    assert make_engine("keras", tiny_model, tmp_path, "tiny", batch_size=2).name == "keras"


def test_auto_falls_back_to_keras_when_conversion_fails(tiny_model, tmp_path, monkeypatch):
    def fail(model, path):
        raise engines.FeatcacheError("TFLite conversion of tiny failed (ConverterError); use --engine keras.")

    monkeypatch.setattr(engines, "convert_to_tflite", fail)
    assert make_engine("auto", tiny_model, tmp_path, "tiny", batch_size=2).name == "keras"
    with pytest.raises(engines.FeatcacheError, match="conversion of tiny failed"):
        make_engine("tflite", tiny_model, tmp_path, "tiny", batch_size=2)


def test_tflite_matches_keras_with_a_smaller_last_batch(tiny_model, tmp_path):
    engine = make_engine("tflite", tiny_model, tmp_path, "tiny", batch_size=4)
    assert isinstance(engine, TFLiteEngine)
    images = np.random.default_rng(1).uniform(-1, 1, (10, 8, 8, 3)).astype(np.float32)
    batches = [images[0:4], images[4:8], images[8:10], images[0:4]]  # small last batch, then full again
    got = np.concatenate([engine(b) for b in batches])
    expected = np.concatenate([KerasEngine(tiny_model)(b) for b in batches])
    assert got.shape == (14, 4) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_artefact_is_converted_once_and_written_atomically(tiny_model, tmp_path, monkeypatch):
    make_engine("tflite", tiny_model, tmp_path, "tiny", batch_size=2)
    path = tflite_path(tiny_model, tmp_path, "tiny")
    assert path.exists() and [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporaries left

    def no_conversion(*a, **k):
        raise AssertionError("converted again")

    monkeypatch.setattr(engines, "convert_to_tflite", no_conversion)
    assert make_engine("tflite", tiny_model, tmp_path, "tiny", batch_size=2).name == "tflite"


def test_damaged_artefact_is_converted_again(tiny_model, tmp_path):
    path = tflite_path(tiny_model, tmp_path, "tiny")
    path.write_bytes(b"not a flatbuffer")
    engine = make_engine("tflite", tiny_model, tmp_path, "tiny", batch_size=2)
    x = np.ones((2, 8, 8, 3), np.float32)
    np.testing.assert_allclose(engine(x), KerasEngine(tiny_model)(x), rtol=1e-5, atol=1e-6)
    assert path.stat().st_size > 100


def test_extraction_with_tflite_equals_keras_and_records_the_engine(tmp_path):
    """MobileNetV2 at 32 (random weights, seeded; small, so it converts fast): 12 + 6 rows in batches of 5
    (last batches of 2 and 1)."""
    data = make_npz(tmp_path / "d.npz")
    results = {}
    for name in ("keras", "tflite"):
        settings = FeatureSettings(backbone="mobilenetv2", weights="none", data=str(data), size=32, dtype="float32",
                                   cache_dir=str(tmp_path / name))
        paths = extract(settings, ExtractOptions(progress=False, batch_size=5, chunk_rows=5, engine=name),
                        log=lambda m: None)
        results[name] = [load_features(p) for p in paths]
    for keras_set, tflite_set in zip(results["keras"], results["tflite"]):
        assert keras_set.path.name == tflite_set.path.name  # the engine is not part of the key
        assert keras_set.attrs["engine"] == "keras" and tflite_set.attrs["engine"] == "tflite"
        assert np.array_equal(keras_set.indices, tflite_set.indices)
        scale = np.abs(keras_set.features).max()
        np.testing.assert_allclose(tflite_set.features, keras_set.features, rtol=1e-4, atol=1e-5 * scale)
    assert list((tmp_path / "tflite" / "engines").glob("mobilenetv2-32-avg-none-*.tflite"))
