"""Fine-tuning from cached activations: the CPU's mode.

The backbone's lower part runs once per image and view into an activation
cache at a cut (``featcache.activations``); the stages above the cut and the
head then train from that cache, epoch after epoch, with BatchNormalization
kept in inference mode::

    cached activations [one random view per image] -> top stages -> pooling -> head

The top stages are the backbone's own layers (``cuts.split_at`` shares
them), so the image model saved at the end is the full-mode one: raw pixels
-> Preprocess -> backbone (lower part, trained top) -> head -> ClassNames.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

import keras
import numpy as np

from ..errors import brief, FeatcacheError
from ..settings import FeatureSettings
from .checks import match_features, match_validation
from .config import FinetuneConfig
from .model import Inference, image_model, make_optimizer
from .source import load_head, prepare, recorded_val_acc
from .stream import ActivationStream
from .workdir import base_record, finish_run, lock_run, open_work_dir, training_callbacks, unlock_run, work_dir_for


def ensure_activations(settings: FeatureSettings, cut_name: str, log: Callable[[str], None],
                       tta: bool = False) -> dict:
    """The activation caches a cached fine-tune reads, extracted now where missing (with progress).

    Train: one file per view of ``settings.views`` ('orig' first), drawn at random while training.
    Test: 'orig' alone, or every view with ``tta`` (test-time averaging, reported beside the
    single-view accuracy; 10,000 more maps per view on CIFAR-10).
    """
    from ..extraction import ExtractOptions, extract

    views = ("orig",) + tuple(v for v in settings.views if v != "orig")
    train = extract(replace(settings, views=views), ExtractOptions(splits=("train",), cut=cut_name), log=log)
    test_views = views if tta else ("orig",)
    test = extract(replace(settings, views=test_views), ExtractOptions(splits=("test",), cut=cut_name), log=log)
    return {"train": train, "test": test[0], "test_views": test, "views": views}


def _rows_of(path: Path, pooled_indices: np.ndarray, pooled_labels: np.ndarray) -> np.ndarray:
    """The activation cache's labels, after proving its rows are the pooled cache's images in the same order."""
    import h5py

    from ..cache import check

    check(path, full=False)
    with h5py.File(path, "r") as fh:
        indices, labels = fh["indices"][...], fh["labels"][...]
    if pooled_indices is not None and not (np.array_equal(indices, pooled_indices)
                                           and np.array_equal(labels, pooled_labels)):
        raise FeatcacheError(f"{path.name} does not hold the pooled cache's images in its order; remove it with "
                             f"`featcache cache rm {path}` and rerun.")
    return labels


def top_models(upper, pooling: str, head, shape: tuple):
    """``(train_model, features_model)`` on activation maps: top stages -> pooling -> head / pooled features."""
    inputs = keras.Input(shape, dtype="float32", name="activations")
    pool = keras.layers.GlobalAveragePooling2D if pooling == "avg" else keras.layers.GlobalMaxPooling2D
    features = pool(name=f"{pooling}_pool", dtype="float32")(upper(inputs))
    return keras.Model(inputs, head(features), name="top_and_head"), keras.Model(inputs, features, name="top")


def freeze_below(base, upper) -> int:
    """Train the layers of ``upper`` (BatchNormalization excepted); freeze the rest of ``base``."""
    above = {id(layer) for layer in upper.layers}
    base.trainable = True
    chosen = 0
    for layer in base.layers:
        layer.trainable = id(layer) in above and not isinstance(layer, keras.layers.BatchNormalization)
        chosen += bool(layer.trainable and layer.weights)
    return chosen


def predict(model, stream: ActivationStream) -> np.ndarray:
    """``model``'s outputs on every batch of ``stream``, in order, in inference mode (Keras keeps one traced
    predict function per model)."""
    return np.asarray(model.predict(stream.dataset(), verbose=0), dtype=np.float32)


# The image model on images against the trained top on cached activations: a few hundred validation
# images, which must agree on the top class (they differ by the activations' float16/bf16 rounding).
AGREEMENT_IMAGES = 500
MIN_AGREEMENT = 0.9


def check_image_model(full, split, indices: np.ndarray, val_rows: np.ndarray, val_probs: np.ndarray, size: int,
                      config: FinetuneConfig, log: Callable[[str], None]) -> dict:
    """Prove the one saved model (lower part on images, trained top, head) is the network that was trained."""
    n = min(AGREEMENT_IMAGES, len(val_rows))
    picked = np.linspace(0, len(val_rows) - 1, n).astype(int)
    _, probs = Inference(full)(split, indices[val_rows[picked]], size, config.batch_size)
    agree = float(np.mean(probs.argmax(1) == val_probs[picked].argmax(1)))
    worst = float(np.abs(probs - val_probs[picked]).max())
    if agree < MIN_AGREEMENT:
        raise FeatcacheError(f"The saved image model agrees with the trained top on cached activations for only "
                             f"{agree:.1%} of {n} validation images (at least {MIN_AGREEMENT:.0%} expected): the "
                             "model does not assemble into the network that was trained.")
    log(f"image model check ok: on {n} validation images it agrees with the top on cached activations for "
        f"{agree:.1%} of top classes (max |probability diff| {worst:.3f})")
    return {"images": n, "top1_agreement": agree, "max_abs_prob_diff": worst}


def finetune_cached(settings: FeatureSettings, config: FinetuneConfig, log: Callable[[str], None] = print,
                    callbacks: Sequence = ()) -> dict:
    """Fine-tune the top stages and the head from an activation cache; returns the run record."""
    import tensorflow as tf

    from ..activations import activation_shape_of, describe_cut
    from ..backbones import create_backbone, get_spec
    from ..backbones.cuts import split_at
    from ..cache import read_attrs

    prep = prepare(settings, config)
    head_run, cache, source = prep.head_run, prep.cache, prep.source
    train_rows, val_rows, test_rows = prep.train_rows, prep.val_rows, prep.test_rows
    info = describe_cut(get_spec(source.backbone), source.size, config.cut)
    log(f"fine-tuning {source.backbone} ({source.weights}, {source.size}px) from head run {head_run.run_id} on "
        f"activations at {info.cut.name} ({'x'.join(map(str, info.shape))}): {len(train_rows)} train / "
        f"{len(val_rows)} val / {len(test_rows)} test images")
    began = time.perf_counter()
    caches = ensure_activations(settings, info.cut.name, log, tta=config.tta)
    activation_seconds = time.perf_counter() - began
    log(f"activation caches ready in {activation_seconds:.0f}s")
    train_labels = _rows_of(caches["train"][0], cache.indices, cache.labels)
    for path in caches["train"][1:]:
        _rows_of(path, cache.indices, cache.labels)
    test_labels = _rows_of(caches["test"], None, None)
    attrs = read_attrs(caches["train"][0])
    if activation_shape_of(attrs) != info.shape:
        raise FeatcacheError(f"{caches['train'][0].name} holds activations of shape {activation_shape_of(attrs)}, "
                             f"not the {info.shape} of {info.cut.name}; remove it and rerun.")
    bf16 = attrs.get("precision") == "bf16"

    work_dir = work_dir_for(settings, head_run, config)
    lock = lock_run(work_dir)
    try:
        keras.utils.set_random_seed(config.seed)
        start = time.perf_counter()
        pooled = create_backbone(source.backbone, source.weights, source.size, source.pooling,
                                 cache_dir=settings.cache_dir)
        base = pooled.layers[1]
        _, upper = split_at(base, info.cut)
        head = load_head(head_run, source)
        model, features_model = top_models(upper, source.pooling, head, info.shape)
        chosen = freeze_below(base, upper)
        for layer in head.layers:  # an MLP head's BatchNormalization keeps its statistics too
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False

        def stream(paths, rows, labels, shuffle=False):
            return ActivationStream(paths, info.shape, rows, labels, config.batch_size, shuffle=shuffle,
                                    seed=config.seed)

        first = caches["train"][:1]
        check_rows = train_rows[:config.check_images]
        checks = {"feature_max_abs_diff": match_features(
            predict(features_model, stream(first, check_rows, train_labels)), cache, check_rows, log,
            what="the top stages' features from cached activations", bf16=bf16)}
        recorded = None if config.subset else recorded_val_acc(head_run)
        checks.update(match_validation(predict(model, stream(first, val_rows, train_labels)), head, cache, val_rows,
                                       recorded, log))

        steps = math.ceil(len(train_rows) / config.batch_size)
        if config.max_steps:
            steps = min(steps, config.max_steps)
        model.compile(optimizer=make_optimizer(config, steps * config.epochs),
                      loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        n_trainable = int(sum(np.prod(v.shape) for v in model.trainable_weights))
        log(f"training {chosen} layer(s) above {info.cut.name} and the head ({n_trainable:,} parameters; "
            f"BatchNormalization frozen) on {len(caches['views'])} cached view(s), {config.optimizer} at lr "
            f"{config.learning_rate:g} ({config.schedule}), {steps} steps per epoch")
        resuming = open_work_dir(work_dir)
        own, best_path = training_callbacks(work_dir, config, resuming, log)
        train = stream(caches["train"], train_rows, train_labels, shuffle=True).dataset(repeat=True)
        val = stream(first, val_rows, train_labels).dataset()
        try:
            model.fit(train, validation_data=val, epochs=config.epochs, steps_per_epoch=steps,
                      callbacks=own + list(callbacks), verbose=config.verbose, shuffle=False)
        except tf.errors.OpError as exc:
            raise FeatcacheError(f"Training stopped reading the activation cache: {brief(exc.message)}") from None
        train_seconds = time.perf_counter() - start
        log(f"trained in {train_seconds:.0f}s (with building the top and the checks)")
        if best_path.exists():
            model.load_weights(best_path)
        val_probs = predict(model, stream(first, val_rows, train_labels))
        test_probs = predict(model, stream([caches["test"]], test_rows, test_labels))
        tta = {}
        if len(caches["test_views"]) > 1:  # test-time averaging over the cached views, reported beside
            tta_val = np.mean([predict(model, stream([p], val_rows, train_labels)) for p in caches["train"]], axis=0)
            tta_test = np.mean([predict(model, stream([p], test_rows, test_labels)) for p in caches["test_views"]],
                               axis=0)
            tta = {"val_acc_tta": float(np.mean(tta_val.argmax(1) == cache.labels[val_rows])),
                   "test_acc_tta": float(np.mean(tta_test.argmax(1) == test_labels[test_rows]))}
            log(f"averaged over the {len(caches['views'])} cached views: val {tta['val_acc_tta']:.4f}, "
                f"test {tta['test_acc_tta']:.4f}")
        full = image_model(source, pooled, head)
        agreement = check_image_model(full, prep.dataset["train"], cache.indices, val_rows, val_probs, source.size,
                                      config, log)
        record = {
            **base_record(config, source, head_run, checks),
            "cut": info.cut.name,
            "activation_shape": list(info.shape),
            "activation_caches": [str(p) for p in caches["train"] + caches["test_views"]],
            "views": list(caches["views"]),
            "image_model_check": agreement,
            **tta,
            "trainable_layers": chosen,
            "trainable_params": n_trainable,
            "steps_per_epoch": steps,
            "n_train": int(len(train_rows)),
            **prep.split_info,
            "activation_seconds": round(activation_seconds, 2),
            "train_seconds": round(train_seconds, 2),
            "seconds": round(time.perf_counter() - start, 2),
            "replicas": 1,
        }
        from ..run_images import loaded_split_images

        train_split = prep.dataset["train"]
        return finish_run(work_dir, settings, config, full, record, source.class_names,
                          (cache.labels[val_rows], val_probs), (test_labels[test_rows], test_probs), log,
                          val_images=loaded_split_images(settings, train_split, cache.indices[val_rows]))
    finally:
        unlock_run(lock, work_dir)
