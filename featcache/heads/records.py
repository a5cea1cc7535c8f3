"""Head runs: train from the cache, write the run folder; sweeps over a grid of settings."""

from __future__ import annotations

import itertools
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from ..errors import InvalidArgument
from ..report import write_run
from ..runs import Run, new_run_id, read_run, runs_root, staged_run_dir
from ..settings import FeatureSettings
from .config import DEFAULT_GRID, SWEEPABLE, HeadConfig, Log, validate_config
from .data import HeadData, load_head_data
from .fit import fit_head
from .init import resolve_init
from .standardize import prepare
from .training import HeadResult


def _relevant(config: HeadConfig, base: HeadConfig) -> HeadConfig:
    """``config`` with the fields its kind ignores reset to ``base``'s, so equivalent configs compare equal."""
    if config.kind == "logreg":
        return replace(config, units=base.units, dropout=base.dropout, optimizer=base.optimizer,
                       learning_rate=base.learning_rate, epochs=base.epochs, batch_size=base.batch_size,
                       patience=base.patience)
    config = replace(config, c_grid=base.c_grid, max_iter=base.max_iter)
    if config.kind == "linear":
        config = replace(config, units=base.units, dropout=base.dropout)
    return config


def _head_summary(config: HeadConfig, result: HeadResult) -> str:
    if "logreg" in result.extra:
        return f"C {result.extra['logreg']['C']:g} (of {len(result.extra['logreg']['grid'])} tried)"
    return config.summary()


def write_head_run(settings: FeatureSettings, config: HeadConfig, data: HeadData, result: HeadResult,
                   runs_dir=None, load_seconds: Optional[float] = None) -> Run:
    """The run folder (built aside, renamed when complete) and its record."""
    runs_dir = Path(runs_dir) if runs_dir is not None else runs_root(settings.cache_dir)
    backbone = "+".join(settings.backbones())
    run_id = new_run_id(config.kind, backbone)
    while (runs_dir / run_id).exists():  # two runs in the same second drew the same suffix
        run_id = new_run_id(config.kind, backbone)
    config = _relevant(config, HeadConfig(kind=config.kind))
    acc_by_view = {view: float(np.mean(result.val_probs_by_view[i].argmax(axis=1) == data.y_val))
                   for i, view in enumerate(data.views)} if result.val_probs_by_view is not None else {}
    sizes = sorted(set(data.sizes.values()))
    record = {
        "kind": "head", "run_id": run_id, "backbone": backbone, "head": config.kind,
        "summary": " ".join(filter(None, ["/".join(f"{s}px" for s in sizes),
                                          "views " + "+".join(data.views) if len(data.views) > 1 else "",
                                          _head_summary(config, result)])),
        "weights": settings.weights, "data": settings.data, "size": sizes[0] if len(sizes) == 1 else data.sizes,
        "pooling": settings.pooling, "dtype": settings.dtype, "views": list(data.views),
        "config": asdict(config), "caches": data.caches,
        "width": data.width, "n_classes": data.n_classes, "n_train": data.train_images,
        "val_fraction": data.val_fraction, "val_seed": data.val_seed,
        "val_acc_by_view": acc_by_view,
        "seconds": round(result.seconds, 3),
        "load_seconds": None if load_seconds is None else round(load_seconds, 3),
        "epochs_run": result.epochs_run, "best_epoch": result.best_epoch,
        **result.extra,
    }
    head_settings = {"features": asdict(settings), "head": asdict(config),
                     "val_fraction": data.val_fraction, "val_seed": data.val_seed}
    final = runs_dir / run_id
    with staged_run_dir(final) as tmp:
        result.model.save(tmp / "head.keras")
        record = write_run(tmp, head_settings, record, data.class_names, data.y_val, result.val_probs,
                           data.y_test, result.test_probs, result.history or None, val_images=data.val_images)
    return read_run(final) or Run(run_id, final, record, head_settings)


def train_head(settings: FeatureSettings, config: HeadConfig = HeadConfig(), runs_dir=None, log: Log = None) -> Run:
    """Load the cached features the settings name, train one head, score validation and test once, write its run."""
    validate_config(config)
    init = None
    if config.init:  # the saved head decides the architecture the run records
        init = resolve_init(config.init, settings.cache_dir)
        config = replace(config, **init.architecture())
    start = time.perf_counter()
    data = load_head_data(settings, config.val_fraction, config.seed)
    loaded = time.perf_counter() - start
    if log:
        log(f"loaded {len(data.caches)} cache file(s) in {loaded:.1f}s: {data.train_images} train / {len(data.y_val)} "
            f"val / {len(data.y_test)} test images x {len(data.views)} view(s), width {data.width}")
    result = fit_head(data, config, log=log, cache_dir=settings.cache_dir, init=init)
    return write_head_run(settings, config, data, result, runs_dir, load_seconds=loaded)


def expand_grid(base: HeadConfig, grid: Optional[Mapping[str, Sequence]] = None) -> list[HeadConfig]:
    """Every combination of ``grid`` values on top of ``base``; fields a kind ignores do not multiply runs.

    Each grid value lists candidates, e.g. ``{"kind": ["linear", "mlp"], "units": [(256,), (512, 128)]}``.
    """
    grid = dict(DEFAULT_GRID if grid is None else grid)
    for name, candidates in grid.items():
        if name not in SWEEPABLE:
            raise InvalidArgument(f"Cannot sweep over {name!r}; expected some of: {', '.join(SWEEPABLE)} "
                                  f"(the validation split, val_fraction and seed, stays fixed so runs compare).")
        if isinstance(candidates, (str, bytes)) or not isinstance(candidates, Sequence) or not candidates:
            raise InvalidArgument(f"Sweep values for {name!r} must be a non-empty list of candidates; "
                                  f"received {candidates!r}.")
    configs: list[HeadConfig] = []
    for combo in itertools.product(*grid.values()):
        config = _relevant(replace(base, **dict(zip(grid, combo))), base)
        validate_config(config)
        if config not in configs:
            configs.append(config)
    return configs


def sweep(settings: FeatureSettings, grid: Optional[Mapping[str, Sequence]] = None,
          base: HeadConfig = HeadConfig(), runs_dir=None, log: Log = None) -> list[Run]:
    """Train a small grid of heads on features loaded and standardised once; runs best-on-validation first."""
    if base.init:
        raise InvalidArgument("A sweep trains new heads; --init is for a single head.")
    configs = expand_grid(base, grid)
    start = time.perf_counter()
    data = load_head_data(settings, base.val_fraction, base.seed)
    prepared = prepare(data).ready([config.kind for config in configs])
    loaded = time.perf_counter() - start
    if log:
        log(f"loaded and standardised {len(data.caches)} cache file(s) in {loaded:.1f}s; {len(configs)} head(s) to train")
    runs = []
    for i, config in enumerate(configs, 1):
        result = fit_head(data, config, prepared=prepared)
        run = write_head_run(settings, config, data, result, runs_dir, load_seconds=loaded)
        runs.append(run)
        if log:
            log(f"[{i}/{len(configs)}] {config.kind:<6} {config.summary():<40} val {run.val_acc:.4f}  "
                f"test {run.test_acc:.4f}  {result.seconds:.1f}s  {run.run_id}")
    runs.sort(key=lambda r: -(r.val_acc or 0.0))
    if log and runs:
        log(f"best on validation: {runs[0].run_id} (val {runs[0].val_acc:.4f}, test {runs[0].test_acc:.4f})")
    return runs
