"""The image model a fine-tune trains, its one inference function, and the data that feeds it."""

from __future__ import annotations

from typing import Callable, Optional

import keras
import numpy as np

from ..errors import brief, FeatcacheError
from ..heads import make_optimizer as head_optimizer
from ..layers import ClassNames, InferenceMode, Preprocess
from .config import FinetuneConfig, parse_unfreeze
from .source import Source

# --- building the model --------------------------------------------------------------------


def build_model(source: Source, head, config: FinetuneConfig, cache_dir: str):
    """Input(raw RGB [0, 255], any size) -> augmentation -> Preprocess -> backbone -> head -> ClassNames.

    Returns ``(model, backbone_features_model)``; the backbone starts frozen.
    """
    from ..backbones import create_backbone

    policy = "mixed_float16" if config.mixed_precision else None
    backbone = create_backbone(source.backbone, source.weights, source.size, source.pooling,
                               cache_dir=cache_dir, dtype_policy=policy)
    augment = []
    if config.flip:
        augment.append(keras.layers.RandomFlip("horizontal", seed=config.seed, name="augment_flip"))
    if config.translate > 0:
        augment.append(keras.layers.RandomTranslation(config.translate, config.translate, fill_mode="reflect",
                                                      seed=config.seed + 1, name="augment_translate"))
    return image_model(source, backbone, head, augment), backbone


def image_model(source: Source, backbone, head, augment=()):
    """The model a run saves: raw pixels of any size in, class probabilities (and names) out."""
    inputs = keras.Input((None, None, 3), dtype="float32", name="images")
    x = inputs
    for layer in augment:
        x = layer(x)
    x = Preprocess(source.backbone, source.size, name="preprocess")(x)
    features = InferenceMode(backbone, name="backbone")(x)
    probs = head(features)
    outputs = ClassNames(source.class_names, name="class_names", dtype="float32")(probs)
    return keras.Model(inputs, outputs, name=f"featcache_{source.backbone}_finetuned")


