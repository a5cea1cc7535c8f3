"""Time a head on random cached-like features: the product's promise is a head in seconds.

    .venv/bin/python bench/bench_head.py                       # mlp, 50,000 x 2,048 float16, 20 epochs
    .venv/bin/python bench/bench_head.py --variant all         # every training path, one process each
    .venv/bin/python bench/bench_head.py --variant parts       # where an epoch's time goes (7 processes)
    .venv/bin/python bench/bench_head.py --kind logreg --blas-threads 2

Features are class-dependent gaussian blobs stored as float16, split like CIFAR-10
(``--rows`` train images of which 10% validation, plus ``--test-rows``). Early stopping
is off (patience = epochs) so every variant runs the same number of epochs.

Variants (whole head training, fixed costs included):
  loop       featcache.heads.fit_head: one tf.function per epoch over in-memory tensors, the step
             on featcache.training_step's fused kernels, validation inside the same call
  loop-jit   the same epoch function with jit_compile=True (XLA)
  fit        plain model.fit on the float16 arrays at batch 256 (the naive baseline)
  fit-fast   model.fit on standardised float32 arrays, steps_per_execution = steps per epoch
Parts (``--variant parts`` runs each in its own process): only the training steps, the median
epoch after an untimed tracing epoch, times the epoch count:
  floor          the first layer's forward and weight-gradient matrix products, nothing else
  grads-only     the product mlp's fused forward and backward; gradients summed, never applied
  no-bn-dropout  Dense+ReLU layers of the same widths (no BatchNormalization, no dropout), Keras' Adam
  sgd            the product mlp's fused step with plain SGD instead of Adam
  keras-adam     the product mlp through Keras' own training call and Adam (the loop's step before)
  adam           the product mlp's fused step and Adam: the loop's epoch without validation
  torch          the same mlp and Adam in PyTorch (needs the 'lite' extra)

Where the target stands (50,000 x 2,048 float16, 20 epochs, batch 1024, ``--variant loop``).
Measured 2026-11-25 on the project's 2-core VM, an Intel Xeon with AVX-512, three runs each,
interleaved with the code before the fused step (a git worktree of commit 87adfb6):
  before  26.9 / 25.7 / 24.1 s
  after   19.5 / 18.0 / 19.3 s   (val_acc 0.671 against 0.670)
The parts, two interleaved runs each: keras-adam 22.0 / 20.6 s (1.10 / 1.03 s per epoch), adam
16.7 / 17.0 s (0.84 / 0.85). A tf.profiler trace of one keras-adam epoch counted 46,545 op runs
in 49 steps: BatchNormalization 0.24 s, dropout 0.18 s and Adam 0.15 s of small element-wise
ops against 0.53 s for the first layer's matrix products. The fused step runs half as many ops
(23,245). What else went into the 25%, each measured on its own in the same process:
validation inside the epoch's graph call (an eager call took 0.055 s per epoch), no
AutoGraph when tracing (first epoch 2.3 s instead of 3.1 s), and the training tensor
standardised by TensorFlow from the float16 rows (0.41 s instead of 0.69 s).
The VM's speed drifts by up to 30% over minutes (the code before took 20.9-28.4 s in 18 runs
over 70 minutes; the fused step 18.0-25.3 s, median 19.6 s, in 14 runs over 50 minutes, 8 of
them at or under 20 s), so the margin under 20 s is thin; a larger batch widens it: at batch 2048 and lr 4e-3,
16.6 / 16.7 s against 18.5 / 18.9 s at 1024 in the same interleaved pairs.

Earlier measurements, with the Keras training call (before the fused step):
  On the VM's earlier CPU (AMD EPYC, AVX2): floor 15.9 s, grads-only 20.7, no-bn-dropout 19.9,
  sgd 22.1, keras-adam 23.4, torch 24.1, loop 28.3. On the Xeon: floor 12.4 s, grads-only 17.4,
  no-bn-dropout 15.0, sgd 19.2, keras-adam 21.3, torch 21.0, loop 27.8.
  XLA compiling each step (not the epoch) ran 7.3 s per epoch. Batch 2048 (lr 4e-3) gave
  26.2/23.4/24.3 s and 4096 23.4/23.1/20.9 s against 30.0/28.3/26.7 s at 1024. bfloat16 matrix
  products were slower than float32 in TensorFlow here (0.62 against 0.36 s per epoch of the
  first layer's two products) and float16 no faster (0.34 s), so the step stays float32.
  Zero-copy input tensors (dlpack) are not possible: TensorFlow aborts on numpy's 16-byte alignment.
  fit (batch 256)        53.3 s at load 2.1 (80 s CPU)
  fit-fast (batch 1024)  54.4 s at load 2.6 (57 s CPU)
  loop-jit (XLA)         14x slower than loop (5,000 x 1,280, 5 epochs: 52.8 s against 3.8 s)
On small data the loop also avoids model.fit's per-epoch overhead: 5,000 x 1,280 took 9-12 s
against 26-36 s for fit-fast. logreg: 4.3 s with one BLAS thread, 24-34 s with two.
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
# Where an epoch of the loop goes: each runs only the training steps, timed per epoch after tracing.
PARTS = ("floor", "grads-only", "no-bn-dropout", "sgd", "keras-adam", "adam", "torch")


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


def _median_epoch(epoch, epochs: int) -> tuple[float, int, float]:
    """(median seconds of ``epochs`` timed epochs, scaled to the run's length), after one untimed tracing epoch."""
    epoch()
    times = []
    for _ in range(epochs):
        start = time.perf_counter()
        epoch()
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * epochs, epochs, float("nan")


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

    return _median_epoch(lambda: epoch().numpy(), epochs)


def keras_part(part: str, x: np.ndarray, y: np.ndarray, epochs: int, config) -> tuple[float, int, float]:
    """The loop's training steps (shuffled gathers, forward, backward, update) with one thing changed.

    grads-only: the product mlp, gradients computed and summed but never applied;
    no-bn-dropout: Dense+ReLU layers of the same widths, Keras' Adam; sgd: the product mlp, plain SGD;
    keras-adam: the product mlp through Keras' own training call, Keras' Adam (the loop's step until 2026-11-25);
    adam: the product mlp and optimizer on ``featcache.training_step``, i.e. the loop's epoch without validation.
    """
    import keras
    import tensorflow as tf

    from featcache import heads
    from featcache.training_step import FusedAdam, training_forward, training_loss

    classes = int(y.max()) + 1
    if part == "no-bn-dropout":
        inputs = keras.Input((x.shape[1],))
        h = inputs
        for units in config.units:
            h = keras.layers.Dense(units, activation="relu")(h)
        core = keras.Model(inputs, keras.layers.Dense(classes, activation="softmax")(h))
    else:
        identity = heads.Standardizer(np.zeros(x.shape[1]), np.ones(x.shape[1]))
        _, core = heads._core(heads.build_head("mlp", x.shape[1], classes, identity, config.units, config.dropout))
    variables = core.trainable_variables
    optimizer = {"sgd": keras.optimizers.SGD, "keras-adam": keras.optimizers.Adam,
                 "no-bn-dropout": keras.optimizers.Adam}.get(part, FusedAdam)(config.learning_rate)
    optimizer.build(variables)
    fused = training_forward(core)
    n = x.shape[0]
    steps = -(-n // config.batch_size)
    bounds = tf.constant(np.rint(np.linspace(0, n, steps + 1)).astype(np.int32))
    x, y = tf.constant(x), tf.constant(y.astype(np.int32))

    @tf.function
    def epoch(order):
        total = tf.constant(0.0)
        for step in tf.range(steps):
            rows = order[bounds[step]:bounds[step + 1]]
            xb, yb = tf.gather(x, rows), tf.gather(y, rows)
            with tf.GradientTape() as tape:
                if part in ("keras-adam", "no-bn-dropout"):
                    loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(yb, core(xb, training=True)))
                else:
                    seed = tf.stack([tf.constant(7, tf.int64), tf.cast(step, tf.int64) * 65536])
                    loss = tf.reduce_mean(training_loss(fused, xb, yb, seed)[0])
            grads = tape.gradient(loss, variables)
            if part == "grads-only":
                total += tf.add_n([tf.reduce_sum(g) for g in grads])
            else:
                optimizer.apply(grads, variables)
            total += loss
        return total

    order = tf.constant(np.random.default_rng(0).permutation(n).astype(np.int32))
    return _median_epoch(lambda: epoch(order).numpy(), epochs)


def torch_part(x: np.ndarray, y: np.ndarray, epochs: int, config) -> tuple[float, int, float]:
    """The same mlp and Adam in PyTorch (2 threads): would another framework's kernels beat TensorFlow's here?"""
    try:
        import torch
    except ImportError:
        raise SystemExit("torch variant: PyTorch is not installed (pip install -e '.[lite]').") from None
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    layers, width = [], x.shape[1]
    for units in config.units:  # Keras' BatchNormalization epsilon and momentum
        layers += [torch.nn.Linear(width, units, bias=False), torch.nn.BatchNorm1d(units, eps=1e-3, momentum=0.01),
                   torch.nn.ReLU(), torch.nn.Dropout(config.dropout)]
        width = units
    model = torch.nn.Sequential(*layers, torch.nn.Linear(width, int(y.max()) + 1))
    optimizer = torch.optim.Adam(model.parameters(), config.learning_rate, eps=1e-7)
    loss_fn = torch.nn.CrossEntropyLoss()
    xs, ys = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
    n = x.shape[0]
    bounds = np.rint(np.linspace(0, n, -(-n // config.batch_size) + 1)).astype(int)

    def epoch():
        order = torch.randperm(n)
        for start, stop in zip(bounds[:-1], bounds[1:]):
            rows = order[start:stop]
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(xs[rows]), ys[rows]).backward()
            optimizer.step()

    return _median_epoch(epoch, epochs)


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
    elif args.variant == "torch":
        seconds, epochs, val_acc = torch_part(heads.prepare(data).x_train, data.y_train, args.epochs, config)
    elif args.variant in PARTS:
        seconds, epochs, val_acc = keras_part(args.variant, heads.prepare(data).x_train, data.y_train, args.epochs,
                                              config)
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
    parser.add_argument("--variant", default="loop",
                        choices=VARIANTS + PARTS[1:] + ("all", "parts"))
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
    if args.variant in ("all", "parts"):
        for variant in VARIANTS if args.variant == "all" else PARTS:
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
        timed = " (median epoch x epochs, tracing excluded)" if args.variant in PARTS else ""
        print(f"{result['variant']:<13} {result['kind']} {result['rows']}x{result['width']} float16, "
              f"{steps}: {result['seconds']:.1f} s{timed} "
              f"({result['seconds_per_epoch']:.2f} s/epoch, {result['cpu_seconds']:.0f} s CPU) val_acc "
              f"{result['val_acc']:.3f} [load avg {result['load_avg_1min']:.1f}]", flush=True)


if __name__ == "__main__":
    main()
