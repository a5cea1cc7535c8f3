"""Stage 3: fine-tune backbone + head end to end, starting from a head trained on the cache.

The model is rebuilt from what the cache records (backbone, weights, input
size, resize method, preprocessing, pooling), so it computes the very
features the head was trained on. Two start-up checks prove it before any
training step: the pooled features of a few training images match the
cache, and the validation accuracy matches the head's. Only then is part of
the backbone unfrozen and trained at a low learning rate.

The model takes raw RGB pixels in [0, 255] of any size::

    images -> [RandomFlip, RandomTranslation: training only] -> Preprocess
           -> InferenceMode(backbone) -> head (from head.keras) -> ClassNames -> probabilities
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import keras
import numpy as np

from . import fsio
from .errors import brief, FeatcacheError, InvalidArgument, choice_error
from .heads import OPTIMIZERS, load_head as load_head_model, make_optimizer as head_optimizer
from .layers import ClassNames, InferenceMode, Preprocess
from .settings import FeatureSettings

# Check (1): cached features are float16 by default (about 3 significant digits), and
# extraction batches differ from ours, so features must agree to within 1% + 0.01.
FEATURE_RTOL = 1e-2
FEATURE_ATOL = 1e-2
# bf16 caches (OpenVINO on AMX) differ from Keras f32 by up to ~8% of single values; heads score the same.
BF16_FEATURE_RTOL = 1e-1
# Check (2): validation accuracy before training must be within one point of the head's.
VAL_ACC_TOLERANCE = 0.01


@dataclass(frozen=True)
class FinetuneConfig:
    """How to fine-tune; ``run`` picks the head run (default: best on validation for the cache)."""

    run: Optional[str] = None
    epochs: int = 5
    batch_size: int = 32
    learning_rate: float = 1e-5
    optimizer: str = "adam"
    unfreeze: str = "all"
    flip: bool = True
    translate: float = 0.1
    max_steps: Optional[int] = None
    subset: Optional[int] = None
    export: bool = True
    patience: int = 3
    mixed_precision: bool = False
    strategy: str = "none"
    check_images: int = 8
    seed: int = 0
    verbose: int = 2

    def training_digest(self) -> str:
        """What a resumed run must share with the interrupted one.

        Not the epochs, the output or the strategy: a run killed on two devices may resume on one.
        """
        skip = ("epochs", "verbose", "patience", "export", "strategy")
        fields = {k: v for k, v in asdict(self).items() if k not in skip}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:8]


# --- arguments -----------------------------------------------------------------------


def parse_unfreeze(text: str) -> tuple[str, Any]:
    """'all' | 'top:N' | 'from:LAYER' -> ('all', None) | ('top', N) | ('from', 'LAYER')."""
    text = (text or "").strip()
    if text == "all":
        return "all", None
    mode, _, arg = text.partition(":")
    if mode == "top" and arg:
        try:
            n = int(arg)
        except ValueError:
            n = 0
        if n < 1:
            raise InvalidArgument(f"--unfreeze top:N needs a positive integer N; received {text!r}.")
        return "top", n
    if mode == "from" and arg:
        return "from", arg
    raise InvalidArgument(f"Unknown unfreeze {text!r}; expected one of: 'all', 'top:N', 'from:LAYER'.")


def validate(config: FinetuneConfig) -> None:
    """Fail on a bad argument before loading data or building a model."""
    if config.optimizer not in OPTIMIZERS:
        raise choice_error("optimizer", OPTIMIZERS, config.optimizer)
    from .distribute import check_strategy

    check_strategy(config.strategy)
    parse_unfreeze(config.unfreeze)
    for name in ("epochs", "batch_size", "check_images"):
        if int(getattr(config, name)) < 1:
            raise InvalidArgument(f"{name.replace('_', ' ').capitalize()} must be a positive integer; "
                                  f"received {getattr(config, name)}.")
    for name in ("max_steps", "subset"):
        value = getattr(config, name)
        if value is not None and int(value) < 1:
            raise InvalidArgument(f"--{name.replace('_', '-')} must be a positive integer; received {value}.")
    if not config.learning_rate > 0:
        raise InvalidArgument(f"Learning rate must be positive; received {config.learning_rate}.")
    if not 0.0 <= config.translate < 0.5:
        raise InvalidArgument(f"Translation must be a fraction in [0, 0.5); received {config.translate}.")
    if config.patience < 0:
        raise InvalidArgument(f"Patience must be >= 0; received {config.patience}.")


# --- the source: what the cache says about how its features were made -------------------


@dataclass(frozen=True)
class Source:
    """The backbone and input pipeline that produced a cache, read from its attributes."""

    backbone: str
    weights: str
    size: int
    pooling: str
    preprocess: str
    width: int
    class_names: list = field(default_factory=list)

    @classmethod
    def from_cache(cls, attrs: dict, settings: FeatureSettings) -> "Source":
        from .backbones import get_spec, preprocess_key, weights_identity

        spec = get_spec(str(attrs["backbone"]))
        recorded, current = str(attrs["preprocess"]), preprocess_key(spec.name)
        if recorded != current:
            raise FeatcacheError(
                f"The cache was made with preprocessing {recorded!r} but {spec.name} now preprocesses as "
                f"{current!r}; fine-tuning would feed the head other features. Re-extract: {attrs.get('make_command')}")
        if weights_identity(settings.weights) != str(attrs["weights"]):  # lookup matched it; guard anyway
            raise FeatcacheError(f"Weights {settings.weights!r} are not the cache's ({attrs['weights']}).")
        return cls(backbone=spec.name, weights=settings.weights, size=int(attrs["size"]),
                   pooling=str(attrs["pooling"]), preprocess=recorded, width=int(attrs["width"]),
                   class_names=json.loads(attrs["class_names"]))


# --- building the model --------------------------------------------------------------------


def build_model(source: Source, head, config: FinetuneConfig, cache_dir: str):
    """Input(raw RGB [0, 255], any size) -> augmentation -> Preprocess -> backbone -> head -> ClassNames.

    Returns ``(model, backbone_features_model)``; the backbone starts frozen.
    """
    from .backbones import create_backbone

    policy = "mixed_float16" if config.mixed_precision else None
    backbone = create_backbone(source.backbone, source.weights, source.size, source.pooling,
                               cache_dir=cache_dir, dtype_policy=policy)
    inputs = keras.Input((None, None, 3), dtype="float32", name="images")
    x = inputs
    if config.flip:
        x = keras.layers.RandomFlip("horizontal", seed=config.seed, name="augment_flip")(x)
    if config.translate > 0:
        x = keras.layers.RandomTranslation(config.translate, config.translate, fill_mode="reflect",
                                           seed=config.seed + 1, name="augment_translate")(x)
    x = Preprocess(source.backbone, source.size, name="preprocess")(x)
    features = InferenceMode(backbone, name="backbone")(x)
    probs = head(features)
    outputs = ClassNames(source.class_names, name="class_names", dtype="float32")(probs)
    return keras.Model(inputs, outputs, name=f"featcache_{source.backbone}_finetuned"), backbone


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


def unfreeze(backbone, spec: str) -> list[str]:
    """Make part of the inner backbone trainable; returns the names of the layers made trainable.

    ``top:N`` counts layers that have weights, BatchNormalization excluded
    (those always stay frozen, so their statistics and scale stay those the
    head was trained on); ``from:LAYER`` unfreezes LAYER and every later layer.
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


