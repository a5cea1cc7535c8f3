"""Stage 2: classifier heads trained from cached features in seconds; no backbone is built.

Features of every (backbone, view) come from the cache, aligned by source index and
concatenated across backbones. Validation rows are carved from train per image with
``datasets.validation_split`` on the labels of the first backbone's ``orig`` cache, the
split ``finetune`` recomputes, so every view of an image falls on the same side. Heads
train on all views' rows and are scored by averaging probabilities over views
(test-time augmentation). Test is evaluated once, at the end, and never chooses anything.

Standardisation is fitted on training rows only and saved inside every head as a
``Normalization`` layer: ``head.keras`` maps pooled features (N, D) to class
probabilities and can sit on top of a backbone unchanged. ``logreg`` trains with
scikit-learn and is exported as the equivalent Keras model, so every head can be
fine-tuned later.

Speed: Keras heads train on features standardised once and held as tensors in memory,
one ``tf.function`` per epoch (a while loop over batches gathered from a shuffled index, then
the validation rows) driven by Keras' own callbacks. Each step runs on the fused kernels of
``training_step``. ``bench/bench_head.py`` measures it against ``model.fit`` and Keras' own step.
"""

from __future__ import annotations

import functools
import itertools
import math
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from .cache import FeatureSet
from .errors import brief, FeatcacheError, InvalidArgument, choice_error
from .report import write_run
from .runs import Run, load_run, new_run_id, read_run, runs_root, staged_run_dir
from .settings import VIEWS, FeatureSettings

KINDS = ("logreg", "linear", "mlp")
OPTIMIZERS = ("adam", "rmsprop", "sgd")
SPLITS = ("train", "test")
# A feature whose training variance is below this is constant: it is centred, not scaled.
MIN_VARIANCE = 1e-12
# Rows per forward pass when predicting (bounds memory, not speed).
PREDICT_ROWS = 16384
# Fields a sweep may vary; the validation split (val_fraction, seed) must stay fixed to compare runs.
SWEEPABLE = ("kind", "units", "dropout", "optimizer", "learning_rate", "epochs", "batch_size", "patience", "c_grid")
DEFAULT_GRID: dict[str, tuple] = {"kind": KINDS, "learning_rate": (1e-3, 3e-3), "dropout": (0.3, 0.5)}
Log = Optional[Callable[[str], None]]


@dataclass(frozen=True)
class HeadConfig:
    """How to train one head.

    The defaults are measured: batch 1024 needs 13% less CPU per epoch than 512
    (``bench/bench_head.py``), and on CIFAR-10 EfficientNet-Lite0 features Adam at 2e-3 and
    batch 1024 reached val/test 0.826/0.820 against 0.828/0.821 at 1e-3 and batch 256.
    ``c_grid`` and ``max_iter`` only concern ``logreg``; ``init`` continues from a saved head
    (a run id, run folder or ``head.keras`` path) instead of a new one, whose saved
    architecture then decides the kind, units and dropout the run records.
    """

    kind: str = "mlp"
    units: tuple[int, ...] = (256, 128, 64)
    dropout: float = 0.5
    optimizer: str = "adam"
    learning_rate: float = 2e-3
    epochs: int = 30
    batch_size: int = 1024
    patience: int = 5
    seed: int = 0
    val_fraction: float = 0.1
    c_grid: tuple[float, ...] = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
    max_iter: int = 300
    init: Optional[str] = None

    def summary(self) -> str:
        """The settings that tell heads apart, for tables."""
        if self.kind == "logreg":
            text = "C " + "/".join(f"{c:g}" for c in self.c_grid)
        else:
            text = f"{self.optimizer} lr {self.learning_rate:g} b{self.batch_size}"
            if self.kind == "mlp":
                text = f"{'-'.join(str(u) for u in self.units)} drop {self.dropout:g} " + text
        return text + (f" from {Path(self.init).name}" if self.init else "")


