"""Cached fine-tuning: activation caches at a cut, training the top from them, checks, resume, the image model.

The tiny random-weight backbone ``tiny_a`` (two convolutions, cut between them) keeps
every run to seconds; colour-coded classes make the accuracies mean something.
"""

import json
from dataclasses import replace
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest

import tiny
from featcache import fsio
from featcache.cache import check
from featcache.errors import FeatcacheError, InvalidArgument
from featcache.extraction import ExtractOptions, extract
from featcache.finetuning import FinetuneConfig, finetune
from featcache.runs import list_runs, load_run

tiny.register_tiny()
FAST = FinetuneConfig(mode="cached", epochs=1, batch_size=16, check_images=4, verbose=0, export=False)


def quiet(message: str) -> None:
    pass


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """(settings with two views, head run) on a tiny image folder."""
    root = tmp_path_factory.mktemp("cached")
    data = tiny.make_data(root / "data", n_train=30, n_test=4)
    settings = tiny.tiny_settings(data, root / "cache", views=("orig", "flip"))
    head = tiny.head_run(tiny.tiny_settings(data, root / "cache"), "mlp")
    return settings, head


def test_activation_cache_is_keyed_by_the_cut_and_checked(made):
    settings, _ = made
    messages = []
    paths = extract(replace(settings, views=("orig",)), ExtractOptions(splits=("train",), cut="top:1", engine="keras",
                                                                      progress=False), log=messages.append)
    path = paths[0]
    assert path.name.startswith("tiny_a@conv_1-24-train-orig-")
    attrs = check(path, full=True)  # what `featcache cache verify` runs
    assert attrs["cut"] == "conv_1" and attrs["pooling"] == "none"
    assert json.loads(attrs["activation_shape"]) == [12, 12, 8] and attrs["width"] == 12 * 12 * 8
    assert "CUT=conv_1" in attrs["make_command"]
    assert any(m.startswith("activation cache: 1 file(s)") for m in messages), messages
    with h5py.File(path) as fh:
        assert fh["features"].dtype == np.float16 and fh["features"].shape == (90, 1152)
    # the same cut named by its layer is the same key: reused, not extracted again
    again = []
    assert extract(replace(settings, views=("orig",)), ExtractOptions(splits=("train",), cut="conv_1", engine="keras",
                                                                      progress=False), log=again.append) == [path]
    assert any(m.startswith("reusing cache") for m in again)


@pytest.mark.parametrize("cut, message", [
    ("top:0", "positive integer"),
    ("top:5", "has 1 stage boundaries; use top:1 to top:1"),
    ("conv_9", "no layer 'conv_9' to cut at"),
])
def test_bad_cuts_are_one_line_value_errors(made, cut, message):
    settings, _ = made
    with pytest.raises(InvalidArgument, match=message) as info:
        extract(settings, ExtractOptions(cut=cut, engine="keras", progress=False), log=quiet)
    assert "\n" not in str(info.value)


def test_a_disk_too_small_is_refused_before_writing(made, monkeypatch, tmp_path):
    settings, _ = made
    small = replace(settings, cache_dir=str(tmp_path / "cache"))
    monkeypatch.setattr(fsio, "free_bytes", lambda folder: 10_000)
    with pytest.raises(fsio.DiskError, match="needs about .* and the disk has 9.8 KB free"):
        extract(small, ExtractOptions(cut="top:1", engine="keras", progress=False), log=quiet)
    assert not list((tmp_path / "cache").glob("*.h5*"))


