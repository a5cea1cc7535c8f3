"""The start-up checks: the rebuilt model computes the cached features, and the head scores as recorded."""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from ..errors import FeatcacheError
from .config import BF16_MIN_COSINE, FEATURE_ATOL, FEATURE_RTOL, VAL_ACC_TOLERANCE
from .model import Inference

# --- the start-up checks -----------------------------------------------------------------


def check_features(infer: Inference, split, cache, cache_rows: np.ndarray, size: int, batch_size: int,
                   log: Callable[[str], None]) -> float:
    """Check (1): the model's pooled features for a few training images equal the cached ones."""
    got, _ = infer(split, cache.indices[cache_rows], size, batch_size)
    return match_features(got, cache, cache_rows, log)


def match_features(got: np.ndarray, cache, cache_rows: np.ndarray, log: Callable[[str], None],
                   what: str = "the rebuilt model's features", bf16: bool = False) -> float:
    """Check (1) on features computed by either mode; returns the largest absolute difference.

    Tolerance ``|model - cached| <= FEATURE_ATOL + FEATURE_RTOL * |cached|`` per value; when the
    cache (or, ``bf16``, the model's input) is bf16, each feature vector's cosine with the cached
    one must be at least BF16_MIN_COSINE.
    """
    image_rows = cache.indices[cache_rows]
    expected = cache.features[cache_rows].astype(np.float32)
    diff = np.abs(np.asarray(got, dtype=np.float32) - expected)
    wide = bf16 or getattr(cache.key, "precision", "f32") == "bf16"
    worst = float(diff.max()) if diff.size else 0.0
    if wide:
        got32 = np.asarray(got, dtype=np.float32)
        norms = np.linalg.norm(got32, axis=1) * np.linalg.norm(expected, axis=1)
        cosine = (got32 * expected).sum(axis=1) / np.maximum(norms, 1e-12)
        bad_rows = cosine < BF16_MIN_COSINE
        tolerance = f"bf16: cosine >= {BF16_MIN_COSINE:g} per feature vector; lowest {float(cosine.min()):.4f}"
    else:
        bad_rows = (diff > FEATURE_ATOL + FEATURE_RTOL * np.abs(expected)).any(axis=1)
        tolerance = f"rtol {FEATURE_RTOL:g}, atol {FEATURE_ATOL:g}"
    if bad_rows.any():
        row = int(np.argmax(bad_rows))
        raise FeatcacheError(
            f"Self-check (1) failed: {what} differ from the cache {cache.path.name} on "
            f"{int(bad_rows.sum())} of {len(cache_rows)} training images (max |diff| {worst:.4g}, e.g. image "
            f"{int(image_rows[row])}; tolerance {tolerance}): the backbone, weights, size or preprocessing no "
            "longer match those that made the cache.")
    log(f"check 1 ok: {what} for {len(cache_rows)} training images match the pooled cache "
        f"(max |diff| {worst:.2e}; tolerance {tolerance})")
    return worst


def check_validation(infer: Inference, head, split, cache, val_rows: np.ndarray, size: int, batch_size: int,
                     recorded: Optional[float], log: Callable[[str], None]) -> dict:
    """Check (2): validation accuracy before training equals the head's, within one point."""
    _, probs = infer(split, cache.indices[val_rows], size, batch_size)
    return match_validation(probs, head, cache, val_rows, recorded, log)


def match_validation(probs: np.ndarray, head, cache, val_rows: np.ndarray, recorded: Optional[float],
                     log: Callable[[str], None]) -> dict:
    """Check (2) on probabilities computed by either mode.

    Compared with the head's recorded ``val_acc`` when the validation rows
    are the head's full set, and always with the head on the cached features
    of the same rows (which also covers ``--subset``).
    """
    labels = cache.labels[val_rows]
    acc = float(np.mean(np.asarray(probs).argmax(axis=1) == labels))
    features = cache.features[val_rows].astype(np.float32)
    cached = np.concatenate([np.asarray(head(features[i:i + 1024], training=False))
                             for i in range(0, len(features), 1024)])
    acc_cached = float(np.mean(cached.argmax(axis=1) == labels))
    against = [("the head on the cached features of these rows", acc_cached)]
    if recorded is not None:
        against.insert(0, ("the head's recorded val_acc", float(recorded)))
    # One point, or two images on a small validation set: a borderline image or two may flip between float32
    # and bf16 arithmetic (50 validation images: one flip is two points).
    tolerance = max(VAL_ACC_TOLERANCE, 2.0 / max(1, len(labels)))
    for what, reference in against:
        if abs(acc - reference) > tolerance + 1e-9:
            raise FeatcacheError(
                f"Self-check (2) failed: validation accuracy before training is {acc:.4f} on {len(val_rows)} images "
                f"but {what} is {reference:.4f} (tolerance {tolerance:.3g}): the head does not fit "
                f"these features or validation rows.")
    shown = ", ".join(f"{what} {ref:.4f}" for what, ref in against)
    log(f"check 2 ok: validation accuracy before training {acc:.4f} on {len(val_rows)} images ({shown}; "
        f"tolerance {tolerance:.3g})")
    return {"val_acc_before": acc, "val_acc_head_cached": acc_cached, "val_acc_head_recorded": recorded}