def validate_config(config: HeadConfig) -> None:
    """Fail on a bad argument before loading anything."""
    if config.kind not in KINDS:
        raise choice_error("head kind", KINDS, config.kind)
    if config.optimizer not in OPTIMIZERS:
        raise choice_error("optimizer", OPTIMIZERS, config.optimizer)
    if config.kind == "mlp" and (not config.units or any(int(u) < 1 for u in config.units)):
        raise InvalidArgument(f"MLP units must be positive integers, e.g. (256, 128, 64); received {config.units!r}.")
    if not 0.0 <= config.dropout < 1.0:
        raise InvalidArgument(f"Dropout must be in [0, 1); received {config.dropout}.")
    if not (config.learning_rate > 0 and math.isfinite(config.learning_rate)):
        raise InvalidArgument(f"Learning rate must be a positive finite number; received {config.learning_rate}.")
    if not 0 <= config.seed < 2 ** 32:
        raise InvalidArgument(f"Seed must be in [0, 2**32); received {config.seed}.")
    for name in ("epochs", "batch_size", "max_iter"):
        if int(getattr(config, name)) < 1:
            raise InvalidArgument(f"{name.replace('_', ' ').capitalize()} must be a positive integer; "
                                  f"received {getattr(config, name)}.")
    if config.patience < 0:
        raise InvalidArgument(f"Patience must be >= 0; received {config.patience}.")
    if not 0.0 < config.val_fraction < 1.0:
        raise InvalidArgument(f"Validation fraction must be in (0, 1); received {config.val_fraction}.")
    if not config.c_grid or any(not c > 0 for c in config.c_grid):
        raise InvalidArgument(f"The logreg C grid must hold positive values; received {config.c_grid!r}.")
    if config.init and config.kind == "logreg":
        raise InvalidArgument("A head continued from --init trains with Keras; use kind 'linear' or 'mlp' "
                              "(a logreg head's saved model is a linear Keras head).")


def parse_units(text: str) -> tuple[int, ...]:
    """'256,128,64' -> (256, 128, 64)."""
    try:
        units = tuple(int(u) for u in str(text).split(",") if u.strip())
    except ValueError:
        units = ()
    if not units or any(u < 1 for u in units):
        raise InvalidArgument(f"Units must be comma-separated positive integers like '256,128,64'; received {text!r}.")
    return units


# --- data assembly ------------------------------------------------------------------------


@dataclass
class HeadData:
    """Features ready for a head: training rows of every view, validation and test rows per view.

    ``x_val[v]`` and ``x_test[v]`` are view ``views[v]`` of the same images in the same order,
    so averaging probabilities over axis 0 is test-time augmentation.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: list[str]
    views: tuple[str, ...]
    caches: list[dict] = field(default_factory=list)
    val_fraction: float = 0.1
    val_seed: int = 0
    train_images: int = 0
    sizes: dict = field(default_factory=dict)
    val_indices: Optional[np.ndarray] = None  # image rows of the validation rows in the dataset's train split
    dataset_fingerprint: Optional[str] = None
    val_images: Any = None  # run_images.ImageRows, for top_losses.png

    @property
    def width(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def n_classes(self) -> int:
        return len(self.class_names)


def _describe(part: FeatureSet) -> str:
    return part.path.name if part.path else f"{part.key.backbone}/{part.key.split}/{part.key.view}"


def _align(reference: FeatureSet, part: FeatureSet) -> Optional[np.ndarray]:
    """Rows of ``part`` in ``reference``'s source-index order (None: already aligned); error if they differ."""
    ref, idx = np.asarray(reference.indices), np.asarray(part.indices)
    if np.array_equal(ref, idx):
        order = None
    else:
        unique = np.unique(idx)
        if unique.size != idx.size:
            raise FeatcacheError(f"{_describe(part)} lists {idx.size - unique.size} image(s) twice; rebuild it.")
        missing, extra = np.setdiff1d(ref, idx).size, np.setdiff1d(idx, ref).size
        if missing or extra or ref.size != idx.size:
            raise FeatcacheError(
                f"{_describe(part)} and {_describe(reference)} do not hold the same images ({missing} missing, "
                f"{extra} extra); extract both from the same data with the same --skip-corrupt setting.")
        sorter = np.argsort(idx, kind="stable")
        order = sorter[np.searchsorted(idx, ref, sorter=sorter)]
    labels = part.labels if order is None else part.labels[order]
    if not np.array_equal(labels, reference.labels):
        raise FeatcacheError(f"{_describe(part)} and {_describe(reference)} disagree on the labels of "
                             f"{int(np.count_nonzero(labels != reference.labels))} image(s); they were not made "
                             f"from the same data. Re-extract them.")
    if list(part.class_names) != list(reference.class_names):
        raise FeatcacheError(f"{_describe(part)} and {_describe(reference)} have different class names.")
    return order


