"""Writes are whole or absent: a full disk or a read-only folder ends in one line and leaves work resumable.

The real-mount tests use a small tmpfs (a real full disk) and a read-only bind mount
(a real read-only file system); tests run as root in CI. Where mounting is not
permitted they are skipped, saying so.
"""

import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image_folder, make_npz

from featcache import fsio
from featcache.cache import load_features
from featcache.errors import FeatcacheError


def run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "featcache", *args], capture_output=True, text=True, timeout=timeout)


def one_error(result) -> str:
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("featcache: error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def _mount(*args) -> None:
    done = subprocess.run(["mount", *args], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"mounting is not permitted here ({done.stderr.strip() or done.returncode})")


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB tmpfs: a real file system that fills up."""
    target = tmp_path / "small"
    target.mkdir()
    _mount("-t", "tmpfs", "-o", "size=3M", "tmpfs", str(target))
    yield target
    subprocess.run(["umount", "-l", str(target)], check=False)


@pytest.fixture
def read_only(tmp_path):
    """A folder whose bind mount is read-only (root ignores permission bits, not a read-only mount)."""
    source = tmp_path / "rw"
    source.mkdir()
    target = tmp_path / "ro"
    target.mkdir()
    _mount("--bind", str(source), str(target))
    done = subprocess.run(["mount", "-o", "remount,bind,ro", str(target)], capture_output=True, text=True)
    if done.returncode != 0:
        subprocess.run(["umount", "-l", str(target)], check=False)
        pytest.skip(f"a read-only remount is not permitted here ({done.stderr.strip()})")
    yield target
    subprocess.run(["umount", "-l", str(target)], check=False)


def _hidden_temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*") if ".tmp" in p.name]


# --- the helper itself ----------------------------------------------------------------------


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(ZeroDivisionError):
        with fsio.atomic_path(target, "test file") as tmp:
            tmp.write_text("half")
            1 / 0
    assert not target.exists() and list(tmp_path.iterdir()) == []
    fsio.write_json(target, {"a": 1})
    assert target.read_text().strip().startswith("{") and list(tmp_path.iterdir()) == [target]
    with pytest.raises(FeatcacheError, match="already exists"):
        with fsio.atomic_path(target, "test file", replace=False) as tmp:
            tmp.write_text("other")
    assert '"a": 1' in target.read_text() and list(tmp_path.iterdir()) == [target]


def test_write_into_a_file_or_missing_parent_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(fsio.DiskError, match="Cannot write test file"):
        fsio.write_bytes(blocker / "inside.bin", b"1", "test file")
    with pytest.raises(fsio.DiskError, match="a file of that name is in the way"):
        fsio.make_dirs(blocker)
    assert blocker.read_text() == "x"


def test_remove_owned_refuses_outside_and_does_not_follow_symlinks(tmp_path):
    root = tmp_path / "cache"
    root.mkdir()
    outside = tmp_path / "keep"
    outside.mkdir()
    (outside / "data").write_text("mine")
    link = root / "link"
    link.symlink_to(outside)
    with pytest.raises(FeatcacheError, match="not inside"):
        fsio.remove_owned(outside, root)
    with pytest.raises(FeatcacheError, match="not inside"):
        fsio.remove_owned(link / "data", root)
    assert fsio.remove_owned(link, root) is True
    assert (outside / "data").read_text() == "mine" and not link.exists()


def test_require_space_refuses_before_writing(tmp_path):
    with pytest.raises(fsio.DiskError, match="needs about .* free"):
        fsio.require_space(tmp_path, 1 << 62, "a huge file")
    fsio.require_space(tmp_path, 1, "a tiny file")


# --- real full disk -----------------------------------------------------------------------


def test_full_disk_during_features_is_one_line_and_resumes(tmp_path, small_disk):
    data = make_npz(tmp_path / "data.npz", n_train=240, n_test=6)
    args = ["features", "-b", "resnet50", "-w", "none", "-d", str(data), "-s", "32", "--dtype", "float32",
            "--split", "train", "--engine", "keras", "--chunk-rows", "48", "--cache-dir", str(small_disk),
            "--no-progress"]
    line = one_error(run(*args))  # 240 x 2048 float32 = 1.9 MB of chunks, and as much again for the file
    assert "disk" in line and str(small_disk) in line, line
    assert list(small_disk.glob("*.h5")) == []  # no cache file that looks complete
    assert _hidden_temporaries(small_disk) == []
    parts = list(small_disk.glob("*.h5.parts"))
    assert len(parts) == 1 and list(parts[0].glob("*.npz")), "the finished chunks are kept for the resume"

    subprocess.run(["mount", "-o", "remount,size=12M", str(small_disk)], check=True)
    resumed = run(*args)
    assert resumed.returncode == 0, resumed.stderr
    (cache_file,) = small_disk.glob("*.h5")
    loaded = load_features(cache_file)
    assert loaded.features.shape == (240, 2048) and np.isfinite(loaded.features).all()
    np.testing.assert_array_equal(loaded.labels, np.load(data)["y_train"][loaded.indices])
    assert not parts[0].exists() and _hidden_temporaries(small_disk) == []


def test_full_disk_while_unpacking_an_archive(tmp_path, small_disk):
    root = make_image_folder(tmp_path / "photos", n_train=8, n_test=2, size=64)
    rng = np.random.default_rng(0)
    big = root / "train" / "cat" / "noise.bin.png"
    from PIL import Image

    Image.fromarray(rng.integers(0, 255, (1100, 1100, 3), dtype=np.uint8)).save(big)  # ~3.6 MB, incompressible
    archive = tmp_path / "photos.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root, arcname="photos")
    line = one_error(run("features", "-b", "resnet50", "-w", "none", "-d", str(archive), "-s", "32",
                         "--cache-dir", str(small_disk), "--no-progress"))
    assert "disk" in line, line
    datasets = small_disk / "datasets"
    left = [p.name for p in datasets.iterdir()] if datasets.exists() else []
    assert [name for name in left if not name.endswith(".lock")] == [], left  # no half-unpacked dataset
    assert _hidden_temporaries(small_disk) == []


# --- real read-only file system -----------------------------------------------------------


@pytest.mark.parametrize("kind", ["npz", "folder", "archive"])
def test_read_only_cache_folder_is_one_line(tmp_path, read_only, kind):
    root = make_image_folder(tmp_path / "photos", n_train=3, n_test=1)
    if kind == "npz":
        data = make_npz(tmp_path / "data.npz")
    elif kind == "folder":
        data = root
    else:
        data = tmp_path / "photos.tar.gz"
        with tarfile.open(data, "w:gz") as tar:
            tar.add(root, arcname="photos")
    line = one_error(run("features", "-b", "resnet50", "-w", "none", "-d", str(data), "-s", "32",
                         "--cache-dir", str(read_only), "--no-progress"))
    assert "read-only" in line, line
    assert list(read_only.iterdir()) == []


def test_cache_dir_that_is_a_file_is_one_line(tmp_path, image_folder):
    blocker = tmp_path / "cache"
    blocker.write_text("my notes")
    for data in (str(image_folder), str(make_npz(tmp_path / "d.npz"))):
        line = one_error(run("features", "-b", "resnet50", "-w", "none", "-d", data, "-s", "32",
                             "--cache-dir", str(blocker), "--no-progress"))
        assert str(blocker) in line and ("in the way" in line or "not a folder" in line), line
    assert blocker.read_text() == "my notes"


def test_head_run_on_a_full_disk_records_nothing(tmp_path, small_disk):
    data = make_npz(tmp_path / "data.npz", n_train=60, n_test=12)
    ok = run("features", "-b", "resnet50", "-w", "none", "-d", str(data), "-s", "32", "--engine", "keras",
             "--cache-dir", str(small_disk), "--no-progress")
    assert ok.returncode == 0, ok.stderr
    filler = small_disk / "filler.bin"
    free = fsio.free_bytes(small_disk)
    with open(filler, "wb") as fh:  # leave almost nothing free: the run folder cannot be written
        fh.write(b"\0" * max(free - 8192, 0))
    line = one_error(run("head", "-b", "resnet50", "-w", "none", "-d", str(data), "-s", "32", "--head", "logreg",
                         "--cache-dir", str(small_disk)))
    assert "disk" in line, line
    runs = small_disk / "runs"
    assert not runs.exists() or [p for p in runs.iterdir() if not p.name.startswith(".finetune")] == []
    assert _hidden_temporaries(small_disk) == []