def make_optimizer(config: FinetuneConfig):
    """The head trainer's optimizers (same hyperparameters), loss-scaled under mixed precision."""
    optimizer = head_optimizer(config.optimizer, config.learning_rate)
    if config.mixed_precision:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def make_strategy(name: str, log: Callable[[str], None]):
    """The tf.distribute strategy (``featcache.distribute``, shared with extraction); created first,
    as ``MultiWorkerMirroredStrategy`` must be before TensorFlow runs any op."""
    import tensorflow as tf

    from . import distribute

    if name == "none":
        return tf.distribute.get_strategy()
    strategy = distribute.make_strategy(name)
    log(f"strategy: {name}, {strategy.num_replicas_in_sync} replica(s) in sync")
    return strategy


def _is_chief(strategy_name: str) -> bool:
    """Only the chief writes the run folder's model, export and record."""
    from .distribute import cluster_from_env

    return strategy_name != "multiworker" or cluster_from_env().chief


# --- data ---------------------------------------------------------------------------------


def image_stream(split, rows: np.ndarray, size: int, batch_size: int, shuffle_seed: Optional[int] = None,
                 repeat: bool = False):
    """(float32 pixels in [0, 255], label) batches of ``split`` rows, as extraction reads them.

    In-memory images keep their size (the model resizes); files are decoded
    and resized one by one before batching, exactly like ``make_stream``.
    """
    import tensorflow as tf

    from .preprocessing import decode_file, resize

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