def concat_backbones(parts: Sequence[FeatureSet]) -> FeatureSet:
    """One split and view of several backbones as one wider feature set, rows aligned by source index."""
    if not parts:
        raise InvalidArgument("concat_backbones needs at least one feature set.")
    reference = parts[0]
    if len(parts) == 1:
        return reference
    blocks = []
    for part in parts:
        order = _align(reference, part)
        blocks.append(part.features if order is None else part.features[order])
    return replace(reference, features=np.concatenate(blocks, axis=1))


def assemble(train: Mapping[str, Sequence[FeatureSet]], test: Mapping[str, Sequence[FeatureSet]],
             val_fraction: float = 0.1, seed: int = 0) -> HeadData:
    """Training, validation and test arrays from per-view lists of per-backbone feature sets.

    The validation split is drawn by image from the labels of the reference view (``orig``
    if present), in the reference cache's row order: ``finetune`` draws the same rows.
    """
    from .datasets import validation_split

    views = tuple(train)
    if tuple(test) != views:
        raise InvalidArgument(f"Train and test must hold the same views; received {views} and {tuple(test)}.")
    reference_view = "orig" if "orig" in views else views[0]
    joined = {split: {view: concat_backbones(sets[view]) for view in views}
              for split, sets in (("train", train), ("test", test))}
    arrays: dict[str, dict[str, np.ndarray]] = {}
    for split in SPLITS:
        reference = joined[split][reference_view]
        arrays[split] = {}
        for view in views:
            part = joined[split][view]
            if part.width != reference.width:
                raise FeatcacheError(f"{_describe(part)} has width {part.width} but {_describe(reference)} "
                                     f"has {reference.width}.")
            order = _align(reference, part)
            arrays[split][view] = part.features if order is None else part.features[order]
    train_ref, test_ref = joined["train"][reference_view], joined["test"][reference_view]
    if list(train_ref.class_names) != list(test_ref.class_names):
        raise FeatcacheError(f"{_describe(train_ref)} and {_describe(test_ref)} have different class names.")
    class_names = [str(c) for c in train_ref.class_names]
    labels = np.asarray(train_ref.labels, dtype=np.int64)
    for part, values in ((train_ref, labels), (test_ref, test_ref.labels)):
        if values.size and (values.min() < 0 or values.max() >= len(class_names)):
            raise FeatcacheError(f"{_describe(part)} holds labels outside 0..{len(class_names) - 1} "
                                 f"({len(class_names)} class names); rebuild it.")
    train_rows, val_rows = validation_split(labels, val_fraction, seed)
    counts = np.bincount(labels[train_rows], minlength=len(class_names))
    if (counts == 0).any():
        missing = [class_names[i] for i in np.flatnonzero(counts == 0)]
        raise FeatcacheError(f"Class(es) {', '.join(map(repr, missing))} have no training rows in "
                             f"{_describe(train_ref)}; a head cannot learn them. Add images of these classes "
                             f"or remove the class folders, then re-extract.")
    caches = [{"backbone": p.key.backbone, "weights": p.key.weights, "size": p.key.size,
               "preprocess": p.key.preprocess, "pooling": p.key.pooling, "split": p.key.split, "view": p.key.view,
               "key": p.key.digest, "file": p.path.name if p.path else None}
              for sets in (train, test) for view in views for p in sets[view]]
    return HeadData(
        x_train=np.concatenate([arrays["train"][v][train_rows] for v in views]),
        y_train=np.tile(labels[train_rows], len(views)),
        x_val=np.stack([arrays["train"][v][val_rows] for v in views]),
        y_val=labels[val_rows],
        x_test=np.stack([arrays["test"][v] for v in views]),
        y_test=np.asarray(test_ref.labels, dtype=np.int64),
        class_names=class_names, views=views, caches=caches, val_fraction=float(val_fraction), val_seed=int(seed),
        train_images=int(train_rows.size),
        sizes={p.key.backbone: p.key.size for p in train[reference_view]},
        val_indices=np.asarray(train_ref.indices, dtype=np.int64)[val_rows], dataset_fingerprint=train_ref.key.dataset,
    )


