"""Per-image validation losses, the top-loss picture and the most confused pairs of every run."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest
from PIL import Image

import tiny
from featcache.datasets import load_dataset
from featcache.decoding import read_image
from featcache.interpretation import (TOP_LOSSES, most_confused, per_image_losses, plot_top_losses,
                                      top_loss_positions)

tiny.register_tiny()


def test_losses_positions_and_pairs():
    labels = np.array([0, 1, 2, 1])
    probs = np.array([[0.9, 0.05, 0.05], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1]])
    losses = per_image_losses(labels, probs)
    np.testing.assert_allclose(losses, -np.log([0.9, 0.3, 0.1, 0.3]))
    assert top_loss_positions(losses, 3).tolist() == [2, 1, 3]  # ties: the earlier image first
    matrix = np.array([[5, 0, 1], [2, 3, 0], [0, 2, 4]])
    assert most_confused(matrix, ["a", "b", "c"], 2) == [{"true": "b", "predicted": "a", "count": 2},
                                                         {"true": "c", "predicted": "b", "count": 2}]
    assert most_confused(np.eye(3, dtype=int), ["a", "b", "c"]) == []


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    root = tmp_path_factory.mktemp("interpretation")
    data = tiny.make_data(root / "data", n_train=30, n_test=3)
    settings = tiny.tiny_settings(data, root / "cache")
    return settings, tiny.head_run(settings, "mlp", epochs=2)  # barely trained: losses spread out


def _validation(run) -> list[dict]:
    with open(run.path / "validation.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_top_losses_shows_the_highest_loss_images(head, tmp_path):
    settings, run = head
    table = _validation(run)
    assert len(table) == run.record["n_val"] > TOP_LOSSES
    losses = np.array([float(r["loss"]) for r in table])
    want = np.argsort(-losses, kind="stable")[:TOP_LOSSES]
    shown = run.record["top_losses"]
    assert [s["position"] for s in shown] == want.tolist()
    assert [s["row"] for s in shown] == [int(table[i]["row"]) for i in want]
    assert losses[want[-1]] >= np.delete(losses, want).max()
    # The picture is exactly these images, read from the dataset's files, in this order, with these titles.
    split = load_dataset(settings.data, settings.cache_dir)["train"]
    images = [read_image(split.paths[s["row"]]) for s in shown]
    titles = [f"{s['predicted']} / {s['true']}\n{s['probability']:.2f}" for s in shown]
    plot_top_losses(tmp_path / "expected.png", images, titles,
                    title="validation images with the highest loss: predicted / true / probability of the prediction",
                    wrong=[s["true"] != s["predicted"] for s in shown])
    drawn = np.asarray(Image.open(run.path / "top_losses.png"))
    assert np.array_equal(drawn, np.asarray(Image.open(tmp_path / "expected.png")))
    labels = [split.labels[s["row"]] for s in shown]
    assert [run.record["class_names"][i] for i in labels] == [s["true"] for s in shown]


def test_most_confused_pairs_are_in_the_report(head):
    _, run = head
    table = _validation(run)
    counts: dict = {}
    for r in table:
        if r["true"] != r["predicted"]:
            counts[(r["true"], r["predicted"])] = counts.get((r["true"], r["predicted"]), 0) + 1
    pairs = run.record["most_confused"]
    assert {(p["true"], p["predicted"]): p["count"] for p in pairs} == counts
    report = (run.path / "classification_report.txt").read_text()
    assert "most confused (validation" in report
    for p in pairs:
        assert f"{p['true']} -> {p['predicted']}: {p['count']}" in report


def test_fine_tune_runs_draw_them_too(head):
    settings, run = head
    finetuned = tiny.finetune_run(settings, run)
    assert (finetuned.path / "top_losses.png").is_file()
    assert len(_validation(finetuned)) == finetuned.record["n_val"] and "most_confused" in finetuned.record
    assert finetuned.record["val_images"]["fingerprint"] == run.record["val_images"]["fingerprint"]


def test_a_moved_dataset_still_records_the_run_and_says_why_there_is_no_picture(tmp_path):
    data = tiny.make_data(tmp_path / "data", n_train=10, n_test=2)
    settings = tiny.tiny_settings(data, tmp_path / "cache")
    tiny.extract_tiny(settings)
    shutil.move(str(data), str(tmp_path / "moved"))
    from featcache.heads import HeadConfig, train_head

    run = train_head(settings, HeadConfig(kind="linear", epochs=5, batch_size=16, val_fraction=0.2))
    assert not (run.path / "top_losses.png").exists() and (run.path / "validation.csv").exists()
    assert run.record["top_losses_note"].startswith("top_losses.png not drawn: Dataset")
