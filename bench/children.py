"""One measurement per process, so that each reports its own peak RSS.

``python bench/children.py KIND '{"json": "arguments"}'`` prints one JSON
line (the last line of stdout). ``bench/run.py`` starts these; they can be
run by hand to repeat a single figure.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402


def _status_mb(field: str) -> float:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class RSSSampler:
    """The largest VmRSS seen every 50 ms.

    Needed on these VMs: the kernel's proactive reclaim (DAMON 'pageout')
    drops file-backed pages such as TensorFlow's libraries, and then VmHWM
    and ru_maxrss can read far below the real peak (45 MB for a process
    that held 850 MB was seen here). The peak reported is the largest of
    the three.
    """

    def __init__(self, interval: float = 0.05):
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(interval,), daemon=True)
        self._thread.start()

    def _loop(self, interval: float) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _status_mb("VmRSS"))
            self._stop.wait(interval)


SAMPLER = None  # set in __main__ only: a measurement process samples itself from its start


def peak_rss_mb() -> dict:
    """Peak resident set size of this process in MB: ru_maxrss, VmHWM, sampled VmRSS, and their maximum."""
    out = {"ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "vmhwm_mb": _status_mb("VmHWM"),
           "sampled_max_rss_mb": max(SAMPLER.peak if SAMPLER else 0.0, _status_mb("VmRSS"))}
    out["peak_mb"] = max(out.values())
    return out


def cadence(stamps: list[tuple[float, int]]) -> dict:
    """Images/s from the median time per image between consecutive batch completions.

    The mean rate (rows / total time) is what a user waits; the median
    cadence is robust to other processes' bursts on a shared CPU. The first
    batch (pipeline start-up) has no predecessor and is left out.
    """
    per_image = [(t1 - t0) / rows for (t0, _), (t1, rows) in zip(stamps, stamps[1:]) if rows]
    if not per_image:
        return {}
    return {"images_per_s_median_batch": 1.0 / float(np.median(per_image)), "batches_timed": len(per_image)}


def naive(args: dict) -> dict:
    """The write-ups' path: Input(32x32x3) -> Resizing -> preprocess -> backbone -> pooling, ``model.predict``."""
    import keras

    from featcache.backbones import create_backbone, get_spec

    with np.load(args["npz"]) as data:
        images = data["x_train"]
    spec = get_spec(args["backbone"])
    size = int(args["size"])
    start = time.perf_counter()
    features = create_backbone(spec.name, args["weights"], size, cache_dir=args["cache_dir"])
    inputs = keras.Input(images.shape[1:])
    x = keras.layers.Resizing(size, size, interpolation="bilinear")(inputs)
    x = keras.layers.Lambda(spec.preprocess)(x)
    model = keras.Model(inputs, features(x))
    build = time.perf_counter() - start
    batch = int(args.get("batch_size", 32))
    model.predict(images[:batch], batch_size=batch, verbose=0)  # trace once, outside the timing
    stamps: list[tuple[float, int]] = []

    class Stamp(keras.callbacks.Callback):
        def on_predict_batch_end(self, index, logs=None):
            stamps.append((time.perf_counter(), min(batch, images.shape[0] - index * batch)))

    start = time.perf_counter()
    out = model.predict(images, batch_size=batch, verbose=0, callbacks=[Stamp()])
    seconds = time.perf_counter() - start
    np.save(args["sample_out"], out[: int(args.get("sample", 256))].astype(np.float32))
    return {"images": int(images.shape[0]), "seconds": seconds, "images_per_s": images.shape[0] / seconds,
            **cadence(stamps), "build_seconds": build, "batch_size": batch, **peak_rss_mb()}