def check_views(views: Sequence[str]) -> tuple[str, ...]:
    views = tuple(views)
    if not views:
        raise InvalidArgument(f"At least one view is needed; expected some of: {', '.join(VIEWS)}.")
    for view in views:
        if view not in VIEWS:
            raise choice_error("view", VIEWS, view)
    if len(set(views)) != len(views):
        raise InvalidArgument(f"Views must not repeat; received {','.join(views)}.")
    return views


def load_head_data(settings: FeatureSettings, val_fraction: float = 0.1, seed: int = 0,
                   verify: bool = True) -> HeadData:
    """Every cache the settings name (backbones x views x train/test), checked and assembled."""
    from .lookup import check_settings, load_split

    check_settings(settings)
    backbones = settings.backbones()
    if len(set(backbones)) != len(backbones):
        raise InvalidArgument(f"A backbone is named twice in {settings.backbone!r}.")
    views = check_views(settings.views)
    sets = {split: {view: [load_split(settings, b, split, view, verify=verify) for b in backbones]
                    for view in views} for split in SPLITS}
    data = assemble(sets["train"], sets["test"], val_fraction, seed)
    from .run_images import head_validation_images

    data.val_images = head_validation_images(settings, data.val_indices, data.dataset_fingerprint)
    return data


# --- standardisation -----------------------------------------------------------------------


@dataclass
class Standardizer:
    """Per-feature mean and variance of the training rows; constant features keep variance 1."""

    mean: np.ndarray
    variance: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray, chunk: int = 1024) -> "Standardizer":
        """One pass over float32 row blocks shifted by the first row, sums in float64.

        The shift keeps sum-of-squares cancellation harmless: on 45,000 x 2,048 float16 this
        matched a two-pass float64 computation to 1e-11 in 0.42 s instead of 0.99 s.
        """
        n = x.shape[0]
        if n == 0:
            raise InvalidArgument("Cannot fit a standardizer on zero rows.")
        shift = x[:1].astype(np.float32)
        total, squares = np.zeros(x.shape[1]), np.zeros(x.shape[1])
        for start in range(0, n, chunk):
            block = x[start:start + chunk].astype(np.float32) - shift
            total += block.sum(axis=0, dtype=np.float64)
            squares += np.einsum("ij,ij->j", block, block, dtype=np.float64)
        centred = total / n
        variance = squares / n - centred ** 2
        return cls(centred + shift[0], np.where(variance < MIN_VARIANCE, 1.0, variance))

    @classmethod
    def from_layer(cls, layer) -> "Standardizer":
        return cls(np.asarray(layer.mean, dtype=np.float64).reshape(-1),
                   np.asarray(layer.variance, dtype=np.float64).reshape(-1))

    def transform(self, x: np.ndarray, chunk: int = 8192) -> np.ndarray:
        """float32 standardised copy, as the ``Normalization`` layer computes it."""
        out = np.empty(x.shape, dtype=np.float32)
        mean = self.mean.astype(np.float32)
        scale = np.sqrt(self.variance).astype(np.float32)
        flat_in, flat_out = x.reshape(-1, x.shape[-1]), out.reshape(-1, x.shape[-1])
        for start in range(0, flat_in.shape[0], chunk):
            block = flat_in[start:start + chunk].astype(np.float32)
            np.subtract(block, mean, out=block)
            np.divide(block, scale, out=flat_out[start:start + chunk])
        return out

    def layer(self):
        import keras

        return keras.layers.Normalization(mean=self.mean.astype(np.float32), variance=self.variance.astype(np.float32),
                                          name="standardize")


