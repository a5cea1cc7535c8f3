"""Load a dataset, carve a validation split, fingerprint its contents.

A dataset is a set of named splits (``train``, ``test``). A split holds its
images either in memory (``cifar10``, ``.npz``, ``digits``) or as a list of
files decoded later inside the ``tf.data`` graph (image folders), so large
image folders are never held in memory. Folders and archives are read by
``image_folders``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np

from .errors import FeatcacheError, InvalidArgument

# A label this large is a data error (ids, not class indices), not a 100,001-class problem.
MAX_CLASSES = 100_000
SPLITS = ("train", "test")
BUILTIN = ("cifar10", "digits")


@dataclass
class Split:
    """One split's labels and pixels (``images``) or image files (``paths``)."""

    name: str
    labels: np.ndarray
    fingerprint: str
    images: Optional[np.ndarray] = None
    paths: Optional[list[str]] = None
    # (height, width) when every image of the split has it: extraction then feeds the pixels as stored
    # and resizes inside the engine's graph; None for mixed sizes (resized in tf.data).
    image_size: Optional[tuple[int, int]] = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class Dataset:
    """Splits plus class names; ``source`` is what the user passed as DATA."""

    source: str
    class_names: list[str]
    splits: dict[str, Split]
    skipped: list[str] = field(default_factory=list)
    ignored_files: int = 0

    def __getitem__(self, split: str) -> Split:
        if split not in self.splits:
            raise InvalidArgument(f"Unknown split {split!r}; expected one of: {', '.join(self.splits)}.")
        return self.splits[split]


def load_dataset(source: Union[str, os.PathLike], cache_dir: Union[str, os.PathLike] = "cache",
                 skip_corrupt: bool = False) -> Dataset:
    """``cifar10``, ``digits``, an image folder, a ``.tar.gz`` of one, or an ``.npz`` file.

    Corrupt image files stop the load with the file's path unless
    ``skip_corrupt`` is set; then they are left out and listed in
    ``Dataset.skipped`` (and later in the cache's metadata).
    """
    text = str(source)
    if text == "cifar10":
        return _load_cifar10()
    if text == "digits":
        return _load_digits()
    path = Path(text).expanduser()
    if not path.exists():
        raise FeatcacheError(
            f"Dataset {text!r} not found: expected 'cifar10', 'digits', an image folder "
            "(train/<class>/*, test/<class>/*), a .tar.gz of one, or an .npz file."
        )
    from .image_folders import extract_archive, load_folder

    if path.is_dir():
        dataset = load_folder(path, Path(cache_dir), skip_corrupt, source=text)
    elif path.name.endswith((".tar.gz", ".tgz", ".tar")):
        dataset = load_folder(extract_archive(path, Path(cache_dir)), Path(cache_dir), skip_corrupt, source=text)
    elif path.suffix == ".npz":
        dataset = _load_npz(path)
    else:
        raise InvalidArgument(
            f"Unsupported dataset file {text!r}; expected a folder, a .tar.gz/.tgz/.tar archive or an .npz file.")
    return _learnable(dataset)


def _learnable(dataset: Dataset) -> Dataset:
    """Refuse data no classifier head can learn from, before anything is extracted for it."""
    classes = np.unique(dataset.splits["train"].labels)
    if classes.size < 2:
        only = dataset.class_names[int(classes[0])] if classes.size else "none"
        raise FeatcacheError(f"{dataset.source} has a single training class ({only}); a classifier needs at "
                             "least two.")
    return dataset