def featcache_extract(args: dict) -> dict:
    """featcache's extractor on the same images (an image folder of JPEGs or an .npz), train split only.

    ``decide``: let 'auto' convert and measure even for a small job (the untimed warm-up that makes the
    engine artefacts and the decision the timed run then reuses).
    """
    from featcache import engines
    from featcache.cache import read_attrs
    from featcache.extraction import ExtractOptions, extract
    from featcache.settings import FeatureSettings

    if args.get("decide"):
        engines.auto.conversion_pays = lambda rows, size: True

    stamps: list[tuple[float, int]] = []
    engine_seconds: list[float] = []
    make_engine = engines.make_engine

    class Timed:
        """The engine featcache chose, stamping each batch's completion (the extractor is untouched)."""

        def __init__(self, inner):
            self.inner, self.name, self.precision = inner, inner.name, inner.precision

        def __call__(self, batch):
            start = time.perf_counter()
            out = self.inner(batch)
            stamps.append((time.perf_counter(), int(out.shape[0])))
            engine_seconds.append(stamps[-1][0] - start)
            return out

    engines.make_engine = lambda *a, **k: Timed(make_engine(*a, **k))

    settings = FeatureSettings(backbone=args["backbone"], weights=args["weights"], data=args["data"],
                               size=int(args["size"]), cache_dir=args["cache_dir"],
                               precision=args.get("precision", "auto"))
    options = ExtractOptions(splits=("train",), batch_size=args.get("batch_size"), engine=args.get("engine", "auto"),
                             progress=False)
    messages: list[str] = []
    start = time.perf_counter()
    path = extract(settings, options, log=messages.append)[0]
    wall = time.perf_counter() - start
    attrs = read_attrs(path)
    seconds = float(attrs["extract_seconds"])
    n = int(attrs["n_rows"])
    # A cache assembled from an interrupted run's chunks records 0 s: no rate (the warm-up may meet one).
    return {"images": n, "seconds": seconds, "images_per_s": n / seconds if seconds else None, **cadence(stamps),
            "engine_share_of_time": sum(engine_seconds) / seconds if seconds else None, "wall_seconds": wall,
            "engine": attrs["engine"], "precision": attrs.get("precision", "f32"), "feed": attrs.get("feed"),
            "batch_size": int(attrs["batch_size"]), "cache": str(path), "log": messages, **peak_rss_mb()}


def engine_only(args: dict) -> dict:
    """The forward-pass rate of the very engine the extractor uses (same decision, same artefact, same
    feed), on batches already in memory: what the pipeline around it is measured against."""
    from featcache.datasets import load_dataset
    from featcache.extraction import ExtractOptions, _Runner
    from featcache.feeding import fed_as_stored
    from featcache.settings import FeatureSettings

    settings = FeatureSettings(backbone=args["backbone"], weights=args["weights"], data=args["data"],
                               size=int(args["size"]), cache_dir=args["cache_dir"],
                               precision=args.get("precision", "auto"))
    options = ExtractOptions(splits=("train",), batch_size=int(args["batch_size"]), engine=args.get("engine", "auto"),
                             progress=False)
    split = load_dataset(settings.data, settings.cache_dir)["train"]
    runner = _Runner(settings, options, args["backbone"], log=lambda m: None, rows=len(split))
    runner.resolve_precision(load_dataset(settings.data, settings.cache_dir))
    engine = runner.engine(split)
    with np.load(args["npz"]) as data:
        images = data["x_train"][: int(args.get("images", 512))].astype(np.float32)
    if fed_as_stored(split, False) is None:
        from featcache.preprocessing import prepare_batch

        images = np.asarray(prepare_batch(images, args["backbone"], int(args["size"])))
    batch = int(args["batch_size"])
    engine(images[:batch])  # warm-up
    rates = []
    for _ in range(int(args.get("rounds", 3))):
        start = time.perf_counter()
        for i in range(0, images.shape[0], batch):
            engine(images[i:i + batch])
        rates.append(images.shape[0] / (time.perf_counter() - start))
    return {"images_per_s": float(np.median(rates)), "rounds": rates, "engine": engine.name,
            "precision": engine.precision, "images": int(images.shape[0]), "batch_size": batch, **peak_rss_mb()}


def flops(args: dict) -> dict:
    """Forward FLOPs per image of the pooled backbone, from tf.profiler on the frozen graph at batch 1."""
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    from featcache.backbones import create_backbone

    size = int(args["size"])
    model = create_backbone(args["backbone"], None, size)
    function = tf.function(lambda x: model(x, training=False)).get_concrete_function(
        tf.TensorSpec((1, size, size, 3), tf.float32))
    graph = convert_variables_to_constants_v2(function).graph
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    profile = tf.compat.v1.profiler.profile(graph=graph, options=options)
    return {"flops_per_image": int(profile.total_float_ops), "method": "tf.compat.v1.profiler float_operation "
            "on the frozen graph at batch 1 (a multiply-add counts as 2 FLOPs)"}