@dataclass
class Prepared:
    """Standardised float32 copies of a ``HeadData``, each made on first use (shared by the runs of a sweep)."""

    standardizer: Standardizer
    data: HeadData

    @functools.cached_property
    def x_train(self) -> np.ndarray:
        return self.standardizer.transform(self.data.x_train)

    @functools.cached_property
    def x_val(self) -> np.ndarray:
        return self.standardizer.transform(self.data.x_val)

    @functools.cached_property
    def x_test(self) -> np.ndarray:
        return self.standardizer.transform(self.data.x_test)

    @functools.cached_property
    def train_tensor(self):
        """The standardised training rows as one tensor, for the Keras heads.

        Standardised by TensorFlow from the cached rows, not copied from ``x_train``: one
        large allocation less (0.41 against 0.69 s on 45,000 x 2,048 float16).
        """
        import tensorflow as tf

        from .training_step import standardize

        return standardize(tf.constant(self.data.x_train), tf.constant(self.standardizer.mean.astype(np.float32)),
                           tf.constant(np.sqrt(self.standardizer.variance).astype(np.float32)))


    def ready(self, kinds: Sequence[str]) -> "Prepared":
        """Standardise now what heads of these kinds read (a sweep times it as loading, not as its first head)."""
        _ = self.x_val, self.x_test
        if "logreg" in kinds:
            _ = self.x_train
        if any(kind != "logreg" for kind in kinds):
            _ = self.train_tensor
        return self


def prepare(data: HeadData, standardizer: Optional[Standardizer] = None) -> Prepared:
    """Standardise every split with statistics of the training rows (or a reused head's)."""
    standardizer = standardizer or Standardizer.fit(data.x_train)
    if standardizer.mean.shape != (data.width,):
        raise FeatcacheError(f"The standardizer has width {standardizer.mean.shape[-1]}, the features {data.width}.")
    return Prepared(standardizer, data)


# --- models ------------------------------------------------------------------------------------


def build_head(kind: str, width: int, n_classes: int, standardizer: Standardizer,
               units: Sequence[int] = (256, 128, 64), dropout: float = 0.5, seed: int = 0):
    """features (N, width) -> standardize -> [Dense, BatchNorm, ReLU, Dropout] x len(units) (mlp) -> softmax."""
    import keras

    if kind not in ("linear", "mlp"):
        raise choice_error("Keras head kind", ("linear", "mlp"), kind)
    inputs = keras.Input((width,), name="features")
    x = standardizer.layer()(inputs)
    if kind == "mlp":
        for i, n in enumerate(units, 1):
            x = keras.layers.Dense(int(n), use_bias=False, kernel_initializer=keras.initializers.HeNormal(seed + i),
                                   name=f"dense_{i}")(x)
            x = keras.layers.BatchNormalization(name=f"batchnorm_{i}")(x)
            x = keras.layers.Activation("relu", name=f"relu_{i}")(x)
            x = keras.layers.Dropout(dropout, seed=seed + i, name=f"dropout_{i}")(x)
    outputs = keras.layers.Dense(n_classes, activation="softmax", dtype="float32",
                                 kernel_initializer=keras.initializers.GlorotUniform(seed), name="probabilities")(x)
    return keras.Model(inputs, outputs, name=f"featcache_head_{kind}")


def load_head(path, width: Optional[int] = None, n_classes: Optional[int] = None):
    """A saved head; a feature width or class count other than the cache's is an error."""
    import keras

    path = Path(path)
    if not path.exists():
        raise FeatcacheError(f"Head model {path} does not exist.")
    try:
        model = keras.models.load_model(path, compile=False)
    except Exception as exc:  # Keras raises many types for a bad file
        first = brief(exc)
        raise FeatcacheError(f"Cannot load head {path}: {type(exc).__name__}: {first}") from None
    check_head(model, width, n_classes, str(path))
    return model


def check_head(model, width: Optional[int], n_classes: Optional[int], where: str) -> None:
    """The head takes features of ``width`` and predicts ``n_classes``; error naming both otherwise."""
    got_width, got_classes = model.input_shape[-1], model.output_shape[-1]
    if width is not None and got_width != width:
        raise FeatcacheError(f"Head {where} takes features of width {got_width} but the cache gives width {width}; "
                             f"it was trained on another backbone (or backbone combination).")
    if n_classes is not None and got_classes != n_classes:
        raise FeatcacheError(f"Head {where} predicts {got_classes} classes but the cache has {n_classes}.")


