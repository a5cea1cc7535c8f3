"""Heads from cached features: each kind learns, data assembly is checked, runs are written, CLI works.

Caches are small synthetic gaussian blobs written with ``write_features`` under the
attributes ``lookup`` matches on; no backbone is ever built.
"""

from __future__ import annotations

import functools
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from featcache.cache import FeatureKey, FeatureSet, write_features
from featcache.datasets import validation_split
from featcache.errors import FeatcacheError, InvalidArgument
from featcache.heads import (HeadConfig, Standardizer, assemble, concat_backbones, expand_grid, fit_head,
                             load_head_data, parse_units, prepare, resolve_init, sweep, train_head,
                             validate_config)
from featcache.lookup import match_attrs
from featcache.runs import list_runs
from featcache.settings import FeatureSettings

CLASSES = ["cat", "dog", "frog"]
A, B = "efficientnet_lite0", "mobilenetv2"  # registered names; only their caches are used
FAST = dict(epochs=8, batch_size=64, patience=3)


def settings_for(cache_dir: Path, backbone: str = A, views=("orig",)) -> FeatureSettings:
    return FeatureSettings(backbone=backbone, data="digits", cache_dir=str(cache_dir), views=tuple(views))


def write_cache(settings: FeatureSettings, backbone: str, split: str, view: str, features: np.ndarray,
                labels: np.ndarray, indices=None, class_names=CLASSES) -> Path:
    attrs = match_attrs(settings, backbone, split, view)
    key = FeatureKey(backbone=attrs["backbone"], weights=attrs["weights"], size=attrs["size"], preprocess="test",
                     pooling=attrs["pooling"], dtype=attrs["dtype"], dataset="synthetic", split=split, view=view)
    indices = np.arange(len(labels)) if indices is None else indices
    return write_features(Path(settings.cache_dir) / key.filename, features.astype(attrs["dtype"]),
                          np.asarray(labels, dtype=np.int64), np.asarray(indices, dtype=np.int64), key,
                          class_names, extra_attrs={"data_source": attrs["data_source"]})


