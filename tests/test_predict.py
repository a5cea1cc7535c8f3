"""``predict``: top-k classes for image files of any size and colour mode; one-line errors."""

import json
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from featcache.errors import FeatcacheError, InvalidArgument
from featcache.finetuning import FinetuneConfig, Source, build_model
from featcache.prediction import Predictor, load_model, predict, read_image

CLASSES = ["cat", "dog", "frog"]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    """A featcache model as `finetune` saves it (random resnet50 at 32 px, a random head), untrained."""
    folder = tmp_path_factory.mktemp("predict")
    source = Source(backbone="resnet50", weights="none", size=32, pooling="avg",
                    preprocess="caffe:bgr-mean|resize:bilinear", width=2048, class_names=CLASSES)
    keras.utils.set_random_seed(1)
    features = keras.Input((2048,))
    head = keras.Model(features, keras.layers.Dense(3, activation="softmax")(
        keras.layers.Normalization(mean=0.5, variance=4.0)(features)))
    model, _ = build_model(source, head, FinetuneConfig(), str(folder))
    path = folder / "model.keras"
    model.save(path)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """PNG and JPEG files of odd sizes: RGB, greyscale, RGBA and palette."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = {
        "rgb.jpg": Image.fromarray(rng.integers(0, 255, (37, 53, 3), dtype=np.uint8)),
        "grey.png": Image.fromarray(rng.integers(0, 255, (91, 20), dtype=np.uint8), "L"),
        "rgba.png": Image.fromarray(rng.integers(0, 255, (17, 29, 4), dtype=np.uint8), "RGBA"),
        "palette.png": Image.fromarray(rng.integers(0, 255, (45, 31, 3), dtype=np.uint8)).convert("P"),
    }
    for name, image in paths.items():
        image.save(folder / name)
    return {name: folder / name for name in paths}


def test_top_k_for_any_size_and_mode(model_path, images):
    predictor = Predictor(model_path)
    model = predictor.model
    assert predictor.class_names == CLASSES
    for path in images.values():
        result = predictor.top_k(path, 2)
        assert result.path == str(path) and len(result.classes) == 2 and set(result.classes) <= set(CLASSES)
        assert result.probabilities[0] >= result.probabilities[1] >= 0.0
        pixels = read_image(path).astype(np.float32)[None]  # the training decoder (tests/test_decoding.py)
        expected = np.asarray(model(pixels, training=False))[0]
        assert result.classes[0] == CLASSES[int(expected.argmax())]
        np.testing.assert_allclose(result.probabilities[0], expected.max(), rtol=1e-5, atol=1e-6)
    grey = read_image(images["grey.png"])
    assert grey.shape == (91, 20, 3) and np.array_equal(grey[..., 0], grey[..., 2])
    assert len(predictor.top_k(images["rgb.jpg"], 10).classes) == 3  # capped at the number of classes


def test_not_a_featcache_model(tmp_path, images):
    junk = tmp_path / "junk.keras"
    junk.write_text("not a model")
    with pytest.raises(FeatcacheError, match="junk.keras is not a featcache model"):
        load_model(junk)
    with pytest.raises(FeatcacheError, match="does not exist"):
        load_model(tmp_path / "missing.keras")
    inputs = keras.Input((4,))
    plain = tmp_path / "plain.keras"
    keras.Model(inputs, keras.layers.Dense(2)(inputs)).save(plain)
    with pytest.raises(FeatcacheError, match="a Keras model but not a featcache model"):
        predict(plain, [images["rgb.jpg"]])


def test_unreadable_image(model_path, tmp_path, images):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(FeatcacheError, match="Cannot read image .*broken.png"):
        predict(model_path, [images["rgb.jpg"], broken])
    with pytest.raises(FeatcacheError, match="missing.jpg does not exist"):
        read_image(tmp_path / "missing.jpg")
    with pytest.raises(InvalidArgument, match="--top-k"):
        predict(model_path, [images["rgb.jpg"]], top_k=0)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "featcache", "predict", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def test_cli_prints_top_k_and_one_line_errors(model_path, images, tmp_path):
    ok = run_cli(model_path, images["rgb.jpg"], images["grey.png"], "--top-k", "2")
    assert ok.returncode == 0, ok.stderr[-2000:]
    lines = ok.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[1].startswith(f"{images['grey.png']}: ")
    assert all(len([w for w in line.split(": ", 1)[1].split() if w in CLASSES]) == 2 for line in lines)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not a jpeg")
    for args, message in (([model_path, broken], "Cannot read image"),
                          ([images["rgb.jpg"], images["rgb.jpg"]], "is not a featcache model")):
        bad = run_cli(*args)
        errors = [l for l in bad.stderr.splitlines() if l.startswith("featcache: error:")]
        assert bad.returncode == 1 and len(errors) == 1 and message in errors[0], bad.stderr[-2000:]
        assert "Traceback" not in bad.stderr


# --- a run, its .keras and .tflite exports and its SavedModel agree ------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny head run with keras, tflite and savedmodel exports; the test images."""
    import tiny
    from featcache.exporters import ExportOptions, export_run

    tiny.register_tiny()
    root = tmp_path_factory.mktemp("forms")
    data = tiny.make_data(root / "data", n_train=20, n_test=4)
    run = tiny.head_run(tiny.tiny_settings(data, root / "cache"), "mlp")
    paths = {fmt: export_run(run.run_id, root / "cache", ExportOptions(format=fmt), log=lambda m: None)["path"]
             for fmt in ("keras", "tflite", "savedmodel")}
    return run, root / "cache", paths, sorted((data / "test").glob("*/*"))