def _core(model):
    """The model after its ``standardize`` layer, sharing weights: trained on pre-standardised arrays."""
    import keras

    try:
        layer = model.get_layer("standardize")
    except ValueError:
        raise FeatcacheError(f"Model {model.name} has no 'standardize' Normalization layer; "
                             f"it is not a featcache head.") from None
    return layer, keras.Model(layer.output, model.output, name=f"{model.name}_core")


def make_optimizer(name: str, learning_rate: float):
    import keras

    if name not in OPTIMIZERS:
        raise choice_error("optimizer", OPTIMIZERS, name)
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate, momentum=0.9)
    return {"adam": keras.optimizers.Adam, "rmsprop": keras.optimizers.RMSprop}[name](learning_rate)


# --- training -------------------------------------------------------------------------------


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

    from .training_step import FusedAdam, training_forward, training_loss

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


IDENTITY_FIELDS = ("backbone", "weights", "size", "preprocess", "pooling")


def _identities(caches: Sequence[Mapping[str, Any]], fields: Sequence[str]) -> list[tuple]:
    found: list[tuple] = []
    for cache in caches:
        identity = tuple(cache.get(f) for f in fields)
        if identity not in found:
            found.append(identity)
    return found


def check_same_features(run: Run, data: HeadData) -> None:
    """A head continued on new rows must see the features it was trained on: same backbones, weights,
    size, preprocessing and pooling (a head of another backbone can have the same width and still be wrong)."""
    theirs = run.record.get("caches") or []
    fields = [f for f in IDENTITY_FIELDS if theirs and f in theirs[0]]
    if not fields:
        return
    before, now = _identities(theirs, fields), _identities(data.caches, fields)
    if before != now:
        describe = lambda ids: " + ".join("/".join(str(v) for v in i) for i in ids)  # noqa: E731
        raise FeatcacheError(f"Head {run.run_id} was trained on {describe(before)} features ({'/'.join(fields)}); "
                             f"this cache holds {describe(now)}. Train a new head on it, or pick a run of the "
                             "same features (see `featcache runs`).")


@dataclass
class InitHead:
    """A saved head to continue training, found before any features load (a bad ``--init`` fails fast)."""

    model: Any
    run: Optional[Run]
    kind: str  # 'linear' or 'mlp': the saved architecture decides, whatever kind was asked
    units: tuple[int, ...] = ()
    dropout: float = 0.0

    def architecture(self) -> dict:
        """The ``HeadConfig`` fields the saved head fixes, so its run records what was trained."""
        return {"kind": self.kind, **({"units": self.units, "dropout": self.dropout} if self.kind == "mlp" else {})}


def resolve_init(init: str, cache_dir: Optional[str] = None) -> InitHead:
    """The head ``init`` names: a run id (looked up under ``cache_dir``), a run folder or a ``head.keras`` path."""
    path = Path(init)
    if path.is_dir():
        path = path / "head.keras"
    run = None
    if not path.exists() and cache_dir is not None and not str(init).endswith(".keras"):
        run = load_run(cache_dir, init)
        path = run.model_path
    elif path.is_file():
        run = read_run(path.parent)
    model = load_head(path)
    _core(model)  # a Keras model without featcache's standardize layer is refused here
    import keras

    hidden = [layer for layer in model.layers if layer.name.startswith("dense_")]  # build_head's mlp names
    rates = [layer.rate for layer in model.layers if isinstance(layer, keras.layers.Dropout)]
    return InitHead(model, run, "mlp" if hidden else "linear", tuple(int(layer.units) for layer in hidden),
                    float(rates[0]) if rates else 0.0)


