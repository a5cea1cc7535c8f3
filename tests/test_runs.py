"""The run store: ids, staged folders, listing; a corrupt record is reported, never silently hidden."""

import json
import subprocess
import sys

import pytest

from featcache.errors import FeatcacheError
from featcache.runs import list_runs, load_run, record_problem, staged_run_dir, unreadable_runs


def _run_folder(root, name, record):
    folder = root / "runs" / name
    folder.mkdir(parents=True)
    (folder / "record.json").write_text(record if isinstance(record, str) else json.dumps(record))
    return folder


def test_staged_run_dir_appears_only_when_whole(tmp_path):
    final = tmp_path / "runs" / "r1"
    with pytest.raises(RuntimeError):
        with staged_run_dir(final) as tmp:
            (tmp / "record.json").write_text("{}")
            raise RuntimeError("stopped")
    assert not final.exists() and list((tmp_path / "runs").iterdir()) == []
    with staged_run_dir(final) as tmp:
        (tmp / "record.json").write_text("{}")
    assert (final / "record.json").exists()
    with pytest.raises(FeatcacheError, match="already exists"):
        with staged_run_dir(final):
            pass


def test_corrupt_records_are_reported(tmp_path):
    _run_folder(tmp_path, "20261204-good-head-aaaa", {"kind": "head", "val_acc": 0.5})
    _run_folder(tmp_path, "20261204-cut-head-bbbb", '{"kind": "head", "val_')
    _run_folder(tmp_path, "20261204-list-head-cccc", "[1, 2]")
    assert [r.run_id for r in list_runs(tmp_path)] == ["20261204-good-head-aaaa"]
    problems = dict((p.name, why) for p, why in unreadable_runs(tmp_path))
    assert set(problems) == {"20261204-cut-head-bbbb", "20261204-list-head-cccc"}
    assert "not valid JSON" in problems["20261204-cut-head-bbbb"]
    assert "holds a list" in problems["20261204-list-head-cccc"]
    assert record_problem(tmp_path / "runs" / "20261204-good-head-aaaa") is None
    with pytest.raises(FeatcacheError, match="cut-head-bbbb cannot be used: its record.json is not valid JSON"):
        load_run(tmp_path, "cut-head")

    result = subprocess.run([sys.executable, "-m", "featcache", "runs", "--cache-dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "20261204-good-head-aaaa" in result.stdout
    warned = [line for line in result.stderr.splitlines() if line.startswith("featcache: not listed:")]
    assert len(warned) == 2 and "20261204-cut-head-bbbb" in warned[0] + warned[1], result.stderr
