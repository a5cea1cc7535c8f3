"""A run's images come from the dataset: its validation rows, recomputed for older runs; changes refused."""

from __future__ import annotations

import json

import numpy as np
import pytest

import tiny
from featcache.errors import FeatcacheError
from featcache.run_images import SplitSource, training_images, validation_images
from featcache.runs import load_run

tiny.register_tiny()


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("run_images")
    data = tiny.make_data(root / "data", n_train=10, n_test=1)
    return tiny.head_run(tiny.tiny_settings(data, root / "cache"), "linear"), root / "cache"


def test_validation_rows_of_an_older_run_are_recomputed_the_same(made):
    run, cache_dir = made
    images, labels = validation_images(run, str(cache_dir))
    assert len(images) == run.record["n_val"] and labels.tolist() == images.source.get().labels[images.rows].tolist()
    (run.path / "validation.csv").rename(run.path / "validation.csv.bak")
    record = json.loads((run.path / "record.json").read_text())
    old = {k: v for k, v in record.items() if k != "val_images"}
    try:
        (run.path / "record.json").write_text(json.dumps(old))
        again, again_labels = validation_images(load_run(cache_dir, run.run_id), str(cache_dir))
        assert again.rows.tolist() == images.rows.tolist() and again_labels.tolist() == labels.tolist()
        assert again.source.fingerprint == images.source.fingerprint
    finally:
        (run.path / "record.json").write_text(json.dumps(record))
        (run.path / "validation.csv.bak").rename(run.path / "validation.csv")


def test_calibration_images_are_training_images_only(made):
    run, cache_dir = made
    images, _ = validation_images(run, str(cache_dir))
    chosen = training_images(images, 10, seed=0)
    assert len(chosen) == 10 and not set(chosen.rows.tolist()) & set(images.rows.tolist())
    everything = training_images(images, 10_000)
    assert len(everything) == len(images.source.get()) - len(images)
    batches = list(everything.batches(batch_size=7))
    assert [len(p) for p, _ in batches][:3] == [7, 7, 7] and batches[0][1].dtype == np.float32


def test_a_changed_dataset_is_refused(made):
    run, cache_dir = made
    source = SplitSource(run.record["val_images"]["data"], str(cache_dir), fingerprint="0" * 64)
    with pytest.raises(FeatcacheError, match="has changed since its features were cached"):
        source.get()