# --- the start-up checks -----------------------------------------------------------------


def check_features(infer: Inference, split, cache, cache_rows: np.ndarray, size: int, batch_size: int,
                   log: Callable[[str], None]) -> float:
    """Check (1): the model's pooled features for a few training images equal the cached ones.

    Tolerance ``|model - cached| <= FEATURE_ATOL + FEATURE_RTOL * |cached|`` per value.
    Returns the largest absolute difference.
    """
    image_rows = cache.indices[cache_rows]
    got, _ = infer(split, image_rows, size, batch_size)
    expected = cache.features[cache_rows].astype(np.float32)
    diff = np.abs(got - expected)
    rtol = BF16_FEATURE_RTOL if getattr(cache.key, "precision", "f32") == "bf16" else FEATURE_RTOL
    bad = diff > FEATURE_ATOL + rtol * np.abs(expected)
    worst = float(diff.max()) if diff.size else 0.0
    if bad.any():
        row = int(np.argmax(bad.any(axis=1)))
        raise FeatcacheError(
            f"Self-check (1) failed: the rebuilt model's features differ from the cache {cache.path.name} on "
            f"{int(bad.any(axis=1).sum())} of {len(cache_rows)} training images (max |diff| {worst:.4g}, e.g. image "
            f"{int(image_rows[row])}; tolerance rtol {rtol:g}, atol {FEATURE_ATOL:g}): the backbone, "
            f"weights, size or preprocessing no longer match those that made the cache.")
    log(f"check 1 ok: features of {len(cache_rows)} training images match the cache "
        f"(max |diff| {worst:.2e}; tolerance rtol {rtol:g}, atol {FEATURE_ATOL:g})")
    return worst


def check_validation(infer: Inference, head, split, cache, val_rows: np.ndarray, size: int, batch_size: int,
                     recorded: Optional[float], log: Callable[[str], None]) -> dict:
    """Check (2): validation accuracy before training equals the head's, within one point.

    Compared with the head's recorded ``val_acc`` when the validation rows
    are the head's full set, and always with the head on the cached features
    of the same rows (which also covers ``--subset``).
    """
    labels = cache.labels[val_rows]
    _, probs = infer(split, cache.indices[val_rows], size, batch_size)
    acc = float(np.mean(probs.argmax(axis=1) == labels))
    features = cache.features[val_rows].astype(np.float32)
    cached = np.concatenate([np.asarray(head(features[i:i + 1024], training=False))
                             for i in range(0, len(features), 1024)])
    acc_cached = float(np.mean(cached.argmax(axis=1) == labels))
    against = [("the head on the cached features of these rows", acc_cached)]
    if recorded is not None:
        against.insert(0, ("the head's recorded val_acc", float(recorded)))
    for what, reference in against:
        if abs(acc - reference) > VAL_ACC_TOLERANCE + 1e-9:
            raise FeatcacheError(
                f"Self-check (2) failed: validation accuracy before training is {acc:.4f} on {len(val_rows)} images "
                f"but {what} is {reference:.4f} (tolerance {VAL_ACC_TOLERANCE:g}): the head does not fit "
                f"these features or validation rows.")
    shown = ", ".join(f"{what} {ref:.4f}" for what, ref in against)
    log(f"check 2 ok: validation accuracy before training {acc:.4f} on {len(val_rows)} images ({shown}; "
        f"tolerance {VAL_ACC_TOLERANCE:g})")
    return {"val_acc_before": acc, "val_acc_head_cached": acc_cached, "val_acc_head_recorded": recorded}


