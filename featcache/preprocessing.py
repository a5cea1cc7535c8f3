"""Image decoding, views, resizing and per-backbone preprocessing, as graph ops.

Extraction (``tf.data``) and fine-tuning (a Keras layer) call the same
functions, so the two stages cannot drift apart: the fine-tune self-check
compares their outputs.
"""

from __future__ import annotations

import tensorflow as tf

from .backbones import get_spec
from .errors import choice_error
from .settings import VIEWS

from .backbones import RESIZE_METHOD


def decode_file(path: tf.Tensor) -> tf.Tensor:
    """JPEG/PNG/BMP/GIF bytes to uint8 RGB; greyscale and RGBA become RGB, GIFs keep their first frame."""
    image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def apply_view(images: tf.Tensor, view: str) -> tf.Tensor:
    """A deterministic augmentation view of a batch (NHWC) or image (HWC)."""
    if view == "orig":
        return images
    if view == "flip":
        return tf.image.flip_left_right(images)
    raise choice_error("view", VIEWS, view)


def resize(images: tf.Tensor, size: int) -> tf.Tensor:
    """Float32 pixels in [0, 255] at ``size`` x ``size``; a no-op cast when already that size."""
    images = tf.cast(images, tf.float32)
    return tf.image.resize(images, (size, size), method=RESIZE_METHOD)


def prepare_batch(images: tf.Tensor, backbone: str, size: int, view: str = "orig") -> tf.Tensor:
    """uint8 or float images of any one size -> the backbone's preprocessed input."""
    return preprocess_fn(backbone)(resize(apply_view(images, view), size))


def preprocess_fn(backbone: str):
    """The backbone's ``preprocess_input``, kept out of AutoGraph (it is plain tensor arithmetic)."""
    return tf.autograph.experimental.do_not_convert(get_spec(backbone).preprocess)
