import dataclasses

import numpy as np
import pytest
from conftest import make_npz

from featcache import engines
from featcache.cache import FeatureKey, load_features
from featcache.engines import KerasEngine, TFLiteEngine, auto, check_precision, machine, make_engine, registry, \
    resolve_engine, tflite_path
from featcache.errors import FeatcacheError, InvalidArgument
from featcache.extraction import ExtractOptions, extract
from featcache.settings import FeatureSettings

HAS_OPENVINO = not engines.get_record("openvino").available()
HAS_BF16 = bool(engines.cpu_flags() & set(engines.BF16_FLAGS))


@pytest.fixture(scope="module")
def tiny_model():
    """A few-kilobyte conv net: converts in a second, so artefact tests stay cheap."""
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, x, name="tiny_features")


def _figures(monkeypatch, figures: dict) -> list:
    """Make 'auto' measure the given img/s per engine ('name' or 'name precision'); returns what it timed."""
    timed = []

    def fake(engine, shape, batches=3):
        label = f"{engine.name} {engine.precision}"
        timed.append(label)
        return figures.get(label, figures.get(engine.name))

    monkeypatch.setattr(auto, "measure", fake)
    return timed


def _cpu(monkeypatch, *flags):
    monkeypatch.setattr(machine, "cpu_flags", lambda: set(flags))


def test_registry_and_names():
    assert engines.list_engines() == ["keras", "tflite", "openvino"]
    assert engines.get_record("keras").distributable and not engines.get_record("tflite").distributable
    assert engines.get_record("openvino").precisions == ("f32", "bf16")
    assert resolve_engine("auto") == "auto"
    with pytest.raises(InvalidArgument, match="Unknown engine 'onnx'; expected one of: 'auto', 'keras', 'tflite', 'openvino'"):
        resolve_engine("onnx")


def test_precision_is_checked_against_engine_and_cpu(monkeypatch):
    with pytest.raises(InvalidArgument, match="Unknown precision 'fp8'"):
        check_precision("fp8")
    with pytest.raises(InvalidArgument, match="runs on the openvino engine; received --engine tflite"):
        check_precision("bf16", "tflite")
    _cpu(monkeypatch, "avx2")
    with pytest.raises(FeatcacheError, match="needs a CPU with AMX or AVX512-BF16"):
        check_precision("bf16")
    assert check_precision("auto") == "auto" and check_precision("f32", "tflite") == "f32"


def test_candidates_offer_bf16_only_where_the_cpu_computes_it(monkeypatch):
    _cpu(monkeypatch, "avx2")
    assert ("openvino", "bf16") not in engines.candidates("auto", "auto")
    assert engines.candidates("auto", "auto", gpu=True) == [("keras", "f32")]
    _cpu(monkeypatch, "avx512f", "avx512_bf16")
    pairs = engines.candidates("auto", "auto")
    assert ("keras", "f32") in pairs and ("tflite", "f32") in pairs
    assert (("openvino", "bf16") in pairs) == HAS_OPENVINO
    assert engines.candidates("auto", "bf16") == ([("openvino", "bf16")] if HAS_OPENVINO else [])
    assert engines.candidates("tflite", "auto") == [("tflite", "f32")]


def test_bf16_enters_the_key_and_f32_keeps_old_keys():
    old = FeatureKey("resnet50", "none", 32, "caffe", "avg", "float16", "abc", "train", "orig")
    assert old.digest == FeatureKey(**{**dataclasses.asdict(old), "precision": "f32"}).digest
    import hashlib
    import json

    fields = {k: v for k, v in dataclasses.asdict(old).items() if k not in ("precision", "cut")}
    assert old.digest == hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]  # as before
    assert FeatureKey(**{**dataclasses.asdict(old), "precision": "bf16"}).digest != old.digest
    assert FeatureKey(**{**dataclasses.asdict(old), "cut": "conv4_block6_out"}).digest != old.digest  # only when set


