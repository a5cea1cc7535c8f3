"""One head fitted on assembled data: the path every head run and sweep takes."""

from __future__ import annotations

import time
from typing import Optional

import numpy as np

from ..errors import FeatcacheError
from .config import HeadConfig, Log, validate_config
from .data import HeadData
from .init import InitHead, check_same_features, resolve_init
from .models import _core, build_head, check_head
from .standardize import Prepared, Standardizer, prepare
from .training import HeadResult, _predictor, fit_keras, fit_logreg


def fit_head(data: HeadData, config: HeadConfig, prepared: Optional[Prepared] = None, log: Log = None,
             cache_dir: Optional[str] = None, init: Optional[InitHead] = None) -> HeadResult:
    """Train one head on assembled arrays and score validation and test once (TTA over views).

    ``prepared`` (standardised arrays) is reused when given; a head continued from
    ``config.init`` (``init`` when already resolved) standardises with its own saved statistics instead.
    """
    validate_config(config)
    start = time.perf_counter()
    extra: dict = {}
    if config.init:
        init = init or resolve_init(config.init, cache_dir)
        model = init.model
        check_head(model, data.width, data.n_classes, config.init)
        if init.run is not None:
            check_same_features(init.run, data)
            extra["init_run"] = init.run.run_id
        layer, _ = _core(model)
        prepared = prepare(data, Standardizer.from_layer(layer))
    else:
        prepared = prepared or prepare(data)
        if prepared.data is not data:
            raise FeatcacheError("The prepared features were standardised from other data than the head trains on.")
    if config.kind == "logreg" and not config.init:
        model, extra["logreg"] = fit_logreg(prepared, data, config, log)
        history, best, epochs_run, by_view = {}, None, None, None
    else:
        if not config.init:
            model = build_head(config.kind, data.width, data.n_classes, prepared.standardizer, config.units,
                               config.dropout, config.seed)
        history, best, by_view = fit_keras(model, prepared, data, config, log)
        epochs_run = len(history.get("loss", []))
    _, core = _core(model)
    predict = _predictor(core)
    if by_view is None:
        by_view = predict(prepared.x_val)
    test_probs = predict(prepared.x_test).mean(axis=0)
    if not (np.all(np.isfinite(by_view)) and np.all(np.isfinite(test_probs))):
        raise FeatcacheError(f"Training the {config.kind} head diverged (NaN or infinite outputs); "
                             f"lower the learning rate (was {config.learning_rate:g}).")
    return HeadResult(model=model, val_probs=by_view.mean(axis=0), test_probs=test_probs, history=history,
                      seconds=time.perf_counter() - start, epochs_run=epochs_run, best_epoch=best,
                      val_probs_by_view=by_view, extra=extra)
