"""``auto``: the fastest (engine, precision) measured on this machine, decided once and kept.

On first use for a model identity and machine, every engine that can run
here is timed on a few batches of the model's own input shape, at each
precision it may run (bf16 only on a CPU that computes it natively), and the
fastest is kept. The decision and its figures are written beside the
artefacts (``<model>-auto-<engine>-<precision>-<machine>.json``) and one line
says what was chosen and why. Keras f32 is always a candidate, so ``auto`` is
never slower than plain Keras on the machine that measured.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .. import fsio
from ..errors import FeatcacheError
from .machine import cpu_model, machine_id
from .registry import (_REGISTRY, Engine, build, get_record, is_converted, library_versions,
                       runnable_precisions)

# Below this many 224-px-equivalent images, 'auto' does not convert (see conversion_pays).
AUTO_MIN_ROWS_AT_224 = 1000
# Batches timed per candidate and round when 'auto' measures (after one warm-up batch); the rounds
# alternate between candidates and the best round counts, so a burst of other work on a shared CPU
# does not decide for good.
AUTO_TIMED_BATCHES = 2
AUTO_ROUNDS = 2


def conversion_pays(rows: Optional[int], size: int) -> bool:
    """Whether converting is worth it for ``rows`` images at ``size`` px when no artefact is cached yet.

    A conversion costs a roughly fixed 2-40 s here (it depends on the weights,
    not the input size), while the time a faster engine saves grows with
    rows x size^2; it breaks even near 1,000 images at 224. Unknown ``rows`` means "large".
    """
    return rows is None or rows * (size / 224) ** 2 >= AUTO_MIN_ROWS_AT_224


def candidates(engine: str, precision: str, gpu: bool = False) -> list[tuple[str, str]]:
    """(engine, precision) pairs that ``--engine`` and ``--precision`` allow here; on a GPU only Keras."""
    names = list(_REGISTRY) if engine == "auto" else [engine]
    if gpu and engine == "auto":
        names = ["keras"]
    pairs = []
    for name in names:
        record = get_record(name)
        if record.available():
            continue
        pairs.extend((name, p) for p in runnable_precisions(record, precision))
    return pairs


def decision_path(artifact_dir: Path, artifact_id: str, engine: str, precision: str) -> Path:
    """Named without the model, so a warm call can read the decision before building anything."""
    return Path(artifact_dir) / f"{artifact_id}-{library_versions()}-auto-{engine}-{precision}-{machine_id()}.json"


def recorded(artifact_dir: Path, artifact_id: str, engine: str = "auto", precision: str = "auto") -> Optional[dict]:
    """The decision measured earlier on this machine, or None (missing or unreadable: measure again)."""
    path = decision_path(artifact_dir, artifact_id, engine, precision)
    try:
        decision = json.loads(path.read_text())
        if decision["engine"] in _REGISTRY and decision["precision"] in ("f32", "bf16"):
            return decision
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def measure(engine: Engine, shape: tuple, batches: int = AUTO_TIMED_BATCHES) -> float:
    """Images per second of ``engine`` on random batches of ``shape``, after one warm-up batch."""
    batch = np.random.default_rng(0).uniform(0, 255, shape).astype(np.float32)
    engine(batch)
    start = time.perf_counter()
    for _ in range(batches):
        engine(batch)
    return shape[0] * batches / (time.perf_counter() - start)


def _label(pair: tuple[str, str]) -> str:
    return f"{pair[0]} {pair[1]}"


def choose(model, artifact_dir: Path, artifact_id: str, batch_size: int, pairs: list[tuple[str, str]],
           rows: Optional[int], size: int, engine: str, precision: str, log: Callable[[str], None]) -> Engine:
    """The fastest of ``pairs`` for this model: a decision kept from before, else measured now."""
    decision = recorded(artifact_dir, artifact_id, engine, precision)
    if decision is not None and (decision["engine"], decision["precision"]) in pairs:
        try:
            return build(decision["engine"], model, artifact_dir, artifact_id, batch_size, decision["precision"])
        except FeatcacheError:
            pass  # the chosen engine broke since: measure again
    shape = (batch_size,) + tuple(int(d or size) for d in model.input_shape[1:])
    engines, figures, skipped, deferred = {}, {}, {}, []
    for pair in pairs:
        if not is_converted(get_record(pair[0]), model, artifact_dir, artifact_id) and not conversion_pays(rows, size):
            skipped[_label(pair)] = f"converting does not pay for {rows} images"
            deferred.append(pair)
            continue
        _try(pair, model, artifact_dir, artifact_id, batch_size, shape, engines, figures, skipped)
    if not engines:  # only engines that need a conversion are left: convert after all
        for pair in deferred:
            _try(pair, model, artifact_dir, artifact_id, batch_size, shape, engines, figures, skipped)
    if len(engines) > 1:
        for _ in range(AUTO_ROUNDS - 1):
            for pair, engine_ in engines.items():
                figures[pair] = max(figures[pair], round(measure(engine_, shape), 1))
    if not engines:
        raise FeatcacheError("No engine can run here: " + "; ".join(f"{n}: {why}" for n, why in skipped.items()))
    best = max(figures, key=figures.get)
    path = decision_path(artifact_dir, artifact_id, engine, precision)
    complete = not deferred or len(engines) == len(pairs)
    others = ", ".join(f"{_label(p)} {figures[p]:.0f}" for p in figures if p != best)
    kept = f"kept in {path.name}" if complete else "not kept: a small job"
    log(f"auto engine: {_label(best)} ({figures[best]:.0f} img/s at batch {batch_size}"
        + (f"; {others}" if others else "") + f"; measured on this {cpu_model()}, {kept})")
    if complete and len(pairs) > 1:
        fsio.write_json(path, {"engine": best[0], "precision": best[1],
                               "img_per_s": {_label(p): v for p, v in figures.items()}, "skipped": skipped,
                               "batch_size": batch_size, "input_shape": list(shape[1:]), "cpu": cpu_model(),
                               "machine": machine_id(), "measured_at": time.time()}, "engine decision")
    return engines[best]


def _try(pair, model, artifact_dir, artifact_id, batch_size, shape, engines, figures, skipped) -> None:
    try:
        engines[pair] = build(pair[0], model, artifact_dir, artifact_id, batch_size, pair[1])
        figures[pair] = round(measure(engines[pair], shape), 1)
    except FeatcacheError as exc:
        engines.pop(pair, None)
        skipped[_label(pair)] = str(exc)