def test_auto_measures_picks_the_fastest_and_caches_the_decision(tiny_model, tmp_path, monkeypatch):
    _cpu(monkeypatch, "avx2")
    timed = _figures(monkeypatch, {"keras": 10.0, "tflite": 30.0, "openvino": 20.0})
    said = []
    engine = make_engine("auto", tiny_model, tmp_path, "tiny", batch_size=2, precision="auto", gpu=False,
                         log=said.append)
    assert engine.name == "tflite" and engine.precision == "f32"
    assert set(timed) == ({"keras f32", "tflite f32", "openvino f32"} if HAS_OPENVINO else {"keras f32", "tflite f32"})
    assert len(said) == 1 and said[0].startswith("auto engine: tflite f32 (30 img/s") and "keras f32 10" in said[0]
    decision = engines.recorded(tmp_path, "tiny")
    assert decision["engine"] == "tflite" and decision["precision"] == "f32" and decision["img_per_s"]["keras f32"] == 10
    timed.clear()
    assert make_engine("auto", tiny_model, tmp_path, "tiny", batch_size=2, precision="auto", gpu=False).name == "tflite"
    assert timed == [], "a cached decision is not measured again"


@pytest.mark.skipif(not HAS_OPENVINO, reason="openvino is not installed")
def test_auto_chooses_the_precision_too(tiny_model, tmp_path, monkeypatch):
    _cpu(monkeypatch, "avx512f", "amx_bf16")
    _figures(monkeypatch, {"keras f32": 10.0, "tflite f32": 30.0, "openvino f32": 20.0, "openvino bf16": 90.0})
    engine = make_engine("auto", tiny_model, tmp_path, "tiny", batch_size=2, precision="auto", gpu=False)
    assert (engine.name, engine.precision) == ("openvino", "bf16")
    assert engines.recorded(tmp_path, "tiny")["precision"] == "bf16"
    f32 = make_engine("auto", tiny_model, tmp_path, "tiny", batch_size=2, precision="f32", gpu=False)
    assert (f32.name, f32.precision) == ("tflite", "f32"), "an f32 run chooses among f32 engines, separately"


def test_auto_is_never_slower_than_keras(tiny_model, tmp_path, monkeypatch):
    _figures(monkeypatch, {"keras": 50.0, "tflite": 30.0, "openvino": 20.0})
    assert make_engine("auto", tiny_model, tmp_path, "tiny", batch_size=2, precision="auto", gpu=False).name == "keras"


def test_auto_converts_only_when_the_work_repays_it(tiny_model, tmp_path, monkeypatch):
    timed = _figures(monkeypatch, {"keras": 10.0, "tflite": 30.0, "openvino": 20.0})
    assert make_engine("auto", tiny_model, tmp_path, "tiny", batch_size=2, rows=50, gpu=False).name == "keras"
    assert timed == ["keras f32"] and not list(tmp_path.iterdir())  # nothing converted, no decision kept
    assert make_engine("auto", tiny_model, tmp_path, "tiny", batch_size=2, gpu=True).name == "keras"


def test_auto_falls_back_to_keras_when_conversion_fails(tiny_model, tmp_path, monkeypatch):
    def fail(model, path):
        raise FeatcacheError("TFLite conversion of tiny failed (ConverterError); use --engine keras.")

    for name in ("tflite", "openvino"):
        monkeypatch.setitem(registry._REGISTRY, name, dataclasses.replace(engines.get_record(name), convert=fail))
    _figures(monkeypatch, {"keras": 10.0, "tflite": 30.0, "openvino": 20.0})
    assert make_engine("auto", tiny_model, tmp_path, "tiny", batch_size=2, precision="auto", gpu=False).name == "keras"
    with pytest.raises(FeatcacheError, match="conversion of tiny failed"):
        make_engine("tflite", tiny_model, tmp_path, "tiny", batch_size=2)