# --- the head run to start from (featcache.report run folders) ----------------------------


def _feature_settings_of(run) -> dict:
    """The feature settings a run recorded (``settings.json``: nested under 'features' or flat)."""
    recorded = run.settings.get("features", run.settings) if isinstance(run.settings, dict) else {}
    return recorded if isinstance(recorded, dict) else {}


def _same_cache(run, settings: FeatureSettings) -> bool:
    """Whether a run was made on the cache these settings name (backbone, weights, size, pooling, data)."""
    from .backbones import get_spec, resolve_size, weights_identity
    from .lookup import data_source_id

    feats = _feature_settings_of(run)
    try:
        spec = get_spec(str(feats.get("backbone", run.record.get("backbone", ""))))
        return (spec.name == get_spec(settings.backbone).name
                and weights_identity(feats.get("weights", "imagenet")) == weights_identity(settings.weights)
                and resolve_size(spec, feats.get("size")) == resolve_size(spec, settings.size)
                and feats.get("pooling", "avg") == settings.pooling
                and data_source_id(str(feats.get("data", "cifar10"))) == data_source_id(settings.data))
    except (FeatcacheError, ValueError, TypeError):
        return False


def select_head_run(settings: FeatureSettings, run_id: Optional[str]):
    """The head run ``run_id`` (id, unique part of one, or folder), or the best head on validation for this cache."""
    from . import runs

    if run_id:
        run = runs.load_run(settings.cache_dir, run_id)
        if run.kind != "head":
            raise FeatcacheError(f"Run {run.run_id} is a {run.kind} run; fine-tuning starts from a head run "
                                 f"(see `featcache runs`).")
        if not (run.path / "head.keras").exists():
            raise FeatcacheError(f"Run {run.run_id} has no head.keras in {run.path}.")
        return run
    candidates = [run for run in runs.list_runs(settings.cache_dir, kind="head")
                  if (run.path / "head.keras").exists() and _same_cache(run, settings)]
    if not candidates:
        raise FeatcacheError(
            f"No head run on the {settings.backbone} cache of {settings.data} in "
            f"{runs.runs_root(settings.cache_dir)}; train one first: "
            f"{settings.make_command().replace('make features', 'make head', 1)}")
    return candidates[0]  # list_runs sorts by validation accuracy, best first


def check_head_run(run, source: Source, settings: FeatureSettings) -> None:
    """A head from another backbone or cache cannot sit on this backbone."""
    backbone = str(run.record.get("backbone", source.backbone))
    if backbone != source.backbone:
        raise FeatcacheError(f"Head run {run.run_id} was trained on {backbone} features; these settings name "
                             f"{source.backbone}. Pick a {source.backbone} head (see `featcache runs`).")
    if not _same_cache(run, settings):
        feats = _feature_settings_of(run)
        shown = ", ".join(f"{k} {feats.get(k)}" for k in ("size", "weights", "pooling", "data") if k in feats)
        raise FeatcacheError(f"Head run {run.run_id} was trained on another {backbone} cache ({shown}) than "
                             f"these settings name ({settings.make_command()}).")


def load_head(run, source: Source):
    """The head model of ``run``, checked to take features of the backbone's width."""
    head = load_head_model(run.path / "head.keras")
    width = head.input_shape[-1]
    if width != source.width:
        raise FeatcacheError(f"Head run {run.run_id} takes features of width {width} but {source.backbone} "
                             f"({source.pooling} pooling) produces width {source.width}.")
    n_out = head.output_shape[-1]
    if n_out != len(source.class_names):
        raise FeatcacheError(f"Head run {run.run_id} predicts {n_out} classes; the cache has "
                             f"{len(source.class_names)}.")
    return head


def recorded_val_acc(run) -> Optional[float]:
    """The head's validation accuracy on the ``orig`` view: a head trained on several views records its
    test-time-augmented accuracy as ``val_acc`` and the single-view ones in ``val_acc_by_view``."""
    by_view = run.record.get("val_acc_by_view") or {}
    views = run.record.get("views") or ["orig"]
    if list(views) != ["orig"] and "orig" in by_view:
        return float(by_view["orig"])
    value = run.record.get("val_acc")
    return None if value is None else float(value)


