"""Batches of cached activation maps, streamed from HDF5 with bounded memory.

Rows are read in small blocks of nearby rows (one contiguous HDF5 read per
block and view file), many blocks from all over the file are mixed and
shuffled together, and each image takes one of the cached views at random,
drawn again every epoch. Memory
holds at most ``mix_blocks * block_rows`` rows per view, whatever the
number of images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from ..errors import brief, FeatcacheError

# Files list images in dataset order, which is often by class (an image folder's is): a shuffle must mix
# rows from many places of the file. 64 blocks of 32 nearby rows (about one HDF5 chunk each) per group: with
# 256-row blocks, four at a time, a group held three or four classes and lite0's top collapsed onto the
# latest ones within an epoch on CIFAR-10.
BLOCK_ROWS = 32
MIX_BLOCKS = 64


class ActivationStream:
    """``(activations float16 [b, h, w, c], labels)`` batches of ``rows`` of one split's activation caches.

    ``paths`` holds one file per view (the first is read when not shuffling).
    Every pass yields ``ceil(len(rows) / batch_size)`` batches, so epochs line up
    with ``steps_per_epoch``; a shuffled stream reshuffles on each pass.
    """

    def __init__(self, paths: Sequence[Path], shape: tuple[int, int, int], rows: np.ndarray, labels: np.ndarray,
                 batch_size: int, shuffle: bool = False, seed: int = 0, block_rows: int = BLOCK_ROWS,
                 mix_blocks: int = MIX_BLOCKS):
        self.paths = [Path(p) for p in paths]
        self.shape = tuple(int(d) for d in shape)
        self.rows = np.sort(np.asarray(rows, dtype=np.int64)) if shuffle else np.asarray(rows, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64)  # indexed by file row
        self.batch_size, self.shuffle = int(batch_size), shuffle
        self.block_rows, self.mix_blocks = int(block_rows), int(mix_blocks)
        self._rng = np.random.default_rng(seed)
        import h5py

        with h5py.File(self.paths[0], "r") as fh:
            self.dtype = np.dtype(fh["features"].dtype)
        self.peak_rows = 0  # the most rows held at once by any pass (bounded-memory tests read it)

    def __len__(self) -> int:
        return -(-len(self.rows) // self.batch_size)

    def _read(self, files: list, rows: np.ndarray, views: Optional[np.ndarray]) -> np.ndarray:
        """Rows (in any order) of the view files; ``views`` picks a file per row (None: the first file).

        Nearby rows come in one contiguous read; rows scattered over more than four times
        their number are read one by one (h5py point selection), so memory stays bounded.
        """
        order = np.argsort(rows, kind="stable")
        wanted = rows[order]
        lo, hi = int(wanted[0]), int(wanted[-1]) + 1
        out = None
        for v, fh in enumerate(files if views is not None else files[:1]):
            try:
                if hi - lo <= 4 * len(wanted):
                    picked = fh["features"][lo:hi][wanted - lo]
                else:
                    picked = fh["features"][wanted]
            except (OSError, RuntimeError, ValueError) as exc:
                raise FeatcacheError(f"Could not read activation rows {lo}..{hi - 1} of {self.paths[v]} "
                                     f"({brief(exc)}); check it with `featcache cache verify`.") from None
            if out is None:
                out = picked
            else:
                mine = views[order] == v
                out[mine] = picked[mine]
        restored = np.empty_like(out)
        restored[order] = out
        return restored.reshape((len(rows),) + self.shape)

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        import h5py

        files = [h5py.File(p, "r") for p in self.paths]
        try:
            blocks = [self.rows[i:i + self.block_rows] for i in range(0, len(self.rows), self.block_rows)]
            if self.shuffle:
                self._rng.shuffle(blocks)
            carry_x = carry_y = None
            for g in range(0, len(blocks), self.mix_blocks):
                group = np.concatenate(blocks[g:g + self.mix_blocks])
                views = self._rng.integers(0, len(files), len(group)) if self.shuffle else None
                xs, ys = [], []
                for block in blocks[g:g + self.mix_blocks]:
                    sel = views[:len(block)] if views is not None else None
                    if views is not None:
                        views = views[len(block):]
                    xs.append(self._read(files, block, sel))
                    ys.append(self.labels[block])
                x, y = np.concatenate(xs), np.concatenate(ys)
                del xs
                if self.shuffle:
                    order = self._rng.permutation(len(group))
                    x, y = x[order], y[order]
                if carry_x is not None:
                    x, y = np.concatenate([carry_x, x]), np.concatenate([carry_y, y])
                self.peak_rows = max(self.peak_rows, len(x))
                n_full = len(x) // self.batch_size * self.batch_size
                for i in range(0, n_full, self.batch_size):
                    yield x[i:i + self.batch_size], y[i:i + self.batch_size]
                carry_x, carry_y = x[n_full:], y[n_full:]
            if carry_x is not None and len(carry_x):
                yield carry_x, carry_y
        finally:
            for fh in files:
                fh.close()

    def dataset(self, repeat: bool = False):
        """The stream as a ``tf.data.Dataset`` of float32 batches (cast in the graph), prefetched."""
        import tensorflow as tf

        signature = (tf.TensorSpec((None,) + self.shape, tf.as_dtype(self.dtype)), tf.TensorSpec((None,), tf.int64))
        ds = tf.data.Dataset.from_generator(lambda: iter(self), output_signature=signature)
        if repeat:
            ds = ds.repeat()
        else:  # a known length: Keras shows progress against it and does not warn at the end
            ds = ds.apply(tf.data.experimental.assert_cardinality(len(self)))
        ds = ds.map(lambda x, y: (tf.cast(x, tf.float32), y))
        return ds.prefetch(2)
