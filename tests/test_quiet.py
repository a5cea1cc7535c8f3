"""The quiet CLI: TensorFlow's C++ lines hidden unless --verbose or TF_CPP_MIN_LOG_LEVEL; ours always shown."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import tiny
from featcache.cli.quiet import is_noise, wants_tensorflow_lines

TINY_CLI = str(Path(__file__).parent / "tiny.py")
# Lines seen on this project's machines (TF 2.21, LiteRT 2.3, the TFLite converter).
NOISE = [
    b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n",
    b"I0000 00:00:1796618021.147007    4771 port.cc:153] oneDNN custom operations are on. You may see slightly\n",
    b"I0000 00:00:1796618021.147293    4771 cudart_stub.cc:31] Could not find cuda drivers on your machine\n",
    b"E0000 00:00:1796618027.950618    4771 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error\n",
    b"W0000 00:00:1796618014.506265    4639 tf_tfl_flatbuffer_helpers.cc:364] Ignored output_format.\n",
    b"To enable the following instructions: AVX2 AVX512F FMA, in other operations, rebuild TensorFlow with the "
    b"appropriate compiler flags.\n",
    b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n",
    b"fully_quantize: 0, inference_type: 6, input_inference_type: FLOAT32, output_inference_type: FLOAT32\n",
]
OURS = [b"featcache: error: No run 'x' in cache/runs (see `featcache runs`).\n",
        b"\refficientnet_lite0 train/orig:  29%|###       | 14400/50000 [06:49<13:24, 44.27img/s]",
        b"INFO about my data\n", b"Traceback (most recent call last):\n",
        b"F0000 00:00:1796618021.147007    4771 check.cc:1] Check failed: fatal\n"]


def test_noise_patterns():
    assert all(is_noise(line) for line in NOISE)
    assert not any(is_noise(line) for line in OURS)
    assert wants_tensorflow_lines(["predict", "--verbose"], {}) and wants_tensorflow_lines(["-v", "runs"], {})
    assert wants_tensorflow_lines(["runs"], {"TF_CPP_MIN_LOG_LEVEL": "0"})
    assert not wants_tensorflow_lines(["runs", "--cache-dir", "v"], {})


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from featcache.exporters import ExportOptions, export_run

    tiny.register_tiny()
    root = tmp_path_factory.mktemp("quiet")
    data = tiny.make_data(root / "data", n_train=10, n_test=1)
    run = tiny.head_run(tiny.tiny_settings(data, root / "cache"), "linear")
    entry = export_run(run.run_id, root / "cache", ExportOptions(format="tflite"), log=lambda m: None)
    return run, root / "cache", entry["path"], sorted((data / "test").glob("*/*"))[0]


def cli(*args, **env):
    base = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}  # conftest sets it
    return subprocess.run([sys.executable, TINY_CLI, *map(str, args)], capture_output=True, text=True, timeout=300,
                          env={**base, **env})


def test_tensorflow_lines_hidden_and_ours_kept(exported):
    run, cache_dir, model, image = exported
    quiet = cli("predict", model, image)
    assert quiet.returncode == 0 and quiet.stdout.startswith(f"{image}: ") and quiet.stderr == "", quiet.stderr
    done = cli("export", run.run_id, "--cache-dir", cache_dir, "--force")
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert "self-check: validation accuracy" in done.stdout and "wrote " in done.stdout
    bad = cli("export", "nosuchrun", "--cache-dir", cache_dir)
    assert bad.returncode == 1 and bad.stderr.splitlines() == [
        f"featcache: error: No run 'nosuchrun' in {cache_dir / 'runs'} (see `featcache runs`)."]
    for loud in (cli("predict", model, image, "--verbose"), cli("--verbose", "predict", model, image),
                 cli("predict", model, image, TF_CPP_MIN_LOG_LEVEL="0")):
        assert loud.returncode == 0 and loud.stdout == quiet.stdout
        assert any(is_noise(line.encode()) for line in loud.stderr.splitlines()), loud.stderr
