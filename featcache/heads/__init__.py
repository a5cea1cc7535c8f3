"""Stage 2: classifier heads trained from cached features in seconds; no backbone is built.

Features of every (backbone, view) come from the cache, aligned by source index and
concatenated across backbones. Validation rows are carved from train per image with
``datasets.validation_split`` on the labels of the first backbone's ``orig`` cache, the
split ``finetune`` recomputes, so every view of an image falls on the same side. Heads
train on all views' rows and are scored by averaging probabilities over views
(test-time augmentation). Test is evaluated once, at the end, and never chooses anything.

Standardisation is fitted on training rows only and saved inside every head as a
``Normalization`` layer: ``head.keras`` maps pooled features (N, D) to class
probabilities and can sit on top of a backbone unchanged. ``logreg`` trains with
scikit-learn and is exported as the equivalent Keras model, so every head can be
fine-tuned later.

Speed: Keras heads train on features standardised once and held as tensors in memory,
one ``tf.function`` per epoch (a while loop over batches gathered from a shuffled index, then
the validation rows) driven by Keras' own callbacks. Each step runs on the fused kernels of
``training_step``. ``bench/bench_head.py`` measures it against ``model.fit`` and Keras' own step.

The package: ``config`` (HeadConfig), ``data`` (assembly of cached rows),
``standardize``, ``models``, ``training`` (the loops), ``init`` (continuing a
saved head), ``fit`` (one head on assembled data) and ``records`` (head runs
and sweeps).
"""

from __future__ import annotations

from .config import (DEFAULT_GRID, KINDS, MIN_VARIANCE, OPTIMIZERS, PREDICT_ROWS, SPLITS, SWEEPABLE, HeadConfig,
                     Log, parse_units, validate_config)
from .data import HeadData, assemble, check_views, concat_backbones, load_head_data
from .fit import fit_head
from .init import IDENTITY_FIELDS, InitHead, check_same_features, resolve_init
from .models import _core, build_head, check_head, load_head, make_optimizer
from .records import expand_grid, sweep, train_head, write_head_run
from .standardize import Prepared, Standardizer, prepare
from .training import HeadResult, fit_keras, fit_logreg

__all__ = ["DEFAULT_GRID", "HeadConfig", "HeadData", "HeadResult", "IDENTITY_FIELDS", "InitHead", "KINDS",
           "Log", "MIN_VARIANCE", "OPTIMIZERS", "PREDICT_ROWS", "Prepared", "SPLITS", "SWEEPABLE",
           "Standardizer", "_core", "assemble", "build_head", "check_head", "check_same_features",
           "check_views", "concat_backbones", "expand_grid", "fit_head", "fit_keras", "fit_logreg", "load_head",
           "load_head_data", "make_optimizer", "parse_units", "prepare", "resolve_init", "sweep", "train_head",
           "validate_config", "write_head_run"]
