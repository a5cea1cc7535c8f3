"""Cut points: where a backbone splits cleanly into a frozen lower part and a trainable top.

A cached fine-tune runs the lower part once, stores its activation map at
the cut (``featcache features --cut``), and trains only the layers after it.
A cut is clean at a stage boundary (a block output after its residual add),
where no later layer reads an earlier tensor. Each backbone record names its
stages (``BackboneSpec.stages``); users pick ``top:N`` (the input of the
last N stages) or a layer name (its output).

Cut names are stable across sessions and go into cache keys: a layer name,
or ``LAYER:input`` where the boundary tensor comes from an auto-named layer
(Xception's adds are ``add_7`` in one session and ``add_19`` in the next).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from ..errors import FeatcacheError, InvalidArgument
from .registry import BackboneSpec


@dataclass(frozen=True)
class Cut:
    """One place to cut: its stable ``name``, and how many stages train above it (None: a layer by name)."""

    name: str
    top: Optional[int] = None

    @property
    def layer(self) -> str:
        return self.name.split(":", 1)[0]

    @property
    def side(self) -> str:
        return "input" if self.name.endswith(":input") else "output"


def stage_cuts(spec: BackboneSpec, base) -> list[Cut]:
    """The stage boundaries of ``base`` (the inner Keras model), lowest first; the last stage's output is not
    one (nothing would be left to train but the head)."""
    if spec.stages is None:
        return []
    side, pattern = spec.stages
    regex = re.compile(pattern)
    order: list[str] = []
    chosen: dict[str, str] = {}
    for layer in base.layers:
        match = regex.match(layer.name)
        if not match:
            continue
        stage = match.group(1)
        if stage not in chosen:
            order.append(stage)
            chosen[stage] = layer.name
        elif side == "output":
            chosen[stage] = layer.name  # the last layer of the stage
    if side == "output":  # outputs of stages 1..S-1 = inputs of stages 2..S
        names = [chosen[s] for s in order[:-1]]
    else:  # inputs of stages 2..S (the first stage's input is the stem's output, not a block boundary)
        names = [f"{chosen[s]}:input" for s in order[1:]]
    return [Cut(name, top=len(names) - i) for i, name in enumerate(names)]


def resolve_cut(spec: BackboneSpec, base, text: Optional[str]) -> Cut:
    """``top:N``, a cut name or a layer name (its output); None means the backbone's default cut."""
    text = (text or spec.default_cut).strip()
    cuts = stage_cuts(spec, base)
    if text.startswith("top:"):
        try:
            n = int(text[4:])
        except ValueError:
            n = 0
        if n < 1:
            raise InvalidArgument(f"--cut top:N needs a positive integer N; received {text!r}.")
        if not cuts:
            raise InvalidArgument(f"{spec.name} records no stage boundaries; name a layer with --cut LAYER "
                                  "(see model.summary()).")
        if n > len(cuts):
            raise InvalidArgument(f"--cut {text}: {spec.name} has {len(cuts)} stage boundaries; use top:1 to "
                                  f"top:{len(cuts)} (see `featcache backbones --cuts {spec.name}`).")
        return cuts[-n]
    for cut in cuts:
        if text == cut.name:
            return cut
    layer_name = text[:-len(":input")] if text.endswith(":input") else text
    names = {layer.name for layer in base.layers}
    if layer_name not in names:
        shown = ", ".join(c.name for c in cuts) or "none recorded"
        raise InvalidArgument(f"{spec.name} has no layer {layer_name!r} to cut at; expected 'top:N' or a layer "
                              f"name (its stage boundaries: {shown}).")
    return Cut(text)


def cut_tensor(base, cut: Cut):
    """The symbolic tensor at ``cut`` in ``base``'s graph."""
    layer = base.get_layer(cut.layer)
    return layer.input if cut.side == "input" else layer.output


def split_at(base, cut: Cut):
    """``(lower, upper)``: ``lower`` maps ``base``'s input to the activation at the cut, ``upper`` the
    activation to ``base``'s output. Both share ``base``'s layers (and so its weights): training ``upper``
    trains ``base``.

    A cut that a later layer reaches around (a skip connection over it) is refused.
    """
    import keras

    tensor = cut_tensor(base, cut)
    if isinstance(tensor, (list, tuple)):
        raise InvalidArgument(f"Cannot cut at {cut.name}: that layer takes {len(tensor)} inputs; "
                              "cut at its output or another layer.")
    lower = keras.Model(base.input, tensor, name=f"{base.name}_to_{cut.layer}")
    try:
        upper = keras.Model(tensor, base.output, name=f"{base.name}_from_{cut.layer}")
    except ValueError as exc:  # the graph above needs a tensor from below the cut
        raise FeatcacheError(f"Cannot cut {base.name} at {cut.name}: a later layer also reads a tensor from below "
                             f"it ({str(exc).splitlines()[0][:160]}); choose a stage boundary (top:N).") from None
    return lower, upper


def activation_shape(base, cut: Cut) -> tuple[int, int, int]:
    """(height, width, channels) of the activation map at ``cut``."""
    shape = tuple(cut_tensor(base, cut).shape[1:])
    if len(shape) != 3 or any(d is None for d in shape):
        raise InvalidArgument(f"The activation at {cut.name} has shape {shape}; a cut needs a fixed 3-D map.")
    return tuple(int(d) for d in shape)
