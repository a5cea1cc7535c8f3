"""Where a fine-tune starts: the cache's backbone and input pipeline, and the head run on top of it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ..errors import FeatcacheError
from ..heads import load_head as load_head_model
from ..settings import FeatureSettings
from .config import FinetuneConfig



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
        from ..backbones import get_spec, preprocess_key, weights_identity

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


# --- the head run to start from (featcache.report run folders) ----------------------------


def _feature_settings_of(run) -> dict:
    """The feature settings a run recorded (``settings.json``: nested under 'features' or flat)."""
    recorded = run.settings.get("features", run.settings) if isinstance(run.settings, dict) else {}
    return recorded if isinstance(recorded, dict) else {}


def _same_cache(run, settings: FeatureSettings) -> bool:
    """Whether a run was made on the cache these settings name (backbone, weights, size, pooling, data)."""
    from ..backbones import get_spec, resolve_size, weights_identity
    from ..lookup import data_source_id

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
    from .. import runs

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


def split_rows(cache, dataset, head_run, config: FinetuneConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """Cache rows of train and validation (the head's own split) and test image rows, capped by ``--subset``."""
    from ..datasets import stratified_subset, validation_split

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



@dataclass
class Start:
    """What both modes start from: the head run, its pooled train cache, the source, the dataset and the rows."""

    head_run: object
    cache: object
    source: Source
    dataset: object
    train_rows: np.ndarray
    val_rows: np.ndarray
    test_rows: np.ndarray
    split_info: dict


def prepare(settings: FeatureSettings, config: FinetuneConfig) -> Start:
    """Select the head run and its cache, and prove they, the data and the settings belong together."""
    from ..datasets import load_dataset
    from ..errors import InvalidArgument
    from ..lookup import check_settings, load_split

    check_settings(settings)
    backbones = settings.backbones()
    if len(backbones) != 1:
        raise InvalidArgument(f"Fine-tuning takes one backbone; received {settings.backbone!r}.")
    head_run = select_head_run(settings, config.run)
    cache = load_split(settings, backbones[0], "train", "orig")
    source = Source.from_cache(cache.attrs, settings)
    check_head_run(head_run, source, settings)
    dataset = load_dataset(settings.data, settings.cache_dir, skip_corrupt=settings.skip_corrupt)
    if dataset["train"].fingerprint != cache.key.dataset:
        raise FeatcacheError(f"{settings.data} has changed since {cache.path.name} was cached; re-extract "
                             f"({settings.make_command()}) and retrain the head first.")
    rows = split_rows(cache, dataset, head_run, config)
    return Start(head_run, cache, source, dataset, *rows)
