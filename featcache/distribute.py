"""Extraction under ``tf.distribute``: ``--strategy mirrored`` and ``--strategy multiworker``.

- ``mirrored``: one process, ``MirroredStrategy`` over the local devices
  (every GPU, else every logical CPU device). Each batch is cut into one
  contiguous slice per replica and the replicas' outputs are concatenated
  in replica order, so rows come back in order. On a CPU-only machine this
  buys nothing (logical CPU devices share the same cores); it exists for
  multi-GPU hosts.
- ``multiworker``: one process per worker under
  ``MultiWorkerMirroredStrategy``, configured by ``TF_CONFIG``. Each worker
  extracts one contiguous shard of rows (shard bounds fall on batch
  boundaries, so every batch is the one a single process would run) into
  its own resumable part folder beside the cache file; the chief (rank 0)
  waits for every part and merges them, in row order, into the one cache
  file through ``HDF5Writer`` (atomic). Other workers return once the
  merged file exists. ``CACHE_DIR`` must be a folder every worker sees.

Both run the Keras model (``strategy.run`` on replicas); ``--engine tflite``
runs outside ``tf.distribute`` and is refused with a strategy.

The strategy is created on first need, once per ``extract`` call, and
shared by its backbones. ``MultiWorkerMirroredStrategy`` must be created
before TensorFlow runs any op in the process, which holds for the CLI.
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np

from .errors import brief, FeatcacheError, InvalidArgument, choice_error

if TYPE_CHECKING:  # pragma: no cover
    from .cache import FeatureKey
    from .datasets import Dataset, Split

STRATEGIES = ("none", "mirrored", "multiworker")
DONE_FILE = "done.json"
POLL_SECONDS = 0.5
# A wait for other workers fails when none of their files changed for this long.
STALL_SECONDS = 1800.0


def check_strategy(name: str, engine: str = "auto") -> str:
    """Validate ``name`` (and its engine) without importing TensorFlow."""
    if name not in STRATEGIES:
        raise choice_error("strategy", STRATEGIES, name)
    if name != "none" and engine != "auto":
        from .engines import get_record

        if not get_record(engine).distributable:
            raise InvalidArgument(f"--engine {engine} runs outside tf.distribute; use --engine keras or auto "
                                  f"with --strategy {name}.")
    if name == "multiworker":
        cluster_from_env()
    return name


@dataclass(frozen=True)
class Cluster:
    """This process's place among the workers: ``rank`` 0 is the chief."""

    rank: int
    workers: int

    @property
    def chief(self) -> bool:
        return self.rank == 0


def cluster_from_env(environ: Optional[dict] = None) -> Cluster:
    """Rank and worker count from ``TF_CONFIG`` (a 'chief' job, if any, ranks first, as in TF)."""
    text = (os.environ if environ is None else environ).get("TF_CONFIG", "")
    hint = ('set TF_CONFIG, e.g. {"cluster": {"worker": ["host1:port", "host2:port"]}, '
            '"task": {"type": "worker", "index": 0}}')
    if not text.strip():
        raise FeatcacheError(f"--strategy multiworker needs TF_CONFIG; {hint}.")
    try:
        config = json.loads(text)
        cluster, task = config["cluster"], config["task"]
        chiefs, workers = list(cluster.get("chief", [])), list(cluster.get("worker", []))
        task_type, index = str(task["type"]), int(task["index"])
    except (ValueError, KeyError, TypeError) as exc:
        raise FeatcacheError(f"TF_CONFIG is not valid ({type(exc).__name__}: {exc}); {hint}.") from None
    if task_type == "chief":
        rank, size = index, len(chiefs)
    elif task_type == "worker":
        rank, size = len(chiefs) + index, len(workers)
    else:
        raise FeatcacheError(f"TF_CONFIG task type {task_type!r}: featcache workers are 'worker' or 'chief'.")
    if not 0 <= index < size:
        raise FeatcacheError(f"TF_CONFIG task index {index} is outside the {size} {task_type} address(es).")
    return Cluster(rank=rank, workers=len(chiefs) + len(workers))


