"""One image model from any run: raw RGB pixels of any size in, class probabilities out.

Built only from what a run folder holds, so exporting and predicting need no
training code:

- a head run: ``head.keras`` on top of its backbone(s), rebuilt with
  ``featcache.backbones`` from the record (backbones, sizes, weights, pooling)
  and checked against the preprocessing and weights its caches recorded.
  Concatenated backbones (``a+b``) are joined in the order the head was
  trained on; a head trained on several views averages its probabilities over
  the same views, as its validation score did::

      images -> Preprocess(b, size, view) -> backbone b -> [concat over b] -> head -> [average over views] -> ClassNames

- a fine-tune run: its ``model.keras`` (already an image model) with its
  random augmentation layers replaced by identities, called in inference mode.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Union

from .errors import FeatcacheError, brief
from .runs import Run

PathLike = Union[str, os.PathLike]
MODEL_NAME = "featcache_image_model"


def build_image_model(run: Run, cache_dir: PathLike = "cache"):
    """The run's image model as a Keras model (float32 pixels in [0, 255], shape (n, h, w, 3))."""
    if (run.path / "head.keras").exists() and run.kind == "head":
        return _from_head_run(run, Path(cache_dir))
    if (run.path / "model.keras").exists():
        return _from_model_file(run.path / "model.keras")
    raise FeatcacheError(f"Run {run.run_id} holds neither head.keras nor model.keras in {run.path}; "
                         "it cannot be turned into an image model.")


def find_layers(model, type_name: str) -> list:
    """Layers of a type (by class name) anywhere in a model, nested models and wrappers included."""
    found, stack, seen = [], [model], set()
    while stack:
        layer = stack.pop(0)
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        if type(layer).__name__ == type_name and layer is not model:
            found.append(layer)
        stack.extend(getattr(layer, "layers", []) or [])
        inner = getattr(layer, "layer", None)
        if inner is not None:
            stack.append(inner)
    return found


def class_names_of(model) -> list[str]:
    """The class names a featcache image model carries (its outermost ``ClassNames`` layer)."""
    layers = find_layers(model, "ClassNames")
    if not layers:
        raise FeatcacheError(f"Model {model.name} carries no class names (no ClassNames layer); "
                             "it was not made by featcache.")
    return list(layers[0].class_names)


def _cache_entry(run: Run, backbone: str) -> dict:
    """The record's train cache entry of one backbone (its size, preprocessing and weights identity)."""
    views = run.record.get("views") or ["orig"]
    reference = "orig" if "orig" in views else views[0]
    entries = [c for c in run.record.get("caches") or [] if isinstance(c, dict) and c.get("backbone") == backbone]
    for entry in entries:
        if entry.get("split") == "train" and entry.get("view") == reference:
            return entry
    if entries:
        return entries[0]
    raise FeatcacheError(f"Run {run.run_id} does not record the {backbone} cache it was trained on "
                         "(record.json has no 'caches' entry); train the head again to export it.")


def _backbone(run: Run, name: str, weights: str, pooling: str, cache_dir: Path) -> tuple[Any, int]:
    """The frozen backbone a head was trained on, after proving that it still computes those features."""
    from .backbones import create_backbone, get_spec, preprocess_key, weights_identity

    entry = _cache_entry(run, name)
    spec = get_spec(name)
    recorded, current = str(entry.get("preprocess")), preprocess_key(spec.name)
    if recorded != current:
        raise FeatcacheError(f"Run {run.run_id} was trained on {spec.name} features preprocessed as {recorded!r}, "
                             f"but {spec.name} now preprocesses as {current!r}; an export would compute other "
                             "features. Re-extract and train the head again.")
    identity = weights_identity(weights)
    if identity != str(entry.get("weights")):
        raise FeatcacheError(f"Run {run.run_id} was trained on {spec.name} weights {entry.get('weights')}, but "
                             f"{weights!r} is now {identity}; the weights file changed since the features were cached.")
    size = int(entry["size"])
    return create_backbone(spec.name, weights, size, pooling, cache_dir=cache_dir), size