def validation_split(labels: np.ndarray, fraction: float = 0.1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded (train, val) row indices into ``labels``, both sorted."""
    from sklearn.model_selection import train_test_split

    if not 0.0 < fraction < 1.0:
        raise InvalidArgument(f"Validation fraction must be in (0, 1); received {fraction}.")
    labels = np.asarray(labels)
    rows = np.arange(labels.shape[0])
    n_classes = np.unique(labels).size
    n_val = int(round(fraction * rows.size))
    if n_val < n_classes or rows.size - n_val < n_classes:
        raise InvalidArgument(
            f"A validation fraction of {fraction} of {rows.size} rows cannot hold every one of "
            f"{n_classes} classes in both parts; use more data or another fraction."
        )
    counts = np.bincount(labels)
    if counts[counts > 0].min() < 2:
        raise FeatcacheError("A class has a single training image; a stratified validation split needs two.")
    train, val = train_test_split(rows, test_size=n_val, random_state=seed, stratify=labels)
    return np.sort(train), np.sort(val)


def stratified_subset(labels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """``n`` sorted row indices with the class mix of ``labels`` (for short runs)."""
    from sklearn.model_selection import train_test_split

    labels = np.asarray(labels)
    if n >= labels.shape[0]:
        return np.arange(labels.shape[0])
    rows, _ = train_test_split(np.arange(labels.shape[0]), train_size=n, random_state=seed, stratify=labels)
    return np.sort(rows)


# --- fingerprints -----------------------------------------------------------

def _hash_arrays(*arrays: np.ndarray) -> str:
    digest = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()[:16]


# --- built-in datasets ---------------------------------------------------------

def _split(name: str, images: np.ndarray, labels: np.ndarray) -> Split:
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    return Split(name=name, images=images, labels=labels, fingerprint=_hash_arrays(images, labels),
                 image_size=(int(images.shape[1]), int(images.shape[2])))


CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _reason(exc: BaseException) -> str:
    """The innermost message of a chained exception (Keras wraps the URL error in a bare Exception)."""
    for _ in range(20):  # chains are short; the bound guards against a cycle
        inner = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
        if inner is None:
            break
        exc = inner
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _load_cifar10() -> Dataset:
    import keras

    try:
        (x_train, y_train), (x_test, y_test) = keras.datasets.cifar10.load_data()
    except Exception as exc:
        raise FeatcacheError(
            "Could not load cifar10 through keras.datasets (it downloads "
            "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz into ~/.keras/datasets): "
            f"{_reason(exc)}. Offline, use a local copy instead, e.g. "
            "DATA=../shared/data/cifar10-jpeg.tar.gz, an image folder or an .npz file."
        ) from None
    return Dataset("cifar10", list(CIFAR10_CLASSES), {"train": _split("train", x_train, y_train),
                                                     "test": _split("test", x_test, y_test)})


def _load_digits() -> Dataset:
    """scikit-learn's 8x8 digits as RGB uint8, a fixed stratified 80/20 split: a real dataset offline."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = np.clip(np.rint(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    images = np.repeat(images[..., None], 3, axis=-1)
    labels = bunch.target.astype(np.int64)
    train, test = train_test_split(np.arange(labels.size), test_size=0.2, random_state=0, stratify=labels)
    train, test = np.sort(train), np.sort(test)
    names = [str(d) for d in range(10)]
    return Dataset("digits", names, {"train": _split("train", images[train], labels[train]),
                                     "test": _split("test", images[test], labels[test])})


def _load_npz(path: Path) -> Dataset:
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as exc:
        raise FeatcacheError(f"Cannot read {path} as an .npz file: {type(exc).__name__}: {exc}") from None
    missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in arrays]
    if missing:
        raise FeatcacheError(f"{path} lacks array(s) {', '.join(missing)}; expected x_train, y_train, x_test, y_test.")
    splits = {}
    n_classes = None
    if "class_names" in arrays:
        class_names = [str(c) for c in arrays["class_names"].tolist()]
        n_classes = len(class_names)
    label_max = 0
    for name in SPLITS:
        x, y = arrays[f"x_{name}"], arrays[f"y_{name}"]
        y = np.asarray(y).reshape(-1) if np.asarray(y).ndim == 2 and np.asarray(y).shape[1] == 1 else np.asarray(y)
        if y.ndim != 1:
            raise FeatcacheError(f"{path}: y_{name} has shape {y.shape}; expected one integer label per image.")
        if x.shape[0] != y.shape[0]:
            raise FeatcacheError(f"{path}: x_{name} has {x.shape[0]} images but y_{name} has {y.shape[0]} labels.")
        if x.shape[0] == 0:
            raise FeatcacheError(f"{path}: x_{name} holds no images.")
        y = _integer_labels(y, f"{path}: y_{name}")
        if n_classes is not None and y.max() >= n_classes:
            raise FeatcacheError(
                f"{path}: y_{name} holds label {int(y.max())}, out of range for {n_classes} class_names.")
        label_max = max(label_max, int(y.max()))
        splits[name] = _split(name, _as_rgb_uint8(x, f"{path}: x_{name}"), y)
    present = np.unique(splits["train"].labels)
    if n_classes is None:
        if label_max + 1 > present.size:
            raise FeatcacheError(
                f"{path}: labels run up to {label_max} but y_train holds {present.size} distinct label(s); without "
                "a class_names array, labels must be 0..K-1 with every class in y_train.")
        class_names = [str(i) for i in range(label_max + 1)]
    missing = sorted(set(range(len(class_names))) - set(present.tolist()))
    if missing:
        raise FeatcacheError(f"{path}: class(es) {', '.join(class_names[i] for i in missing[:5])} have no training "
                             "images; a head cannot learn a class it never sees.")
    return Dataset(str(path), class_names, splits)


