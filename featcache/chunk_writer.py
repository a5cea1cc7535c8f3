"""The extraction loop: batches through an engine into resumable chunks, written while the next batch runs."""

from __future__ import annotations

import sys
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional

import numpy as np

from .cache import FeatureKey, PartStore
from .datasets import Split
from .errors import brief, FeatcacheError


def run_into_chunks(engine, stream, data: Split, key: FeatureKey, store: PartStore, done: int, start: int,
                    chunk_rows: int, label: str, progress: bool = True) -> None:
    """Rows ``start..`` of ``data`` from ``stream`` through ``engine`` into chunks ``done..`` of ``store``.

    A background thread writes each chunk while the engine runs the next batches;
    an activation map (``features --cut``) is flattened into one row per image.
    """
    import tensorflow as tf
    from tqdm import tqdm

    bar = tqdm(total=len(data), initial=start, unit="img", desc=label, disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    writer = ThreadPoolExecutor(max_workers=1)
    pending: Optional[Future] = None
    buffered: list[np.ndarray] = []
    row, chunk = start, done
    try:
        iterator = iter(stream)
        while True:
            try:
                images = next(iterator)
            except StopIteration:
                break
            except tf.errors.OpError as exc:
                raise FeatcacheError(
                    f"Could not read or decode an image of {data.name} near row {row + sum(len(b) for b in buffered)}: "
                    f"{brief(exc.message)}") from None
            out = np.asarray(engine(images))
            buffered.append(out.reshape(out.shape[0], -1))
            bar.update(int(images.shape[0]))
            rows_buffered = sum(len(b) for b in buffered)
            if rows_buffered >= chunk_rows or row + rows_buffered >= len(data):
                features = np.concatenate(buffered).astype(key.dtype)
                buffered = []
                stop = row + features.shape[0]
                if not np.all(np.isfinite(features)):
                    raise FeatcacheError(
                        f"{key.backbone} produced NaN or infinite features for {data.name} rows {row}..{stop - 1}"
                        f"{' (float16 overflow? try --dtype float32)' if key.dtype == 'float16' else ''}.")
                if pending is not None:
                    pending.result()
                pending = writer.submit(store.save, chunk, features, data.labels[row:stop],
                                        np.arange(row, stop, dtype=np.int64))
                row, chunk = stop, chunk + 1
        if pending is not None:
            pending.result()
    finally:
        writer.shutdown(wait=True)
        bar.close()
    if row != len(data):
        raise FeatcacheError(f"Extraction of {data.name} stopped at row {row} of {len(data)}; rerun to resume.")