def _from_head_run(run: Run, cache_dir: Path):
    import keras

    from .heads import load_head
    from .layers import ClassNames, InferenceMode, Preprocess

    record = run.record
    features = run.settings.get("features") if isinstance(run.settings.get("features"), dict) else {}
    backbones = [b for b in str(record.get("backbone", "")).split("+") if b]
    views = list(record.get("views") or ["orig"])
    weights = str(record.get("weights") or features.get("weights") or "imagenet")
    pooling = str(record.get("pooling") or features.get("pooling") or "avg")
    names = record.get("class_names")
    if not backbones or not names:
        raise FeatcacheError(f"Run {run.run_id}'s record names no backbone or no class names; it cannot be exported.")
    head = load_head(run.path / "head.keras", n_classes=len(names))
    built = [(name, *_backbone(run, name, weights, pooling, cache_dir)) for name in backbones]
    width = sum(int(model.output_shape[-1]) for _, model, _ in built)
    if int(head.input_shape[-1]) != width:
        raise FeatcacheError(f"Run {run.run_id}'s head takes features of width {head.input_shape[-1]}, but "
                             f"{'+'.join(backbones)} ({pooling} pooling) produces width {width}.")
    inputs = keras.Input((None, None, 3), dtype="float32", name="images")
    wrapped = [InferenceMode(model, name=f"backbone_{i}") for i, (_, model, _) in enumerate(built)]
    per_view = []
    for view in views:
        parts = [wrapper(Preprocess(name, size, view, name=f"preprocess_{i}_{view}")(inputs))
                 for i, ((name, _, size), wrapper) in enumerate(zip(built, wrapped))]
        joined = parts[0] if len(parts) == 1 else keras.layers.Concatenate(name=f"features_{view}")(parts)
        per_view.append(head(joined))
    probs = per_view[0] if len(per_view) == 1 else keras.layers.Average(name="view_average")(per_view)
    outputs = ClassNames([str(n) for n in names], name="class_names", dtype="float32")(probs)
    return keras.Model(inputs, outputs, name=MODEL_NAME)


def _from_model_file(path: Path):
    import keras

    from . import layers as _layers  # noqa: F401  (registers featcache's layers)
    from .layers import ClassNames

    try:
        inner = keras.saving.load_model(path, compile=False)
    except Exception as exc:  # Keras raises many types for a foreign or broken file
        raise FeatcacheError(f"Cannot load {path}: {type(exc).__name__}: {brief(exc)}") from None
    names = class_names_of(inner)
    inner = _without_augmentation(inner)
    inputs = keras.Input((None, None, 3), dtype="float32", name="images")
    outputs = inner(inputs, training=False)
    outputs = ClassNames(names, name="class_names", dtype="float32")(outputs)
    return keras.Model(inputs, outputs, name=MODEL_NAME)


def _without_augmentation(model):
    """The model with its random augmentation layers (``RandomFlip``, ``RandomTranslation``...) as identities.

    They do nothing at inference, but their seed state would still be captured by an
    exported graph (TensorFlow refuses to save it from a module). The other layers are
    reused, not copied, so the weights are the trained ones.
    """
    import keras

    def clone(layer):
        if type(layer).__name__.startswith("Random"):
            return keras.layers.Identity(name=layer.name)
        return layer

    if not any(type(layer).__name__.startswith("Random") for layer in model.layers):
        return model
    try:
        return keras.models.clone_model(model, clone_function=clone)
    except Exception as exc:  # a subclassed model cannot be cloned: say so rather than export the augmentation
        raise FeatcacheError(f"Cannot remove the augmentation layers of {model.name} for export "
                             f"({type(exc).__name__}: {brief(exc)}).") from None