def head(args: dict) -> dict:
    """A 20-epoch mlp head (featcache.heads defaults, early stopping off) on random float16 features."""
    import importlib.util

    if importlib.util.find_spec("featcache.heads") is None:
        return {"skipped": "featcache.heads does not exist in this checkout"}
    from featcache import heads
    from featcache.cache import FeatureKey, FeatureSet

    rows, width, epochs = int(args["rows"]), int(args["width"]), int(args["epochs"])
    test_rows, classes = int(args.get("test_rows", 1000)), 10
    rng = np.random.default_rng(0)

    def split(name: str, n: int) -> FeatureSet:
        labels = (np.arange(n) % classes).astype(np.int64)
        features = rng.standard_normal((n, width), dtype=np.float32).astype(np.float16)
        key = FeatureKey("bench", "none", 224, "bench", "avg", "float16", "random", name, "orig")
        return FeatureSet(features, labels, np.arange(n, dtype=np.int64), [f"c{i}" for i in range(classes)], key,
                          Path(f"bench-{name}.h5"))

    data = heads.assemble({"orig": [split("train", rows)]}, {"orig": [split("test", test_rows)]}, 0.1, 0)
    config = heads.HeadConfig(kind="mlp", epochs=epochs, patience=epochs)
    start = time.perf_counter()
    result = heads.fit_head(data, config)
    seconds = time.perf_counter() - start
    return {"rows": rows, "train_rows_after_val_split": int(data.x_train.shape[0]), "width": width,
            "test_rows": test_rows, "epochs_run": int(result.epochs_run), "seconds": seconds,
            "config": {"units": list(config.units), "batch_size": config.batch_size, "dropout": config.dropout},
            "note": f"featcache.heads.fit_head, mlp {config.units}, batch {config.batch_size}; includes "
                    "standardisation and scoring validation/test once", **peak_rss_mb()}


def end_to_end(args: dict) -> dict:
    """Steps of backbone+head training on upsampled images, timed on a sample (to extrapolate to an epoch)."""
    import keras

    from featcache.backbones import create_backbone, get_spec

    spec = get_spec(args["backbone"])
    size, batch, steps = int(args["size"]), int(args.get("batch_size", 32)), int(args.get("steps", 8))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch * (steps + 1), 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, batch * (steps + 1))
    features = create_backbone(spec.name, args["weights"], size)
    features.trainable = bool(args.get("trainable", False))
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Resizing(size, size, interpolation="bilinear")(inputs)
    x = keras.layers.Lambda(spec.preprocess)(x)
    x = features(x)
    for units in (256, 128, 64):  # featcache's default mlp head
        x = keras.layers.Dense(units, activation="relu")(x)
        x = keras.layers.Dropout(0.5)(x)
    outputs = keras.layers.Dense(10, activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.train_on_batch(images[:batch], labels[:batch])  # trace, outside the timing
    times = []
    for i in range(1, steps + 1):
        start = time.perf_counter()
        model.train_on_batch(images[i * batch:(i + 1) * batch], labels[i * batch:(i + 1) * batch])
        times.append(time.perf_counter() - start)
    step = float(np.median(times))
    return {"backbone": spec.name, "size": size, "batch_size": batch, "sample_images": batch * steps,
            "step_seconds_median": step, "step_seconds": times, "images_per_s": batch / step,
            "backbone_trainable": features.trainable, **peak_rss_mb()}


def parity(args: dict) -> dict:
    """Default logreg and mlp heads on f32 and on bf16 features of the same real images (library path)."""
    from featcache.extraction import ExtractOptions, extract
    from featcache.heads import HeadConfig, train_head
    from featcache.settings import FeatureSettings

    out = {}
    for precision in ("f32", "bf16"):
        settings = FeatureSettings(backbone=args["backbone"], weights=args["weights"], data=args["data"],
                                   cache_dir=args["cache_dir"], precision=precision)
        start = time.perf_counter()
        paths = extract(settings, ExtractOptions(progress=False), log=lambda m: None)
        from featcache.cache import read_attrs

        attrs = read_attrs(paths[0])
        out[precision] = {"extract_seconds": time.perf_counter() - start, "engine": attrs["engine"]}
        for kind in ("logreg", "mlp"):
            run = train_head(settings, HeadConfig(kind=kind), runs_dir=Path(args["cache_dir"]) / "runs")
            out[precision][kind] = {"val": run.val_acc, "test": run.test_acc, "seconds": run.record.get("seconds")}
    for kind in ("logreg", "mlp"):
        out[f"{kind}_test_difference_points"] = 100 * (out["bf16"][kind]["test"] - out["f32"][kind]["test"])
    return {**out, **peak_rss_mb()}


KINDS = {"naive": naive, "featcache": featcache_extract, "engine": engine_only, "flops": flops, "head": head,
         "e2e": end_to_end, "parity": parity}

if __name__ == "__main__":
    SAMPLER = RSSSampler()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    result = KINDS[sys.argv[1]](json.loads(sys.argv[2]))
    print(json.dumps(result))
