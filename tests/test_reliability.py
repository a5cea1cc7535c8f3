"""Crash safety across processes: kill -9 and resume, one writer per key, disk errors, damaged caches.

The extraction runs in subprocesses through the CLI, as a user runs it; the
reference is an uninterrupted run with the same settings.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import make_npz

from featcache.cache import check, load_features, lock_for
from featcache.errors import FeatcacheError
from featcache.extraction import ExtractOptions, extract
from featcache.settings import FeatureSettings

BACKBONE = "mobilenetv2"  # quick to build
ROWS, CHUNK = 3072, 64  # 48 chunks: long enough to kill at several points, a few seconds in all


def features_args(data: Path, cache_dir: Path) -> list[str]:
    return ["features", "-b", BACKBONE, "-w", "none", "-d", str(data), "-s", "32", "--split", "train",
            "--engine", "keras", "--batch-size", "32", "--chunk-rows", str(CHUNK), "--cache-dir", str(cache_dir),
            "--no-progress"]


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "featcache", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> tuple[str, str]:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return out, err


def chunks(cache_dir: Path) -> int:
    return len(list(cache_dir.glob("*.parts/chunk-*.npz")))


def assert_no_debris(cache_dir: Path) -> None:
    """A finished key leaves its file, its lock and nothing else: no temporary files, no parts."""
    assert not list(cache_dir.rglob("*.tmp")) and not list(cache_dir.glob("*.parts"))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_npz(tmp_path_factory.mktemp("data") / "d.npz", n_train=ROWS, n_test=30, size=8)


@pytest.fixture(scope="module")
def clean(data, tmp_path_factory):
    """The uninterrupted run every other result must equal."""
    cache_dir = tmp_path_factory.mktemp("clean")
    finish(start(features_args(data, cache_dir)))
    (path,) = cache_dir.glob("*.h5")
    return path, load_features(path)


def test_kill_9_at_several_points_then_resume_bit_identical(data, clean, tmp_path):
    cache_dir = tmp_path / "cache"
    args = features_args(data, cache_dir)
    killed_at = [0]
    for target in (1, 16, 32):  # chunks on disk when the process is killed
        proc = start(args)
        deadline = time.monotonic() + 240
        while (done := chunks(cache_dir)) < target and proc.poll() is None and time.monotonic() < deadline:
            # A run that started over instead of resuming would first drop the earlier chunks.
            assert done >= killed_at[-1], f"chunks fell from {killed_at[-1]} to {done}: the run restarted"
            time.sleep(0.005)
        assert proc.poll() is None, "extraction finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        killed_at.append(chunks(cache_dir))
        assert not list(cache_dir.glob("*.h5")), "a killed run must not leave a file that looks complete"
    assert killed_at[1] >= 1, killed_at
    out, _ = finish(start(args))
    assert f"resuming {clean[0].name} at row {killed_at[-1] * CHUNK}/{ROWS}" in out
    (path,) = cache_dir.glob("*.h5")
    resumed = load_features(path)
    assert path.name == clean[0].name
    for name in ("features", "labels", "indices"):
        assert np.array_equal(getattr(resumed, name), getattr(clean[1], name)), name
    assert_no_debris(cache_dir)


def test_two_extractions_of_one_key_write_one_file(data, clean, tmp_path):
    cache_dir = tmp_path / "cache"
    first, second = start(features_args(data, cache_dir)), start(features_args(data, cache_dir))
    outputs = [finish(first)[0], finish(second)[0]]
    assert sum("wrote " in out for out in outputs) == 1, outputs
    assert sum("reusing cache" in out for out in outputs) == 1, outputs
    # They overlapped: the second met the lock, not a finished file.
    assert any("waiting: another featcache process" in out or "meanwhile" in out for out in outputs), outputs
    (path,) = cache_dir.glob("*.h5")
    assert np.array_equal(load_features(path).features, clean[1].features)
    assert_no_debris(cache_dir)


@pytest.mark.timeout(240)  # readline() below has no deadline of its own
def test_second_writer_says_it_waits_for_the_lock(data, clean, tmp_path):
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    lock = lock_for(cache_dir / clean[0].name)
    lock.acquire()
    proc = start(features_args(data, cache_dir))
    try:
        line = ""
        while "waiting" not in line:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, proc.stderr.read()
        assert "another featcache process is writing" in line
        time.sleep(0.5)
        assert proc.poll() is None and not list(cache_dir.glob("*.parts")), "it must wait, not write"
    finally:
        lock.release()
    finish(proc)
    (path,) = cache_dir.glob("*.h5")
    assert np.array_equal(load_features(path).features, clean[1].features)


QUIET = ExtractOptions(progress=False, batch_size=8, chunk_rows=16, engine="keras", splits=("train",))


def small_settings(data: Path, cache_dir: Path) -> FeatureSettings:
    return FeatureSettings(backbone=BACKBONE, weights="none", data=str(data), size=32, cache_dir=str(cache_dir))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """60 rows in four chunks, and their uninterrupted extraction."""
    folder = tmp_path_factory.mktemp("small")
    data = make_npz(folder / "d.npz", n_train=60, n_test=6)
    return data, load_features(extract(small_settings(data, folder / "clean"), QUIET, log=lambda m: None)[0])


def fail_fsync_of(monkeypatch, pattern: str, code: int) -> None:
    """Make ``os.fsync`` fail with ``code`` for files whose path matches ``pattern``, as a full disk would."""
    real = os.fsync

    def fsync(fd):
        if re.search(pattern, os.readlink(f"/proc/self/fd/{fd}")):
            raise OSError(code, os.strerror(code))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name a descriptor's file")
@pytest.mark.parametrize("where, kept, code, reason", [
    ("chunk-000002", 2, errno.ENOSPC, "the disk is full"),
    ("chunk-000002", 2, errno.EROFS, "the file system is read-only"),
    ("chunk-000002", 2, errno.EACCES, "permission denied"),
    (r"\.h5\.\d+\.tmp$", 4, errno.ENOSPC, "the disk is full"),  # while assembling the final file
])
def test_disk_errors_keep_finished_chunks_and_leave_no_cache_file(small, tmp_path, monkeypatch, where, kept, code,
                                                                 reason):
    data, clean = small
    cache_dir = tmp_path / "cache"
    fail_fsync_of(monkeypatch, where, code)
    with pytest.raises(FeatcacheError, match=f"{reason}.*rerun the same command") as info:
        extract(small_settings(data, cache_dir), QUIET, log=lambda m: None)
    assert "\n" not in str(info.value)
    assert not list(cache_dir.glob("*.h5")) and not list(cache_dir.rglob("*.tmp"))
    assert chunks(cache_dir) == kept
    monkeypatch.undo()
    messages = []
    resumed = load_features(extract(small_settings(data, cache_dir), QUIET, log=messages.append)[0])
    assert any(f"at row {min(kept * 16, 60)}/60" in m for m in messages), messages
    assert np.array_equal(resumed.features, clean.features)
    assert_no_debris(cache_dir)


def stop_at_chunk(data: Path, cache_dir: Path, monkeypatch, chunk: int) -> None:
    """Leave an interrupted extraction with ``chunk`` whole chunks on disk."""
    fail_fsync_of(monkeypatch, f"chunk-{chunk:06d}", errno.ENOSPC)
    with pytest.raises(FeatcacheError):
        extract(small_settings(data, cache_dir), QUIET, log=lambda m: None)
    monkeypatch.undo()
    assert chunks(cache_dir) == chunk


def test_resume_with_other_settings_starts_over_and_says_why(small, tmp_path, monkeypatch):
    data = small[0]
    cache_dir = tmp_path / "cache"
    stop_at_chunk(data, cache_dir, monkeypatch, 2)
    messages = []
    other = ExtractOptions(**{**QUIET.__dict__, "batch_size": 4})
    extract(small_settings(data, cache_dir), other, log=messages.append)
    assert any("starting" in m and "batch_size was 8" in m for m in messages), messages
    assert not any("resuming" in m for m in messages)


def test_killed_assembly_leftovers_are_cleared(small, tmp_path):
    data = small[0]
    cache_dir = tmp_path / "cache"
    (path,) = extract(small_settings(data, cache_dir), QUIET, log=lambda m: None)
    path.unlink()
    stale = path.with_name(f".{path.name}.99999.tmp")
    stale.write_bytes(b"half an HDF5 file")
    extract(small_settings(data, cache_dir), QUIET, log=lambda m: None)
    assert not stale.exists() and np.array_equal(load_features(path).features, small[1].features)


def test_damaged_chunk_is_named_not_used(small, tmp_path, monkeypatch):
    data = small[0]
    cache_dir = tmp_path / "cache"
    stop_at_chunk(data, cache_dir, monkeypatch, 3)
    (chunk,) = cache_dir.glob("*.parts/chunk-000001.npz")
    chunk.write_bytes(chunk.read_bytes()[:100])
    with pytest.raises(FeatcacheError, match=r"chunk-000001.npz .*unreadable.*removed it and 2 later chunk"):
        extract(small_settings(data, cache_dir), QUIET, log=lambda m: None)
    assert not list(cache_dir.glob("*.h5")) and chunks(cache_dir) == 1
    messages = []
    again = load_features(extract(small_settings(data, cache_dir), QUIET, log=messages.append)[0])
    assert any("at row 16/60" in m for m in messages), messages
    assert np.array_equal(again.features, small[1].features)


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "featcache", *args], capture_output=True, text=True, timeout=300)


def test_flipped_bytes_are_refused_by_verify_and_head(data, clean, tmp_path):
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    path = cache_dir / clean[0].name
    path.write_bytes(clean[0].read_bytes())
    with h5py.File(path, "r") as fh:
        offset = fh["features"].id.get_chunk_info(0).byte_offset
    raw = bytearray(path.read_bytes())
    raw[offset + 1000] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(FeatcacheError, match="corrupt"):
        check(path)
    verify = run_cli("cache", "verify", "--all", "--cache-dir", str(cache_dir))
    assert verify.returncode != 0 and path.name in verify.stdout + verify.stderr
    head = run_cli("head", "-b", BACKBONE, "-w", "none", "-d", str(data), "-s", "32", "--cache-dir", str(cache_dir),
                   "--epochs", "1")
    errors = [l for l in head.stderr.splitlines() if l.startswith("featcache: error:")]
    assert head.returncode != 0 and len(errors) == 1 and "Traceback" not in head.stderr, head.stderr
    assert path.name in errors[0] and "corrupt" in errors[0] and "make features" in errors[0]