def test_cached_run_trains_the_top_and_saves_one_image_model(made):
    settings, head = made
    messages = []
    record = finetune(settings, replace(FAST, run=head.run_id, epochs=2, tta=True), log=messages.append)
    run = load_run(settings.cache_dir, record["run_id"])
    assert run.kind == "finetune" and record["mode"] == "cached" and record["cut"] == "conv_1"
    assert record["views"] == ["orig", "flip"] and len(record["activation_caches"]) == 4  # test's flip for --tta
    assert 0 <= record["test_acc_tta"] <= 1 and any(m.startswith("averaged over the 2 cached views") for m in messages)
    assert record["epochs_run"] == 2 and record["trainable_layers"] == 1  # conv_2 trains; conv_1 stays frozen
    assert any(m.startswith("check 1 ok: the top stages' features") for m in messages), messages
    assert any(m.startswith("check 2 ok") for m in messages)
    assert any(m.startswith("activation caches ready in") for m in messages) and record["activation_seconds"] > 0
    assert record["run_id"] in [r.run_id for r in list_runs(settings.cache_dir)]
    for name in ("model.keras", "history.csv", "curves.png", "confusion.png", "top_losses.png"):
        assert (run.path / name).exists(), name
    # the saved image model takes raw pixels and reproduces the run's validation accuracy
    from featcache.image_model import build_image_model

    model = build_image_model(run, Path(settings.cache_dir))
    assert model.input_shape == (None, None, None, 3)
    assert run.val_acc > 0.9 and record["image_model_check"]["top1_agreement"] >= 0.9
    assert any(m.startswith("image model check ok") for m in messages)


def test_training_changes_only_the_layers_above_the_cut(made):
    settings, head = made
    record = finetune(settings, replace(FAST, run=head.run_id, learning_rate=1e-2, seed=3), log=quiet)
    assert len(record["activation_caches"]) == 3 and "test_acc_tta" not in record  # no --tta: test's orig alone
    model = keras.saving.load_model(Path(record["model"]), compile=False)
    inner = model.get_layer("backbone").layer.layers[1]
    from featcache.backbones import create_backbone

    start = create_backbone("tiny_a", None, 24, "avg", cache_dir=settings.cache_dir).layers[1]
    for name, moved in (("conv_1", False), ("conv_2", True)):
        before, after = start.get_layer(name).get_weights()[0], inner.get_layer(name).get_weights()[0]
        assert (not np.allclose(before, after)) == moved, name


def test_misrecorded_head_accuracy_fails_check_2(made, tmp_path):
    settings, head = made
    import shutil

    runs = Path(settings.cache_dir) / "runs"
    shutil.copytree(head.path, runs / "wrong-acc")
    path = runs / "wrong-acc" / "record.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "val_acc": 1.5 - head.val_acc}))
    try:
        with pytest.raises(FeatcacheError, match=r"Self-check \(2\) failed: .*recorded val_acc"):
            finetune(settings, replace(FAST, run="wrong-acc"), log=quiet)
    finally:
        shutil.rmtree(runs / "wrong-acc")


def test_activations_from_other_preprocessing_fail_check_1(made, monkeypatch, tmp_path):
    """An activation cache that does not continue into the pooled features is caught before training."""
    import featcache.finetuning.cached as cached

    settings, head = made
    real = cached.predict

    def shifted(model, stream):  # as if the activations came from another input pipeline
        if model.name == "top":
            return real(model, stream) * 1.5 + 1.0
        return real(model, stream)

    monkeypatch.setattr(cached, "predict", shifted)
    with pytest.raises(FeatcacheError, match=r"Self-check \(1\) failed: the top stages' features .*differ"):
        finetune(settings, replace(FAST, run=head.run_id), log=quiet)


class _Interrupt(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):  # after BackupAndRestore saved the epoch
        raise KeyboardInterrupt


def test_an_interrupted_run_resumes_at_its_next_epoch(made):
    settings, head = made
    config = replace(FAST, run=head.run_id, epochs=2, seed=11)
    with pytest.raises(KeyboardInterrupt):
        finetune(settings, config, log=quiet, callbacks=[_Interrupt()])
    work = [p for p in (Path(settings.cache_dir) / "runs").iterdir() if p.name.startswith(".finetune-") and p.is_dir()]
    assert len(work) == 1 and (work[0] / "backup").is_dir()
    messages = []
    record = finetune(settings, config, log=messages.append)
    assert "resuming from the backup at epoch 2" in messages
    assert record["epochs_run"] == 2 and not work[0].exists()