def validation_settings(run) -> tuple[float, int]:
    """The validation fraction and seed the head used, so fine-tuning validates on the same rows."""
    for place in (run.record, run.settings):
        if isinstance(place, dict) and place.get("val_fraction") is not None and place.get("val_seed") is not None:
            return float(place["val_fraction"]), int(place["val_seed"])
    raise FeatcacheError(f"Run {run.run_id} does not record its validation split (val_fraction, val_seed); "
                         "train a new head with `featcache head` and fine-tune from that one.")


# --- the work folder (resumable) and the finished run folder ------------------------------


def work_dir_for(settings: FeatureSettings, head_run, config: FinetuneConfig) -> Path:
    """Where an unfinished run keeps its backup, logs and history: hidden (``list_runs`` skips it) and
    named after the head run and the training settings, so the same call finds it again to resume."""
    from . import runs

    return runs.runs_root(settings.cache_dir) / f".finetune-{head_run.run_id}-{config.training_digest()}"


def _discard_work_dir(work_dir: Path) -> None:
    """Delete a fine-tune work folder, after proving it is one (its hidden ``.finetune-`` name, in runs/)."""
    if not work_dir.name.startswith(".finetune-"):
        raise FeatcacheError(f"Refusing to delete {work_dir}: it is not a featcache fine-tune work folder.")
    fsio.remove_owned(work_dir, work_dir.parent, "fine-tune work folder")


def _open_work_dir(work_dir: Path) -> bool:
    """Create the work folder; True when it holds a backup to resume from."""
    if (work_dir / "backup").is_dir():
        return True
    if work_dir.exists():  # killed before its first epoch finished: nothing worth keeping
        _discard_work_dir(work_dir)
    fsio.make_dirs(work_dir, "fine-tune work folder")
    return False


def finish_run(work_dir: Path, settings: FeatureSettings, config: FinetuneConfig, model, record: dict,
               class_names: list[str], val: tuple, test: tuple, log: Callable[[str], None], val_images=None) -> dict:
    """The finished run folder, written through ``featcache.report`` (staged, renamed when whole)."""
    from . import report, runs

    run_id = runs.new_run_id("finetune", record["backbone"])
    final = runs.runs_root(settings.cache_dir) / run_id
    history = _history(work_dir / "history.csv")
    with runs.staged_run_dir(final) as tmp:
        model.save(tmp / "model.keras")
        for name in ("history.csv", "logs"):
            if (work_dir / name).exists():
                shutil.move(str(work_dir / name), str(tmp / name))
        record = {**record, "run_id": run_id, "epochs_run": len(history), "model": str(final / "model.keras"),
                  "saved_model": str(final / "saved_model") if config.export else None}
        run_settings = {"features": asdict(settings), "finetune": asdict(config), "head_run": record["head_run"]}
        record = report.write_run(tmp, run_settings, record, class_names, *val, *test, history=history,
                                  val_images=val_images)
    _discard_work_dir(work_dir)
    log(f"wrote {final / 'model.keras'}")
    if config.export:  # the exporter table, self-checked on validation like `featcache export`
        from .exporters import ExportOptions, export_run

        export_run(runs.read_run(final), settings.cache_dir,
                   ExportOptions(format="savedmodel", out=str(final / "saved_model")), log=log)
        record = runs.read_run(final).record
    return record


# --- the run ------------------------------------------------------------------------------


class _ResumeLog(keras.callbacks.Callback):
    """Says where training starts, so a resumed run says that it resumed."""

    def __init__(self, log: Callable[[str], None]):
        super().__init__()
        self.log, self.first = log, True

    def on_epoch_begin(self, epoch, logs=None):
        if self.first and epoch > 0:
            self.log(f"resuming from the backup at epoch {epoch + 1}")
        self.first = False


def _has_tensorboard() -> bool:
    """TensorFlow's summary ops need the separate ``tensorboard`` package; without it only the CSV log is kept."""
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


