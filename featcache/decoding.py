"""How featcache turns an image file into pixels, the same way in every stage.

TensorFlow's decoder (``preprocessing.decode_file``) reads JPEG, PNG, GIF and RGB
BMP files; 16-bit PNGs are scaled down to 8 bits. It misreads
palette BMPs and refuses 1-bit ones, so every image it does not read faithfully
is converted once, with PIL, to an RGB PNG under the cache folder, and that copy
is what extraction and fine-tuning decode. ``read_image`` follows the same rule
for ``featcache predict``, so a model sees at prediction the pixels it was
trained on (``tests/test_decoding.py`` compares the two paths for every mode).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional, Union

import numpy as np

from . import fsio
from .errors import FeatcacheError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
# What tf.io.decode_image reads faithfully (None: any mode), measured on TF 2.21.
_TF_NATIVE = {"JPEG": None, "MPO": None, "PNG": None, "GIF": None, "BMP": ("RGB",)}  # MPO: phone JPEGs


def check_image(path: str) -> tuple[Optional[str], bool, Optional[tuple[int, int]]]:
    """(why the file does not decode fully or None, whether TensorFlow needs a converted copy, (height, width))."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
            if img.size[0] < 1 or img.size[1] < 1:
                return "empty image", False, None
            fmt, mode, (width, height) = img.format, img.mode, img.size
    except Exception as exc:  # PIL raises many types for bad files
        return f"{type(exc).__name__}: {exc}", False, None
    native = fmt in _TF_NATIVE and (_TF_NATIVE[fmt] is None or mode in _TF_NATIVE[fmt])
    return None, not native, (height, width)


def converted_path(digest: str, cache_dir: Path) -> Path:
    """Named by the original's content hash, so an edited original never meets a stale copy."""
    return cache_dir / "datasets" / "converted" / f"{digest[:32]}.png"


def convert_to_png(path: str, digest: str, target: Path) -> None:
    """An RGB PNG copy of an image TensorFlow cannot decode faithfully, written atomically."""
    import io

    from PIL import Image

    try:
        data = Path(path).read_bytes()
        if hashlib.sha256(data).hexdigest() != digest:
            raise FeatcacheError(f"{path} changed since it was scanned; run the command again.")
        with Image.open(io.BytesIO(data)) as img:
            buffer = io.BytesIO()
            img.convert("RGB").save(buffer, format="PNG")
    except FeatcacheError:
        raise
    except Exception as exc:  # PIL raises many types for bad files
        raise FeatcacheError(f"Cannot convert {path} to PNG: {type(exc).__name__}: {exc}") from None
    fsio.write_bytes(target, buffer.getvalue(), f"a converted copy of {path} at")


def _pil_rgb(data: bytes) -> np.ndarray:
    """What decoding the converted PNG copy gives: PIL's RGB conversion, as uint8."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


def read_image(path: Union[str, Path]) -> np.ndarray:
    """uint8 RGB pixels of an image file, decoded exactly as extraction and fine-tuning decode it."""
    path = Path(path)
    if path.is_dir():
        raise FeatcacheError(f"Image {path} is a folder, not an image file.")
    if not path.exists():
        raise FeatcacheError(f"Image {path} does not exist.")
    problem, convert, _ = check_image(str(path))
    if problem is not None:
        raise FeatcacheError(f"Cannot read image {path}: {problem}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise FeatcacheError(f"Cannot read image {path}: {exc.strerror or exc}.") from None
    if convert:
        return _pil_rgb(data)
    import tensorflow as tf

    image = tf.io.decode_image(data, channels=3, expand_animations=False)
    return np.asarray(image, dtype=np.uint8)
