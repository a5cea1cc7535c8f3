"""Destructive commands touch only featcache's own files; decoys beside and outside the cache survive."""

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from featcache import cache
from featcache.cache import FeatureKey, write_features
from featcache.errors import FeatcacheError

ROOT = Path(__file__).resolve().parents[1]
KEY = FeatureKey("resnet50", "none", 32, "caffe", "avg", "float16", "abc123", "train", "orig")


def run(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, "-m", "featcache", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300, env=env)


def one_error(result) -> str:
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("featcache: error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def _real_cache(cache_dir: Path) -> Path:
    n = 6
    return write_features(cache_dir / KEY.filename, np.zeros((n, 4), np.float16), np.arange(n) % 2,
                          np.arange(n), KEY, ["a", "b"])


def _decoys(tmp_path: Path, cache_dir: Path) -> dict:
    outside = tmp_path / "notes.txt"
    outside.write_text("mine")
    named_like_ours = cache_dir / "resnet50-32-train-orig-0123456789ab.h5"
    named_like_ours.write_text("not hdf5")
    plain_hdf5 = cache_dir / "vgg19-32-train-orig-aaaaaaaaaaaa.h5"
    with h5py.File(plain_hdf5, "w") as fh:
        fh["x"] = np.arange(3)
    folder = cache_dir / "xception-71-test-orig-bbbbbbbbbbbb.h5"
    folder.mkdir()
    (folder / "keep").write_text("keep")
    return {"outside": outside, "named": named_like_ours, "plain": plain_hdf5, "folder": folder}


def _snapshot(paths) -> dict:
    return {p: (p.read_bytes() if p.is_file() else sorted(x.name for x in p.iterdir())) for p in paths}


def test_cache_rm_refuses_everything_that_is_not_a_featcache_cache(tmp_path, cache_dir):
    decoys = _decoys(tmp_path, cache_dir)
    before = _snapshot(decoys.values())
    for name, path in decoys.items():
        line = one_error(run("cache", "rm", str(path), "--cache-dir", str(cache_dir)))
        assert "Refusing to delete" in line, (name, line)
        assert not path.with_name(path.name + ".lock").exists(), name
    assert "Refusing" in one_error(run("cache", "rm", "notes.txt", "--cache-dir", "nope", cwd=tmp_path))
    assert "Give a cache key" in one_error(run("cache", "rm", "", "--cache-dir", str(cache_dir)))
    assert "No cache file or key" in one_error(run("cache", "rm", "fffff", "--cache-dir", str(cache_dir)))
    assert _snapshot(decoys.values()) == before


def test_cache_rm_refuses_a_cache_outside_the_cache_folder_and_one_whose_key_does_not_match(tmp_path, cache_dir):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    foreign = _real_cache(elsewhere)
    with pytest.raises(FeatcacheError, match="not inside the cache folder"):
        cache.owned_cache(cache_dir, str(foreign))
    renamed = cache_dir / "resnet50-32-train-orig-cccccccccccc.h5"
    renamed.write_bytes(foreign.read_bytes())
    with pytest.raises(FeatcacheError, match="does not match its name"):
        cache.owned_cache(cache_dir, str(renamed))
    link = cache_dir / "link"
    link.symlink_to(elsewhere)
    with pytest.raises(FeatcacheError, match="not inside the cache folder"):
        cache.owned_cache(cache_dir, str(link / foreign.name))
    assert foreign.exists() and renamed.exists()


def test_cache_rm_removes_a_real_cache_with_its_parts_and_keeps_decoys(tmp_path, cache_dir):
    decoys = _decoys(tmp_path, cache_dir)
    before = _snapshot(decoys.values())
    path = _real_cache(cache_dir)
    parts = path.with_name(path.name + ".parts")
    parts.mkdir()
    (parts / "chunk-000000.npz").write_bytes(b"x")
    result = run("cache", "rm", KEY.digest, "--cache-dir", str(cache_dir))
    assert result.returncode == 0, result.stderr
    assert not path.exists() and not parts.exists()
    assert _snapshot(decoys.values()) == before


def test_info_and_verify_do_not_suggest_rm_for_a_foreign_file(tmp_path, cache_dir):
    decoys = _decoys(tmp_path, cache_dir)
    for path in (decoys["named"], decoys["plain"], decoys["outside"]):
        for command in ("info", "verify"):
            result = run("cache", command, str(path), "--cache-dir", str(cache_dir))
            assert result.returncode != 0 and "Traceback" not in result.stderr
            assert "cache rm" not in result.stdout + result.stderr, (command, path)
    folder = one_error(run("cache", "info", str(decoys["folder"]), "--cache-dir", str(cache_dir)))
    assert "is a folder" in folder


def _make(*args):
    return subprocess.run(["make", "-C", str(ROOT), "--no-print-directory", f"FC={sys.executable} -m featcache",
                           *args], capture_output=True, text=True, timeout=300)


def _populate(cache_dir: Path) -> tuple[list[Path], list[Path]]:
    """featcache artefacts (to go) and decoys (to stay) in one cache folder."""
    ours = [_real_cache(cache_dir)]
    base = cache_dir / KEY.filename
    for suffix in (".lock", ".parts"):
        ours.append(base.with_name(base.name + suffix))
    ours[2].mkdir()
    (ours[2] / "meta.json").write_text("{}")
    ours[1].write_text("")
    ours.append(cache_dir / f".{KEY.filename}.123.tmp")
    ours[-1].write_bytes(b"half")
    run_dir = cache_dir / "runs" / "20261204-000000-mlp-abc"
    run_dir.mkdir(parents=True)
    (run_dir / "record.json").write_text("{}")
    extracted = cache_dir / "datasets" / "cifar-0123456789"
    extracted.mkdir(parents=True)
    (extracted / ".featcache-extracted").write_text("x")
    ours += [run_dir, extracted]
    decoys = [cache_dir / "my-notes.txt", cache_dir / "runs" / "my-run-notes", cache_dir / "datasets" / "photos",
              cache_dir / "resnet50-32-train-orig-0123456789ab.h5"]
    for decoy in decoys:
        decoy.parent.mkdir(parents=True, exist_ok=True)
        if decoy.suffix:
            decoy.write_text("mine")
        else:
            decoy.mkdir()
            (decoy / "precious.jpg").write_bytes(b"jpeg")
    return ours, decoys


@pytest.mark.parametrize("folder_name", ["cache", "my cache é"])
def test_make_clean_removes_only_featcache_artefacts(tmp_path, folder_name):
    cache_dir = tmp_path / folder_name
    cache_dir.mkdir()
    (cache_dir / ".gitkeep").write_text("")
    outside = tmp_path / "outside.txt"
    outside.write_text("mine")
    ours, decoys = _populate(cache_dir)
    result = _make("clean", f"CACHE_DIR={cache_dir}")
    assert result.returncode == 0, result.stderr
    assert [p for p in ours if p.exists()] == []
    assert all(p.exists() for p in decoys) and outside.exists() and (cache_dir / ".gitkeep").exists()
    assert "kept" in result.stdout and "my-notes.txt" in result.stdout


@pytest.mark.parametrize("value, message", [
    ("", "CACHE_DIR is empty"), ("/", "root or a home folder"), ("~", "root or a home folder"),
    (str(ROOT), "project folder"), ("/nonexistent-cache", "does not exist"),
])
def test_make_clean_refuses_folders_that_are_not_cache_folders(value, message):
    before = sorted(p.name for p in ROOT.iterdir())
    result = _make("clean", f"CACHE_DIR={value}")
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr
    assert sorted(p.name for p in ROOT.iterdir()) == before and (ROOT / ".git").exists()


def test_clean_leaves_a_key_that_is_being_written(cache_dir):
    path = _real_cache(cache_dir)
    with cache.lock_for(path):
        from featcache.cleaning import clean

        report = clean(cache_dir)
    assert path.exists() and path in report.busy
