"""Find the cache files that a ``FeatureSettings`` names, without building a backbone.

``head`` and ``finetune`` select caches with the same settings as
``features``. Matching is by recorded attributes (backbone, weights
identity, size, pooling, dtype, data source, split, view), so a head run
neither loads the dataset nor the backbone; only when several datasets
were cached under one source name is the dataset fingerprinted to choose.
"""

from __future__ import annotations

from pathlib import Path

from .backbones import POOLINGS, get_spec, resolve_size, weights_identity
from .cache import FeatureSet, find, load_features
from .errors import FeatcacheError, InvalidArgument, choice_error
from .settings import DTYPES, VIEWS, FeatureSettings


def check_settings(settings: FeatureSettings) -> None:
    """Fail on an unknown backbone, size, pooling, dtype or view before any file is read.

    Shared by ``features``, ``head`` and ``finetune``: a typo must not read as a missing cache.
    """
    if not settings.backbones():
        raise InvalidArgument(f"No backbone named in {settings.backbone!r}; e.g. 'efficientnet_lite0' or 'a+b'.")
    for name in settings.backbones():
        resolve_size(get_spec(name), settings.size)
    from .engines import PRECISIONS

    if settings.precision not in PRECISIONS:  # whether this machine can compute bf16 matters only to features
        raise choice_error("precision", PRECISIONS, settings.precision)
    if settings.pooling not in POOLINGS:
        raise choice_error("pooling", POOLINGS, settings.pooling)
    if settings.dtype not in DTYPES:
        raise choice_error("dtype", DTYPES, settings.dtype)
    if not settings.views:
        raise InvalidArgument("No view given; use 'orig' and/or 'flip'.")
    for view in settings.views:
        if view not in VIEWS:
            raise choice_error("view", VIEWS, view)


def data_source_id(data: str) -> str:
    """How a cache records its data source: built-in names as is, paths made absolute."""
    if data in ("cifar10", "digits"):
        return data
    return str(Path(data).expanduser().resolve())


def match_attrs(settings: FeatureSettings, backbone: str, split: str, view: str) -> dict:
    spec = get_spec(backbone)
    return {
        "backbone": spec.name,
        "weights": weights_identity(settings.weights),
        "size": resolve_size(spec, settings.size),
        "pooling": settings.pooling,
        "dtype": settings.dtype,
        "data_source": data_source_id(settings.data),
        "split": split,
        "view": view,
    }


def _by_precision(settings: FeatureSettings, wanted: dict) -> list[Path]:
    """Caches of the asked precision; with 'auto', of either (two of them are told apart below)."""
    if settings.precision != "auto":
        return find(settings.cache_dir, {**wanted, "precision": settings.precision})
    return find(settings.cache_dir, wanted)


def locate(settings: FeatureSettings, backbone: str, split: str, view: str = "orig") -> Path:
    """The one cache file for these settings; a clear error naming the ``make features`` call otherwise."""
    wanted = match_attrs(settings, backbone, split, view)
    paths = _by_precision(settings, wanted)
    if not paths:
        one = FeatureSettings(**{**settings.__dict__, "backbone": backbone})
        raise FeatcacheError(
            f"No {split} features cached for {backbone} (size {wanted['size']}, weights {settings.weights}, "
            f"data {settings.data}, view {view}) in {settings.cache_dir}; create them with: {one.make_command()}")
    if len(paths) == 1:
        return paths[0]
    from .datasets import load_dataset

    fingerprint = load_dataset(settings.data, settings.cache_dir, settings.skip_corrupt)[split].fingerprint
    current = [p for p in paths if p in find(settings.cache_dir, {**wanted, "dataset": fingerprint})]
    if len(current) > 1:
        raise FeatcacheError(f"{len(current)} caches match {backbone}/{split}/{view} (f32 and bf16 features); "
                             "choose one with --precision f32 or --precision bf16.")
    if len(current) != 1:
        raise FeatcacheError(f"{len(paths)} caches match {backbone}/{split}/{view} but none holds the current "
                             f"contents of {settings.data}; rerun `{settings.make_command()}`.")
    return current[0]


def load_split(settings: FeatureSettings, backbone: str, split: str, view: str = "orig",
               verify: bool = True) -> FeatureSet:
    """Locate and load (with checks) one cached split."""
    return load_features(locate(settings, backbone, split, view), verify=verify)
