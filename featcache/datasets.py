"""Load a dataset, carve a validation split, fingerprint its contents.

A dataset is a set of named splits (``train``, ``test``). A split holds its
images either in memory (``cifar10``, ``.npz``, ``digits``) or as a list of
files decoded later inside the ``tf.data`` graph (image folders), so large
image folders are never held in memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np

from . import fsio
from .decoding import IMAGE_EXTENSIONS, check_image, convert_to_png, converted_path
from .errors import FeatcacheError, InvalidArgument

_SCAN_VERSION = 5  # 5: records each split's common image size
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
    if path.is_dir():
        dataset = _load_folder(path, Path(cache_dir), skip_corrupt, source=text)
    elif path.name.endswith((".tar.gz", ".tgz", ".tar")):
        dataset = _load_folder(_extract_archive(path, Path(cache_dir)), Path(cache_dir), skip_corrupt, source=text)
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


def _hash_files(paths: list[str], labels: np.ndarray, root: Path) -> str:
    digest = hashlib.sha256()
    for path, label in zip(paths, labels):
        digest.update(f"{Path(path).relative_to(root).as_posix()}\0{int(label)}\0".encode())
        with open(path, "rb") as fh:
            digest.update(hashlib.sha256(fh.read()).digest())
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


# --- image folders ----------------------------------------------------------------

def _file_identity(path: Path) -> str:
    """Size, times and inode: ``cp -p`` keeps size and mtime but gives a new ctime, so rewritten
    content is noticed and hashed again."""
    st = os.stat(path)
    return f"{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0{st.st_ino}"


def _extract_archive(archive: Path, cache_dir: Path) -> Path:
    """Extract once into ``cache_dir/datasets/<name>-<hash>``; the folder appears only when complete."""
    tag = hashlib.sha256(f"{archive.resolve()}\0{_file_identity(archive)}".encode()).hexdigest()[:10]
    stem = archive.name.split(".")[0]
    target = cache_dir / "datasets" / f"{stem}-{tag}"
    marker = target / ".featcache-extracted"
    if marker.exists():
        return _folder_root(target, archive)
    from filelock import FileLock

    fsio.make_dirs(target.parent, "dataset folder")
    try:
        lock = FileLock(str(target) + ".lock")
        lock.acquire()
    except OSError as exc:
        raise fsio.disk_error(exc, target.parent, "lock in") from None
    try:
        if marker.exists():
            return _folder_root(target, archive)
        for stale in fsio.stale_temporaries(target) + ([target] if target.exists() else []):
            fsio.remove_owned(stale, target.parent, "unfinished extraction")  # ours, killed before its marker
        try:
            with tarfile.open(archive) as tar:
                members = tar.getmembers()
                fsio.require_space(target.parent, sum(m.size for m in members) + (1 << 20),
                                   f"the extracted {archive.name}")
                with fsio.atomic_path(target, "extracted dataset") as tmp:
                    tar.extractall(tmp, members=members, filter="data")
                    (tmp / ".featcache-extracted").write_text(str(archive.resolve()))
        except (tarfile.TarError, EOFError, zlib.error) as exc:
            raise FeatcacheError(f"Cannot extract {archive}: {type(exc).__name__}: {exc}") from None
        except OSError as exc:
            raise fsio.disk_error(exc, target, "extracted dataset") from None
    finally:
        lock.release()
    return _folder_root(target, archive)


def _folder_root(path: Path, archive: Optional[Path] = None) -> Path:
    """The folder holding train/ and test/: the top, or the one top-level folder of an archive that has them
    (beside e.g. ``__MACOSX/``)."""
    if (path / "train").is_dir():
        return path
    candidates = [p for p in path.iterdir() if p.is_dir() and (p / "train").is_dir()]
    if len(candidates) == 1:
        return candidates[0]
    shown = ", ".join(sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir()
                             if p.name != ".featcache-extracted")[:6]) or "nothing"
    where = f"{archive} (extracted to {path})" if archive else str(path)
    if len(candidates) > 1:
        raise FeatcacheError(f"{where} has {len(candidates)} top-level folders with a train/ folder "
                             f"({', '.join(p.name for p in candidates)}); keep one dataset per archive.")
    raise FeatcacheError(f"{where} holds no train/ folder at its top or one level down (it holds {shown}); "
                         "expected train/<class>/* and test/<class>/*.")


def _scan_cache_path(root: Path, cache_dir: Path) -> Path:
    tag = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:12]
    return cache_dir / "datasets" / f"scan-{tag}.json"


def _listing(root: Path) -> tuple[dict[str, list[tuple[str, int]]], int, list[str]]:
    """Per split, sorted (path, class) pairs; plus non-image file count and class names."""
    train_dir, test_dir = root / "train", root / "test"
    for d in (train_dir, test_dir):
        if not d.is_dir():
            raise FeatcacheError(f"{root} has no {d.name}/ folder; expected train/<class>/* and test/<class>/*.")
    class_names = sorted(p.name for p in train_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_names:
        raise FeatcacheError(f"{train_dir} holds no class folders.")
    test_classes = sorted(p.name for p in test_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    extra = sorted(set(test_classes) - set(class_names))
    if extra:
        raise FeatcacheError(
            f"Class folder(s) {', '.join(extra)} exist in {test_dir} but not in {train_dir}; "
            "a head cannot learn a class it never sees in training.")
    ignored = 0
    listing = {}
    for split, d in (("train", train_dir), ("test", test_dir)):
        items = []
        for label, name in enumerate(class_names):
            cdir = d / name
            if not cdir.is_dir():
                continue
            files = sorted(p for p in cdir.iterdir() if p.is_file() and not p.name.startswith("."))
            images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
            ignored += len(files) - len(images)
            if not images:
                raise FeatcacheError(f"Class folder {cdir} holds no images ({', '.join(IMAGE_EXTENSIONS)}).")
            items.extend((str(p), label) for p in images)
        listing[split] = items
    return listing, ignored, class_names


def _load_folder(root: Path, cache_dir: Path, skip_corrupt: bool, source: str) -> Dataset:
    """Image folder, checked and fingerprinted once; the result is cached by file sizes and times."""
    listing, ignored, class_names = _listing(root)
    signature = hashlib.sha256(f"scan v{_SCAN_VERSION}\n".encode())
    for split in SPLITS:
        for path, label in listing[split]:
            signature.update(f"{path}\0{label}\0{_file_identity(Path(path))}\n".encode())
    signature = signature.hexdigest()
    scan_path = _scan_cache_path(root, cache_dir)
    scan = None
    if scan_path.exists():
        try:
            scan = json.loads(scan_path.read_text())
            if scan.get("signature") != signature:
                scan = None
        except (OSError, ValueError):
            scan = None
    if scan is None:
        scan = {"signature": signature, "bad": {}, "fingerprints": {}, "convert": {}, "image_size": {}}
        for split in SPLITS:
            sizes = set()
            for path, _ in listing[split]:
                problem, convert, size = check_image(path)
                if problem is not None:
                    scan["bad"][path] = problem
                    continue
                sizes.add(size)
                if convert:
                    scan["convert"][path] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            scan["image_size"][split] = list(sizes.pop()) if len(sizes) == 1 else None
        for split in SPLITS:
            good = [(p, l) for p, l in listing[split] if p not in scan["bad"]]
            scan["fingerprints"][split] = _hash_files([p for p, _ in good],
                                                      np.array([l for _, l in good], dtype=np.int64), root)
        _write_json_atomic(scan_path, scan)
    bad = scan["bad"]
    if bad and not skip_corrupt:
        path, problem = next(iter(sorted(bad.items())))
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise FeatcacheError(f"Unreadable image {path}: {problem}{more}; fix or remove it, or pass --skip-corrupt.")
    converted = {}
    for path, digest in scan["convert"].items():
        target = converted_path(digest, cache_dir.resolve())
        if not target.exists():
            convert_to_png(path, digest, target)
        converted[path] = str(target)
    splits = {}
    for split in SPLITS:
        good = [(p, l) for p, l in listing[split] if p not in bad]
        if not good:
            raise FeatcacheError(f"{root / split} holds no readable images.")
        labels = np.array([l for _, l in good], dtype=np.int64)
        size = scan["image_size"][split]
        splits[split] = Split(split, labels=labels, paths=[converted.get(p, p) for p, _ in good],
                              fingerprint=scan["fingerprints"][split], image_size=tuple(size) if size else None)
    present = np.unique(splits["train"].labels)
    if present.size != len(class_names):
        missing = sorted(set(range(len(class_names))) - set(present.tolist()))
        raise FeatcacheError(f"Class(es) {', '.join(class_names[i] for i in missing)} have no readable training images.")
    return Dataset(source, class_names, splits, skipped=sorted(bad), ignored_files=ignored)


def _write_json_atomic(path: Path, obj) -> None:
    fsio.write_bytes(path, json.dumps(obj).encode(), "dataset scan")
