"""Training loops: Keras heads on the fused step of ``training_step``, logreg with scikit-learn."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from .config import PREDICT_ROWS, HeadConfig, Log
from .data import HeadData
from .models import _core, build_head, make_optimizer
from .standardize import Prepared


@dataclass
class HeadResult:
    """A trained head with its TTA-averaged validation and test probabilities."""

    model: Any
    val_probs: np.ndarray
    test_probs: np.ndarray
    history: dict
    seconds: float
    epochs_run: Optional[int]
    best_epoch: Optional[int] = None
    val_probs_by_view: Optional[np.ndarray] = None
    extra: dict = field(default_factory=dict)


def _predictor(core):
    """Probabilities for (..., D) float32 arrays in large eager chunks.

    Eager, not ``tf.function``: per-call overhead is negligible at this chunk size, and a
    sweep creating a traced function per run would trip TensorFlow's retracing warning.
    """
    import tensorflow as tf

    def predict(x: np.ndarray) -> np.ndarray:
        flat = x.reshape(-1, x.shape[-1])
        out = [np.asarray(core(tf.constant(flat[i:i + PREDICT_ROWS]), training=False))
               for i in range(0, flat.shape[0], PREDICT_ROWS)]
        return np.concatenate(out).reshape(*x.shape[:-1], -1)

    return predict


def _log_loss(labels: np.ndarray, probs: np.ndarray) -> float:
    p = np.clip(probs[np.arange(labels.size), labels], 1e-7, 1.0)
    return float(-np.mean(np.log(p)))


def fit_keras(model, prepared: Prepared, data: HeadData, config: HeadConfig, log: Log = None,
              jit_compile: bool = False) -> tuple[dict, Optional[int], np.ndarray]:
    """Train the layers after ``standardize`` on the standardised arrays; returns (history, best epoch, val probs by view).

    One ``tf.function`` runs a whole epoch over in-memory tensors (steps on ``training_step``'s
    fused kernels) and scores the validation rows; Keras' EarlyStopping (val loss, best weights
    restored) and ReduceLROnPlateau drive it through a CallbackList.
    """
    import keras
    import tensorflow as tf

    from ..training_step import FusedAdam, training_forward, training_loss

    _, core = _core(model)
    optimizer = (FusedAdam(config.learning_rate) if config.optimizer == "adam"
                 else make_optimizer(config.optimizer, config.learning_rate))
    core.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")  # callbacks reach the optimizer here
    optimizer.build(core.trainable_variables)
    n = int(data.x_train.shape[0])
    steps = max(1, math.ceil(n / config.batch_size))
    # Equal batches (no straggler of a few rows for BatchNormalization to choke on).
    bounds = tf.constant(np.rint(np.linspace(0, n, steps + 1)).astype(np.int32))
    x = prepared.train_tensor
    y = tf.constant(data.y_train.astype(np.int32))
    views, n_val, width = prepared.x_val.shape
    x_val = tf.constant(prepared.x_val.reshape(views * n_val, width))
    variables = core.trainable_variables
    forward = training_forward(core)

    def train_epoch(order, x, y, x_val, seed):
        def train_step(step, loss_sum, correct):
            rows = order[bounds[step]:bounds[step + 1]]
            xb, yb = tf.gather(x, rows), tf.gather(y, rows)
            with tf.GradientTape() as tape:
                losses, predicted = training_loss(forward, xb, yb, tf.stack([seed, tf.cast(step, tf.int64)]))
                loss = tf.reduce_mean(losses)
            optimizer.apply(tape.gradient(loss, variables), variables)
            return (step + 1, loss_sum + tf.reduce_sum(losses),
                    correct + tf.reduce_sum(tf.cast(tf.equal(predicted, yb), tf.float32)))

        _, loss_sum, correct = tf.while_loop(lambda step, *_: step < steps, train_step,
                                             (tf.constant(0), tf.constant(0.0), tf.constant(0.0)))
        # Validation in the same graph call: scoring 5,000 rows eagerly cost more Python than arithmetic.
        val = tf.concat([core(x_val[i:i + PREDICT_ROWS], training=False)
                         for i in range(0, views * n_val, PREDICT_ROWS)], axis=0)
        return loss_sum / n, correct / n, val

    # No AutoGraph: converting Keras' and the optimizer's code took about half of the tracing time.
    train_epoch = tf.function(train_epoch, jit_compile=jit_compile, autograph=False)
    predict = _predictor(core)
    history = keras.callbacks.History()
    stopper = keras.callbacks.EarlyStopping(monitor="val_loss", mode="min", patience=config.patience,
                                            restore_best_weights=True)
    callbacks = keras.callbacks.CallbackList([
        history, stopper,
        keras.callbacks.ReduceLROnPlateau(monitor="val_loss", mode="min", factor=0.5,
                                          patience=max(1, config.patience // 2), min_lr=config.learning_rate / 100),
    ], model=core, epochs=config.epochs, steps=steps, verbose=0)
    rng = np.random.default_rng(config.seed)
    core.stop_training = False
    callbacks.on_train_begin()
    for epoch in range(config.epochs):
        callbacks.on_epoch_begin(epoch)
        loss, accuracy, val = train_epoch(tf.constant(rng.permutation(n).astype(np.int32)), x, y, x_val,
                                          tf.constant(rng.integers(2**62), tf.int64))
        val_probs = np.asarray(val).reshape(views, n_val, -1).mean(axis=0)
        logs = {"loss": float(loss), "accuracy": float(accuracy), "val_loss": _log_loss(data.y_val, val_probs),
                "val_accuracy": float(np.mean(val_probs.argmax(axis=1) == data.y_val)),
                "learning_rate": float(keras.ops.convert_to_numpy(optimizer.learning_rate))}
        callbacks.on_epoch_end(epoch, logs)
        if log:
            log(f"epoch {epoch + 1}/{config.epochs}: loss {logs['loss']:.4f} acc {logs['accuracy']:.4f} "
                f"val_loss {logs['val_loss']:.4f} val_acc {logs['val_accuracy']:.4f}")
        if core.stop_training:
            break
    callbacks.on_train_end()
    best = stopper.best_epoch + 1 if stopper.best is not None else None
    return dict(history.history), best, predict(prepared.x_val)


def fit_logreg(prepared: Prepared, data: HeadData, config: HeadConfig, log: Log = None,
               blas_threads: int = 1):
    """scikit-learn LogisticRegression, C chosen on validation accuracy; returns (Keras model, grid results).

    C rises through the grid, each fit warm-started from the last, and stops at the first C
    whose validation accuracy falls (accuracy over log-spaced C is unimodal in practice, and
    the large-C fits are the slow ones). BLAS runs one thread by default: OpenBLAS' two-thread
    path for the gradient's (classes x rows) @ (rows x features) product ran 8x slower on
    this 2-core machine (33.7 s vs 4.3 s for a 4-value grid on 45,000 x 2,048).
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    flat_val = prepared.x_val.reshape(-1, prepared.x_val.shape[-1])
    model = LogisticRegression(max_iter=config.max_iter, warm_start=True)
    grid, best = [], None
    with threadpool_limits(blas_threads, user_api="blas"), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for c in sorted(config.c_grid):  # small C first: each fit warm-starts from a smoother solution
            model.set_params(C=float(c))
            model.fit(prepared.x_train, data.y_train)
            probs = model.predict_proba(flat_val).reshape(*prepared.x_val.shape[:2], -1).mean(axis=0)
            result = {"C": float(c), "val_acc": float(np.mean(probs.argmax(axis=1) == data.y_val)),
                      "val_loss": _log_loss(data.y_val, probs), "iterations": int(np.max(model.n_iter_))}
            grid.append(result)
            if log:
                log(f"logreg C={c:g}: val_acc {result['val_acc']:.4f} ({result['iterations']} iterations)")
            if best is None or (result["val_acc"], -result["val_loss"]) > (best[0]["val_acc"], -best[0]["val_loss"]):
                best = (result, model.coef_.copy(), model.intercept_.copy())
            if len(grid) > 1 and result["val_acc"] < grid[-2]["val_acc"]:
                break
    chosen, coef, intercept = best
    if coef.shape[0] == 1:  # binary: softmax over (0, z) is the sigmoid of z
        coef = np.vstack([np.zeros_like(coef), coef])
        intercept = np.array([0.0, intercept[0]])
    keras_model = build_head("linear", data.width, data.n_classes, prepared.standardizer, seed=config.seed)
    keras_model.get_layer("probabilities").set_weights([coef.T.astype(np.float32), intercept.astype(np.float32)])
    return keras_model, {"C": chosen["C"], "grid": grid}