def fit_head(data: HeadData, config: HeadConfig, prepared: Optional[Prepared] = None, log: Log = None,
             cache_dir: Optional[str] = None, init: Optional[InitHead] = None) -> HeadResult:
    """Train one head on assembled arrays and score validation and test once (TTA over views).

    ``prepared`` (standardised arrays) is reused when given; a head continued from
    ``config.init`` (``init`` when already resolved) standardises with its own saved statistics instead.
    """
    validate_config(config)
    start = time.perf_counter()
    extra: dict = {}
    if config.init:
        init = init or resolve_init(config.init, cache_dir)
        model = init.model
        check_head(model, data.width, data.n_classes, config.init)
        if init.run is not None:
            check_same_features(init.run, data)
            extra["init_run"] = init.run.run_id
        layer, _ = _core(model)
        prepared = prepare(data, Standardizer.from_layer(layer))
    else:
        prepared = prepared or prepare(data)
        if prepared.data is not data:
            raise FeatcacheError("The prepared features were standardised from other data than the head trains on.")
    if config.kind == "logreg" and not config.init:
        model, extra["logreg"] = fit_logreg(prepared, data, config, log)
        history, best, epochs_run, by_view = {}, None, None, None
    else:
        if not config.init:
            model = build_head(config.kind, data.width, data.n_classes, prepared.standardizer, config.units,
                               config.dropout, config.seed)
        history, best, by_view = fit_keras(model, prepared, data, config, log)
        epochs_run = len(history.get("loss", []))
    _, core = _core(model)
    predict = _predictor(core)
    if by_view is None:
        by_view = predict(prepared.x_val)
    test_probs = predict(prepared.x_test).mean(axis=0)
    if not (np.all(np.isfinite(by_view)) and np.all(np.isfinite(test_probs))):
        raise FeatcacheError(f"Training the {config.kind} head diverged (NaN or infinite outputs); "
                             f"lower the learning rate (was {config.learning_rate:g}).")
    return HeadResult(model=model, val_probs=by_view.mean(axis=0), test_probs=test_probs, history=history,
                      seconds=time.perf_counter() - start, epochs_run=epochs_run, best_epoch=best,
                      val_probs_by_view=by_view, extra=extra)


# --- runs ----------------------------------------------------------------------------------------


def _relevant(config: HeadConfig, base: HeadConfig) -> HeadConfig:
    """``config`` with the fields its kind ignores reset to ``base``'s, so equivalent configs compare equal."""
    if config.kind == "logreg":
        return replace(config, units=base.units, dropout=base.dropout, optimizer=base.optimizer,
                       learning_rate=base.learning_rate, epochs=base.epochs, batch_size=base.batch_size,
                       patience=base.patience)
    config = replace(config, c_grid=base.c_grid, max_iter=base.max_iter)
    if config.kind == "linear":
        config = replace(config, units=base.units, dropout=base.dropout)
    return config


def _head_summary(config: HeadConfig, result: HeadResult) -> str:
    if "logreg" in result.extra:
        return f"C {result.extra['logreg']['C']:g} (of {len(result.extra['logreg']['grid'])} tried)"
    return config.summary()


def write_head_run(settings: FeatureSettings, config: HeadConfig, data: HeadData, result: HeadResult,
                   runs_dir=None, load_seconds: Optional[float] = None) -> Run:
    """The run folder (built aside, renamed when complete) and its record."""
    runs_dir = Path(runs_dir) if runs_dir is not None else runs_root(settings.cache_dir)
    backbone = "+".join(settings.backbones())
    run_id = new_run_id(config.kind, backbone)
    while (runs_dir / run_id).exists():  # two runs in the same second drew the same suffix
        run_id = new_run_id(config.kind, backbone)
    config = _relevant(config, HeadConfig(kind=config.kind))
    acc_by_view = {view: float(np.mean(result.val_probs_by_view[i].argmax(axis=1) == data.y_val))
                   for i, view in enumerate(data.views)} if result.val_probs_by_view is not None else {}
    sizes = sorted(set(data.sizes.values()))
    record = {
        "kind": "head", "run_id": run_id, "backbone": backbone, "head": config.kind,
        "summary": " ".join(filter(None, ["/".join(f"{s}px" for s in sizes),
                                          "views " + "+".join(data.views) if len(data.views) > 1 else "",
                                          _head_summary(config, result)])),
        "weights": settings.weights, "data": settings.data, "size": sizes[0] if len(sizes) == 1 else data.sizes,
        "pooling": settings.pooling, "dtype": settings.dtype, "views": list(data.views),
        "config": asdict(config), "caches": data.caches,
        "width": data.width, "n_classes": data.n_classes, "n_train": data.train_images,
        "val_fraction": data.val_fraction, "val_seed": data.val_seed,
        "val_acc_by_view": acc_by_view,
        "seconds": round(result.seconds, 3),
        "load_seconds": None if load_seconds is None else round(load_seconds, 3),
        "epochs_run": result.epochs_run, "best_epoch": result.best_epoch,
        **result.extra,
    }
    head_settings = {"features": asdict(settings), "head": asdict(config),
                     "val_fraction": data.val_fraction, "val_seed": data.val_seed}
    final = runs_dir / run_id
    with staged_run_dir(final) as tmp:
        result.model.save(tmp / "head.keras")
        record = write_run(tmp, head_settings, record, data.class_names, data.y_val, result.val_probs,
                           data.y_test, result.test_probs, result.history or None, val_images=data.val_images)
    return read_run(final) or Run(run_id, final, record, head_settings)


