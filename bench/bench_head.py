"""Time a head on random cached-like features: the product's promise is a head in seconds.

    .venv/bin/python bench/bench_head.py                       # mlp, 50,000 x 2,048 float16, 20 epochs
    .venv/bin/python bench/bench_head.py --variant all         # every training path, one process each
    .venv/bin/python bench/bench_head.py --kind logreg --blas-threads 2

Features are class-dependent gaussian blobs stored as float16, split like CIFAR-10
(``--rows`` train images of which 10% validation, plus ``--test-rows``). Early stopping
is off (patience = epochs) so every variant runs the same number of epochs.

Variants:
  loop       featcache.heads.fit_head: one tf.function per epoch over in-memory tensors
  loop-jit   the same epoch function with jit_compile=True (XLA)
  fit        plain model.fit on the float16 arrays at batch 256 (the naive baseline)
  fit-fast   model.fit on standardised float32 arrays, steps_per_execution = steps per epoch
  floor      only the first layer's forward and weight-gradient matrix products, in the same
             kind of tf.function loop: the time no mlp of this width can beat here

Measured 2026-11-25 on the project's 2-core VM, shared with other jobs, so wall times move
with the load average printed on each line; process CPU seconds are the steadier figure.
50,000 x 2,048, 20 epochs:
  loop (batch 1024)      28.6 s wall at load 2.2 (50 s CPU); 42-72 s under load 3-5 (50-55 s CPU)
  fit-fast (batch 1024)  54.4 s at load 2.6 (57 s CPU)
  fit (batch 256)        53.3 s at load 2.1 (80 s CPU); 86 s at load 6
  loop-jit (XLA)         14x slower than loop (5,000 x 1,280, 5 epochs: 52.8 s against 3.8 s)
The loop is bound by the first layer's two matrix products (~95 GFLOP per epoch of 45,000
training rows). On an idle machine (load 1.2-1.7, 10:15 the same day):
  floor (batch 1024)     14.7 s (0.73 s/epoch; TensorFlow's matmul at ~125 GFLOP/s on these
                         shapes, where numpy's BLAS reaches ~172)
  loop (batch 1024)      29.6 s, of which ~3 s tracing and ~4 s standardising and scoring
So the 20 s target for 20 epochs is out of reach with TensorFlow's matmul here: the floor
plus the fixed costs alone come to ~22 s. The remaining ~0.4 s per epoch is the other
layers, BatchNormalization, dropout and Adam, dispatched op by op inside the loop.
On small data it also avoids model.fit's per-epoch overhead: 5,000 x 1,280 took 9-12 s
against 26-36 s for fit-fast. logreg (4.3 s with one BLAS thread, 24-34 s with two).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

VARIANTS = ("loop", "loop-jit", "fit", "fit-fast", "floor")


def synthetic(rows: int, test_rows: int, width: int, classes: int, seed: int = 0):
    """HeadData for one backbone and view, as ``assemble`` builds it from caches."""
    from featcache.cache import FeatureKey, FeatureSet
    from featcache.heads import assemble

    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, width)).astype(np.float32)

    def split(name: str, n: int) -> FeatureSet:
        labels = np.arange(n) % classes
        rng.shuffle(labels)
        features = (0.05 * centers[labels] + rng.normal(size=(n, width)).astype(np.float32) + 1.0).astype(np.float16)
        key = FeatureKey("bench", "none", 224, "bench", "avg", "float16", "random", name, "orig")
        return FeatureSet(features, labels.astype(np.int64), np.arange(n, dtype=np.int64),
                          [f"c{i}" for i in range(classes)], key, Path(f"bench-{name}.h5"))

    return assemble({"orig": [split("train", rows)]}, {"orig": [split("test", test_rows)]}, 0.1, seed)


def first_layer_floor(x: np.ndarray, epochs: int, batch_size: int, units: int) -> tuple[float, int, float]:
    """Seconds for ``epochs`` passes of x @ W and its weight gradient, nothing else (val_acc: NaN)."""
    import tensorflow as tf

    n = x.shape[0]
    steps = -(-n // batch_size)
    bounds = tf.constant(np.rint(np.linspace(0, n, steps + 1)).astype(np.int32))
    x = tf.constant(x)
    weights = tf.Variable(tf.random.normal((x.shape[1], units), stddev=0.01))

    @tf.function
    def epoch():
        for step in tf.range(steps):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(tf.matmul(x[bounds[step]:bounds[step + 1]], weights))
            weights.assign_sub(1e-9 * tape.gradient(loss, weights))
        return tf.constant(0)

    epoch()  # trace outside the timing
    start = time.perf_counter()
    for _ in range(epochs):
        epoch().numpy()
    return time.perf_counter() - start, epochs, float("nan")


def run_variant(args) -> dict:
    import keras

    from featcache import heads

    t0 = time.perf_counter()
    data = synthetic(args.rows, args.test_rows, args.width, args.classes)
    made = time.perf_counter() - t0
    config = heads.HeadConfig(kind=args.kind, epochs=args.epochs, patience=args.epochs,
                              batch_size=args.batch_size or (256 if args.variant == "fit" else 1024),
                              learning_rate=args.lr or heads.HeadConfig.learning_rate)
    start, cpu_start = time.perf_counter(), time.process_time()
    if args.kind == "logreg":
        prepared = heads.prepare(data)
        model, info = heads.fit_logreg(prepared, data, config, blas_threads=args.blas_threads)
        seconds, epochs = time.perf_counter() - start, max(r["iterations"] for r in info["grid"])
        val_acc = max(r["val_acc"] for r in info["grid"])
    elif args.variant == "loop":
        result = heads.fit_head(data, config)
        seconds, epochs = result.seconds, result.epochs_run
        val_acc = float(np.mean(result.val_probs.argmax(1) == data.y_val))
    elif args.variant == "floor":
        seconds, epochs, val_acc = first_layer_floor(data.x_train.astype(np.float32), args.epochs,
                                                     config.batch_size, config.units[0])
    elif args.variant == "loop-jit":
        prepared = heads.prepare(data)
        model = heads.build_head(args.kind, data.width, data.n_classes, prepared.standardizer, config.units,
                                 config.dropout, config.seed)
        history, _, by_view = heads.fit_keras(model, prepared, data, config, jit_compile=True)
        seconds, epochs = time.perf_counter() - start, len(history["loss"])
        val_acc = float(np.mean(by_view.mean(0).argmax(1) == data.y_val))
    else:
        keras.utils.set_random_seed(0)
        standardizer = heads.Standardizer.fit(data.x_train)
        model = heads.build_head(args.kind, data.width, data.n_classes, standardizer, config.units,
                                 config.dropout, config.seed)
        callbacks = [keras.callbacks.EarlyStopping(monitor="val_loss", patience=config.patience,
                                                   restore_best_weights=True),
                     keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=2)]
        if args.variant == "fit":
            model.compile(heads.make_optimizer("adam", config.learning_rate), "sparse_categorical_crossentropy",
                          metrics=["accuracy"])
            model.fit(data.x_train, data.y_train, validation_data=(data.x_val[0], data.y_val), epochs=config.epochs,
                      batch_size=config.batch_size, callbacks=callbacks, verbose=0)
            probs = model.predict(data.x_val[0], verbose=0, batch_size=4096)
        else:
            layer, core = heads._core(model)
            x, xv = standardizer.transform(data.x_train), standardizer.transform(data.x_val[0])
            steps = -(-len(x) // config.batch_size)
            core.compile(heads.make_optimizer("adam", config.learning_rate), "sparse_categorical_crossentropy",
                         metrics=["accuracy"], steps_per_execution=steps)
            core.fit(x, data.y_train, validation_data=(xv, data.y_val), epochs=config.epochs,
                     batch_size=config.batch_size, callbacks=callbacks, verbose=0)
            probs = core.predict(xv, verbose=0, batch_size=4096)
        seconds, epochs = time.perf_counter() - start, config.epochs
        val_acc = float(np.mean(probs.argmax(1) == data.y_val))
    cpu = time.process_time() - cpu_start
    return {"variant": args.variant if args.kind != "logreg" else f"blas{args.blas_threads}",
            "kind": args.kind, "rows": args.rows, "width": args.width, "epochs": epochs,
            "batch_size": config.batch_size, "seconds": round(seconds, 2),
            "seconds_per_epoch": round(seconds / max(1, epochs), 3),
            "val_acc": round(val_acc, 4), "cpu_seconds": round(cpu, 1), "data_seconds": round(made, 2), "load_avg_1min": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="loop", choices=VARIANTS + ("all",))
    parser.add_argument("--kind", default="mlp", choices=("mlp", "linear", "logreg"))
    parser.add_argument("--rows", type=int, default=50_000, help="train-split rows (10%% become validation)")
    parser.add_argument("--test-rows", type=int, default=10_000)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=None, help="default 1024 (256 for 'fit')")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--blas-threads", type=int, default=1, help="logreg only: BLAS threads")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args()
    if args.variant == "all":
        for variant in VARIANTS:
            options = {"--variant": variant, "--kind": args.kind, "--rows": args.rows, "--test-rows": args.test_rows,
                       "--width": args.width, "--classes": args.classes, "--epochs": args.epochs,
                       "--batch-size": args.batch_size, "--lr": args.lr}
            cmd = [sys.executable, __file__] + [str(v) for k, v in options.items() if v is not None for v in (k, v)]
            subprocess.run(cmd + (["--json"] if args.json else []), check=False)
        return
    result = run_variant(args)
    if args.json:
        print(json.dumps(result))
    else:
        steps = (f"{result['epochs']} L-BFGS iterations at most per C" if args.kind == "logreg"
                 else f"{result['epochs']} epochs, batch {result['batch_size']}")
        print(f"{result['variant']:<10} {result['kind']} {result['rows']}x{result['width']} float16, "
              f"{steps}: {result['seconds']:.1f} s "
              f"({result['seconds_per_epoch']:.2f} s/epoch, {result['cpu_seconds']:.0f} s CPU) val_acc "
              f"{result['val_acc']:.3f} [load avg {result['load_avg_1min']:.1f}]", flush=True)


if __name__ == "__main__":
    main()
