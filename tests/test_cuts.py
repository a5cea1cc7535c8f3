"""Cut points of every registered family: names, shapes at the default size, clean splits, bad cuts."""

import numpy as np
import pytest

from featcache.backbones import get_spec
from featcache.backbones.cuts import Cut, activation_shape, resolve_cut, split_at, stage_cuts
from featcache.errors import FeatcacheError, InvalidArgument

# (backbone, default cut, its name, its activation shape at the backbone's default size): the README's table.
DEFAULTS = [
    ("efficientnet_lite0", "top:2", "block5c_add", (14, 14, 112)),
    ("xception", "top:1", "block14_sepconv1:input", (10, 10, 1024)),
    ("resnet50", "top:1", "conv4_block6_out", (14, 14, 1024)),
    ("inceptionv3", "top:1", "mixed9", (8, 8, 2048)),
    ("vgg19", "top:1", "block4_pool", (14, 14, 512)),
    ("efficientnetv2s", "top:1", "block5i_add", (24, 24, 160)),
    ("efficientnetb0", "top:1", "block6d_add", (7, 7, 192)),
    ("mobilenetv2", "top:1", "block_15_add", (7, 7, 160)),
    ("densenet121", "top:1", "conv4_block24_concat", (14, 14, 1024)),
]


def build(name, size=None):
    spec = get_spec(name)
    size = size or spec.default_size
    return spec, spec.builder((size, size, 3), None)


@pytest.mark.parametrize("name, default, layer, shape", DEFAULTS)
def test_default_cut_and_shape_at_the_default_size(name, default, layer, shape):
    spec, base = build(name)
    assert spec.default_cut == default
    cut = resolve_cut(spec, base, None)
    assert cut.name == layer and activation_shape(base, cut) == shape
    cuts = stage_cuts(spec, base)
    assert [c.top for c in cuts] == list(range(len(cuts), 0, -1)) and cuts[-1].top == 1
    # every stage boundary splits cleanly
    for c in cuts:
        split_at(base, c)


@pytest.mark.parametrize("name, size", [("efficientnet_lite0", 64), ("resnet50", 64), ("xception", 71)])
def test_lower_then_upper_reproduces_the_whole_backbone(name, size):
    spec, base = build(name, size)
    x = np.random.default_rng(0).uniform(-1, 1, (2, size, size, 3)).astype("float32")
    whole = np.asarray(base(x, training=False))
    for cut in stage_cuts(spec, base)[-2:]:
        lower, upper = split_at(base, cut)
        np.testing.assert_allclose(np.asarray(upper(lower(x, training=False), training=False)), whole,
                                   rtol=1e-5, atol=1e-5)


def test_xception_cut_names_do_not_depend_on_the_session():
    """Its adds are named add_N by a session-wide counter; the cut names must not be."""
    spec, first = build("xception", 71)
    _, second = build("xception", 71)
    assert [c.name for c in stage_cuts(spec, first)] == [c.name for c in stage_cuts(spec, second)]
    assert {layer.name for layer in first.layers if layer.name.startswith("add")} != \
        {layer.name for layer in second.layers if layer.name.startswith("add")}


@pytest.mark.parametrize("text, error, message", [
    ("top:0", InvalidArgument, "positive integer"),
    ("top:99", InvalidArgument, "has 6 stage boundaries; use top:1 to top:6"),
    ("block9z_add", InvalidArgument, "no layer 'block9z_add' to cut at; .*block5c_add"),
])
def test_bad_cuts_are_one_line_errors(text, error, message):
    spec, base = build("efficientnet_lite0", 64)
    with pytest.raises(error, match=message) as info:
        resolve_cut(spec, base, text)
    assert "\n" not in str(info.value)


def test_a_cut_inside_a_residual_block_is_refused():
    spec, base = build("efficientnet_lite0", 64)
    with pytest.raises(FeatcacheError, match="a later layer also reads a tensor from below it"):
        split_at(base, Cut("block5c_project_bn"))


def test_a_family_without_stages_takes_a_layer_name_only():
    spec, base = build("convnext_tiny", 32)
    assert stage_cuts(spec, base) == []
    with pytest.raises(InvalidArgument, match="records no stage boundaries"):
        resolve_cut(spec, base, "top:1")


def test_backbones_cuts_lists_shapes_and_sizes_and_refuses_unknown_names():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "featcache", "backbones", "--cuts", "efficientnet_lite0"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("efficientnet_lite0 at 224px (default cut top:2)")
    assert any(line.split()[:4] == ["top:2", "block5c_add", "14x14x112", "41.9"] for line in lines), lines
    bad = subprocess.run([sys.executable, "-m", "featcache", "backbones", "--cuts", "nosuchnet"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "Unknown backbone 'nosuchnet'" in bad.stderr and "Traceback" not in bad.stderr