def test_auto_mode_says_it_chose_cached_without_a_gpu(made):
    settings, head = made
    messages = []
    finetune(settings, replace(FAST, mode="auto", run=head.run_id, seed=5), log=messages.append)
    assert messages[0].startswith("mode: cached (no GPU here")


def test_the_image_model_equals_stem_top_and_head_run_separately_and_predicts(made):
    """The one saved model against its parts on the test split's cached activations; then `featcache predict`."""
    import subprocess
    import sys

    from featcache.backbones.cuts import Cut, split_at
    from featcache.decoding import read_image

    settings, head = made
    record = finetune(settings, replace(FAST, run=head.run_id, seed=7), log=quiet)
    model = keras.saving.load_model(Path(record["model"]), compile=False)
    pooled = model.get_layer("backbone").layer
    _, upper = split_at(pooled.layers[1], Cut("conv_1"))
    head_model = model.layers[-2]
    test_cache = Path(record["activation_caches"][2])  # train orig, train flip, test orig
    with h5py.File(test_cache) as fh:
        activations = fh["features"][...].astype(np.float32).reshape((-1, 12, 12, 8))
    parts = np.asarray(head_model(keras.layers.GlobalAveragePooling2D()(upper(activations))))
    images = sorted((Path(settings.data) / "test").glob("*/*"))
    whole = np.concatenate([np.asarray(model(read_image(p).astype(np.float32)[None], training=False))
                            for p in images])
    assert len(images) == len(parts)
    np.testing.assert_allclose(whole, parts, atol=2e-2)  # activations were cached as float16
    assert (whole.argmax(1) == parts.argmax(1)).mean() >= 0.9
    done = subprocess.run([sys.executable, str(Path(__file__).parent / "tiny.py"), "predict", record["run_id"],
                           str(images[0]), "--cache-dir", settings.cache_dir, "--json", "-k", "1"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    top = json.loads(done.stdout)[0]["classes"][0]
    assert top == record["class_names"][int(whole[0].argmax())]


def test_unfreeze_above_a_cut_trains_what_the_cached_mode_trains(made):
    """`--unfreeze above:CUT` (end to end) and `--cut CUT` (cached) use the same block groups."""
    from featcache.backbones import create_backbone
    from featcache.finetuning.model import unfreeze

    settings, _ = made
    backbone = create_backbone("tiny_a", None, 24, "avg", cache_dir=settings.cache_dir)
    assert unfreeze(backbone, "above:top:1", "tiny_a") == ["conv_2"]
    assert unfreeze(backbone, "above:conv_1", "tiny_a") == ["conv_2"]
    with pytest.raises(InvalidArgument, match="use top:1 to top:1"):
        unfreeze(backbone, "above:top:2", "tiny_a")


def test_check_1_on_bf16_caches_compares_directions():
    """bf16 features differ value by value beyond any useful tolerance; their direction must match."""
    from types import SimpleNamespace

    from featcache.finetuning.checks import match_features

    rng = np.random.default_rng(0)
    cached = rng.uniform(0, 5, (8, 64)).astype(np.float16)
    cache = SimpleNamespace(features=cached, indices=np.arange(8), key=SimpleNamespace(precision="bf16"),
                            path=Path("x-224-train-orig-0123456789ab.h5"))
    noisy = cached.astype(np.float32) * rng.normal(1, 0.05, cached.shape) + rng.normal(0, 0.1, cached.shape)
    said = []
    match_features(noisy, cache, np.arange(8), said.append)
    assert "cosine >= 0.98" in said[0]
    with pytest.raises(FeatcacheError, match=r"Self-check \(1\) failed: .* on 8 of 8 .*cosine >= 0.98"):
        match_features(rng.uniform(0, 5, (8, 64)), cache, np.arange(8), quiet)


def test_tta_with_one_view_is_refused_before_any_work(made):
    settings, head = made
    one_view = replace(settings, views=("orig",))
    with pytest.raises(InvalidArgument, match=r"--tta averages test over the cached views; .*received --views orig"):
        finetune(one_view, replace(FAST, run=head.run_id, tta=True), log=quiet)
