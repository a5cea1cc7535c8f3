"""The images behind a run, read from the dataset itself (files or arrays), never from the cache.

A head or fine-tune run validates on rows of the dataset's train split. Its top-loss
picture, an export's self-check and int8 calibration all need those images as raw RGB
pixels, decoded exactly as extraction decoded them (``featcache.decoding``). A run
records which rows it validated on in ``validation.csv`` (see ``featcache.interpretation``)
and which dataset in its record (``val_images``): the data source and the fingerprint of
the split its cache was made from, so a dataset changed since then is refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from .errors import FeatcacheError


@dataclass
class SplitSource:
    """One split of a dataset, loaded on first use and checked against the fingerprint its cache recorded.

    Shared by the runs of a sweep, so the dataset is listed once. ``split`` may be given
    already loaded (a fine-tune run has it in hand).
    """

    data: str
    cache_dir: str = "cache"
    skip_corrupt: bool = False
    split_name: str = "train"
    fingerprint: Optional[str] = None
    split: Optional[object] = field(default=None, repr=False)

    def get(self):
        """The ``datasets.Split``; a one-line error when the data is gone or changed since it was cached."""
        if self.split is None:
            self.split = _load_split(self.data, self.cache_dir, self.skip_corrupt, self.split_name)
        if self.fingerprint is not None and self.split.fingerprint != self.fingerprint:
            raise FeatcacheError(f"{self.data} has changed since its features were cached (the {self.split_name} "
                                 f"split's fingerprint is {self.split.fingerprint[:12]}, the cache's "
                                 f"{self.fingerprint[:12]}); its images are not the ones the run saw.")
        return self.split

    def describe(self) -> dict:
        """What a run record keeps to find these images again."""
        return {"data": self.data, "split": self.split_name, "fingerprint": self.fingerprint,
                "skip_corrupt": self.skip_corrupt}

    def rows(self, rows: Sequence[int]) -> "ImageRows":
        return ImageRows(self, np.asarray(rows, dtype=np.int64))


def head_validation_images(settings, val_indices: np.ndarray, fingerprint: str) -> ImageRows:
    """The validation images of a head run on ``settings`` (a ``FeatureSettings``), read lazily."""
    from .lookup import data_source_id

    source = SplitSource(data_source_id(settings.data), str(settings.cache_dir), bool(settings.skip_corrupt),
                         "train", fingerprint)
    return source.rows(val_indices)


def loaded_split_images(settings, split, rows: np.ndarray) -> ImageRows:
    """Rows of a split already loaded (a fine-tune run holds its train split)."""
    from .lookup import data_source_id

    source = SplitSource(data_source_id(settings.data), str(settings.cache_dir), bool(settings.skip_corrupt),
                         split.name, split.fingerprint, split=split)
    return source.rows(rows)


def _load_split(data: str, cache_dir: str, skip_corrupt: bool, split_name: str):
    from .datasets import load_dataset

    return load_dataset(data, cache_dir, skip_corrupt=skip_corrupt)[split_name]


@dataclass
class ImageRows:
    """Rows (image indices) of a split; pixels are read only when asked for."""

    source: SplitSource
    rows: np.ndarray

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def image(self, position: int) -> np.ndarray:
        """uint8 RGB pixels (H, W, 3) of ``rows[position]``."""
        return read_row(self.source.get(), int(self.rows[position]))

    def batches(self, batch_size: int = 32) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(positions, float32 pixels) in row order; consecutive images of one size share a batch."""
        pending: list[int] = []
        images: list[np.ndarray] = []
        for position in range(len(self)):
            image = self.image(position)
            if images and (image.shape != images[0].shape or len(images) == batch_size):
                yield np.asarray(pending), np.stack(images).astype(np.float32)
                pending, images = [], []
            pending.append(position)
            images.append(image)
        if images:
            yield np.asarray(pending), np.stack(images).astype(np.float32)


