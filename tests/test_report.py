"""Run records: metrics, files and plots, atomic folders, listing and ranking (head and fine-tune together)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from featcache.errors import FeatcacheError, InvalidArgument
from featcache.report import errors_line, evaluate, runs_table, write_run
from featcache.runs import list_runs, load_run, new_run_id, runs_root, staged_run_dir

NAMES = ["cat", "dog", "frog"]


def probs_for(labels: np.ndarray, correct: int, n_classes: int = 3) -> np.ndarray:
    """One-hot-ish probabilities, right for the first ``correct`` rows and wrong after."""
    predicted = labels.copy()
    predicted[correct:] = (predicted[correct:] + 1) % n_classes
    probs = np.full((len(labels), n_classes), 0.1)
    probs[np.arange(len(labels)), predicted] = 0.8
    return probs


def make_run(cache_dir: Path, kind: str, val_correct: int, head: str = "mlp", seconds: float = 1.0,
             history=None, **extra) -> dict:
    """A finished run folder (through the staged, atomic path) with 10 val and 20 test rows."""
    val, test = np.arange(10) % 3, np.arange(20) % 3
    run_id = new_run_id(head if kind == "head" else kind, "efficientnet_lite0")
    with staged_run_dir(runs_root(cache_dir) / run_id) as tmp:
        (tmp / ("head.keras" if kind == "head" else "model.keras")).write_bytes(b"model")
        record = {"kind": kind, "run_id": run_id, "backbone": "efficientnet_lite0", "seconds": seconds, **extra}
        if kind == "head":
            record["head"] = head
        return write_run(tmp, {"backbone": "efficientnet_lite0", "val_fraction": 0.1}, record, NAMES, val,
                         probs_for(val, val_correct), test, probs_for(test, 15), history)


def test_evaluate_accuracy_per_class_and_confusion():
    labels = np.array([0, 0, 1, 1, 2, 2])
    probs = np.eye(3)[[0, 1, 1, 1, 2, 0]]
    result = evaluate(labels, probs, NAMES)
    assert result["acc"] == pytest.approx(4 / 6)
    assert result["per_class"] == {"cat": 0.5, "dog": 1.0, "frog": 0.5}
    assert result["confusion"].tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    with pytest.raises(ValueError, match=r"shape \(6, 3\)"):
        evaluate(labels, probs[:, :2], NAMES)


def test_write_run_writes_every_file_and_a_complete_record(cache_dir):
    history = {"loss": [1.0, 0.6, 0.5], "accuracy": [0.5, 0.7, 0.8], "val_loss": [0.9, 0.7, 0.72],
               "val_accuracy": [0.6, 0.7, 0.7]}
    record = make_run(cache_dir, "head", val_correct=7, history=history, summary="256-128-64 lr 0.002")
    path = runs_root(cache_dir) / record["run_id"]
    names = {p.name for p in path.iterdir()}
    assert {"head.keras", "settings.json", "record.json", "confusion.txt", "confusion.png", "curves.png",
            "classification_report.txt"} <= names
    for png in ("confusion.png", "curves.png"):
        assert (path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (path / png).stat().st_size > 5000
    on_disk = json.loads((path / "record.json").read_text())
    assert on_disk == record
    assert record["val_acc"] == pytest.approx(0.7) and record["test_acc"] == pytest.approx(0.75)
    assert record["kind"] == "head" and record["format"] == 1 and record["epochs_run"] == 3
    assert set(record["val_per_class"]) == set(NAMES) and record["n_val"] == 10 and record["n_test"] == 20
    assert record["history"]["val_loss"] == [0.9, 0.7, 0.72] and "created" in record
    confusion = (path / "confusion.txt").read_text()
    assert "validation confusion matrix" in confusion and "test confusion matrix" in confusion
    report = (path / "classification_report.txt").read_text()
    assert report.startswith("validation") and "\ntest\n" in report and "precision" in report
    assert json.loads((path / "settings.json").read_text())["val_fraction"] == 0.1


def test_write_run_accepts_csv_logger_rows_and_no_history(cache_dir):
    rows = [{"epoch": 0, "loss": 1.0, "accuracy": 0.5, "val_loss": 0.9, "val_accuracy": 0.6},
            {"epoch": 1, "loss": 0.8, "accuracy": 0.6, "val_loss": 0.8, "val_accuracy": 0.7}]
    record = make_run(cache_dir, "finetune", val_correct=9, history=rows)
    assert record["history"]["val_accuracy"] == [0.6, 0.7] and record["epochs_run"] == 2
    plain = make_run(cache_dir, "head", val_correct=5, head="logreg")
    path = runs_root(cache_dir) / plain["run_id"]
    assert not (path / "curves.png").exists() and "history" not in plain


def test_a_run_without_its_images_still_lists_its_losses_and_confusions(cache_dir):
    """Without the dataset rows there is no picture, and the record says so; losses and pairs are kept."""
    record = make_run(cache_dir, "head", val_correct=6)
    path = runs_root(cache_dir) / record["run_id"]
    assert not (path / "top_losses.png").exists() and record["top_losses_note"].startswith("top_losses.png not drawn")
    lines = (path / "validation.csv").read_text().splitlines()
    assert lines[0] == "position,row,true,predicted,p_true,p_predicted,loss" and len(lines) == 11
    assert lines[7].split(",")[1:4] == ["", "cat", "dog"]  # row 6 is wrong: label 0 predicted 1, no dataset row
    assert record["most_confused"] == [{"true": "cat", "predicted": "dog", "count": 2},
                                       {"true": "dog", "predicted": "frog", "count": 1},
                                       {"true": "frog", "predicted": "cat", "count": 1}]
    assert errors_line(record, path) == (f"{record['top_losses_note'].rstrip('.')}; most confused: cat -> dog (2), "
                                         "dog -> frog (1), frog -> cat (1)")
    assert "cat -> dog: 2" in (path / "classification_report.txt").read_text()


def test_staged_run_dir_is_all_or_nothing(tmp_path):
    final = tmp_path / "runs" / "r1"
    with pytest.raises(RuntimeError):
        with staged_run_dir(final) as tmp:
            (tmp / "head.keras").write_bytes(b"half")
            raise RuntimeError("killed")
    assert not final.exists() and list((tmp_path / "runs").iterdir()) == []
    with staged_run_dir(final) as tmp:
        assert tmp.name.startswith(".") and tmp.parent == final.parent
        (tmp / "record.json").write_text("{}")
    assert (final / "record.json").exists() and not tmp.exists()
    with pytest.raises(FeatcacheError, match="already exists"):
        with staged_run_dir(final):
            pass


def test_run_ids_sort_by_time_and_name_kind_and_backbone():
    run_id = new_run_id("mlp", "efficientnet_lite0+mobilenetv2", when=1795500000)
    assert re.fullmatch(r"\d{8}-\d{6}-mlp-efficientnet_lite0\+mobilenetv2-[0-9a-f]{4}", run_id)
    assert new_run_id("mlp", "x/y z").split("-")[3] == "x_y_z"


def test_list_runs_and_table_rank_heads_and_finetunes_by_validation(cache_dir):
    low = make_run(cache_dir, "head", val_correct=4, head="linear", seconds=2.5)
    high = make_run(cache_dir, "finetune", val_correct=9, seconds=300.0, size=224,
                    config={"learning_rate": 1e-5, "unfreeze": "top:20"}, head_run=low["run_id"])
    mid = make_run(cache_dir, "head", val_correct=7, head="mlp", summary="224px 256-128-64 drop 0.5")
    (runs_root(cache_dir) / ".20261125-000000-mlp-x-dead.tmp-1").mkdir()  # a run being written
    (runs_root(cache_dir) / "not-a-run").mkdir()  # no record.json
    (runs_root(cache_dir) / "broken").mkdir()
    (runs_root(cache_dir) / "broken" / "record.json").write_text("{half")
    runs = list_runs(cache_dir)
    assert [r.run_id for r in runs] == [high["run_id"], mid["run_id"], low["run_id"]]
    assert runs[0].kind == "finetune" and runs[0].model_path.name == "model.keras"
    assert runs[1].model_path.name == "head.keras" and runs[1].settings["val_fraction"] == 0.1
    assert [r.run_id for r in list_runs(cache_dir, kind="head")] == [mid["run_id"], low["run_id"]]
    with pytest.raises(InvalidArgument, match="Unknown run kind 'heads'; expected one of: 'head', 'finetune'"):
        list_runs(cache_dir, kind="heads")
    assert [r.run_id for r in list_runs(runs_root(cache_dir))] == [r.run_id for r in runs]
    table = runs_table(runs).splitlines()
    assert table[0].split() == ["run", "backbone", "head", "settings", "val_acc", "test_acc", "seconds"]
    body = table[2:]
    assert [line.split()[0] for line in body] == [high["run_id"], mid["run_id"], low["run_id"]]
    assert "finetune" in body[0] and "0.9000" in body[0] and "unfreeze top:20" in body[0] and "300.0" in body[0]
    assert "224px 256-128-64 drop 0.5" in body[1] and "0.7000" in body[1] and "0.7500" in body[1]
    assert runs_table([]) == "no runs yet"


def test_load_run_by_id_prefix_or_path(cache_dir):
    a = make_run(cache_dir, "head", val_correct=5)
    b = make_run(cache_dir, "head", val_correct=6, head="linear")
    assert load_run(cache_dir, a["run_id"]).run_id == a["run_id"]
    assert load_run(cache_dir, "-linear-").run_id == b["run_id"]
    assert load_run(cache_dir, str(runs_root(cache_dir) / b["run_id"] / "head.keras")).run_id == b["run_id"]
    with pytest.raises(FeatcacheError, match="matches 2 runs"):
        load_run(cache_dir, "efficientnet_lite0")
    with pytest.raises(FeatcacheError, match="No run 'nope'"):
        load_run(cache_dir, "nope")


def test_cli_runs_prints_the_table(cache_dir, tmp_path):
    from typer.testing import CliRunner

    import featcache.cli.head_cmd  # noqa: F401  (registers the commands)
    from featcache.cli.app import app

    runner = CliRunner()
    empty = runner.invoke(app, ["runs", "--cache-dir", str(tmp_path / "elsewhere")])
    assert empty.exit_code == 0 and "no runs yet" in empty.output
    worse = make_run(cache_dir, "head", val_correct=3, head="linear")
    better = make_run(cache_dir, "head", val_correct=8, head="mlp")
    result = runner.invoke(app, ["runs", "--cache-dir", str(cache_dir)])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[2].startswith(better["run_id"]) and lines[3].startswith(worse["run_id"])
