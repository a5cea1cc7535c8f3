"""What each lever adds to cached fine-tunes, in points of test accuracy, from their activation caches.

For each cached fine-tune run given: the head it started from, the run's single-view test
accuracy, and the accuracy averaged over the test views found in the cache (test-time
augmentation); then the same for the average of all runs' probabilities (an ensemble). Each
run's top stages and head are taken from its saved ``model.keras`` and run on the cached test
activations, as ``featcache finetune`` evaluates them, so nothing here touches images::

    .venv/bin/python bench/finetune_levers.py --cache-dir /work/cache16 \\
        --runs <finetune run id or folder> [...] [--views orig,flip] [--memo DIR] [--subsets] [--select-on-val]

Run folders may come from several cache folders (for example an ensemble of two backbones):
each run is evaluated on the test activations of the cache folder that holds it.

With ``--select-on-val``, each run's probabilities on its validation images (the rows of its
``validation.csv``, read from its train activation caches) choose the ensemble: the subset with
the best validation accuracy is named with its test accuracy, so the pick never sees the test split.
Every run must have held out the same validation images.

A view whose test activations are missing (the run was made without ``--tta``) can be cached
with ``featcache features --cut <cut> --views orig,flip`` and the run's other settings.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import h5py
import numpy as np


def test_cache(cache_dir: Path, record: dict, view: str) -> Path:
    """The one test activation cache of ``view`` at the run's backbone, cut and size."""
    pattern = f"{record['backbone']}@{record['cut']}-{record['size']}-test-{view}-*.h5"
    found = sorted(cache_dir.glob(pattern))
    if len(found) != 1:
        raise SystemExit(f"expected one {pattern} in {cache_dir}, found {len(found)}")
    return found[0]


def run_probabilities(cache_dir: Path, run_dir: Path, views: list[str],
                      memo: Path | None = None) -> tuple[dict, dict, np.ndarray]:
    """``(record, {view: test probabilities}, labels)`` for one cached fine-tune run, on the test activation
    caches of ``cache_dir``; with ``memo``, each view's probabilities are kept there and reused."""
    record = json.loads((run_dir / "record.json").read_text())
    if record.get("kind") != "finetune" or record.get("mode") != "cached":
        raise SystemExit(f"{run_dir} is not a cached fine-tune run")
    probs, labels, tops = {}, None, {}
    for view in views:
        path = test_cache(cache_dir, record, view)
        with h5py.File(path, "r") as fh:
            view_labels = fh["labels"][...]
        if labels is not None and not np.array_equal(labels, view_labels):
            raise SystemExit(f"{path.name} lists its images in another order than the orig view")
        labels = view_labels
        kept = memo / f"{run_dir.name}-{path.stem}.npy" if memo else None
        probs[view] = cached_predict(record, path, np.arange(len(labels)), labels, kept, tops)
    return record, probs, labels


def cached_predict(record: dict, path: Path, rows: np.ndarray, file_labels: np.ndarray, kept: Path | None,
                   tops: dict) -> np.ndarray:
    """The run's probabilities on ``rows`` of one activation cache, reused from ``kept`` when it exists;
    ``tops`` holds the run's top model once built, so a run loads its saved model at most once."""
    if kept is not None and kept.exists():
        return np.load(kept)
    if "top" not in tops:
        tops["top"] = top_model(record)
    from featcache.finetuning.cached import predict
    from featcache.finetuning.stream import ActivationStream

    probs = predict(tops["top"], ActivationStream([path], tuple(record["activation_shape"]), rows, file_labels, 256))
    if kept is not None:
        kept.parent.mkdir(parents=True, exist_ok=True)
        np.save(kept, probs)
    return probs


def val_probabilities(run_dir: Path, views: list[str], memo: Path | None = None) -> tuple[np.ndarray, dict, np.ndarray]:
    """``(dataset rows, {view: probabilities}, labels)`` of the run's validation images, from its train
    activation caches (the files its record lists), in dataset-row order."""
    import csv

    record = json.loads((run_dir / "record.json").read_text())
    with open(run_dir / "validation.csv", newline="") as fh:
        wanted = np.sort(np.array([int(r["row"]) for r in csv.DictReader(fh)], dtype=np.int64))
    probs, labels, tops = {}, None, {}
    for view in views:
        found = [Path(c) for c in record["activation_caches"] if f"-train-{view}-" in Path(c).name]
        if len(found) != 1:
            raise SystemExit(f"{run_dir.name}: expected one train activation cache of view {view}, found {found}")
        with h5py.File(found[0], "r") as fh:
            indices, file_labels = fh["indices"][...], fh["labels"][...]
        order = np.argsort(indices)
        at = order[np.clip(np.searchsorted(indices, wanted, sorter=order), 0, len(indices) - 1)]
        if not np.array_equal(indices[at], wanted):
            raise SystemExit(f"{found[0].name} lacks some of {run_dir.name}'s validation rows")
        labels = file_labels[at]
        kept = memo / f"{run_dir.name}-{found[0].stem}-val.npy" if memo else None
        probs[view] = cached_predict(record, found[0], at, file_labels, kept, tops)
    return wanted, probs, labels


