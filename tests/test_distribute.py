"""tf.distribute extraction on CPU: two logical devices (mirrored) and two local worker processes (multiworker).

Each distributed run happens in fresh subprocesses (logical devices and
collective ops must be configured before TensorFlow starts) and is compared
with a single-process run of the same settings.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import make_npz

from featcache.cache import load_features
from featcache.distribute import Cluster, check_strategy, cluster_from_env, shard_bounds
from featcache.errors import FeatcacheError, InvalidArgument
from featcache.extraction import ExtractOptions, extract
from featcache.settings import FeatureSettings

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 300


def settings(data, cache_dir) -> FeatureSettings:
    return FeatureSettings(backbone="resnet50", weights="none", data=str(data), size=32, dtype="float32",
                           cache_dir=str(cache_dir))


def single_process(data, cache_dir, batch_size=4):
    paths = extract(settings(data, cache_dir), ExtractOptions(progress=False, batch_size=batch_size, chunk_rows=4,
                                                              engine="keras"), log=lambda m: None)
    return [load_features(p) for p in paths]


def env() -> dict:
    out = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    out.update(TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT))
    return out


def test_shards_are_contiguous_whole_batches_covering_every_row():
    for n, batch, workers in [(18, 4, 2), (6, 4, 2), (1, 4, 3), (100, 7, 3), (0, 4, 2)]:
        bounds = [shard_bounds(n, batch, workers, r) for r in range(workers)]
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        assert all(start % batch == 0 or start == n for start, _ in bounds)  # empty shards sit at the end


def test_cluster_from_tf_config():
    worker = {"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}, "task": {"type": "worker", "index": 1}}
    assert cluster_from_env({"TF_CONFIG": json.dumps(worker)}) == Cluster(rank=1, workers=2)
    chief = {"cluster": {"chief": ["a:1"], "worker": ["b:1"]}, "task": {"type": "worker", "index": 0}}
    assert cluster_from_env({"TF_CONFIG": json.dumps(chief)}) == Cluster(rank=1, workers=2)
    with pytest.raises(FeatcacheError, match="needs TF_CONFIG"):
        cluster_from_env({})
    with pytest.raises(FeatcacheError, match="TF_CONFIG is not valid"):
        cluster_from_env({"TF_CONFIG": "{"})
    bad = {**worker, "task": {"type": "worker", "index": 2}}
    with pytest.raises(FeatcacheError, match="outside the 2 worker"):
        cluster_from_env({"TF_CONFIG": json.dumps(bad)})


def test_bad_strategy_arguments_fail_before_any_work(tmp_path, monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(InvalidArgument, match="Unknown strategy 'ring'; expected one of: 'none', 'mirrored'"):
        check_strategy("ring")
    with pytest.raises(InvalidArgument, match="--engine tflite runs outside tf.distribute"):
        check_strategy("mirrored", "tflite")
    cache_dir = tmp_path / "cache"
    with pytest.raises(FeatcacheError, match="needs TF_CONFIG"):
        extract(settings(make_npz(tmp_path / "d.npz"), cache_dir), ExtractOptions(strategy="multiworker"),
                log=lambda m: None)
    assert not cache_dir.exists()


MIRRORED = textwrap.dedent("""
    import sys
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from featcache.distribute import Distribution
    from featcache.extraction import ExtractOptions, extract
    from featcache.settings import FeatureSettings
    assert len(Distribution("mirrored").strategy().extended.worker_devices) == 2
    settings = FeatureSettings(backbone="resnet50", weights="none", data=sys.argv[1], size=32, dtype="float32",
                               cache_dir=sys.argv[2])
    extract(settings, ExtractOptions(progress=False, batch_size=5, chunk_rows=5, strategy="mirrored"))
""")


def test_mirrored_over_two_logical_cpus_equals_single_process(tmp_path):
    data = make_npz(tmp_path / "d.npz")  # 12 + 6 rows, batches of 5: last batches of 2 and 1 split over 2 replicas
    run = subprocess.run([sys.executable, "-c", MIRRORED, str(data), str(tmp_path / "mirrored")], env=env(),
                         capture_output=True, text=True, timeout=TIMEOUT)
    assert run.returncode == 0, run.stderr[-3000:]
    expected = single_process(data, tmp_path / "single", batch_size=5)
    for want in expected:
        got = load_features(tmp_path / "mirrored" / want.path.name)
        assert got.attrs["engine"] == "keras/mirrored"
        assert np.array_equal(got.indices, want.indices) and np.array_equal(got.labels, want.labels)
        np.testing.assert_allclose(got.features, want.features, rtol=1e-5, atol=1e-5)


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def test_multiworker_merge_equals_single_process_row_for_row(tmp_path):
    """Two workers on localhost; 12 train rows = shards 0..8 / 8..12, 6 test rows = 0..4 / 4..6."""
    data = make_npz(tmp_path / "d.npz")
    cache_dir = tmp_path / "multi"
    workers = [f"127.0.0.1:{p}" for p in free_ports(2)]
    command = [sys.executable, "-m", "featcache", "features", "--backbone", "resnet50", "--weights", "none",
               "--data", str(data), "--size", "32", "--dtype", "float32", "--cache-dir", str(cache_dir),
               "--batch-size", "4", "--chunk-rows", "4", "--engine", "auto", "--strategy", "multiworker",
               "--no-progress"]
    procs = []
    for index in range(2):
        config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        procs.append(subprocess.Popen(command, env={**env(), "TF_CONFIG": json.dumps(config)}, cwd=tmp_path,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=TIMEOUT))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, out[-2000:] + err[-3000:]
    assert "waiting for the chief" in outputs[1][0] and "from 2 workers" in outputs[0][0]
    expected = single_process(data, tmp_path / "single")
    for want in expected:
        got = load_features(cache_dir / want.path.name)
        assert got.attrs["engine"] == "keras/multiworker" and got.attrs["workers"] == 2
        assert np.array_equal(got.indices, want.indices) and np.array_equal(got.labels, want.labels)
        # Shards start on batch boundaries, so every batch is the one the single process ran.
        np.testing.assert_array_equal(got.features, want.features)
    assert sorted(p.name for p in cache_dir.iterdir() if not p.name.endswith((".h5", ".lock"))) == []