def test_a_run_and_its_exports_agree_on_top_1(exported):
    run, cache_dir, paths, test_images = exported
    by_form = {"run id": predict(run.run_id[-12:], test_images, top_k=3, cache_dir=cache_dir),
               "run folder": predict(run.path, test_images, top_k=3)}
    by_form.update({fmt: predict(path, test_images, top_k=3) for fmt, path in paths.items()})
    first = {form: [r.classes[0] for r in results] for form, results in by_form.items()}
    assert len({tuple(v) for v in first.values()}) == 1, first
    truth = [p.parent.name for p in test_images]
    assert np.mean(np.array(first["run id"]) == np.array(truth)) >= 0.9
    for results in by_form.values():
        for result, reference in zip(results, by_form["run id"]):
            np.testing.assert_allclose(result.probabilities, reference.probabilities, atol=1e-3)
            assert result.classes == reference.classes


def test_forms_that_cannot_predict(exported, tmp_path):
    run, cache_dir, paths, test_images = exported
    lonely = tmp_path / "lonely.tflite"
    lonely.write_bytes(Path(paths["tflite"]).read_bytes())
    with pytest.raises(FeatcacheError, match="lonely.tflite has no labels.txt beside it"):
        predict(lonely, test_images[:1])
    with pytest.raises(FeatcacheError, match="head.keras is a Keras model but not a featcache model .* give its run id"):
        predict(run.path / "head.keras", test_images[:1])
    with pytest.raises(FeatcacheError, match="'nosuchrun' is neither a model file nor a run in"):
        predict("nosuchrun", test_images[:1], cache_dir=cache_dir)
    with pytest.raises(FeatcacheError, match="Model file .*missing.tflite does not exist"):
        predict(tmp_path / "missing.tflite", test_images[:1])


def test_cli_json_for_a_run_id(exported):
    run, cache_dir, paths, test_images = exported
    done = subprocess.run([sys.executable, str(Path(__file__).parent / "tiny.py"), "predict", run.run_id,
                           *map(str, test_images[:2]), "--cache-dir", str(cache_dir), "--json", "-k", "2"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(done.stdout)
    assert [r["path"] for r in results] == [str(p) for p in test_images[:2]]
    assert all(len(r["classes"]) == 2 and r["probabilities"][0] >= r["probabilities"][1] for r in results)