@pytest.mark.parametrize("name", ["tflite", "openvino"])
def test_engine_matches_keras_with_a_smaller_last_batch(tiny_model, tmp_path, name):
    if name == "openvino" and not HAS_OPENVINO:
        pytest.skip("openvino is not installed")
    engine = make_engine(name, tiny_model, tmp_path, "tiny", batch_size=4)
    assert engine.name == name and engine.precision == "f32"
    images = np.random.default_rng(1).uniform(-1, 1, (10, 8, 8, 3)).astype(np.float32)
    batches = [images[0:4], images[4:8], images[8:10], images[0:4]]  # small last batch, then full again
    got = np.concatenate([engine(b) for b in batches])
    expected = np.concatenate([KerasEngine(tiny_model)(b) for b in batches])
    assert got.shape == (14, 4) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not (HAS_OPENVINO and HAS_BF16), reason="needs openvino and a CPU with AMX or AVX512-BF16")
def test_openvino_bf16_within_its_documented_tolerance(tiny_model, tmp_path):
    engine = make_engine("openvino", tiny_model, tmp_path, "tiny", batch_size=4, precision="bf16")
    x = np.random.default_rng(2).uniform(-1, 1, (4, 8, 8, 3)).astype(np.float32)
    expected = KerasEngine(tiny_model)(x)
    got = engine(x)
    assert engine.precision == "bf16"
    # bf16 keeps 8 bits of mantissa: a few per cent per value (documented in README)
    np.testing.assert_allclose(got, expected, rtol=0.05, atol=0.02 * np.abs(expected).max())
    np.testing.assert_array_equal(engine(x), got)  # deterministic: a resume is bit-identical


def test_artefacts_are_converted_once_and_written_atomically(tiny_model, tmp_path, monkeypatch):
    names = ["tflite"] + (["openvino"] if HAS_OPENVINO else [])
    for name in names:
        make_engine(name, tiny_model, tmp_path, "tiny", batch_size=2)
    path = tflite_path(tiny_model, tmp_path, "tiny")
    assert path.exists() and not [p for p in tmp_path.iterdir() if ".tmp" in p.name]  # no temporaries left
    assert len(list(tmp_path.iterdir())) == len(names)

    def no_conversion(*a, **k):
        raise AssertionError("converted again")

    for name in names:
        monkeypatch.setitem(registry._REGISTRY, name,
                            dataclasses.replace(engines.get_record(name), convert=no_conversion))
        assert make_engine(name, tiny_model, tmp_path, "tiny", batch_size=2).name == name


def test_damaged_artefact_is_converted_again(tiny_model, tmp_path):
    path = tflite_path(tiny_model, tmp_path, "tiny")
    path.write_bytes(b"not a flatbuffer")
    engine = make_engine("tflite", tiny_model, tmp_path, "tiny", batch_size=2)
    x = np.ones((2, 8, 8, 3), np.float32)
    np.testing.assert_allclose(engine(x), KerasEngine(tiny_model)(x), rtol=1e-5, atol=1e-6)
    assert path.stat().st_size > 100


@pytest.mark.parametrize("name", ["tflite", "openvino"])
def test_extraction_with_each_engine_equals_keras_and_records_it(tmp_path, name):
    """MobileNetV2 at 32 (random weights, seeded; small, so it converts fast): 12 + 6 rows in batches of 5
    (last batches of 2 and 1)."""
    if name == "openvino" and not HAS_OPENVINO:
        pytest.skip("openvino is not installed")
    data = make_npz(tmp_path / "d.npz")
    results = {}
    for engine in ("keras", name):
        settings = FeatureSettings(backbone="mobilenetv2", weights="none", data=str(data), size=32, dtype="float32",
                                   cache_dir=str(tmp_path / engine), precision="f32")
        paths = extract(settings, ExtractOptions(progress=False, batch_size=5, chunk_rows=5, engine=engine),
                        log=lambda m: None)
        results[engine] = [load_features(p) for p in paths]
    for keras_set, other in zip(results["keras"], results[name]):
        assert keras_set.path.name == other.path.name  # the engine is not part of the key
        assert keras_set.attrs["engine"] == "keras" and other.attrs["engine"] == name
        assert other.attrs["precision"] == "f32"
        assert np.array_equal(keras_set.indices, other.indices)
        scale = np.abs(keras_set.features).max()
        np.testing.assert_allclose(other.features, keras_set.features, rtol=1e-4, atol=1e-5 * scale)
    assert list((tmp_path / name / "engines").glob("mobilenetv2-32-avg-none-*"))
