"""Fine-tuning from a cached head: assembly, the two self-checks, resume after a kill, bad input.

One tiny image folder, features from a random-weight resnet50 at 32 px and
one head are made once for the module; every fine-tune runs one step per
epoch with only the last backbone layers unfrozen, to stay fast on 2 cores.
"""

import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import make_image_folder

import featcache.finetuning as ft
from featcache.errors import FeatcacheError, InvalidArgument
from featcache.extraction import ExtractOptions, extract
from featcache.report import runs_table
from featcache.runs import list_runs
from featcache.settings import FeatureSettings

ROOT = Path(__file__).resolve().parents[1]
# End to end (the GPU's mode), forced on this CPU; test_cached_finetune covers the CPU's mode.
FAST = ft.FinetuneConfig(epochs=1, batch_size=8, unfreeze="top:2", max_steps=1, check_images=4, verbose=0, mode="full")


def quiet(message: str) -> None:
    pass


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(settings, head run id): features cached and one head trained on them."""
    root = tmp_path_factory.mktemp("finetune")
    data = make_image_folder(root / "data", n_train=8, n_test=3)
    settings = FeatureSettings(backbone="resnet50", weights="none", data=str(data), size=32,
                               cache_dir=str(root / "cache"))
    extract(settings, ExtractOptions(progress=False, batch_size=8, engine="keras"), log=quiet)
    return settings, make_head_run(settings)


def make_head_run(settings: FeatureSettings) -> str:
    from featcache.heads import HeadConfig, train_head

    return train_head(settings, HeadConfig(kind="mlp", units=(32,), epochs=15, val_fraction=0.25)).run_id


@pytest.fixture
def copy_run(trained):
    """Make copies of the head run folder (optionally with changed record fields); removed afterwards,
    so that they never compete for 'best head' in other tests."""
    settings, run_id = trained
    runs = Path(settings.cache_dir) / "runs"
    made = []

    def copy(new_id, **record):
        shutil.copytree(runs / run_id, runs / new_id)
        made.append(runs / new_id)
        if record:
            path = runs / new_id / "record.json"
            path.write_text(json.dumps({**json.loads(path.read_text()), **record}))
        return new_id

    yield copy
    for path in made:
        shutil.rmtree(path)


# --- arguments, no model built ---------------------------------------------------------


@pytest.mark.parametrize("change, message", [
    ({"unfreeze": "half"}, "Unknown unfreeze 'half'"),
    ({"unfreeze": "top:0"}, "positive integer"),
    ({"optimizer": "adagrad"}, "Unknown optimizer 'adagrad'; expected one of: 'adam', 'rmsprop', 'sgd'"),
    ({"strategy": "tpu"}, "Unknown strategy 'tpu'"),
    ({"epochs": 0}, "Epochs must be a positive integer"),
    ({"tta": True}, "--tta averages the cached views of test; it needs --mode cached"),
])
def test_bad_arguments_are_value_errors(change, message):
    with pytest.raises(InvalidArgument, match=message) as info:
        ft.validate(replace(FAST, **change))
    assert isinstance(info.value, ValueError)


def test_tta_is_refused_where_auto_would_train_end_to_end():
    config = ft.FinetuneConfig(mode="auto", tta=True)
    assert config.resolved(has_gpu=False).mode == "cached"
    with pytest.raises(InvalidArgument, match="--tta averages the cached views of test, and a GPU here"):
        config.resolved(has_gpu=True)


def test_unknown_run_id_lists_runs(trained):
    settings, run_id = trained
    with pytest.raises(FeatcacheError, match="No run 'nope' in .*featcache runs"):
        ft.finetune(settings, replace(FAST, run="nope"), log=quiet)


def test_head_of_another_backbone_or_width(trained, copy_run):
    settings, run_id = trained
    other = copy_run("other-backbone", backbone="vgg19")
    with pytest.raises(FeatcacheError, match="trained on vgg19 features; these settings name resnet50"):
        ft.finetune(settings, replace(FAST, run=other), log=quiet)
    narrow = copy_run("narrow-head")
    inputs = keras.Input((512,))
    keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(inputs)).save(
        Path(settings.cache_dir) / "runs" / narrow / "head.keras")
    with pytest.raises(FeatcacheError, match="width 512 but resnet50 .* width 2048"):
        ft.finetune(settings, replace(FAST, run=narrow), log=quiet)


# --- the self-checks -----------------------------------------------------------------------


def test_changed_preprocessing_fails_check_1(trained, monkeypatch):
    import featcache.preprocessing as pre

    settings, run_id = trained
    monkeypatch.setattr(pre, "preprocess_fn", lambda backbone: lambda x: x / 127.5 - 1.0)
    with pytest.raises(FeatcacheError, match=r"Self-check \(1\) failed: .*differ from the cache"):
        ft.finetune(settings, replace(FAST, run=run_id), log=quiet)


def test_misrecorded_accuracy_fails_check_2_and_bad_layer_name(trained, copy_run):
    settings, run_id = trained
    with pytest.raises(FeatcacheError, match="no layer 'conv9_block1_out'.*conv1_pad"):
        ft.finetune(settings, replace(FAST, run=run_id, unfreeze="from:conv9_block1_out"), log=quiet)
    record = json.loads((Path(settings.cache_dir) / "runs" / run_id / "record.json").read_text())
    wrong = copy_run("wrong-acc", val_acc=1.5 - record["val_acc"])
    messages = []
    with pytest.raises(FeatcacheError, match=r"Self-check \(2\) failed: .*recorded val_acc"):
        ft.finetune(settings, replace(FAST, run=wrong), log=messages.append)
    assert any(m.startswith("check 1 ok") and "rtol 0.01, atol 0.01" in m for m in messages)


# --- training: killed on two logical CPUs (mirrored), resumed in process ---------------------

KILLED_RUN = """
import json, os, signal, sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
from featcache.finetuning import FinetuneConfig, finetune
from featcache.settings import FeatureSettings

