"""Records for the ``keras.applications`` families.

Each record pairs a builder with the preprocessing its ImageNet weights
were trained with; networks that carry their preprocessing inside the
model (EfficientNet, EfficientNetV2, ConvNeXt) get the identity. Keras is
imported only when a builder or preprocessing runs, so reading the
registry (``featcache backbones``, a warm-cache ``features`` call) stays
free of the TensorFlow import.
"""

from __future__ import annotations

import importlib

from .registry import BackboneSpec, register

_DOWNLOAD_BASE = "https://storage.googleapis.com/tensorflow/keras-applications/"


def _identity(x):
    return x


def _app(class_name: str):
    def build(input_shape, weights):
        from keras import applications

        cls = getattr(applications, class_name)
        return cls(include_top=False, weights=weights, input_shape=input_shape, pooling=None)

    build.__name__ = f"build_{class_name}"
    return build


def _preprocess(module: str):
    def preprocess(x):
        return importlib.import_module(f"keras.applications.{module}").preprocess_input(x)

    preprocess.__name__ = f"{module}_preprocess_input"
    return preprocess


# Stage boundaries: block outputs after the residual add (or the pooling / concatenation ending a stage).
_EFFICIENTNET_STAGES = ("output", r"^block(\d+)[a-z]+_")
_STAGES = {
    "xception": ("input", r"^block(\d+)_sepconv1(?:_act)?$"),  # its adds have session-dependent names
    "resnet50": ("output", r"^conv(\d)_block\d+_out$"),
    "inceptionv3": ("output", r"^mixed(\d+)$"),
    "vgg19": ("output", r"^block(\d)_pool$"),
    "efficientnetv2s": _EFFICIENTNET_STAGES,
    "efficientnetb0": _EFFICIENTNET_STAGES,
    "mobilenetv2": ("output", r"^block_(\d+)_(?:add|project_BN)$"),
    "densenet121": ("output", r"^conv(\d)_block\d+_concat$"),
}

_RECORDS = [
    # name, family, keras class, preprocess, preprocess id, default size, min size, width
    ("xception", "xception", "Xception", _preprocess("xception"), "tf:[-1,1]", 299, 71, 2048),
    ("resnet50", "resnet", "ResNet50", _preprocess("resnet50"), "caffe:bgr-mean", 224, 32, 2048),
    ("inceptionv3", "inception_v3", "InceptionV3", _preprocess("inception_v3"), "tf:[-1,1]", 299, 75, 2048),
    ("vgg19", "vgg", "VGG19", _preprocess("vgg19"), "caffe:bgr-mean", 224, 32, 512),
    ("efficientnetv2s", "efficientnet_v2", "EfficientNetV2S", _identity, "in-model", 384, 32, 1280),
    ("efficientnetb0", "efficientnet", "EfficientNetB0", _identity, "in-model", 224, 32, 1280),
    ("mobilenetv2", "mobilenet_v2", "MobileNetV2", _preprocess("mobilenet_v2"), "tf:[-1,1]", 224, 32, 1280),
    ("densenet121", "densenet", "DenseNet121", _preprocess("densenet"), "torch:imagenet-mean-std", 224, 32, 1024),
    ("convnext_tiny", "convnext", "ConvNeXtTiny", _identity, "in-model", 224, 32, 768),
]

for _name, _family, _cls, _pre, _pre_id, _default, _min, _width in _RECORDS:
    register(
        BackboneSpec(
            name=_name,
            family=_family,
            builder=_app(_cls),
            preprocess=_pre,
            preprocess_id=_pre_id,
            default_size=_default,
            min_size=_min,
            width=_width,
            weights_source=f"keras.applications download ({_DOWNLOAD_BASE})",
            stages=_STAGES.get(_name),
        )
    )
