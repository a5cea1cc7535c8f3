"""Continuing a saved head (``--init``): which run, and whether its features are the same."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from ..errors import FeatcacheError
from ..runs import Run, load_run, read_run
from .data import HeadData
from .models import _core, load_head


IDENTITY_FIELDS = ("backbone", "weights", "size", "preprocess", "pooling")


def _identities(caches: Sequence[Mapping[str, Any]], fields: Sequence[str]) -> list[tuple]:
    found: list[tuple] = []
    for cache in caches:
        identity = tuple(cache.get(f) for f in fields)
        if identity not in found:
            found.append(identity)
    return found


def check_same_features(run: Run, data: HeadData) -> None:
    """A head continued on new rows must see the features it was trained on: same backbones, weights,
    size, preprocessing and pooling (a head of another backbone can have the same width and still be wrong)."""
    theirs = run.record.get("caches") or []
    fields = [f for f in IDENTITY_FIELDS if theirs and f in theirs[0]]
    if not fields:
        return
    before, now = _identities(theirs, fields), _identities(data.caches, fields)
    if before != now:
        describe = lambda ids: " + ".join("/".join(str(v) for v in i) for i in ids)  # noqa: E731
        raise FeatcacheError(f"Head {run.run_id} was trained on {describe(before)} features ({'/'.join(fields)}); "
                             f"this cache holds {describe(now)}. Train a new head on it, or pick a run of the "
                             "same features (see `featcache runs`).")


@dataclass
class InitHead:
    """A saved head to continue training, found before any features load (a bad ``--init`` fails fast)."""

    model: Any
    run: Optional[Run]
    kind: str  # 'linear' or 'mlp': the saved architecture decides, whatever kind was asked
    units: tuple[int, ...] = ()
    dropout: float = 0.0

    def architecture(self) -> dict:
        """The ``HeadConfig`` fields the saved head fixes, so its run records what was trained."""
        return {"kind": self.kind, **({"units": self.units, "dropout": self.dropout} if self.kind == "mlp" else {})}


def resolve_init(init: str, cache_dir: Optional[str] = None) -> InitHead:
    """The head ``init`` names: a run id (looked up under ``cache_dir``), a run folder or a ``head.keras`` path."""
    path = Path(init)
    if path.is_dir():
        path = path / "head.keras"
    run = None
    if not path.exists() and cache_dir is not None and not str(init).endswith(".keras"):
        run = load_run(cache_dir, init)
        path = run.model_path
    elif path.is_file():
        run = read_run(path.parent)
    model = load_head(path)
    _core(model)  # a Keras model without featcache's standardize layer is refused here
    import keras

    hidden = [layer for layer in model.layers if layer.name.startswith("dense_")]  # build_head's mlp names
    rates = [layer.rate for layer in model.layers if isinstance(layer, keras.layers.Dropout)]
    return InitHead(model, run, "mlp" if hidden else "linear", tuple(int(layer.units) for layer in hidden),
                    float(rates[0]) if rates else 0.0)