class Inference:
    """One traced inference function for the whole run: pooled features and probabilities of a batch.

    Traced once for any image size and batch (so the checks, the final
    evaluation and every batch share one graph); it reads the live weights,
    so it serves before and after training alike. No augmentation runs.
    """

    def __init__(self, model):
        import tensorflow as tf

        probe = keras.Model(model.inputs, [model.get_layer("backbone").output, model.output])
        self._fn = tf.function(lambda x: probe(x, training=False), reduce_retracing=True,
                               input_signature=[tf.TensorSpec((None, None, None, 3), tf.float32)])

    def __call__(self, split, rows: np.ndarray, size: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """(features, probabilities) of ``split`` rows, in order."""
        import tensorflow as tf

        features, probs = [], []
        try:
            for images, _ in image_stream(split, rows, size, batch_size):
                f, p = self._fn(images)
                features.append(np.asarray(f, dtype=np.float32))
                probs.append(np.asarray(p, dtype=np.float32))
        except tf.errors.OpError as exc:
            raise FeatcacheError(f"Could not read or decode an image of {split.name}: "
                                 f"{brief(exc.message)}") from None
        return np.concatenate(features), np.concatenate(probs)


def unfreeze(backbone, spec: str, backbone_name: str = "") -> list[str]:
    """Make part of the inner backbone trainable; returns the names of the layers made trainable.

    ``top:N`` counts layers that have weights, BatchNormalization excluded
    (those always stay frozen, so their statistics and scale stay those the
    head was trained on); ``from:LAYER`` unfreezes LAYER and every later layer;
    ``above:CUT`` the layers above a cut (``featcache.backbones.cuts``), as a cached run trains.
    """
    mode, arg = parse_unfreeze(spec)
    inner = backbone.layers[1]
    layers = [layer for layer in inner.layers if not isinstance(layer, keras.layers.InputLayer)]
    trainable = [layer for layer in layers
                 if layer.weights and not isinstance(layer, keras.layers.BatchNormalization)]
    if mode == "all":
        chosen = trainable
    elif mode == "top":
        chosen = trainable[-arg:]
    elif mode == "above":
        from ..backbones import get_spec
        from ..backbones.cuts import resolve_cut, split_at

        _, upper = split_at(inner, resolve_cut(get_spec(backbone_name), inner, arg))
        above = {id(layer) for layer in upper.layers}
        chosen = [layer for layer in trainable if id(layer) in above]
    else:
        names = [layer.name for layer in layers]
        if arg not in names:
            sample = names[:3] + ["..."] + names[-4:] if len(names) > 8 else names
            raise FeatcacheError(f"Backbone {inner.name} has no layer {arg!r} for --unfreeze from:LAYER; "
                                 f"its {len(names)} layers run {', '.join(sample)} (see model.summary()).")
        later = {id(layer) for layer in layers[names.index(arg):]}
        chosen = [layer for layer in trainable if id(layer) in later]
    backbone.trainable = True  # sets every sublayer; then freeze all but the chosen ones
    chosen_ids = {id(layer) for layer in chosen}
    for layer in layers:
        layer.trainable = id(layer) in chosen_ids
    return [layer.name for layer in chosen]


def make_optimizer(config: FinetuneConfig, total_steps: int):
    """The head trainer's optimizers (same hyperparameters), loss-scaled under mixed precision.

    The cosine schedule decays over the whole run; it lives in the optimizer, so a
    resumed run (``BackupAndRestore`` restores the step count) continues it.
    """
    rate = config.learning_rate
    if config.schedule == "cosine":
        rate = keras.optimizers.schedules.CosineDecay(config.learning_rate, decay_steps=max(1, total_steps))
    optimizer = head_optimizer(config.optimizer, rate)
    if config.mixed_precision:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def make_strategy(name: str, log: Callable[[str], None]):
    """The tf.distribute strategy (``featcache.distribute``, shared with extraction); created first,
    as ``MultiWorkerMirroredStrategy`` must be before TensorFlow runs any op."""
    import tensorflow as tf

    from .. import distribute

    if name == "none":
        return tf.distribute.get_strategy()
    strategy = distribute.make_strategy(name)
    log(f"strategy: {name}, {strategy.num_replicas_in_sync} replica(s) in sync")
    return strategy


def is_chief(strategy_name: str) -> bool:
    """Only the chief writes the run folder's model, export and record."""
    from ..distribute import cluster_from_env

    return strategy_name != "multiworker" or cluster_from_env().chief


# --- data ---------------------------------------------------------------------------------


def image_stream(split, rows: np.ndarray, size: int, batch_size: int, shuffle_seed: Optional[int] = None,
                 repeat: bool = False):
    """(float32 pixels in [0, 255], label) batches of ``split`` rows, as extraction reads them.

    In-memory images keep their size (the model resizes); files are decoded
    and resized one by one before batching, exactly like ``make_stream``.
    """
    import tensorflow as tf

    from ..preprocessing import decode_file, resize

    autotune = tf.data.AUTOTUNE
    rows = np.asarray(rows, dtype=np.int64)
    labels = split.labels[rows].astype(np.int64)
    if split.images is not None:
        ds = tf.data.Dataset.from_tensor_slices((split.images[rows], labels))
    else:
        ds = tf.data.Dataset.from_tensor_slices((np.array(split.paths, dtype=object)[rows].astype(str), labels))
    if shuffle_seed is not None:
        ds = ds.shuffle(len(rows), seed=shuffle_seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    if split.images is None:
        ds = ds.map(lambda p, y: (resize(decode_file(p), size), y), num_parallel_calls=autotune, deterministic=True)
    ds = ds.batch(batch_size).map(lambda x, y: (tf.cast(x, tf.float32), y), num_parallel_calls=autotune)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(options).prefetch(autotune)

