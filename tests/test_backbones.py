import numpy as np
import pytest

import featcache.backbones as backbones
from featcache.backbones import create_backbone, get_spec, list_backbones, resolve_size, weights_identity
from featcache.errors import FeatcacheError, InvalidArgument

FIVE = ("xception", "resnet50", "inceptionv3", "vgg19", "efficientnetv2s")


def test_registry_lists_the_five_and_more():
    names = list_backbones()
    assert set(FIVE) <= set(names)
    assert {"efficientnetb0", "mobilenetv2", "densenet121", "convnext_tiny"} <= set(names)


def test_unknown_backbone_names_the_allowed_ones():
    with pytest.raises(ValueError, match="Unknown backbone 'resnet51'.*resnet50"):
        get_spec("resnet51")


def test_size_rules():
    spec = get_spec("xception")
    assert resolve_size(spec, None) == 299
    with pytest.raises(InvalidArgument, match="below the minimum of xception \\(71\\)"):
        resolve_size(spec, 64)


def test_weights_identity(tmp_path):
    assert weights_identity("imagenet") == "imagenet"
    assert weights_identity("none") == weights_identity(None) == "none"
    path = tmp_path / "w.weights.h5"
    path.write_bytes(b"123")
    assert weights_identity(path).startswith("file:sha256:")
    with pytest.raises(InvalidArgument, match="missing.h5', which does not exist"):
        weights_identity(tmp_path / "missing.h5")
    with pytest.raises(InvalidArgument, match="which is a folder, not a weights file"):
        weights_identity(tmp_path)


@pytest.mark.parametrize("name, size", [("resnet50", 32), ("vgg19", 32), ("xception", 71)])
def test_features_shape_and_frozen(name, size):
    model = create_backbone(name, weights=None, input_size=size)
    out = model(np.random.default_rng(0).uniform(-1, 1, (2, size, size, 3)).astype("float32"))
    assert tuple(out.shape) == (2, get_spec(name).width)
    assert not model.trainable_weights


def test_weights_file_roundtrip_and_mismatch(tmp_path):
    model = create_backbone("resnet50", weights=None, input_size=32)
    path = tmp_path / "resnet.weights.h5"
    model.layers[1].save_weights(path)
    again = create_backbone("resnet50", weights=str(path), input_size=32)
    x = np.random.default_rng(1).normal(size=(1, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(model(x), again(x), atol=1e-5)
    with pytest.raises(FeatcacheError, match="does not fit backbone vgg19"):
        create_backbone("vgg19", weights=str(path), input_size=32)


def test_imagenet_download_failure_is_a_clear_error(monkeypatch):
    spec = get_spec("xception")

    def offline(input_shape, weights):
        if weights == "imagenet":
            raise OSError("URL fetch failure: [Errno -3] Temporary failure in name resolution")
        return spec.builder(input_shape, weights)

    monkeypatch.setitem(backbones._REGISTRY, "xception", spec.__class__(**{**spec.__dict__, "builder": offline}))
    with pytest.raises(FeatcacheError, match="Could not fetch the ImageNet weights of xception.*--weights PATH"):
        create_backbone("xception", weights="imagenet", input_size=71)


def test_bad_pooling():
    with pytest.raises(ValueError, match="pooling"):
        create_backbone("resnet50", weights=None, input_size=32, pooling="median")


def test_random_weights_are_reproducible():
    x = np.random.default_rng(2).normal(size=(1, 32, 32, 3)).astype("float32")
    first = create_backbone("resnet50", weights="none", input_size=32)(x)
    second = create_backbone("resnet50", weights="none", input_size=32)(x)
    np.testing.assert_array_equal(first, second)


def test_building_random_weights_leaves_the_callers_generators_and_dtype_policy_alone():
    import random

    import keras
    import numpy as np

    from featcache.backbones import create_backbone

    random.seed(5)
    np.random.seed(5)
    expected = (random.random(), np.random.rand())
    random.seed(5)
    np.random.seed(5)
    policy = keras.config.dtype_policy().name
    create_backbone("resnet50", None, 32, "avg", dtype_policy="float16")
    assert (random.random(), np.random.rand()) == expected
    assert keras.config.dtype_policy().name == policy
    first = create_backbone("resnet50", None, 32, "avg")  # 'none' still names one network
    second = create_backbone("resnet50", None, 32, "avg")
    np.testing.assert_array_equal(first.layers[1].get_layer("conv1_conv").get_weights()[0].astype("float16"),
                                  second.layers[1].get_layer("conv1_conv").get_weights()[0].astype("float16"))
