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


def odd_images() -> tuple[dict, np.ndarray]:
    """Files whose mode or format needs care, with the RGB pixels each must decode to."""
    from PIL import Image

    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 255, (17, 23, 3), dtype=np.uint8))
    deep = rng.integers(0, 65535, (9, 11), dtype=np.uint16)
    cases = {
        "grey.png": rgb.convert("L"), "grey_alpha.png": rgb.convert("LA"), "rgba.png": rgb.convert("RGBA"),
        "palette.png": rgb.convert("P"), "bilevel.png": rgb.convert("1"), "palette.gif": rgb.convert("P"),
        "cmyk.jpg": rgb.convert("CMYK"), "grey.jpg": rgb.convert("L"), "palette.bmp": rgb.convert("P"),
        "bilevel.bmp": rgb.convert("1"), "grey.bmp": rgb.convert("L"), "one_pixel.png": Image.new("RGB", (1, 1), (9, 99, 199)),
        "large.jpg": Image.fromarray(rng.integers(0, 255, (1500, 2100, 3), dtype=np.uint8)),
        "deep16.png": Image.fromarray(deep),
    }
    # 16-bit greyscale keeps its high byte (PIL's own convert clips instead).
    return cases, np.repeat((deep >> 8).astype(np.uint8)[..., None], 3, axis=-1)
