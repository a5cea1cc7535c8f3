"""featcache predict decodes every image exactly as extraction and fine-tuning do."""

import numpy as np
import pytest
import tensorflow as tf
from conftest import make_image_folder, odd_images

from featcache.datasets import load_dataset
from featcache.decoding import check_image, read_image
from featcache.errors import FeatcacheError
from featcache.preprocessing import decode_file


def test_predict_decoder_matches_the_training_decoder_for_every_mode(tmp_path, cache_dir):
    root = make_image_folder(tmp_path / "data", n_train=1, n_test=1)
    cases, deep = odd_images()
    folder = root / "train" / "cat"
    for name, img in cases.items():
        img.save(folder / name)
    ds = load_dataset(root, cache_dir)
    originals = sorted(folder.iterdir())
    trained_on = [p for p, label in zip(ds["train"].paths, ds["train"].labels) if label == 0]
    assert len(trained_on) == len(originals) == len(cases) + 1
    converted = 0
    for original, training_path in zip(originals, trained_on):
        training_pixels = decode_file(tf.constant(training_path)).numpy()
        predict_pixels = read_image(original)
        assert predict_pixels.dtype == np.uint8, original.name
        assert np.array_equal(predict_pixels, training_pixels), original.name
        converted += training_path != str(original)
    assert converted >= 2  # the palette and bilevel BMPs went through converted copies, and still match
    # A 16-bit PNG is scaled down (its high byte), as TensorFlow does in training, not clipped at 255 as PIL does.
    assert np.array_equal(read_image(folder / "deep16.png"), deep)


def test_read_image_refuses_what_training_refuses(tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    assert check_image(str(broken))[0] is not None
    with pytest.raises(FeatcacheError, match="Cannot read image .*broken.png"):
        read_image(broken)
    with pytest.raises(FeatcacheError, match="is a folder, not an image file"):
        read_image(tmp_path)
    with pytest.raises(FeatcacheError, match="missing.png does not exist"):
        read_image(tmp_path / "missing.png")