def _history(path: Path) -> list[dict]:
    """Rows of the CSV log: one per finished epoch, including those before a resume."""
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        return [{k: (int(v) if k == "epoch" else float(v)) for k, v in row.items() if v not in (None, "")}
                for row in csv.DictReader(fh)]


def split_rows(cache, dataset, head_run, config: FinetuneConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """Cache rows of train and validation (the head's own split) and test image rows, capped by ``--subset``."""
    from .datasets import stratified_subset, validation_split

    fraction, seed = validation_settings(head_run)
    train_rows, val_rows = validation_split(cache.labels, fraction, seed)
    test_rows = np.arange(len(dataset["test"]))
    if config.subset:
        try:
            train_rows = train_rows[stratified_subset(cache.labels[train_rows], config.subset, config.seed)]
            val_rows = val_rows[stratified_subset(cache.labels[val_rows], config.subset, config.seed)]
            test_rows = test_rows[stratified_subset(dataset["test"].labels, config.subset, config.seed)]
        except ValueError as exc:
            raise FeatcacheError(f"--subset {config.subset} cannot keep every class in train, validation "
                                 f"and test ({exc}); use a larger N.") from None
    return train_rows, val_rows, test_rows, {"val_fraction": fraction, "val_seed": seed}


def finetune(settings: FeatureSettings, config: FinetuneConfig = FinetuneConfig(),
             log: Callable[[str], None] = print, callbacks: Sequence[keras.callbacks.Callback] = ()) -> dict:
    """Fine-tune the chosen head run's model end to end; returns the run record (kind 'finetune').

    Running the same call again after an interruption resumes from the last
    finished epoch (``BackupAndRestore`` in a hidden work folder). ``callbacks``
    run after featcache's own (tests use them to interrupt a run).
    """
    import tensorflow as tf
    from filelock import FileLock, Timeout

    from .datasets import load_dataset
    from .lookup import check_settings, load_split

    validate(config)
    check_settings(settings)
    backbones = settings.backbones()
    if len(backbones) != 1:
        raise InvalidArgument(f"Fine-tuning takes one backbone; received {settings.backbone!r}.")
    strategy = make_strategy(config.strategy, log)  # before any other TensorFlow work
    head_run = select_head_run(settings, config.run)
    cache = load_split(settings, backbones[0], "train", "orig")
    source = Source.from_cache(cache.attrs, settings)
    check_head_run(head_run, source, settings)
    dataset = load_dataset(settings.data, settings.cache_dir, skip_corrupt=settings.skip_corrupt)
    if dataset["train"].fingerprint != cache.key.dataset:
        raise FeatcacheError(f"{settings.data} has changed since {cache.path.name} was cached; re-extract "
                             f"({settings.make_command()}) and retrain the head first.")
    train_rows, val_rows, test_rows, split_info = split_rows(cache, dataset, head_run, config)
    chief = _is_chief(config.strategy)
    work_dir = work_dir_for(settings, head_run, config)
    if not chief:  # other workers keep their own backups; only the chief writes the run
        from .distribute import cluster_from_env

        # Beside the chief's folder, not inside it: the chief clears its own folder on a fresh start.
        work_dir = work_dir.with_name(f"{work_dir.name}.worker{cluster_from_env().rank}")
    log(f"fine-tuning {source.backbone} ({source.weights}, {source.size}px, {source.pooling} pooling) from head run "
        f"{head_run.run_id}: {len(train_rows)} train / {len(val_rows)} val / {len(test_rows)} test images")
    if config.mixed_precision and not tf.config.list_physical_devices("GPU"):
        log("warning: --mixed-precision without a GPU runs slower on CPU; continuing as asked")

    # Locked before the backbone is built: a second identical call fails in a second, not minutes.
    fsio.make_dirs(work_dir.parent, "runs folder")
    lock = FileLock(str(work_dir) + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise FeatcacheError(f"Another featcache finetune is running these settings (lock {lock.lock_file}).") from None
    try:
        keras.utils.set_random_seed(config.seed)
        start = time.perf_counter()
        train_split = dataset["train"]
        with strategy.scope():
            head = load_head(head_run, source)
            model, backbone = build_model(source, head, config, settings.cache_dir)
            chosen = unfreeze(backbone, config.unfreeze)  # before the checks: a bad layer name fails fast
            for layer in head.layers:  # an MLP head's BatchNormalization keeps its statistics too
                if isinstance(layer, keras.layers.BatchNormalization):
                    layer.trainable = False
            infer = Inference(model)
            checks = {"feature_max_abs_diff": check_features(
                infer, train_split, cache, train_rows[:config.check_images], source.size, config.batch_size, log)}
            recorded = None if config.subset else recorded_val_acc(head_run)
            checks.update(check_validation(infer, head, train_split, cache, val_rows, source.size, config.batch_size,
                                           recorded, log))
            model.compile(optimizer=make_optimizer(config), loss="sparse_categorical_crossentropy",
                          metrics=["accuracy"])
        n_trainable = int(sum(np.prod(v.shape) for v in model.trainable_weights))
        log(f"unfreeze {config.unfreeze}: {len(chosen)} backbone layer(s) trainable ({n_trainable:,} trainable "
            f"parameters with the head; BatchNormalization frozen); {config.optimizer} at lr {config.learning_rate:g}")
        resuming = _open_work_dir(work_dir)
        steps = math.ceil(len(train_rows) / config.batch_size)
        if config.max_steps:
            steps = min(steps, config.max_steps)
        train_stream = image_stream(train_split, cache.indices[train_rows], source.size, config.batch_size,
                                    shuffle_seed=config.seed, repeat=True)
        val_stream = image_stream(train_split, cache.indices[val_rows], source.size, config.batch_size)
        best_path = work_dir / "best.weights.h5"
        checkpoint = keras.callbacks.ModelCheckpoint(best_path, monitor="val_accuracy", mode="max",
                                                     save_best_only=True, save_weights_only=True)
        earlier = [row["val_accuracy"] for row in _history(work_dir / "history.csv") if "val_accuracy" in row]
        if resuming and earlier:
            checkpoint.best = max(earlier)  # the best epoch before the interruption still counts
        own = [
            keras.callbacks.BackupAndRestore(str(work_dir / "backup")),
            checkpoint,
            keras.callbacks.EarlyStopping(monitor="val_accuracy", mode="max", patience=config.patience),
            keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=max(1, config.patience // 2),
                                              min_lr=config.learning_rate / 100),
            keras.callbacks.CSVLogger(str(work_dir / "history.csv"), append=True),
            _ResumeLog(log),
        ]
        if _has_tensorboard():
            own.append(keras.callbacks.TensorBoard(str(work_dir / "logs"), write_graph=False, profile_batch=0))
        else:
            log("note: no TensorBoard logs (the tensorboard package is not installed); history.csv has the curves")
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
            "kind": "finetune",
            "head": head_run.record.get("head"),
            "backbone": source.backbone,
            "weights": source.weights,
            "size": source.size,
            "pooling": source.pooling,
            "preprocess": source.preprocess,
            "head_run": head_run.run_id,
            "head_val_acc": head_run.record.get("val_acc"),
            "config": asdict(config),
            "checks": {**checks, "feature_rtol": FEATURE_RTOL, "feature_atol": FEATURE_ATOL,
                       "val_acc_tolerance": VAL_ACC_TOLERANCE},
            "unfrozen_layers": len(chosen),
            "trainable_params": n_trainable,
            "steps_per_epoch": steps,
            "n_train": int(len(train_rows)),
            **split_info,
            "seconds": round(seconds, 2),
            "replicas": int(strategy.num_replicas_in_sync),
        }
        if not chief:  # the chief writes the run; a worker's backup and logs are spent
            _discard_work_dir(work_dir)
            return record
        from .run_images import loaded_split_images

        return finish_run(work_dir, settings, config, model, record, source.class_names,
                          (cache.labels[val_rows], val_probs), (dataset["test"].labels[test_rows], test_probs), log,
                          val_images=loaded_split_images(settings, train_split, cache.indices[val_rows]))
    finally:
        lock.release()
        if not work_dir.exists():  # the run is written: its lock file has nothing left to guard
            Path(lock.lock_file).unlink(missing_ok=True)
