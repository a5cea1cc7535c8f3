"""The rows a head trains on: cached features of every backbone and view, aligned, split into train/val/test."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from ..cache import FeatureSet
from ..errors import FeatcacheError, InvalidArgument, choice_error
from ..settings import VIEWS, FeatureSettings
from .config import SPLITS


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
    from ..datasets import validation_split

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
    from ..lookup import check_settings, load_split

    check_settings(settings)
    backbones = settings.backbones()
    if len(set(backbones)) != len(backbones):
        raise InvalidArgument(f"A backbone is named twice in {settings.backbone!r}.")
    views = check_views(settings.views)
    sets = {split: {view: [load_split(settings, b, split, view, verify=verify) for b in backbones]
                    for view in views} for split in SPLITS}
    data = assemble(sets["train"], sets["test"], val_fraction, seed)
    from ..run_images import head_validation_images

    data.val_images = head_validation_images(settings, data.val_indices, data.dataset_fingerprint)
    return data