class Kill(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):  # runs after BackupAndRestore saved the epoch
        print("KILLED after epoch", epoch, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

config = FinetuneConfig(**json.loads(sys.argv[2]))
finetune(FeatureSettings(**json.loads(sys.argv[1])), config, log=lambda m: print(m, flush=True), callbacks=[Kill()])
"""


class Watch(keras.callbacks.Callback):
    """Records the epochs run and the weights of a BatchNormalization and two convolution layers."""

    def __init__(self):
        super().__init__()
        self.epochs, self.weights = [], {}

    def snapshot(self):
        inner = self.model.get_layer("backbone").layer.layers[1]
        weights = {name: [np.array(w) for w in inner.get_layer(name).weights]
                   for name in ("conv5_block3_3_bn", "conv5_block3_3_conv", "conv1_conv")}
        head = self.model.get_layer("featcache_head_mlp")
        weights["head_bn"] = [np.array(w) for w in head.get_layer("batchnorm_1").weights]
        return weights

    def on_train_begin(self, logs=None):
        self.weights["begin"] = self.snapshot()

    def on_epoch_begin(self, epoch, logs=None):
        self.epochs.append(epoch)

    def on_train_end(self, logs=None):
        self.weights["end"] = self.snapshot()


def test_killed_mirrored_run_resumes_at_epoch_2(trained):
    """A run on two logical CPU devices (MirroredStrategy; the devices must be set before TensorFlow
    starts, hence a subprocess) is killed with SIGKILL after epoch 1; the same call resumes at epoch 2."""
    settings, run_id = trained
    config = replace(FAST, epochs=2, strategy="mirrored")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    env.pop("TF_CONFIG", None)
    args = [json.dumps({**settings.__dict__, "views": list(settings.views)}), json.dumps(asdict(config))]
    killed = subprocess.run([sys.executable, "-c", KILLED_RUN, *args], capture_output=True, text=True, env=env,
                            timeout=300)
    assert killed.returncode == -9, killed.stdout[-2000:] + killed.stderr[-3000:]
    assert "strategy: mirrored, 2 replica(s) in sync" in killed.stdout
    assert "check 1 ok" in killed.stdout and "check 2 ok" in killed.stdout
    assert "KILLED after epoch 0" in killed.stdout
    runs = Path(settings.cache_dir) / "runs"
    work = [p for p in runs.iterdir() if p.name.startswith(".finetune-") and p.is_dir()]
    assert len(work) == 1 and (work[0] / "backup").is_dir(), "the killed run left its backup"
    assert [r.kind for r in list_runs(settings.cache_dir)] == ["head"], "an unfinished run is not listed"

    messages, watch = [], Watch()
    record = ft.finetune(settings, replace(config, strategy="none"), log=messages.append, callbacks=[watch])
    assert watch.epochs == [1], "the rerun must resume at the second epoch"
    assert any("resuming from the backup at epoch 2" in m for m in messages)
    run_dir = runs / record["run_id"]
    assert record["kind"] == "finetune" and record["mode"] == "full" and record["head_run"] == run_id
    assert "-finetune-resnet50-" in run_dir.name
    assert record["epochs_run"] == 2 and 0.0 <= record["val_acc"] <= 1.0 and 0.0 <= record["test_acc"] <= 1.0
    assert abs(record["checks"]["val_acc_before"] - record["head_val_acc"]) <= 0.01
    for name in ("model.keras", "saved_model/saved_model.pb", "history.csv", "record.json", "settings.json",
                 "confusion.png", "curves.png", "logs"):
        assert (run_dir / name).exists(), name
    assert not work[0].exists(), "the work folder goes once the run is written"
    assert {r.run_id: r.kind for r in list_runs(settings.cache_dir)} == {run_id: "head", run_dir.name: "finetune"}
    assert "finetune(mlp)" in runs_table(list_runs(settings.cache_dir))
    # BatchNormalization stayed frozen; the unfrozen top convolution trained; the stem did not.
    begin, end = watch.weights["begin"], watch.weights["end"]
    for layer in ("conv5_block3_3_bn", "head_bn"):
        for before, after in zip(begin[layer], end[layer]):
            np.testing.assert_array_equal(before, after)
    assert not np.array_equal(begin["conv5_block3_3_conv"][0], end["conv5_block3_3_conv"][0])
    np.testing.assert_array_equal(begin["conv1_conv"][0], end["conv1_conv"][0])
