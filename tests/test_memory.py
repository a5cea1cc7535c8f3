"""An input size that cannot fit in memory is refused with an estimate before anything runs."""

import subprocess
import sys

import keras
import pytest
from conftest import make_npz

from featcache.errors import FeatcacheError
from featcache.memory import available_bytes, estimate_bytes, largest_activation, require_memory


def _convnet(size: int):
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same")(inputs)
    x = keras.layers.Conv2D(16, 3, padding="same")(x)
    return keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))


def test_estimate_follows_the_largest_map():
    model = _convnet(64)
    assert largest_activation(model) == 32 * 32 * 16
    assert estimate_bytes(model, 10) == 32 * 32 * 16 * 3 * 10 * 4
    assert estimate_bytes(_convnet(128), 10) == 4 * estimate_bytes(model, 10)


def test_refused_beyond_the_memory_warned_near_it():
    model = _convnet(64)
    need = estimate_bytes(model, 10)
    with pytest.raises(FeatcacheError, match=r"input 64x64 with batch 10 needs about .* lower --size or --batch-size"):
        require_memory(model, 10, "convnet", available=need)
    said = []
    require_memory(model, 10, "convnet", log=said.append, available=int(need * 1.5))
    assert len(said) == 1 and said[0].startswith("warning:")
    said.clear()
    require_memory(model, 10, "convnet", log=said.append, available=need * 10)
    assert said == []
    assert available_bytes() > 0


def test_features_at_size_4000_is_refused_in_one_line(tmp_path):
    data = make_npz(tmp_path / "d.npz")
    result = subprocess.run([sys.executable, "-m", "featcache", "features", "-b", "efficientnet_lite0", "-w", "none",
                             "-d", str(data), "-s", "4000", "--cache-dir", str(tmp_path / "cache"), "--no-progress"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("featcache: error:")]
    assert "4000x4000" in line and "needs about" in line and "GB" in line, line
    cache = tmp_path / "cache"
    left = [p.name for p in cache.iterdir()] if cache.exists() else []
    assert [name for name in left if not name.endswith(".lock")] == [], left  # nothing but a key's lock
