"""How fast the top stages may learn from cached activations: one learning rate on a subset, in memory.

Builds the cached fine-tune's model (``top_models`` over the stages above the cut, the head of a
head run) exactly as ``featcache finetune --mode cached`` does, trains it on every ``--stride``-th
training row of the activation cache (the head's own validation rows held out, orig view only,
arrays in memory and shuffled globally), and prints validation accuracy before and after
each epoch. It needs an activation cache and a head run made by featcache, e.g. after
``make finetune`` on CIFAR-10 (see the README)::

    .venv/bin/python bench/finetune_lr.py --cache-dir /work/cache16 --run <linear run> \\
        --activations /work/cache16/efficientnet_lite0@block5c_add-224-train-orig-<key>.h5 --lr 1e-4
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import h5py
import keras


def random_shift(maps, cells: int):
    """Each map of the batch moved by its own whole-cell offset in [-cells, cells] (mirrored borders): the
    feature-space stand-in for random crops that this script measured (it did not help; see the README)."""
    import tensorflow as tf

    if cells == 0:
        return maps
    height, width = int(maps.shape[1]), int(maps.shape[2])
    padded = tf.pad(maps, [[0, 0], [cells, cells], [cells, cells], [0, 0]], mode="SYMMETRIC")
    offsets = tf.random.uniform([2, tf.shape(maps)[0]], 0, 2 * cells + 1, dtype=tf.int32)
    rows = offsets[0][:, None] + tf.range(height)[None]
    cols = offsets[1][:, None] + tf.range(width)[None]
    return tf.gather(tf.gather(padded, rows, axis=1, batch_dims=1), cols, axis=2, batch_dims=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", required=True)
    parser.add_argument("--run", required=True, help="head run id under CACHE_DIR/runs")
    parser.add_argument("--activations", required=True, help="the train/orig activation cache file")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--schedule", choices=("cosine", "constant"), default="cosine")
    parser.add_argument("--stride", type=int, default=5, help="train on every N-th training row")
    parser.add_argument("--shift", type=int, default=0, help="random whole-cell shifts of the maps (0: none)")
    args = parser.parse_args()
    if args.shift < 0:
        parser.error(f"--shift must be >= 0; received {args.shift}")

    from featcache.backbones import create_backbone
    from featcache.backbones.cuts import Cut, split_at
    from featcache.datasets import validation_split
    import tensorflow as tf

    from featcache.finetuning.cached import freeze_below, top_models
    from featcache.heads import load_head

    run = Path(args.cache_dir) / "runs" / args.run
    record = json.loads((run / "record.json").read_text())
    with h5py.File(args.activations, "r") as fh:
        attrs = dict(fh.attrs)
        shape = tuple(json.loads(attrs["activation_shape"]))
        labels = fh["labels"][...]
        train, val = validation_split(labels, record.get("val_fraction", 0.1), record.get("val_seed", 0))
        train, val = train[::args.stride], val[::2]
        x = fh["features"][train].astype("float32").reshape((-1,) + shape)
        xv = fh["features"][val].astype("float32").reshape((-1,) + shape)
    y, yv = labels[train], labels[val]
    keras.utils.set_random_seed(0)
    pooled = create_backbone(str(attrs["backbone"]), "imagenet", int(attrs["size"]), "avg", cache_dir=args.cache_dir)
    base = pooled.layers[1]
    _, upper = split_at(base, Cut(str(attrs["cut"])))
    head = load_head(run / "head.keras")
    model, _ = top_models(upper, "avg", head, shape)
    freeze_below(base, upper)
    for layer in head.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
    rate = args.lr
    if args.schedule == "cosine":
        rate = keras.optimizers.schedules.CosineDecay(args.lr, decay_steps=args.epochs * len(x) // 32)
    model.compile(optimizer=keras.optimizers.Adam(rate), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    before = model.evaluate(xv, yv, batch_size=256, verbose=0)[1]
    print(f"{record.get('head')} head, lr {args.lr:g} {args.schedule}, shift {args.shift}, {len(x)} train / {len(xv)} val rows: "
          f"val before {before:.4f}", flush=True)
    train_data = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=0).batch(32)
    train_data = train_data.map(lambda a, b: (random_shift(a, args.shift), b)).prefetch(2)
    history = model.fit(train_data, epochs=args.epochs, validation_data=(xv, yv), verbose=2)
    print("val after each epoch:", ", ".join(f"{a:.4f}" for a in history.history["val_accuracy"]))


if __name__ == "__main__":
    main()
