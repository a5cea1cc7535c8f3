"""What the engine is fed: ``tf.data`` streams of batches, and the model that matches them.

Two feeds compute the same numbers (up to float rounding):

- ``prepared``: files are decoded, viewed and resized one by one in
  ``tf.data``, then preprocessed; the engine runs the backbone on
  ``size x size`` float inputs. Used for image folders of mixed sizes and
  under tf.distribute.
- ``pixels``: when every image of a split has one size (CIFAR's 32x32, any
  ``.npz``), batches hold the images as stored (with the view applied) and
  the engine's model starts with featcache's ``Preprocess`` layer, so the
  resize and the preprocessing run inside the converted graph. The stream
  then moves 32x32 pixels instead of 224x224 floats, and the engine fuses
  the upsampling with its first convolution's reads.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from .datasets import Split


def pixel_model(backbone_model, backbone: str, size: int, image_size: tuple[int, int]):
    """``backbone_model`` (on preprocessed ``size`` px inputs) behind resize + preprocessing of raw pixels."""
    import keras

    from .layers import Preprocess

    inputs = keras.Input((int(image_size[0]), int(image_size[1]), 3), dtype="float32", name="pixels")
    outputs = backbone_model(Preprocess(backbone, size, name="preprocess")(inputs))
    return keras.Model(inputs, outputs, name=f"{backbone_model.name}_from_{image_size[0]}x{image_size[1]}")


def make_stream(data: Split, backbone: str, size: int, view: str, start: int, batch_size: int,
                pixels: bool = False):
    """A ``tf.data`` pipeline of batches from row ``start`` on, in order.

    ``pixels=False``: preprocessed ``size`` px float batches. ``pixels=True``:
    the images as stored, with the view applied, as float32 (the split must
    have one image size). In-memory images are sliced batch by batch (never
    copied whole into the graph); files are read and decoded in parallel.
    """
    import tensorflow as tf

    from .preprocessing import apply_view, decode_file, prepare_batch, preprocess_fn, resize

    autotune = tf.data.AUTOTUNE
    if pixels and data.image_size is None:
        raise ValueError(f"{data.name} has images of several sizes; they cannot be fed as stored.")
    if data.images is not None:
        images = data.images

        def batches():
            for i in range(start, images.shape[0], batch_size):
                yield images[i:i + batch_size]

        signature = tf.TensorSpec((None,) + tuple(images.shape[1:]), tf.as_dtype(images.dtype))
        stream = tf.data.Dataset.from_generator(batches, output_signature=signature)
        if pixels:
            stream = stream.map(lambda x: tf.cast(apply_view(x, view), tf.float32), num_parallel_calls=autotune)
        else:
            stream = stream.map(lambda x: prepare_batch(x, backbone, size, view), num_parallel_calls=autotune)
    else:
        paths = tf.data.Dataset.from_tensor_slices(np.array(data.paths[start:], dtype=object).astype(str))
        if pixels:
            stream = paths.map(lambda p: apply_view(decode_file(p), view), num_parallel_calls=autotune,
                               deterministic=True)
            stream = stream.batch(batch_size).map(lambda x: tf.cast(x, tf.float32), num_parallel_calls=autotune)
        else:
            stream = paths.map(lambda p: resize(apply_view(decode_file(p), view), size),
                               num_parallel_calls=autotune, deterministic=True)
            stream = stream.batch(batch_size).map(preprocess_fn(backbone), num_parallel_calls=autotune)
    return stream.prefetch(autotune)


def fed_as_stored(data: Optional[Split], distributed: bool) -> Optional[tuple[int, int]]:
    """The image size to feed as stored, or None to feed prepared batches (mixed sizes, tf.distribute)."""
    if data is None or distributed or data.image_size is None:
        return None
    return tuple(int(d) for d in data.image_size)