def _integer_labels(y: np.ndarray, what: str) -> np.ndarray:
    """Labels as int64, or an error saying why they are not class indices."""
    if y.dtype == np.bool_ or not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
        raise FeatcacheError(f"{what} holds {y.dtype} values; labels must be integer class indices 0..K-1.")
    if np.issubdtype(y.dtype, np.floating):
        if not np.all(np.isfinite(y)) or not np.all(np.equal(np.mod(y, 1), 0)):
            raise FeatcacheError(f"{what} holds non-integer labels; labels must be integer class indices 0..K-1.")
    if y.min() < 0:
        raise FeatcacheError(f"{what} holds a negative label ({int(y.min())}).")
    if y.max() >= MAX_CLASSES:
        raise FeatcacheError(f"{what} holds label {int(y.max())}; featcache takes at most {MAX_CLASSES} classes.")
    return y.astype(np.int64)


def _as_rgb_uint8(x: np.ndarray, what: str) -> np.ndarray:
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3, 4):
        raise FeatcacheError(f"{what} has shape {x.shape}; expected (N, H, W), (N, H, W, 1), (N, H, W, 3) or (N, H, W, 4).")
    if x.dtype != np.uint8:
        x = _pixels_as_uint8(x, what)
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    elif x.shape[-1] == 4:
        x = np.ascontiguousarray(x[..., :3])
    return x


def _pixels_as_uint8(x: np.ndarray, what: str) -> np.ndarray:
    """The accepted ranges: integers in [0, 255] as they are; floats in [0, 1] scaled by 255 (the
    convention of ``x / 255.0``); floats in [0, 255] rounded. Anything else is refused."""
    if x.dtype == np.bool_ or not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise FeatcacheError(f"{what} holds {x.dtype} values; images must be uint8 or float pixels.")
    if np.issubdtype(x.dtype, np.floating) and not np.all(np.isfinite(x)):
        raise FeatcacheError(f"{what} holds NaN or infinite pixel values.")
    low, high = float(x.min()), float(x.max())
    if low < 0 or high > 255:
        raise FeatcacheError(f"{what} holds pixel values from {low:g} to {high:g}; accepted are integers or floats "
                             "in [0, 255], or floats in [0, 1].")
    if np.issubdtype(x.dtype, np.floating) and high <= 1.0:
        x = x * 255.0
    return np.rint(x).astype(np.uint8)
