"""Fine-tuning end to end: every step runs the whole backbone on decoded images (a GPU's mode)."""

from __future__ import annotations

import math
import time
from typing import Callable, Sequence

import keras
import numpy as np

from ..errors import brief, FeatcacheError
from ..settings import FeatureSettings
from .checks import check_features, check_validation
from .config import FinetuneConfig
from .model import Inference, build_model, image_stream, is_chief, make_optimizer, make_strategy, unfreeze
from .source import load_head, prepare, recorded_val_acc
from .workdir import (base_record, discard_work_dir, finish_run, lock_run, open_work_dir, training_callbacks,
                      unlock_run, work_dir_for)


def finetune_full(settings: FeatureSettings, config: FinetuneConfig = FinetuneConfig(),
                  log: Callable[[str], None] = print, callbacks: Sequence[keras.callbacks.Callback] = ()) -> dict:
    """Fine-tune the chosen head run's model end to end; returns the run record (kind 'finetune').

    Running the same call again after an interruption resumes from the last
    finished epoch (``BackupAndRestore`` in a hidden work folder). ``callbacks``
    run after featcache's own (tests use them to interrupt a run).
    """
    import tensorflow as tf

    strategy = make_strategy(config.strategy, log)  # before any other TensorFlow work
    prep = prepare(settings, config)
    head_run, cache, source, dataset = prep.head_run, prep.cache, prep.source, prep.dataset
    train_rows, val_rows, test_rows, split_info = prep.train_rows, prep.val_rows, prep.test_rows, prep.split_info
    chief = is_chief(config.strategy)
    work_dir = work_dir_for(settings, head_run, config)
    if not chief:  # other workers keep their own backups; only the chief writes the run
        from ..distribute import cluster_from_env

        # Beside the chief's folder, not inside it: the chief clears its own folder on a fresh start.
        work_dir = work_dir.with_name(f"{work_dir.name}.worker{cluster_from_env().rank}")
    log(f"fine-tuning {source.backbone} ({source.weights}, {source.size}px, {source.pooling} pooling) from head run "
        f"{head_run.run_id}: {len(train_rows)} train / {len(val_rows)} val / {len(test_rows)} test images")
    if config.mixed_precision and not tf.config.list_physical_devices("GPU"):
        log("warning: --mixed-precision without a GPU runs slower on CPU; continuing as asked")

    # Locked before the backbone is built: a second identical call fails in a second, not minutes.
    lock = lock_run(work_dir)
    try:
        keras.utils.set_random_seed(config.seed)
        start = time.perf_counter()
        train_split = dataset["train"]
        with strategy.scope():
            head = load_head(head_run, source)
            model, backbone = build_model(source, head, config, settings.cache_dir)
            chosen = unfreeze(backbone, config.unfreeze, source.backbone)  # before the checks: a bad layer name fails fast
            for layer in head.layers:  # an MLP head's BatchNormalization keeps its statistics too
                if isinstance(layer, keras.layers.BatchNormalization):
                    layer.trainable = False
            infer = Inference(model)
            checks = {"feature_max_abs_diff": check_features(
                infer, train_split, cache, train_rows[:config.check_images], source.size, config.batch_size, log)}
            recorded = None if config.subset else recorded_val_acc(head_run)
            checks.update(check_validation(infer, head, train_split, cache, val_rows, source.size, config.batch_size,
                                           recorded, log))
            steps = math.ceil(len(train_rows) / config.batch_size)
            if config.max_steps:
                steps = min(steps, config.max_steps)
            model.compile(optimizer=make_optimizer(config, steps * config.epochs),
                          loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        n_trainable = int(sum(np.prod(v.shape) for v in model.trainable_weights))
        log(f"unfreeze {config.unfreeze}: {len(chosen)} backbone layer(s) trainable ({n_trainable:,} trainable "
            f"parameters with the head; BatchNormalization frozen); {config.optimizer} at lr {config.learning_rate:g}")
        resuming = open_work_dir(work_dir)
        train_stream = image_stream(train_split, cache.indices[train_rows], source.size, config.batch_size,
                                    shuffle_seed=config.seed, repeat=True)
        val_stream = image_stream(train_split, cache.indices[val_rows], source.size, config.batch_size)
        own, best_path = training_callbacks(work_dir, config, resuming, log)
        try:
            model.fit(train_stream, validation_data=val_stream, epochs=config.epochs, steps_per_epoch=steps,
                      callbacks=own + list(callbacks), verbose=config.verbose, shuffle=False)
        except tf.errors.OpError as exc:
            raise FeatcacheError(f"Training stopped on a data error: {brief(exc.message)}") from None
        seconds = time.perf_counter() - start
        if best_path.exists():
            model.load_weights(best_path)
        _, val_probs = infer(train_split, cache.indices[val_rows], source.size, config.batch_size)
        _, test_probs = infer(dataset["test"], test_rows, source.size, config.batch_size)
        record = {
            **base_record(config, source, head_run, checks),
            "unfrozen_layers": len(chosen),
            "trainable_params": n_trainable,
            "steps_per_epoch": steps,
            "n_train": int(len(train_rows)),
            **split_info,
            "seconds": round(seconds, 2),
            "replicas": int(strategy.num_replicas_in_sync),
        }
        if not chief:  # the chief writes the run; a worker's backup and logs are spent
            discard_work_dir(work_dir)
            return record
        from ..run_images import loaded_split_images

        return finish_run(work_dir, settings, config, model, record, source.class_names,
                          (cache.labels[val_rows], val_probs), (dataset["test"].labels[test_rows], test_probs), log,
                          val_images=loaded_split_images(settings, train_split, cache.indices[val_rows]))
    finally:
        unlock_run(lock, work_dir)