def shard_bounds(n_rows: int, batch_size: int, workers: int, rank: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of worker ``rank``: contiguous, whole batches, in rank order."""
    per_worker = math.ceil(math.ceil(n_rows / batch_size) / workers) * batch_size
    start = min(rank * per_worker, n_rows)
    return start, min(start + per_worker, n_rows)


def local_devices() -> list[str]:
    """Every GPU, else every logical CPU device (tests configure two)."""
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    return [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]


def make_strategy(name: str):
    """The ``tf.distribute`` strategy for ``name`` ('mirrored' or 'multiworker')."""
    import tensorflow as tf

    if name == "mirrored":
        return tf.distribute.MirroredStrategy(devices=local_devices())
    if name == "multiworker":
        cluster_from_env()
        options = tf.distribute.experimental.CommunicationOptions(
            implementation=tf.distribute.experimental.CommunicationImplementation.RING)
        try:
            return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
        except RuntimeError as exc:
            raise FeatcacheError(f"Cannot start MultiWorkerMirroredStrategy ({brief(exc)}); it must "
                                 "be created before TensorFlow runs any op: start the worker with the "
                                 "featcache CLI or call extract first thing.") from None
    raise choice_error("strategy", STRATEGIES[1:], name)


class StrategyEngine:
    """The model on every local replica; a batch is cut into contiguous per-replica slices."""

    precision = "f32"

    def __init__(self, model, strategy, strategy_name: str):
        import tensorflow as tf

        self.name = f"keras/{strategy_name}"
        self._strategy = strategy
        self._replicas = len(strategy.extended.worker_devices)
        self._step = tf.function(lambda values: strategy.run(lambda x: model(x, training=False), args=(values,)),
                                 reduce_retracing=True)

    def __call__(self, batch) -> np.ndarray:
        import tensorflow as tf

        batch = tf.convert_to_tensor(batch, tf.float32)
        n, k = int(batch.shape[0]), self._replicas
        # Equal slices, padded with copies of the last row: an empty slice (a last batch smaller
        # than the replica count) crashes oneDNN's fused batch norm, and inference is per row.
        per = -(-n // k)
        if per * k > n:
            batch = tf.concat([batch, tf.repeat(batch[-1:], per * k - n, axis=0)], axis=0)
        values = self._strategy.experimental_distribute_values_from_function(
            lambda ctx: batch[(ctx.replica_id_in_sync_group % k) * per:(ctx.replica_id_in_sync_group % k + 1) * per])
        outputs = self._strategy.experimental_local_results(self._step(values))
        return np.concatenate([np.asarray(t, dtype=np.float32) for t in outputs])[:n]


class Distribution:
    """The strategy of one ``extract`` call: created on first need, shared by its backbones."""

    def __init__(self, name: str):
        self.name = name
        self.cluster = cluster_from_env() if name == "multiworker" else None
        self._strategy = None

    @property
    def active(self) -> bool:
        return self.name != "none"

    @property
    def multiworker(self) -> bool:
        return self.name == "multiworker"

    def strategy(self):
        if self._strategy is None:
            self._strategy = make_strategy(self.name)
        return self._strategy

    def scope(self):
        """Where the model must be built: variables become mirrored ones."""
        return self.strategy().scope() if self.active else nullcontext()

    def engine(self, model) -> StrategyEngine:
        return StrategyEngine(model, self.strategy(), self.name)

    def ensure(self, runner, path: Path, key: "FeatureKey", dataset: "Dataset", split: str) -> Path:
        """Multi-worker extraction of one key: this worker's shard, then (chief) the merge."""
        from .cache import check, lock_for

        if path.exists():
            check(path, full=False)
            runner.log(f"reusing cache {path} ({runner.spec.name} {split}/{key.view}; backbone not built)")
            return path
        cluster = self.cluster
        engine = runner.engine()  # every worker builds the model: variable creation is collective
        data = dataset[split]
        batch = runner.batch_size
        chunk_rows = math.ceil(runner.options.chunk_rows / batch) * batch
        parts = [_Part.of(path, key, data, batch, chunk_rows, engine.name, cluster, rank)
                 for rank in range(cluster.workers)]
        if not cluster.chief:
            _extract_shard(runner, engine, parts[cluster.rank], data, key, chunk_rows)
            runner.log(f"worker {cluster.rank}: shard of {data.name} done; waiting for the chief to merge {path.name}")
            _wait(path.exists, f"the chief to merge {path.name}", [p.dir for p in parts] + [path.parent])
            check(path, full=False)
            return path
        lock = lock_for(path)
        with _locked(lock):
            if path.exists():
                check(path, full=False)
                return path
            start = time.perf_counter()
            _extract_shard(runner, engine, parts[0], data, key, chunk_rows, final_path=path)
            runner.log(f"chief: waiting for the parts of {cluster.workers - 1} other worker(s)")
            _wait(lambda: all((p.dir / DONE_FILE).exists() for p in parts),
                  f"parts of {path.name} from every worker", [p.dir for p in parts])
            _merge(runner, path, key, dataset, data, parts, engine.name, batch, time.perf_counter() - start)
        return path


@contextmanager
def _locked(lock):
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


@dataclass
class _Part:
    """One worker's rows ``[start, stop)`` and the chunk folder (a ``PartStore``) that holds them."""

    store: object
    start: int
    stop: int

    @property
    def dir(self) -> Path:
        return self.store.dir

    @classmethod
    def of(cls, path: Path, key: "FeatureKey", data: "Split", batch: int, chunk_rows: int, engine: str,
           cluster: Cluster, rank: int) -> "_Part":
        from .cache import PartStore

        start, stop = shard_bounds(len(data), batch, cluster.workers, rank)
        meta = {"key": key.digest, "n_rows": len(data), "shard": [start, stop], "rank": rank,
                "workers": cluster.workers, "chunk_rows": chunk_rows, "batch_size": batch, "engine": engine}
        return cls(PartStore(path.with_name(f"{path.name}.worker{rank}"), meta), start, stop)


def _extract_shard(runner, engine, part: _Part, data: "Split", key: "FeatureKey", chunk_rows: int,
                   final_path: Optional[Path] = None) -> None:
    """This worker's rows into its part folder (resumable), then its done marker; the chief, which holds
    the key's lock, passes ``final_path`` so a killed merge's temp files are cleared too."""
    from .datasets import Split
    from .fsio import write_json

    store = part.store
    done = runner.open_store(store, final_path)
    if (store.dir / DONE_FILE).exists():
        return
    start, stop = part.start, part.stop
    shard = Split(name=data.name, labels=data.labels[start:stop], fingerprint=data.fingerprint,
                  images=None if data.images is None else data.images[start:stop],
                  paths=None if data.paths is None else data.paths[start:stop])
    first = min(done * chunk_rows, len(shard))
    if first < len(shard):
        if first:
            runner.log(f"resuming shard {start}..{stop} of {data.name} at row {start + first}")
        runner._run(engine, shard, key, store, done, first, chunk_rows)
    write_json(store.dir / DONE_FILE, {"shard": [start, stop], "chunks": math.ceil(len(shard) / chunk_rows)},
               "shard marker")


def _merge(runner, path: Path, key: "FeatureKey", dataset: "Dataset", data: "Split", parts: list,
           engine: str, batch: int, seconds: float) -> None:
    """Every worker's chunks, in rank and chunk order, into the one cache file."""
    from .cache import HDF5Writer

    writer = None
    try:
        for part in parts:
            store, start, stop = part.store, part.start, part.stop
            marker = json.loads((store.dir / DONE_FILE).read_text())
            if marker["shard"] != [start, stop]:
                raise FeatcacheError(f"{store.dir} holds rows {marker['shard']}, expected [{start}, {stop}]; "
                                     f"workers disagree on the data or batch size.")
            for i in range(int(marker["chunks"])):
                chunk = store.load(i)
                if writer is None:
                    writer = HDF5Writer(path, len(data), runner.check_width(chunk["features"]), key.dtype)
                writer.append(chunk["features"], chunk["labels"], chunk["indices"] + start)
        if writer is None:
            raise FeatcacheError(f"No rows to merge for {path.name}.")
        writer.commit(runner.cache_attrs(key, dataset, data.name, engine, batch, seconds,
                                         strategy="multiworker", workers=len(parts)))
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    for part in parts:
        part.store.remove()
    rate = len(data) / seconds if seconds > 0 else float("nan")
    runner.log(f"wrote {path} ({len(data)} rows from {len(parts)} workers, {rate:.1f} img/s)")


def _wait(ready: Callable[[], bool], what: str, watch: list[Path], stall: float = STALL_SECONDS) -> None:
    """Poll until ``ready``; fail once nothing under ``watch`` changed for ``stall`` seconds."""
    last_change, last_seen = time.monotonic(), None
    while not ready():
        seen = _latest_change(watch)
        if seen != last_seen:
            last_change, last_seen = time.monotonic(), seen
        elif time.monotonic() - last_change > stall:
            raise FeatcacheError(f"Gave up waiting for {what}: nothing changed for {stall:.0f}s "
                                 f"(did a worker stop?); rerun every worker to resume.")
        time.sleep(POLL_SECONDS)


def _latest_change(folders: list[Path]) -> tuple:
    latest = []
    for folder in folders:
        try:
            with os.scandir(folder) as entries:
                latest.extend((e.name, e.stat().st_mtime_ns) for e in entries)
        except OSError:
            continue
    return tuple(sorted(latest))