def blobs(n: int, width: int, seed: int, n_classes: int = 3, spread: float = 1.0):
    """Learnable but not trivial: class centres 3 apart, unit noise, offset so standardising matters."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % n_classes
    centers = np.random.default_rng(123).normal(size=(n_classes, width)) * 3.0 / np.sqrt(width) * 2
    features = 5.0 + centers[labels] + spread * rng.normal(size=(n, width)) * 0.5
    return features.astype(np.float32), labels


def make_caches(cache_dir: Path, backbone: str = A, width: int = 12, n_train: int = 240, n_test: int = 90,
                views=("orig",), seed: int = 0) -> FeatureSettings:
    settings = settings_for(cache_dir, backbone, views)
    for split, n in (("train", n_train), ("test", n_test)):
        features, labels = blobs(n, width, seed + (split == "test"))
        for v, view in enumerate(views):
            noisy = features + 0.05 * v * np.random.default_rng(v).normal(size=features.shape)
            write_cache(settings, backbone, split, view, noisy, labels)
    return settings


def feature_set(features, labels, indices, backbone=A, split="train", view="orig", names=CLASSES) -> FeatureSet:
    key = FeatureKey(backbone, "imagenet", 224, "test", "avg", "float16", "synthetic", split, view)
    return FeatureSet(np.asarray(features, dtype=np.float16), np.asarray(labels, dtype=np.int64),
                      np.asarray(indices, dtype=np.int64), list(names), key, Path(f"{backbone}-{split}-{view}.h5"))


# --- every head kind learns and leaves a complete run ----------------------------------------


@pytest.mark.parametrize("kind", ["logreg", "linear", "mlp"])
def test_each_head_kind_learns_and_writes_its_run(cache_dir, tmp_path, kind):
    import keras

    settings = make_caches(cache_dir)
    run = train_head(settings, HeadConfig(kind=kind, units=(32, 16), dropout=0.2, **FAST))
    assert run.val_acc > 0.8 and run.test_acc > 0.8, run.record  # chance is 1/3
    assert run.path.parent == cache_dir / "runs" and run.run_id.split("-")[2] == kind
    expected = {"head.keras", "settings.json", "record.json", "confusion.txt", "confusion.png",
                "classification_report.txt"} | ({"curves.png"} if kind != "logreg" else set())
    assert expected <= {p.name for p in run.path.iterdir()}
    for png in run.path.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = run.record
    assert record["kind"] == "head" and record["head"] == kind and record["backbone"] == A
    assert record["width"] == 12 and record["n_train"] + record["n_val"] == 240 and record["n_test"] == 90
    assert set(record["test_per_class"]) == set(CLASSES)
    assert {c["split"] for c in record["caches"]} == {"train", "test"}
    assert run.settings["val_fraction"] == 0.1 and run.settings["val_seed"] == 0
    assert run.settings["head"]["kind"] == kind and run.settings["features"]["backbone"] == A
    # head.keras alone, on raw cached features (its own standardisation inside), reproduces the test accuracy.
    from featcache.lookup import load_split

    test = load_split(settings, A, "test")
    model = keras.models.load_model(run.path / "head.keras")
    assert model.input_shape == (None, 12) and model.output_shape == (None, 3)
    probs = model.predict(test.features.astype(np.float32), verbose=0)
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert np.mean(probs.argmax(axis=1) == test.labels) == pytest.approx(run.test_acc, abs=1.5 / len(test.labels))


@pytest.mark.parametrize("n_classes", [2, 3])
def test_logreg_export_matches_scikit_learn(n_classes):
    from sklearn.linear_model import LogisticRegression

    names = CLASSES[:n_classes]
    x, y = blobs(200, 10, seed=1, n_classes=n_classes)
    xt, yt = blobs(60, 10, seed=2, n_classes=n_classes)
    data = assemble({"orig": [feature_set(x, y, np.arange(200), names=names)]},
                    {"orig": [feature_set(xt, yt, np.arange(60), split="test", names=names)]})
    result = fit_head(data, HeadConfig(kind="logreg", c_grid=(0.1, 1.0)))
    chosen = result.extra["logreg"]["C"]
    prepared = prepare(data)
    reference = LogisticRegression(C=chosen, max_iter=300).fit(prepared.x_train, data.y_train)
    expected = reference.predict_proba(prepared.x_test[0])
    got = result.model.predict(data.x_test[0].astype(np.float32), verbose=0)
    assert np.allclose(got, expected, atol=2e-3)
    assert float(np.mean(result.val_probs.argmax(1) == data.y_val)) > 0.9


# --- standardisation --------------------------------------------------------------------------


def test_standardisation_is_fitted_on_training_rows_only(cache_dir):
    settings = settings_for(cache_dir)
    x, y = blobs(240, 8, seed=0)
    _, val_rows = validation_split(y, 0.1, 0)
    shifted = x.copy()
    shifted[val_rows] += 100.0  # would drag the mean far off if validation rows were used
    xt, yt = blobs(90, 8, seed=1)
    write_cache(settings, A, "train", "orig", shifted, y)
    write_cache(settings, A, "test", "orig", xt + 100.0, yt)
    run = train_head(settings, HeadConfig(kind="linear", epochs=2, batch_size=64))
    import keras

    layer = keras.models.load_model(run.path / "head.keras").get_layer("standardize")
    train_rows = np.setdiff1d(np.arange(240), val_rows)
    expected = shifted[train_rows].astype(np.float16).astype(np.float64)
    assert np.allclose(np.asarray(layer.mean).ravel(), expected.mean(axis=0), atol=1e-4)
    assert np.allclose(np.asarray(layer.variance).ravel(), expected.var(axis=0), rtol=1e-4)
    assert np.all(np.asarray(layer.mean).ravel() < 50)


def test_standardizer_matches_float64_statistics_despite_a_large_offset():
    rng = np.random.default_rng(0)
    x = (1e4 + 0.01 * rng.normal(size=(3000, 5))).astype(np.float32)  # three blocks; var/mean^2 ~ 1e-12
    scaler = Standardizer.fit(x)
    exact = x.astype(np.float64)
    np.testing.assert_allclose(scaler.mean, exact.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(scaler.variance, exact.var(axis=0), rtol=1e-6)
    with pytest.raises(InvalidArgument, match="zero rows"):
        Standardizer.fit(x[:0])


def test_training_tensor_equals_the_numpy_standardisation():
    rng = np.random.default_rng(1)
    train = feature_set(40 + 3 * rng.normal(size=(60, 5)), np.arange(60) % 3, np.arange(60))
    test = feature_set(rng.normal(size=(9, 5)), np.arange(9) % 3, np.arange(9), split="test")
    prepared = prepare(assemble({"orig": [train]}, {"orig": [test]}, 0.2, 0))
    np.testing.assert_allclose(prepared.train_tensor.numpy(), prepared.x_train, rtol=1e-6, atol=1e-6)
    assert abs(prepared.x_train.mean()) < 1e-5 and prepared.x_val.shape[1:] == (12, 5)


def test_constant_feature_is_centred_not_scaled():
    x = np.ones((50, 3), dtype=np.float16)
    x[:, 1] = np.arange(50)
    scaler = Standardizer.fit(x)
    assert scaler.variance[0] == 1.0 and scaler.variance[2] == 1.0
    out = scaler.transform(x)
    assert np.isfinite(out).all() and np.allclose(out[:, 0], 0.0)
    assert out.dtype == np.float32 and abs(out[:, 1].std() - 1.0) < 1e-5


# --- data assembly ---------------------------------------------------------------------------


def test_backbones_concatenate_aligned_by_source_index(cache_dir):
    settings = settings_for(cache_dir, f"{A}+{B}")
    for split, n in (("train", 240), ("test", 90)):
        xa, y = blobs(n, 6, seed=0 if split == "train" else 1)
        xb, _ = blobs(n, 10, seed=5 if split == "train" else 6)
        xa[:, 0] = xb[:, 0] = np.arange(n)  # column 0 holds the source index in both parts
        order = np.random.default_rng(3).permutation(n)  # the second backbone's rows come in another order
        write_cache(settings, A, split, "orig", xa, y)
        write_cache(settings, B, split, "orig", xb[order], y[order], indices=order)
    data = load_head_data(settings)
    assert data.width == 16
    assert np.array_equal(data.x_train[:, 0], data.x_train[:, 6])
    assert np.array_equal(data.x_test[0][:, 0], data.x_test[0][:, 6])
    run = train_head(settings, HeadConfig(kind="logreg", c_grid=(1.0,)))
    assert run.record["backbone"] == f"{A}+{B}" and run.record["width"] == 16 and len(run.record["caches"]) == 4
    assert run.val_acc > 0.8


def test_misaligned_backbones_are_refused():
    x, y = blobs(30, 4, seed=0)
    a = feature_set(x, y, np.arange(30))
    missing = feature_set(x[:29], y[:29], np.arange(29), backbone=B)
    with pytest.raises(FeatcacheError, match="do not hold the same images"):
        concat_backbones([a, missing])
    relabelled = y.copy()
    relabelled[4] = (relabelled[4] + 1) % 3
    with pytest.raises(FeatcacheError, match="disagree on the labels"):
        concat_backbones([a, feature_set(x, relabelled, np.arange(30), backbone=B)])
    with pytest.raises(FeatcacheError, match="twice"):
        concat_backbones([a, feature_set(x, y, np.r_[np.arange(29), 0], backbone=B)])


def test_views_train_on_all_rows_and_average_over_views(cache_dir):
    settings = settings_for(cache_dir, views=("orig", "flip"))
    for split, n in (("train", 240), ("test", 90)):
        x, y = blobs(n, 8, seed=0 if split == "train" else 1)
        x[:, 0] = np.arange(n)
        flip = x + 0.05
        order = np.random.default_rng(7).permutation(n)
        write_cache(settings, A, split, "orig", x, y)
        write_cache(settings, A, split, "flip", flip[order], y[order], indices=order)
    data = load_head_data(settings)
    train_rows, val_rows = validation_split(blobs(240, 8, 0)[1], 0.1, 0)  # the split finetune recomputes
    assert data.views == ("orig", "flip") and data.x_train.shape == (2 * len(train_rows), 8)
    assert data.x_val.shape == (2, len(val_rows), 8) and data.x_test.shape == (2, 90, 8)
    for v in range(2):  # every view of a validation image is a validation row, in the same order
        assert np.array_equal(data.x_val[v][:, 0].astype(int), val_rows)
    assert not set(data.x_train[:, 0].astype(int)) & set(val_rows)
    result = fit_head(data, HeadConfig(kind="linear", **FAST))
    assert result.val_probs_by_view.shape == (2, len(val_rows), 3)
    assert np.allclose(result.val_probs, result.val_probs_by_view.mean(axis=0))
    run = train_head(settings, HeadConfig(kind="linear", **FAST))
    assert run.record["views"] == ["orig", "flip"] and set(run.record["val_acc_by_view"]) == {"orig", "flip"}
    assert "views orig+flip" in run.record["summary"]


def test_missing_class_in_training_rows_is_an_error(cache_dir):
    settings = settings_for(cache_dir)
    x, y = blobs(120, 4, seed=0, n_classes=2)  # labels 0 and 1 only, three class names
    write_cache(settings, A, "train", "orig", x, y)
    write_cache(settings, A, "test", "orig", x[:30], y[:30])
    with pytest.raises(FeatcacheError, match="'frog' have no training rows"):
        train_head(settings, HeadConfig(kind="logreg"))


def test_nan_features_are_refused(cache_dir):
    settings = settings_for(cache_dir)
    x, y = blobs(60, 4, seed=0)
    x[5, 2] = np.nan
    write_cache(settings, A, "train", "orig", x, y)
    write_cache(settings, A, "test", "orig", x[:30], y[:30])
    with pytest.raises(FeatcacheError, match="NaN or infinite"):
        train_head(settings, HeadConfig(kind="logreg"))
    assert not (cache_dir / "runs").exists() or not list_runs(cache_dir)


def test_missing_cache_names_the_make_command(cache_dir):
    with pytest.raises(FeatcacheError, match="make features BACKBONE=efficientnet_lite0"):
        train_head(settings_for(cache_dir), HeadConfig(kind="logreg"))


def test_reused_head_continues_and_must_fit_the_cache_width(cache_dir):
    settings = make_caches(cache_dir, width=12)
    first = train_head(settings, HeadConfig(kind="linear", epochs=2, batch_size=64))
    again = train_head(settings, HeadConfig(kind="linear", epochs=2, batch_size=64, init=first.run_id))
    assert again.record["init_run"] == first.run_id and again.val_acc > 0.6
    narrow = make_caches(cache_dir, backbone=B, width=8)
    with pytest.raises(FeatcacheError, match="width 12 but the cache gives width 8"):
        train_head(narrow, HeadConfig(kind="linear", init=str(first.path / "head.keras")))


def test_reused_head_of_another_backbone_is_refused_even_at_the_same_width(cache_dir):
    first = train_head(make_caches(cache_dir, width=12), HeadConfig(kind="linear", epochs=1, batch_size=64))
    other = make_caches(cache_dir, backbone=B, width=12)
    for init in (first.run_id, str(first.path / "head.keras")):
        with pytest.raises(FeatcacheError, match=f"Head {first.run_id} was trained on {A}/.*this cache holds {B}/"):
            train_head(other, HeadConfig(kind="linear", epochs=1, init=init))


def test_continued_head_records_the_saved_architecture_not_the_default(cache_dir):
    settings = make_caches(cache_dir, width=12)
    linear = train_head(settings, HeadConfig(kind="linear", epochs=1, batch_size=64))
    again = train_head(settings, HeadConfig(epochs=1, batch_size=64, init=linear.run_id))  # kind left at 'mlp'
    assert again.record["head"] == "linear" and again.record["config"]["kind"] == "linear"
    mlp = train_head(settings, HeadConfig(kind="mlp", units=(8, 4), dropout=0.1, epochs=1, batch_size=64))
    assert resolve_init(mlp.run_id, str(cache_dir)).kind == "mlp"
    continued = train_head(settings, HeadConfig(epochs=1, batch_size=64, init=mlp.run_id))  # defaults 256-128-64
    assert continued.record["config"]["units"] == [8, 4] and continued.record["config"]["dropout"] == 0.1
    assert resolve_init(str(linear.path), str(cache_dir)).run.run_id == linear.run_id  # a run folder works too


def test_bad_init_fails_before_any_features_load(cache_dir, monkeypatch):
    import featcache.heads.records as records

    def no_loading(*args, **kwargs):
        raise AssertionError("features were loaded before --init was checked")

    monkeypatch.setattr(records, "load_head_data", no_loading)
    settings = settings_for(cache_dir)
    with pytest.raises(FeatcacheError, match="No run 'nope'"):
        train_head(settings, HeadConfig(kind="linear", init="nope"))
    with pytest.raises(FeatcacheError, match="missing.keras does not exist"):
        train_head(settings, HeadConfig(kind="linear", init=str(cache_dir / "missing.keras")))
    broken = cache_dir / "broken.keras"
    broken.write_bytes(b"not a zip")
    with pytest.raises(FeatcacheError, match="Cannot load head"):
        train_head(settings, HeadConfig(kind="linear", init=str(broken)))


@pytest.mark.parametrize("field, value, message", [
    ("pooling", "mean", "Unknown pooling 'mean'; expected one of: 'avg', 'max'"),
    ("dtype", "float64", "Unknown dtype 'float64'; expected one of: 'float16', 'float32'"),
    ("views", ("orig", "mirror"), "Unknown view 'mirror'; expected one of: 'orig', 'flip'")])
def test_bad_feature_settings_are_named_not_reported_as_a_missing_cache(cache_dir, field, value, message):
    settings = replace(make_caches(cache_dir, width=6), **{field: value})
    with pytest.raises(InvalidArgument, match=message):
        train_head(settings, HeadConfig(kind="logreg"))


# --- configs, sweep and CLI -----------------------------------------------------------------------


def test_config_errors_name_allowed_and_received():
    with pytest.raises(InvalidArgument, match="expected one of: 'logreg', 'linear', 'mlp'"):
        validate_config(HeadConfig(kind="svm"))
    with pytest.raises(InvalidArgument, match="'adam', 'rmsprop', 'sgd'"):
        validate_config(HeadConfig(optimizer="lbfgs"))
    with pytest.raises(InvalidArgument, match="Dropout"):
        validate_config(HeadConfig(dropout=1.0))
    with pytest.raises(InvalidArgument, match="positive finite.*inf"):
        validate_config(HeadConfig(learning_rate=float("inf")))
    with pytest.raises(InvalidArgument, match=r"Seed must be in \[0, 2\*\*32\); received -1"):
        validate_config(HeadConfig(seed=-1))
    assert parse_units("256, 128,64") == (256, 128, 64)
    with pytest.raises(InvalidArgument, match="'256,x'"):
        parse_units("256,x")
    with pytest.raises(InvalidArgument, match="Cannot sweep over 'seed'"):
        expand_grid(HeadConfig(), {"seed": [0, 1]})


def test_grid_does_not_multiply_settings_a_kind_ignores():
    configs = expand_grid(HeadConfig(), {"kind": ["logreg", "linear", "mlp"], "learning_rate": [1e-3, 3e-3],
                                         "dropout": [0.3, 0.5]})
    kinds = [c.kind for c in configs]
    assert kinds.count("logreg") == 1 and kinds.count("linear") == 2 and kinds.count("mlp") == 4


def test_sweep_loads_once_and_ranks_on_validation(cache_dir, monkeypatch):
    import featcache.heads as heads
    import featcache.heads.records as records

    settings = make_caches(cache_dir)
    calls = []
    real = heads.load_head_data
    monkeypatch.setattr(records, "load_head_data", lambda *a, **k: calls.append(1) or real(*a, **k))
    built = []
    build = heads.Prepared.train_tensor.func
    counted = functools.cached_property(lambda self: built.append(1) or build(self))
    counted.__set_name__(heads.Prepared, "train_tensor")
    monkeypatch.setattr(heads.Prepared, "train_tensor", counted)
    runs = sweep(settings, {"kind": ["logreg", "linear"], "learning_rate": [0.01, 0.003]},
                 base=HeadConfig(epochs=3, batch_size=64))
    assert len(calls) == 1 and len(runs) == 3
    assert len(built) == 1  # two Keras heads, one training tensor
    assert [r.val_acc for r in runs] == sorted((r.val_acc for r in runs), reverse=True)
    assert {r.run_id for r in list_runs(cache_dir)} == {r.run_id for r in runs}


def test_cli_head_and_sweep(cache_dir):
    from typer.testing import CliRunner

    import featcache.cli.head_cmd  # noqa: F401  (registers the commands)
    from featcache.cli.app import app

    make_caches(cache_dir)
    runner = CliRunner()
    base = ["head", "-b", A, "-d", "digits", "--cache-dir", str(cache_dir)]
    result = runner.invoke(app, base + ["-H", "mlp", "--epochs", "3", "--batch-size", "64", "--units", "16,8",
                                        "--dropout", "0.1", "--lr", "0.01"])
    assert result.exit_code == 0, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith(f"mlp on {A}: val ") and " test " in last and str(cache_dir / "runs") in last
    result = runner.invoke(app, base + ["--sweep", "-H", "linear", "--epochs", "2", "--batch-size", "64"])
    assert result.exit_code == 0, result.output
    assert "best " in result.output and len(list_runs(cache_dir)) == 3  # one mlp + linear at two learning rates
    bad = runner.invoke(app, base + ["-H", "svm"])
    assert bad.exit_code != 0 and isinstance(bad.exception, InvalidArgument)
    assert "expected one of: 'logreg', 'linear', 'mlp'" in str(bad.exception)
    first = list_runs(cache_dir)[0].run_id
    both = runner.invoke(app, base + ["-H", "linear", "--init", first])
    assert both.exit_code != 0 and "cannot be combined with --init" in str(both.exception)