def top_model(record: dict):
    """The run's trained top stages and head, from its saved image model, fed activations at its cut."""
    import keras

    from featcache.backbones.cuts import Cut, split_at
    from featcache.finetuning.cached import top_models

    model = keras.saving.load_model(record["model"], compile=False)
    pooled = model.get_layer("backbone").layer
    _, upper = split_at(pooled.layers[1], Cut(record["cut"]))
    top, _ = top_models(upper, record["pooling"], model.layers[-2], tuple(record["activation_shape"]))
    return top


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(probs.argmax(1) == labels))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", required=True)
    parser.add_argument("--runs", nargs="+", required=True,
                        help="cached fine-tune runs: ids under CACHE_DIR/runs or run folders")
    parser.add_argument("--views", default="orig,flip", help="test views to average ('orig' first)")
    parser.add_argument("--memo", default=None, help="folder to keep each run's test probabilities in and reuse")
    parser.add_argument("--subsets", action="store_true", help="also every ensemble of two or more of the runs")
    parser.add_argument("--select-on-val", action="store_true",
                        help="choose the ensemble among the subsets by validation accuracy (views averaged)")
    args = parser.parse_args()
    cache_dir = Path(args.cache_dir)
    views = [v for v in args.views.split(",") if v]
    if views[:1] != ["orig"]:
        parser.error("--views must start with orig")

    rows, single, averaged, labels = [], [], [], None
    val_rows, val_labels, val_averaged = None, None, []
    for run in args.runs:
        run_dir = Path(run) if Path(run).is_dir() else cache_dir / "runs" / run
        run_id = run_dir.name
        memo = Path(args.memo) if args.memo else None
        record, probs, run_labels = run_probabilities(run_dir.resolve().parent.parent, run_dir, views, memo)
        if labels is not None and not np.array_equal(labels, run_labels):
            raise SystemExit(f"{run_id} was evaluated on other test images than the first run")
        labels = run_labels
        if args.select_on_val:
            these, vprobs, vlabels = val_probabilities(run_dir, views, memo)
            if val_rows is not None and not np.array_equal(val_rows, these):
                raise SystemExit(f"{run_id} held out other validation images than the first run")
            val_rows, val_labels = these, vlabels
            val_averaged.append(np.mean([vprobs[v] for v in views], axis=0))
        head = json.loads((run_dir.parent / record["head_run"] / "record.json").read_text())
        mean = np.mean([probs[v] for v in views], axis=0)
        single.append(probs["orig"])
        averaged.append(mean)
        config = record.get("config", {})
        rows.append((f"{run_id} ({record['backbone']} @{record['size']})", f"{record.get('head')} head {head.get('test_acc', float('nan')):.2%}",
                     f"lr {config.get('learning_rate')}, {record.get('epochs_run')} epochs",
                     accuracy(probs["orig"], labels), accuracy(mean, labels)))
    print(f"| run | started from | training | test, orig view | test, {'+'.join(views)} averaged |")
    print("|---|---|---|---|---|")
    for i, (run_id, head, training, one, avg) in enumerate(rows, 1):
        print(f"| {i}. {run_id} | {head} | {training} | {one:.2%} | {avg:.2%} ({(avg - one) * 100:+.2f}) |")
    sizes = range(2, len(rows) + 1) if args.subsets else [len(rows)] if len(rows) > 1 else []
    for size in sizes:
        for members in itertools.combinations(range(len(rows)), size):
            one = accuracy(np.mean([single[i] for i in members], axis=0), labels)
            avg = accuracy(np.mean([averaged[i] for i in members], axis=0), labels)
            best = max(rows[i][3] for i in members)
            print(f"| ensemble of runs {', '.join(str(i + 1) for i in members)} | | | {one:.2%} "
                  f"({(one - best) * 100:+.2f} over its best run) | {avg:.2%} ({(avg - one) * 100:+.2f}) |")
    chosen = None
    if args.select_on_val:  # every non-empty subset, a single run included
        for size in range(1, len(rows) + 1):
            for members in itertools.combinations(range(len(rows)), size):
                val = accuracy(np.mean([val_averaged[i] for i in members], axis=0), val_labels)
                if chosen is None or val > chosen[0]:
                    avg = accuracy(np.mean([averaged[i] for i in members], axis=0), labels)
                    chosen = (val, members, avg)
    if chosen is not None:
        every = accuracy(np.mean(val_averaged, axis=0), val_labels)
        print("\nValidation, views averaged: " + ", ".join(
            f"run {i + 1} {accuracy(v, val_labels):.2%}" for i, v in enumerate(val_averaged)) + f"; all runs {every:.2%}")
        val, members, avg = chosen
        print(f"\nChosen on validation ({len(val_rows)} images, {'+'.join(views)} averaged): ensemble of runs "
              f"{', '.join(str(i + 1) for i in members)}, validation {val:.2%}, test {avg:.2%}")


if __name__ == "__main__":
    main()
