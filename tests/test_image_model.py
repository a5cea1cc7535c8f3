"""The image model of a run: the cached features recomputed, every view and backbone, refusals by name."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import tiny
from featcache import image_model
from featcache.errors import FeatcacheError
from featcache.runs import load_run

tiny.register_tiny()


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("image_model")
    data = tiny.make_data(root / "data", n_train=10, n_test=1)
    settings = tiny.tiny_settings(data, root / "cache", "tiny_a+tiny_b", ("orig", "flip"))
    return {"run": tiny.head_run(settings, "mlp"), "cache_dir": root / "cache", "data": data}


def test_head_image_model_computes_the_cached_features(made):
    """The rebuilt backbone(s) of a concatenated two-view head give the cached features of its images."""
    from featcache.cache import load_features
    from featcache.lookup import locate
    from featcache.run_images import validation_images

    run = made["run"]
    model = image_model.build_image_model(run, made["cache_dir"])
    assert [l.name for l in model.layers if type(l).__name__ == "Preprocess"] == [
        "preprocess_0_orig", "preprocess_1_orig", "preprocess_0_flip", "preprocess_1_flip"]
    images, _ = validation_images(run, made["cache_dir"])
    settings = tiny.tiny_settings(made["data"], made["cache_dir"], "tiny_a+tiny_b")
    cached = [load_features(locate(settings, b, "train", "flip")) for b in ("tiny_a", "tiny_b")]
    features = keras.Model(model.input, model.get_layer("features_flip").output)
    x = np.stack([images.image(i) for i in range(4)]).astype(np.float32)
    got = np.asarray(features(x))
    rows = [int(np.flatnonzero(cached[0].indices == r)[0]) for r in images.rows[:4]]
    want = np.concatenate([c.features[rows].astype(np.float32) for c in cached], axis=1)
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2)


def test_changed_preprocessing_or_weights_are_refused_by_name(made):
    run = load_run(made["cache_dir"], made["run"].run_id)
    record = dict(run.record)
    record["caches"] = [{**c, "preprocess": "test:other"} for c in record["caches"]]
    run.record = record
    with pytest.raises(FeatcacheError, match=r"trained on tiny_a features preprocessed as 'test:other', but tiny_a "
                                             r"now preprocesses as 'test:\[-1,1\]\|resize:bilinear'"):
        image_model.build_image_model(run, made["cache_dir"])
    fresh = load_run(made["cache_dir"], run.run_id)
    fresh.record["caches"] = [{**c, "weights": "imagenet"} for c in fresh.record["caches"]]
    with pytest.raises(FeatcacheError, match="trained on tiny_a weights imagenet, but 'none' is now none"):
        image_model.build_image_model(fresh, made["cache_dir"])
    bare = load_run(made["cache_dir"], run.run_id)
    bare.record.pop("caches")
    with pytest.raises(FeatcacheError, match="does not record the tiny_a cache it was trained on"):
        image_model.build_image_model(bare, made["cache_dir"])
