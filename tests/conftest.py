"""Tiny synthetic datasets: a few dozen small images, made fresh per test session."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

CLASSES = ("cat", "dog", "frog")


def make_image_folder(root: Path, n_train: int = 6, n_test: int = 2, size: int = 16, seed: int = 0) -> Path:
    """train/<class>/*, test/<class>/* with JPEG and PNG files whose colour depends on the class."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 80, (size, size, 3), dtype=np.uint8)
                pixels[..., label] += 150
                ext = "png" if i % 2 else "jpg"
                Image.fromarray(pixels).save(folder / f"{i:03d}.{ext}")
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "data")


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    path = tmp_path / "cache"
    path.mkdir()
    return path


def make_npz(path: Path, n_train: int = 12, n_test: int = 6, size: int = 8, seed: int = 0, **override) -> Path:
    rng = np.random.default_rng(seed)
    arrays = {
        "x_train": rng.integers(0, 255, (n_train, size, size, 3), dtype=np.uint8),
        "y_train": np.arange(n_train) % 3,
        "x_test": rng.integers(0, 255, (n_test, size, size, 3), dtype=np.uint8),
        "y_test": np.arange(n_test) % 3,
    }
    arrays.update(override)
    np.savez(path, **arrays)
    return path
