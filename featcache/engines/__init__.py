"""Engines run a frozen feature model over batches; ``auto`` picks the fastest measured on this machine.

Every engine maps a float32 batch ``(n, h, w, 3)`` to float32 features
``(n, width)``. Engines of one precision differ only by float rounding
(``tests/test_engines.py`` compares them), so the engine is recorded in a
cache file's attributes but is not part of its key; the precision (``f32`` or
``bf16``) is.

Each engine is a record in a small registry, like the backbones: its name,
whether it can run here, how to convert a model to its artefact (cached under
``CACHE_DIR/engines/``, named by model identity and library versions), how to
load it, the precisions it runs and whether it runs under tf.distribute.
``make_engine`` is the one path for all of them: reuse the cached artefact,
else convert, else (for ``auto``) fall back to Keras with the reason.

``auto`` decides by measurement, not by assumption: on first use for a
model identity and machine it times a few batches on every engine that can
run the precision, keeps the fastest, and caches that decision with its
figures beside the artefacts (``*-auto-<machine>.json``), saying what it chose
and why. Keras is always among the candidates, so ``auto`` is never slower
than plain Keras on the machine that measured.
"""

from __future__ import annotations

import hashlib
import os
import platform
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable, Optional, Protocol

import numpy as np

from .. import fsio
from ..errors import FeatcacheError, InvalidArgument, choice_error
from . import keras as keras_engine
from . import openvino as openvino_engine
from . import tflite as tflite_engine
from .keras import KerasEngine
from .tflite import TFLiteEngine, convert_to_tflite

PRECISIONS = ("auto", "f32", "bf16")
# CPU flags with native bf16 arithmetic (AMX tiles, AVX512-BF16); without them OpenVINO would emulate.
BF16_FLAGS = ("amx_bf16", "avx512_bf16")
# The flags where 'auto' precision picks bf16. Measured (bench/results/): on the Xeon with AMX, OpenVINO
# bf16 ran lite0 4-5x and ResNet50 5-8x faster than f32 engines; on the EPYC with AVX512-BF16 only, bf16
# was no faster than TFLite f32, so f32 (exact) stays the default there; --precision bf16 still works.
AUTO_BF16_FLAGS = ("amx_bf16",)
# Below this many 224-px-equivalent images, 'auto' does not convert (see conversion_pays).
AUTO_MIN_ROWS_AT_224 = 1000
# Batches timed per candidate when 'auto' measures (after one warm-up batch).
AUTO_TIMED_BATCHES = 3


class Engine(Protocol):
    name: str
    precision: str

    def __call__(self, batch) -> np.ndarray: ...


@dataclass(frozen=True)
class EngineRecord:
    """One engine: what it needs, how its artefact is made and loaded, what it can run."""

    name: str
    available: Callable[[], str]  # "" when usable here, else the reason
    load: Callable  # (model, artefact path or None, batch_size, precision) -> Engine
    convert: Optional[Callable] = None  # (model, path) -> path; None: runs the Keras model itself
    suffix: str = ""  # the artefact's name ending
    precisions: tuple = ("f32",)
    distributable: bool = False  # runs under a tf.distribute strategy
    version: Callable[[], str] = lambda: ""


_REGISTRY = {
    "keras": EngineRecord("keras", lambda: "", keras_engine.load, distributable=True),
    "tflite": EngineRecord("tflite", tflite_engine.available, tflite_engine.load, tflite_engine.convert, ".tflite"),
    "openvino": EngineRecord("openvino", openvino_engine.available, openvino_engine.load, openvino_engine.convert,
                             ".ov", precisions=("f32", "bf16"), version=openvino_engine.version),
}
ENGINES = ("auto",) + tuple(_REGISTRY)


def list_engines() -> list[str]:
    return list(_REGISTRY)


def get_record(name: str) -> EngineRecord:
    if name not in _REGISTRY:
        raise choice_error("engine", list(_REGISTRY), name)
    return _REGISTRY[name]


def resolve_engine(name: str) -> str:
    """Check an engine name without importing TensorFlow (a warm-cache call stays light)."""
    if name not in ENGINES:
        raise choice_error("engine", ENGINES, name)
    return name


# --- the machine and the precision ---------------------------------------------------------


def cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def machine_id() -> str:
    """Names the machine an 'auto' decision was measured on: CPU model, its bf16 flags and core count."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            model = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), model)
    except OSError:
        pass
    flags = sorted(cpu_flags() & set(BF16_FLAGS))
    text = f"{model}|{','.join(flags)}|{os.cpu_count()}"
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def resolve_precision(precision: str, engine: str = "auto", rows: Optional[int] = None, size: int = 224) -> str:
    """``auto`` becomes bf16 where OpenVINO runs on an AMX CPU (see AUTO_BF16_FLAGS), f32 elsewhere.

    Deterministic and cheap (no model, no TensorFlow), so ``head`` finds the cache
    ``features`` wrote without measuring anything. A job too small to repay an
    OpenVINO conversion (``rows`` images at ``size`` px, all splits together) stays f32.
    """
    if precision not in PRECISIONS:
        raise choice_error("precision", PRECISIONS, precision)
    resolve_engine(engine)
    if precision == "auto":
        bf16 = (engine in ("auto", "openvino") and not openvino_engine.available()
                and bool(cpu_flags() & set(AUTO_BF16_FLAGS)) and (engine == "openvino" or conversion_pays(rows, size)))
        return "bf16" if bf16 else "f32"
    if precision == "bf16":
        check_bf16(engine)
    return precision


def check_bf16(engine: str) -> None:
    """bf16 runs on OpenVINO, on a CPU with native bf16; anything else would be emulated or mislabelled."""
    if engine not in ("auto", "openvino"):
        raise InvalidArgument(f"--precision bf16 runs on the openvino engine; received --engine {engine}.")
    reason = openvino_engine.available()
    if reason:
        raise FeatcacheError(f"--precision bf16 needs the openvino engine, but {reason}.")
    if not cpu_flags() & set(BF16_FLAGS):
        raise FeatcacheError("--precision bf16 needs a CPU with AMX or AVX512-BF16 (neither is in /proc/cpuinfo); "
                             "use --precision f32.")


# --- artefacts -------------------------------------------------------------------------------


def _versions() -> str:
    """Library versions in artefact names, read without importing TensorFlow."""
    def v(package: str) -> str:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "none"

    return f"tf{v('tensorflow')}-keras{v('keras')}"


def _layers(model):
    for layer in model.layers:
        yield layer
        if hasattr(layer, "layers"):
            yield from _layers(layer)


def artifact_stem(model, artifact_id: str) -> str:
    """One name per model identity, library versions and compute dtype (a mixed-precision model differs)."""
    dtypes = sorted({str(getattr(layer, "compute_dtype", "float32")) for layer in _layers(model)} - {"float32"})
    suffix = f"-{'-'.join(dtypes)}" if dtypes else ""
    return f"{artifact_id}-{_versions()}{suffix}"


def artifact_path(record: EngineRecord, model, artifact_dir: Path, artifact_id: str) -> Optional[Path]:
    if record.convert is None:
        return None
    version = record.version()
    tag = f"-{record.name}{version}" if version else ""
    return Path(artifact_dir) / f"{artifact_stem(model, artifact_id)}{tag}{record.suffix}"


def tflite_path(model, artifact_dir: Path, artifact_id: str) -> Path:
    return artifact_path(_REGISTRY["tflite"], model, artifact_dir, artifact_id)


def conversion_pays(rows: Optional[int], size: int) -> bool:
    """Whether converting is worth it for ``rows`` images at ``size`` px when no artefact is cached yet.

    A conversion costs a roughly fixed 5-30 s here (it depends on the weights,
    not the input size), while the time a faster engine saves grows with
    rows x size^2; it breaks even near 1,000 images at 224. Unknown ``rows`` means "large".
    """
    return rows is None or rows * (size / 224) ** 2 >= AUTO_MIN_ROWS_AT_224


def build(name: str, model, artifact_dir: Path, artifact_id: str, batch_size: int, precision: str) -> Engine:
    """Engine ``name``: its cached artefact, else a fresh conversion (a damaged artefact is converted again)."""
    record = get_record(name)
    if precision not in record.precisions:
        raise InvalidArgument(f"The {name} engine runs {', '.join(record.precisions)}; received precision "
                              f"{precision!r}.")
    reason = record.available()
    if reason:
        raise FeatcacheError(f"The {name} engine cannot run here: {reason}.")
    path = artifact_path(record, model, artifact_dir, artifact_id)
    if path is not None and path.exists():
        try:
            return record.load(model, path, batch_size, precision)
        except FeatcacheError:  # only a cache: convert again below
            pass
    if path is not None:
        record.convert(model, path)
    return record.load(model, path, batch_size, precision)


# --- auto ------------------------------------------------------------------------------------


def decision_path(model, artifact_dir: Path, artifact_id: str, precision: str) -> Path:
    return Path(artifact_dir) / f"{artifact_stem(model, artifact_id)}-auto-{precision}-{machine_id()}.json"


def measure(engine: Engine, shape: tuple, batches: int = AUTO_TIMED_BATCHES) -> float:
    """Images per second of ``engine`` on random batches of ``shape``, after one warm-up batch."""
    batch = np.random.default_rng(0).uniform(0, 255, shape).astype(np.float32)
    engine(batch)
    start = time.perf_counter()
    for _ in range(batches):
        engine(batch)
    return shape[0] * batches / (time.perf_counter() - start)


def _try(name: str, model, artifact_dir: Path, artifact_id: str, batch_size: int, precision: str, shape: tuple,
         candidates: dict, figures: dict, skipped: dict) -> None:
    try:
        candidates[name] = build(name, model, artifact_dir, artifact_id, batch_size, precision)
        figures[name] = round(measure(candidates[name], shape), 1)
        skipped.pop(name, None)
    except FeatcacheError as exc:
        skipped[name] = str(exc)


def choose(model, artifact_dir: Path, artifact_id: str, batch_size: int, precision: str,
           rows: Optional[int], log: Callable[[str], None]) -> Engine:
    """The fastest engine for ``precision`` on this machine: a cached decision, else measured now."""
    path = decision_path(model, artifact_dir, artifact_id, precision)
    if path.exists():
        try:
            import json

            decision = json.loads(path.read_text())
            return build(decision["engine"], model, artifact_dir, artifact_id, batch_size, precision)
        except (ValueError, KeyError, TypeError, FeatcacheError):
            pass  # unreadable or stale: measure again
    size = int(model.input_shape[1] or 224)
    shape = (batch_size,) + tuple(int(d or size) for d in model.input_shape[1:])
    candidates, figures, skipped, deferred = {}, {}, {}, []
    for name, record in _REGISTRY.items():
        if precision not in record.precisions:
            continue
        reason = record.available()
        converted = record.convert is None or artifact_path(record, model, artifact_dir, artifact_id).exists()
        if not reason and not converted and not conversion_pays(rows, size):
            reason = f"converting does not pay for {rows} images"
            deferred.append(name)
        if reason:
            skipped[name] = reason
            continue
        _try(name, model, artifact_dir, artifact_id, batch_size, precision, shape, candidates, figures, skipped)
    if not candidates:  # only engines that need a conversion run this precision: convert after all
        for name in deferred:
            _try(name, model, artifact_dir, artifact_id, batch_size, precision, shape, candidates, figures, skipped)
    if not candidates:
        raise FeatcacheError(f"No engine can run precision {precision} here: "
                             + "; ".join(f"{n}: {why}" for n, why in skipped.items()))
    best = max(figures, key=figures.get)
    others = ", ".join(f"{n} {figures[n]:.0f}" for n in figures if n != best)
    log(f"auto engine: {best} ({figures[best]:.0f} img/s at batch {batch_size}"
        + (f"; {others}" if others else "") + f"; measured here, kept in {path.name})")
    if not any("does not pay" in why for why in skipped.values()):  # every engine that runs here was timed
        fsio.write_json(path, {"engine": best, "precision": precision, "img_per_s": figures, "skipped": skipped,
                               "batch_size": batch_size, "machine": machine_id(), "measured_at": time.time()},
                        "engine decision")
    return candidates[best]


def make_engine(name: str, model, artifact_dir: Path, artifact_id: str, batch_size: int,
                rows: Optional[int] = None, precision: str = "f32", gpu: Optional[bool] = None,
                log: Callable[[str], None] = lambda message: None) -> Engine:
    """The engine ``name`` (or the fastest measured, for ``auto``) running ``model`` at ``precision``.

    On a GPU ``auto`` is Keras (the converted engines here are CPU ones).
    """
    resolve_engine(name)
    if name != "auto":
        return build(name, model, artifact_dir, artifact_id, batch_size, precision)
    if gpu is None:
        import tensorflow as tf

        gpu = bool(tf.config.list_physical_devices("GPU"))
    if gpu:
        return KerasEngine(model)
    return choose(model, artifact_dir, artifact_id, batch_size, precision, rows, log)


__all__ = ["ENGINES", "PRECISIONS", "Engine", "EngineRecord", "KerasEngine", "TFLiteEngine", "build", "choose",
           "convert_to_tflite", "get_record", "list_engines", "make_engine", "machine_id", "resolve_engine",
           "resolve_precision", "tflite_path"]
