"""The two feeds (prepared batches, pixels as stored + resize inside the model) compute the same features."""

import numpy as np
import pytest
from conftest import make_image_folder, make_npz

from featcache.backbones import create_backbone
from featcache.datasets import load_dataset
from featcache.feeding import fed_as_stored, make_stream, pixel_model


def test_prepared_stream_resizes_in_graph(image_folder, cache_dir):
    ds = load_dataset(image_folder, cache_dir)
    batch = next(iter(make_stream(ds["train"], "resnet50", 40, "orig", start=4, batch_size=5)))
    assert tuple(batch.shape) == (5, 40, 40, 3) and batch.dtype.name == "float32"


def test_pixel_stream_keeps_images_as_stored(image_folder, cache_dir):
    ds = load_dataset(image_folder, cache_dir)
    assert ds["train"].image_size == (16, 16)
    batch = next(iter(make_stream(ds["train"], "resnet50", 40, "flip", start=0, batch_size=4, pixels=True)))
    plain = next(iter(make_stream(ds["train"], "resnet50", 40, "orig", start=0, batch_size=4, pixels=True)))
    assert tuple(batch.shape) == (4, 16, 16, 3) and batch.dtype.name == "float32"
    np.testing.assert_array_equal(batch.numpy(), plain.numpy()[:, :, ::-1])
    assert float(plain.numpy().max()) > 1.0  # raw pixels in [0, 255], not preprocessed


@pytest.mark.parametrize("source", ["folder", "npz"])
@pytest.mark.parametrize("view", ["orig", "flip"])
def test_both_feeds_give_the_same_features(tmp_path, source, view):
    data = make_image_folder(tmp_path / "d") if source == "folder" else make_npz(tmp_path / "d.npz", size=12)
    split = load_dataset(data, tmp_path / "cache")["train"]
    backbone = create_backbone("mobilenetv2", "none", 32, "avg")
    prepared = np.concatenate([backbone(b).numpy() for b in make_stream(split, "mobilenetv2", 32, view, 0, 5)])
    model = pixel_model(backbone, "mobilenetv2", 32, split.image_size)
    fed = np.concatenate([model(b).numpy() for b in make_stream(split, "mobilenetv2", 32, view, 0, 5, pixels=True)])
    assert fed.shape == prepared.shape == (len(split), 1280)
    np.testing.assert_allclose(fed, prepared, rtol=1e-5, atol=1e-5 * np.abs(prepared).max())


def test_mixed_sizes_and_distribution_feed_prepared_batches(tmp_path):
    from PIL import Image

    root = make_image_folder(tmp_path / "d")
    Image.new("RGB", (20, 9), (10, 20, 30)).save(root / "train" / "cat" / "wide.png")
    ds = load_dataset(root, tmp_path / "cache")
    assert ds["train"].image_size is None and ds["test"].image_size == (16, 16)
    assert fed_as_stored(ds["train"], distributed=False) is None
    assert fed_as_stored(ds["test"], distributed=False) == (16, 16)
    assert fed_as_stored(ds["test"], distributed=True) is None
    with pytest.raises(ValueError, match="several sizes"):
        make_stream(ds["train"], "resnet50", 32, "orig", 0, 4, pixels=True)