def train_head(settings: FeatureSettings, config: HeadConfig = HeadConfig(), runs_dir=None, log: Log = None) -> Run:
    """Load the cached features the settings name, train one head, score validation and test once, write its run."""
    validate_config(config)
    init = None
    if config.init:  # the saved head decides the architecture the run records
        init = resolve_init(config.init, settings.cache_dir)
        config = replace(config, **init.architecture())
    start = time.perf_counter()
    data = load_head_data(settings, config.val_fraction, config.seed)
    loaded = time.perf_counter() - start
    if log:
        log(f"loaded {len(data.caches)} cache file(s) in {loaded:.1f}s: {data.train_images} train / {len(data.y_val)} "
            f"val / {len(data.y_test)} test images x {len(data.views)} view(s), width {data.width}")
    result = fit_head(data, config, log=log, cache_dir=settings.cache_dir, init=init)
    return write_head_run(settings, config, data, result, runs_dir, load_seconds=loaded)


def expand_grid(base: HeadConfig, grid: Optional[Mapping[str, Sequence]] = None) -> list[HeadConfig]:
    """Every combination of ``grid`` values on top of ``base``; fields a kind ignores do not multiply runs.

    Each grid value lists candidates, e.g. ``{"kind": ["linear", "mlp"], "units": [(256,), (512, 128)]}``.
    """
    grid = dict(DEFAULT_GRID if grid is None else grid)
    for name, candidates in grid.items():
        if name not in SWEEPABLE:
            raise InvalidArgument(f"Cannot sweep over {name!r}; expected some of: {', '.join(SWEEPABLE)} "
                                  f"(the validation split, val_fraction and seed, stays fixed so runs compare).")
        if isinstance(candidates, (str, bytes)) or not isinstance(candidates, Sequence) or not candidates:
            raise InvalidArgument(f"Sweep values for {name!r} must be a non-empty list of candidates; "
                                  f"received {candidates!r}.")
    configs: list[HeadConfig] = []
    for combo in itertools.product(*grid.values()):
        config = _relevant(replace(base, **dict(zip(grid, combo))), base)
        validate_config(config)
        if config not in configs:
            configs.append(config)
    return configs


def sweep(settings: FeatureSettings, grid: Optional[Mapping[str, Sequence]] = None,
          base: HeadConfig = HeadConfig(), runs_dir=None, log: Log = None) -> list[Run]:
    """Train a small grid of heads on features loaded and standardised once; runs best-on-validation first."""
    if base.init:
        raise InvalidArgument("A sweep trains new heads; --init is for a single head.")
    configs = expand_grid(base, grid)
    start = time.perf_counter()
    data = load_head_data(settings, base.val_fraction, base.seed)
    prepared = prepare(data).ready([config.kind for config in configs])
    loaded = time.perf_counter() - start
    if log:
        log(f"loaded and standardised {len(data.caches)} cache file(s) in {loaded:.1f}s; {len(configs)} head(s) to train")
    runs = []
    for i, config in enumerate(configs, 1):
        result = fit_head(data, config, prepared=prepared)
        run = write_head_run(settings, config, data, result, runs_dir, load_seconds=loaded)
        runs.append(run)
        if log:
            log(f"[{i}/{len(configs)}] {config.kind:<6} {config.summary():<40} val {run.val_acc:.4f}  "
                f"test {run.test_acc:.4f}  {result.seconds:.1f}s  {run.run_id}")
    runs.sort(key=lambda r: -(r.val_acc or 0.0))
    if log and runs:
        log(f"best on validation: {runs[0].run_id} (val {runs[0].val_acc:.4f}, test {runs[0].test_acc:.4f})")
    return runs
