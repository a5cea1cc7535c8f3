"""The CLI end to end in subprocesses: exit codes, one-line errors, no cache left behind."""

import subprocess
import sys

import h5py
import pytest


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "featcache", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def error_line(result):
    lines = [l for l in result.stderr.splitlines() if l.startswith("featcache: error:")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_help_on_every_command():
    for args in ([], ["features"], ["backbones"], ["cache"], ["cache", "ls"], ["cache", "verify"]):
        result = run(*args, "--help")
        assert result.returncode == 0 and "Usage" in result.stdout, args


def test_backbones_table_lists_the_five():
    out = run("backbones").stdout
    for name in ("xception", "resnet50", "inceptionv3", "vgg19", "efficientnetv2s"):
        assert f"\n{name} " in out


def test_features_then_warm_reuse_then_cache_commands(image_folder, cache_dir):
    args = ["features", "-b", "resnet50", "-w", "none", "-d", str(image_folder), "-s", "32",
            "--cache-dir", str(cache_dir), "--no-progress"]
    first = run(*args)
    assert first.returncode == 0, first.stderr
    files = sorted(cache_dir.glob("*.h5"))
    assert len(files) == 2
    with h5py.File(files[0]) as fh:
        assert fh.attrs["backbone"] == "resnet50" and fh.attrs["size"] == 32
    again = run(*args)
    assert again.returncode == 0 and again.stdout.count("reusing cache") == 2 and "built resnet50" not in again.stdout
    listing = run("cache", "ls", "--cache-dir", str(cache_dir)).stdout
    key = files[0].stem.split("-")[-1]
    assert key in listing
    assert "backbone: resnet50" in run("cache", "info", key, "--cache-dir", str(cache_dir)).stdout
    assert run("cache", "verify", "--all", "--cache-dir", str(cache_dir)).returncode == 0
    assert run("cache", "rm", key, "--cache-dir", str(cache_dir)).returncode == 0
    assert not files[0].exists()


@pytest.mark.parametrize("extra, message", [
    (["-b", "resnet51"], "Unknown backbone 'resnet51'"),
    (["-b", "xception", "-s", "64"], "below the minimum of xception (71)"),
    (["-w", "/nonexistent/weights.h5"], "weights.h5', which does not exist"),
    (["-w", "/tmp"], "which is a folder, not a weights file"),
    # An empty value (an empty Makefile variable) is refused, never replaced by the default.
    (["-b", ""], "--backbone is empty (in make, BACKBONE="),
    (["-w", ""], "--weights is empty (in make, WEIGHTS="),
    (["-d", ""], "--data is empty (in make, DATA="),
    (["--cache-dir", ""], "--cache-dir is empty (in make, CACHE_DIR="),
    (["--views", ""], "--views is empty"),
    (["--views", ","], "--views names no view"),
    (["--split", ","], "No split to extract"),
])
def test_bad_arguments_one_line(image_folder, cache_dir, extra, message):
    result = run("features", "-b", "resnet50", "-w", "none", "-d", str(image_folder), "-s", "32",
                 "--cache-dir", str(cache_dir), *extra)
    assert result.returncode == 1
    assert message in error_line(result)
    assert not list(cache_dir.glob("*.h5"))


def test_missing_data_path(tmp_path, cache_dir):
    result = run("features", "-b", "resnet50", "-w", "none", "-d", str(tmp_path / "nothing"),
                 "--cache-dir", str(cache_dir))
    assert result.returncode == 1 and "not found" in error_line(result)


def test_unreadable_image_names_the_file(image_folder, cache_dir):
    (image_folder / "train" / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    result = run("features", "-b", "resnet50", "-w", "none", "-d", str(image_folder), "-s", "32",
                 "--cache-dir", str(cache_dir))
    assert result.returncode == 1 and "broken.png" in error_line(result)
    assert not list(cache_dir.glob("*.h5"))


def test_verify_fails_on_foreign_file(cache_dir):
    (cache_dir / "junk.h5").write_bytes(b"not hdf5")
    result = run("cache", "verify", "--all", "--cache-dir", str(cache_dir))
    assert result.returncode == 1 and "FAILED" in result.stdout


def _interrupt_when(args, marker: str, delay: float = 1.0, ready=lambda: True):
    """Start ``featcache ARGS``; once ``marker`` is printed and ``ready()`` holds, send Ctrl-C (SIGINT).

    Returns (exit code, all output).
    """
    import signal
    import time

    process = subprocess.Popen([sys.executable, "-u", "-m", "featcache", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, bufsize=1)
    seen = []
    try:
        for line in process.stdout:
            seen.append(line)
            if marker in line:
                time.sleep(delay)
                deadline = time.monotonic() + 120
                while not ready() and process.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.1)
                process.send_signal(signal.SIGINT)
                break
        rest, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    return process.returncode, "".join(seen) + rest


def test_ctrl_c_during_features_says_what_was_kept(tmp_path):
    from conftest import make_npz

    data = make_npz(tmp_path / "d.npz", n_train=6000, n_test=6)
    cache_dir = tmp_path / "cache"
    args = ["features", "-b", "resnet50", "-w", "none", "-d", str(data), "-s", "32", "--engine", "keras",
            "--split", "train", "--chunk-rows", "64", "--cache-dir", str(cache_dir), "--no-progress"]
    code, output = _interrupt_when(args, "built resnet50", delay=0.5,
                                   ready=lambda: bool(list(cache_dir.glob("*.h5.parts/*.npz"))))
    assert code == 130, output
    assert "Traceback" not in output and "featcache: interrupted features: finished chunks are kept" in output
    assert not list(cache_dir.glob("*.h5")), "no cache file that looks complete"
    (parts,) = cache_dir.glob("*.h5.parts")
    assert list(parts.glob("*.npz")), "chunks finished before Ctrl-C are kept for the resume"
    resumed = run(*args)
    assert resumed.returncode == 0 and "resuming" in resumed.stdout.lower(), resumed.stdout + resumed.stderr


def test_ctrl_c_during_head_records_no_run(tmp_path):
    from conftest import make_npz

    data = make_npz(tmp_path / "d.npz", n_train=600, n_test=30)
    common = ["-b", "resnet50", "-w", "none", "-d", str(data), "-s", "32", "--cache-dir", str(tmp_path / "cache")]
    assert run("features", *common, "--no-progress", "--engine", "keras").returncode == 0
    code, output = _interrupt_when(["head", *common, "--head", "mlp", "--epochs", "5000", "--patience", "5000",
                                    "--batch-size", "8", "-v"], "epoch", delay=1.0)
    assert code == 130, output
    assert "Traceback" not in output and "featcache: interrupted head: no run was recorded" in output
    runs = tmp_path / "cache" / "runs"
    assert not runs.exists() or list(runs.iterdir()) == []


@pytest.mark.parametrize("args, message, code", [
    (["finetune", "--head-run", "x"], "No such option: --head-run (Possible options: --run, --schedule) (see `featcache finetune --help`)", 2),
    (["predict", "model.keras"], "Missing argument 'images' (see `featcache predict --help`)", 2),
    (["cache", "rm"], "Missing argument 'target' (see `featcache cache rm --help`)", 2),
    (["features", "--size", "abc"], "Invalid value for '--size'", 2),
    (["cache", "info", ""], "Give a cache key, file name or path", 1),
    (["cache", "ls", "--cache-dir", "README.md"], "--cache-dir README.md is a file, not a cache folder", 1),
    (["runs", "--cache-dir", ""], "--cache-dir is empty", 1),
])
def test_usage_errors_are_one_line(args, message, code):
    from pathlib import Path

    result = run(*args, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == code
    assert message in error_line(result)
