"""Image folders and their archives: listed, checked and fingerprinted once, the scan kept under the cache folder.

A folder holds ``train/<class>/*`` and ``test/<class>/*``; a ``.tar.gz`` of one is
extracted once into ``CACHE_DIR/datasets/``. Every image is opened once (what
TensorFlow cannot decode faithfully is converted to a PNG copy) and hashed; the
result is kept in ``scan-*.json`` and reused while no file's path, size, times or
inode change.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import zlib
from pathlib import Path
from typing import Optional

import numpy as np

from . import fsio
from .datasets import SPLITS, Dataset, Split
from .decoding import IMAGE_EXTENSIONS, check_image, convert_to_png, converted_path
from .errors import FeatcacheError

_SCAN_VERSION = 5  # 5: records each split's common image size


def _hash_files(paths: list[str], labels: np.ndarray, root: Path) -> str:
    digest = hashlib.sha256()
    for path, label in zip(paths, labels):
        digest.update(f"{Path(path).relative_to(root).as_posix()}\0{int(label)}\0".encode())
        with open(path, "rb") as fh:
            digest.update(hashlib.sha256(fh.read()).digest())
    return digest.hexdigest()[:16]


def _file_identity(path: Path) -> str:
    """Size, times and inode: ``cp -p`` keeps size and mtime but gives a new ctime, so rewritten
    content is noticed and hashed again."""
    st = os.stat(path)
    return f"{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0{st.st_ino}"


def extract_archive(archive: Path, cache_dir: Path) -> Path:
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


def load_folder(root: Path, cache_dir: Path, skip_corrupt: bool, source: str) -> Dataset:
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
