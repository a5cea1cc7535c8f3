"""The machine a figure was measured on, and the name of its results files."""

from __future__ import annotations

import os
import platform
import socket
import time


def cpu_model() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The SIMD flags that decide kernel choice (AVX2/FMA/AVX-512)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    return sorted(f for f in flags if f in ("avx", "avx2", "fma", "f16c") or f.startswith("avx512"))
    except OSError:
        pass
    return []


def machine_info() -> dict:
    """CPU model, cores, memory, library versions: what a reader needs to compare figures."""
    import numpy as np

    try:
        import tensorflow as tf

        tf_version = tf.__version__
        gpus = len(tf.config.list_physical_devices("GPU"))
    except ImportError:  # pragma: no cover
        tf_version, gpus = "absent", 0
    try:
        import keras

        keras_version = keras.__version__
    except ImportError:  # pragma: no cover
        keras_version = "absent"
    try:
        from importlib.metadata import version

        litert = version("ai-edge-litert")
    except Exception:
        litert = "absent"
    mem_gb = None
    try:
        with open("/proc/meminfo") as fh:
            mem_gb = round(int(fh.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    cores = os.cpu_count()
    info = {
        "date": time.strftime("%Y-%m-%d"),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": socket.gethostname(),
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cores": cores,
        "memory_gb": mem_gb,
        "gpus": gpus,
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "tensorflow": tf_version,
        "keras": keras_version,
        "numpy": np.__version__,
        "ai_edge_litert": litert,
    }
    info["description"] = (f"{info['cpu_model']} ({'/'.join(info['cpu_flags']) or 'no AVX'}), {cores} cores, "
                           f"{mem_gb} GB RAM, {gpus} GPU; TF {tf_version}, Keras {keras_version}, "
                           f"LiteRT {litert}, numpy {np.__version__}")
    return info


def result_stem() -> str:
    """``<date>-<host>``: one results file per machine and day."""
    return f"{time.strftime('%Y-%m-%d')}-{socket.gethostname()}"
