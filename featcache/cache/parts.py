"""An extraction in progress: whole chunks on disk, so a killed run resumes from its last chunk."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np

from .. import fsio
from ..errors import FeatcacheError
from .keys import ARRAYS
from .writer import _disk_error

_RESUME_HINT = "Chunks already written are kept; free space or fix the folder, then rerun the same command to resume."

class DamagedChunk(FeatcacheError):
    """A chunk of an interrupted extraction could not be read back."""


class PartStore:
    """Finished chunks of an extraction in progress, one ``.npz`` file each.

    Each chunk file is written under a temporary name and renamed, so after
    a crash every chunk file present is whole; ``meta.json`` pins the
    settings a resumed run must match for the result to be bit-identical.
    """

    def __init__(self, final_path: Path, meta: dict):
        self.dir = final_path.with_name(final_path.name + ".parts")
        self.meta = meta
        self.discarded: Optional[dict] = None  # the settings of chunks dropped by ``open``, if any

    def open(self) -> int:
        """Create or reopen the folder; the number of whole chunks already done.

        Chunks made with other settings (batch size, engine, chunk size) would not
        resume bit-identically, so they are dropped and ``discarded`` says so.
        """
        meta_path = self.dir / "meta.json"
        try:
            if meta_path.exists():
                try:
                    old = json.loads(meta_path.read_text())
                except ValueError:
                    old = None
                if not isinstance(old, dict):
                    old = {"meta.json": "unreadable"}
                if old != self.meta:
                    self.discarded = {k: old.get(k, "absent") for k in sorted(set(old) | set(self.meta))
                                      if old.get(k) != self.meta.get(k)}
                    fsio.remove_owned(self.dir, self.dir.parent, "parts folder")
            fsio.make_dirs(self.dir, "extraction folder")
            if not meta_path.exists():
                fsio.write_bytes(meta_path, json.dumps(self.meta, sort_keys=True).encode(), "extraction settings")
        except OSError as exc:
            raise _disk_error(exc, self.dir, "extraction folder") from None
        done = 0
        while (self.dir / self._name(done)).exists():
            done += 1
        return done

    @staticmethod
    def _name(i: int) -> str:
        return f"chunk-{i:06d}.npz"

    def save(self, i: int, features: np.ndarray, labels: np.ndarray, indices: np.ndarray) -> None:
        import io

        buffer = io.BytesIO()
        np.savez(buffer, features=features, labels=labels, indices=indices)
        fsio.write_bytes(self.dir / self._name(i), buffer.getvalue(), "chunk", _RESUME_HINT)

    def load(self, i: int) -> dict:
        """Chunk ``i``; a damaged one is deleted with every later chunk, so a rerun extracts them again."""
        path = self.dir / self._name(i)
        try:
            with np.load(path, allow_pickle=False) as data:
                return {k: data[k] for k in ARRAYS}
        except Exception as exc:  # zipfile, OSError, KeyError, ValueError: all mean a damaged chunk
            later = sorted(p for p in self.dir.glob("chunk-*.npz") if p.name >= path.name)
            for chunk in later:
                fsio.remove_owned(chunk, self.dir, "damaged chunk")
            raise DamagedChunk(f"Chunk {path} of an interrupted extraction is unreadable ({type(exc).__name__}: "
                               f"{exc}); removed it and {len(later) - 1} later chunk(s): rerun the same command "
                               "to extract them again.") from None

    def remove_stale(self, final_path: Optional[Path] = None) -> int:
        """Delete temporary files a killed writer left in this folder and, given ``final_path`` (call
        under that key's lock), beside it."""
        stale = list(self.dir.glob(".*.tmp"))
        if final_path is not None:
            stale += list(final_path.parent.glob(f".{final_path.name}.*.tmp"))
        for path in stale:
            fsio.remove_owned(path, path.parent.parent, "temporary file")
        return len(stale)

    def remove(self) -> None:
        """Drop the folder once its chunks are in the final file."""
        if self.dir.is_dir():
            fsio.remove_owned(self.dir, self.dir.parent, "parts folder")


def lock_for(path: Path):
    """The inter-process lock guarding one key (a ``filelock.FileLock``)."""
    from filelock import FileLock

    return FileLock(str(path.with_name(path.name + ".lock")))
