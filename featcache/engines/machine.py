"""What this CPU offers the engines, read from /proc/cpuinfo (no model, no TensorFlow)."""

from __future__ import annotations

import hashlib
import os
import platform

# CPU flags with native bf16 arithmetic (AMX tiles, AVX512-BF16). Without them OpenVINO's CPU plugin
# ignores the bf16 hint and computes in f32, so a cache labelled bf16 would hold f32 numbers.
BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_bf16() -> bool:
    return bool(cpu_flags() & set(BF16_FLAGS))


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_id() -> str:
    """Names the machine an 'auto' decision was measured on: CPU model, its bf16 flags and core count."""
    flags = sorted(cpu_flags() & set(BF16_FLAGS))
    text = f"{cpu_model()}|{','.join(flags)}|{os.cpu_count()}"
    return hashlib.sha256(text.encode()).hexdigest()[:10]