def read_row(split, row: int) -> np.ndarray:
    """One image of a split as uint8 RGB, from its array or its file (``decoding.read_image``)."""
    if split.images is not None:
        image = np.asarray(split.images[row])
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=-1)
        return image.astype(np.uint8)
    from .decoding import read_image

    return read_image(split.paths[row])


def cache_rows(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(labels, image indices) of a cache file, without reading its features."""
    import h5py

    from .cache import check

    check(path, full=False)
    try:
        with h5py.File(path, "r") as fh:
            return np.asarray(fh["labels"][...], dtype=np.int64), np.asarray(fh["indices"][...], dtype=np.int64)
    except (OSError, KeyError) as exc:
        raise FeatcacheError(f"{path} cannot be read ({exc}).") from None


# --- a finished run's images ----------------------------------------------------------------


def validation_images(run, cache_dir: str = "cache") -> tuple[ImageRows, np.ndarray]:
    """(the run's validation images in order, their labels), from its ``validation.csv`` and record.

    A head run written before runs kept ``validation.csv`` recomputes its rows the way it drew
    them: ``validation_split`` of its first train cache with the recorded fraction and seed.
    """
    from .interpretation import VALIDATION_FILE, read_validation_table

    names = [str(n) for n in run.record.get("class_names") or []]
    table_path = run.path / VALIDATION_FILE
    described = run.record.get("val_images")
    if table_path.exists() and isinstance(described, dict):
        table = read_validation_table(table_path)
        try:
            rows = np.array([int(r["row"]) for r in table], dtype=np.int64)
            labels = np.array([names.index(r["true"]) for r in table], dtype=np.int64)
        except (KeyError, ValueError) as exc:
            raise FeatcacheError(f"{table_path} is not a featcache validation table ({exc}).") from None
        source = SplitSource(str(described["data"]), str(cache_dir), bool(described.get("skip_corrupt", False)),
                             str(described.get("split", "train")), described.get("fingerprint"))
        return source.rows(rows), labels
    if run.kind != "head":
        raise FeatcacheError(f"Run {run.run_id} does not record its validation images ({VALIDATION_FILE}); "
                             "it was made by an older featcache. Fine-tune again to export it.")
    return _recomputed_validation(run, cache_dir)


def _recomputed_validation(run, cache_dir: str) -> tuple[ImageRows, np.ndarray]:
    from .cache import read_attrs
    from .datasets import validation_split

    views = run.record.get("views") or ["orig"]
    reference = "orig" if "orig" in views else views[0]
    first = str(run.record.get("backbone", "")).split("+")[0]
    entries = [c for c in run.record.get("caches") or [] if isinstance(c, dict) and c.get("backbone") == first
               and c.get("split") == "train" and c.get("view") == reference and c.get("file")]
    fraction, seed = run.record.get("val_fraction"), run.record.get("val_seed")
    if not entries or fraction is None or seed is None:
        raise FeatcacheError(f"Run {run.run_id} records neither its validation images nor the cache and split "
                             "they were drawn from; train the head again to export it.")
    path = Path(cache_dir) / str(entries[0]["file"])
    if not path.exists():
        raise FeatcacheError(f"Run {run.run_id} was trained on {path.name}, which is not in {cache_dir} "
                             "(give the --cache-dir it was trained with).")
    labels, indices = cache_rows(path)
    _, val_rows = validation_split(labels, float(fraction), int(seed))
    attrs = read_attrs(path)
    source = SplitSource(str(attrs.get("data_source")), str(cache_dir), bool(run.settings.get("features", {})
                         .get("skip_corrupt", False)), "train", str(attrs.get("dataset")))
    return source.rows(indices[val_rows]), labels[val_rows]


def training_images(validation: ImageRows, n: int, seed: int = 0) -> ImageRows:
    """Up to ``n`` images of the split that are not validation images, drawn at random (seeded), in order."""
    split = validation.source.get()
    candidates = np.setdiff1d(np.arange(len(split)), validation.rows)
    if candidates.size > n:
        candidates = np.sort(np.random.default_rng(seed).choice(candidates, n, replace=False))
    return validation.source.rows(candidates)
