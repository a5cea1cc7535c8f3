"""The engine records, their artefacts under ``CACHE_DIR/engines/``, and the one path that builds an engine."""

from __future__ import annotations

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
from .machine import native_bf16

PRECISIONS = ("auto", "f32", "bf16")


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


def check_precision(precision: str, engine: str = "auto") -> str:
    """Validate ``--precision`` with ``--engine`` up front; bf16 must be native here, never emulated."""
    if precision not in PRECISIONS:
        raise choice_error("precision", PRECISIONS, precision)
    resolve_engine(engine)
    if precision != "bf16":
        return precision
    runs_bf16 = [name for name, record in _REGISTRY.items() if "bf16" in record.precisions]
    if engine != "auto" and engine not in runs_bf16:
        raise InvalidArgument(f"--precision bf16 runs on the {' or '.join(runs_bf16)} engine; "
                              f"received --engine {engine}.")
    reasons = [f"{name}: {get_record(name).available()}" for name in runs_bf16 if get_record(name).available()]
    if len(reasons) == len(runs_bf16):
        raise FeatcacheError(f"--precision bf16 needs the openvino engine, but {'; '.join(reasons)}.")
    if not native_bf16():
        raise FeatcacheError("--precision bf16 needs a CPU with AMX or AVX512-BF16 (neither is in /proc/cpuinfo); "
                             "use --precision f32.")
    return precision


def runnable_precisions(record: EngineRecord, precision: str) -> list[str]:
    """The precisions ``record`` may run for a ``--precision`` value: bf16 only where the CPU computes it."""
    if precision == "auto":
        return [p for p in record.precisions if p != "bf16" or native_bf16()]
    return [precision] if precision in record.precisions else []


# --- artefacts -------------------------------------------------------------------------------


def library_versions() -> str:
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
    return f"{artifact_id}-{library_versions()}{suffix}"


def artifact_path(record: EngineRecord, model, artifact_dir: Path, artifact_id: str) -> Optional[Path]:
    if record.convert is None:
        return None
    version = record.version()
    tag = f"-{record.name}{version}" if version else ""
    return Path(artifact_dir) / f"{artifact_stem(model, artifact_id)}{tag}{record.suffix}"


def tflite_path(model, artifact_dir: Path, artifact_id: str) -> Path:
    return artifact_path(_REGISTRY["tflite"], model, artifact_dir, artifact_id)


def is_converted(record: EngineRecord, model, artifact_dir: Path, artifact_id: str) -> bool:
    return record.convert is None or artifact_path(record, model, artifact_dir, artifact_id).exists()


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
        except FeatcacheError:  # only a cache of ours (our name, inside our folder): convert again below
            fsio.remove_owned(path, artifact_dir, "damaged engine artefact")
    if path is not None:
        record.convert(model, path)
    return record.load(model, path, batch_size, precision)
