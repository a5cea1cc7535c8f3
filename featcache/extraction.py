"""Stage 1: stream a dataset through a frozen backbone into the HDF5 cache.

Batches flow through ``tf.data`` (decode, view, resize, preprocess, all
graph ops), through an engine, and into chunk files written by a
background thread, so I/O overlaps compute and a killed run resumes from
its last whole chunk. The cache file appears only when every row is in.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .backbones import get_spec, preprocess_key, resolve_size, weights_identity
from .cache import DamagedChunk, FeatureKey, HDF5Writer, PartStore, base_attrs, check, lock_for
from .datasets import SPLITS, Dataset, Split, load_dataset
from .errors import FeatcacheError, InvalidArgument, choice_error
from .lookup import check_settings, data_source_id
from .settings import FeatureSettings

DEFAULT_CHUNK_ROWS = 1024


@dataclass(frozen=True)
class ExtractOptions:
    """How to run extraction; none of these change the cached numbers beyond float rounding."""

    splits: tuple[str, ...] = SPLITS
    batch_size: Optional[int] = None
    engine: str = "auto"
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    mixed_precision: bool = False
    progress: bool = True
    strategy: str = "none"
    # An activation cache instead of pooled features: 'top:N' or a layer name (featcache.activations).
    cut: Optional[str] = None


def default_batch_size() -> int:
    """Larger batches pay off on a GPU; on CPU 32 was as fast as larger ones and uses less memory."""
    import tensorflow as tf

    return 128 if tf.config.list_physical_devices("GPU") else 32


def feature_key(settings: FeatureSettings, backbone: str, dataset: Dataset, split: str, view: str,
                precision: str = "f32", cut: str = "") -> FeatureKey:
    """The exact key of one split/view, from validated settings, the resolved precision and cut (if any)."""
    spec = get_spec(backbone)
    return FeatureKey(
        backbone=spec.name,
        weights=weights_identity(settings.weights),
        size=resolve_size(spec, settings.size),
        preprocess=preprocess_key(spec.name),
        pooling="none" if cut else settings.pooling,
        dtype=settings.dtype,
        dataset=dataset[split].fingerprint,
        split=split,
        view=view,
        precision=precision,
        cut=cut,
    )


def validate(settings: FeatureSettings, options: ExtractOptions) -> None:
    """Fail on any bad argument before loading data or building a model."""
    check_settings(settings)
    if not options.splits:
        raise InvalidArgument(f"No split to extract; expected one or more of: {', '.join(SPLITS)}.")
    for split in options.splits:
        if split not in SPLITS:
            raise choice_error("split", SPLITS, split)
    if options.batch_size is not None and options.batch_size < 1:
        raise InvalidArgument(f"Batch size must be a positive integer; received {options.batch_size}.")
    if options.chunk_rows < 1:
        raise InvalidArgument(f"Chunk rows must be a positive integer; received {options.chunk_rows}.")
    weights_identity(settings.weights)  # a missing weights file fails here
    from .engines import check_precision, resolve_engine

    resolve_engine(options.engine)
    from .distribute import check_strategy

    check_strategy(options.strategy, options.engine)
    if options.cut is not None and options.strategy != "none":
        raise InvalidArgument("--cut extracts on one device; drop --strategy.")
    if options.strategy != "none" and settings.precision == "bf16":
        raise InvalidArgument(f"--strategy {options.strategy} runs the Keras engine in f32; "
                              "use --precision f32 (or auto) with it.")
    check_precision(settings.precision, options.engine)


def extract(settings: FeatureSettings, options: ExtractOptions = ExtractOptions(),
            log: Callable[[str], None] = print) -> list[Path]:
    """Make sure every requested split and view is cached; returns the cache files.

    Files already complete are reused without building the backbone. Each
    key is written by one process at a time: a second caller waits for the
    lock, then reuses the finished file.
    """
    validate(settings, options)
    dataset = load_dataset(settings.data, settings.cache_dir, skip_corrupt=settings.skip_corrupt)
    if dataset.ignored_files:
        log(f"ignored {dataset.ignored_files} non-image file(s) in {settings.data}")
    if dataset.skipped:
        log(f"skipping {len(dataset.skipped)} unreadable image(s) (--skip-corrupt); first: {dataset.skipped[0]}")
    cache_dir = Path(settings.cache_dir)
    paths = []
    from .distribute import Distribution

    distribution = Distribution(options.strategy)  # one tf.distribute strategy per call, made on first need
    for backbone in settings.backbones():
        rows = sum(len(dataset[split]) for split in options.splits) * len(settings.views)
        runner = _Runner(settings, options, backbone, log, distribution, rows)
        precision = runner.resolve_precision(dataset)
        keys = [(feature_key(settings, backbone, dataset, split, view, precision, runner.cut_name), split)
                for view in settings.views for split in options.splits]
        if runner.cut is not None:
            from .activations import require_disk
            from .cache import expected_bytes

            require_disk(cache_dir, {key.filename: expected_bytes(len(dataset[split]), runner.cut.width, key.dtype)
                                     for key, split in keys if not (cache_dir / key.filename).exists()}, log)
        for key, split in keys:
            paths.append(runner.ensure(cache_dir / key.filename, key, dataset, split))
    return paths


class _Runner:
    """Extraction for one backbone; the model is built on first need, at most once."""

    def __init__(self, settings: FeatureSettings, options: ExtractOptions, backbone: str, log, distribution=None,
                 rows: Optional[int] = None):
        from .distribute import Distribution

        self.settings, self.options, self.log = settings, options, log
        self.distribution = distribution or Distribution(options.strategy)
        self.spec = get_spec(backbone)
        self.size = resolve_size(self.spec, settings.size)
        self.precision = "f32" if options.strategy != "none" else settings.precision  # 'auto' until measured
        self.rows = rows  # the call's work in images, which decides whether a first engine conversion pays
        self._model = None
        self._engines: dict = {}
        self.batch_size = options.batch_size
        self.cut = None  # a CutInfo when extracting activations
        if options.cut is not None:
            from .activations import describe_cut

            self.cut = describe_cut(self.spec, self.size, options.cut)

    @property
    def cut_name(self) -> str:
        return self.cut.cut.name if self.cut is not None else ""

    def resolve_precision(self, dataset: Dataset) -> str:
        """The precision of this call's caches, the same for every split and view.

        ``auto`` keeps the precision of work already there (finished files or an
        interrupted run's chunks) when this machine can compute it, so caches are
        reused and a resume never mixes precisions; else the decision measured
        earlier on this machine; else it builds the engine and measures now.
        """
        if self.precision != "auto":
            return self.precision
        from .engines import native_bf16, recorded

        cache_dir = Path(self.settings.cache_dir)
        work = {}
        for precision in ("f32", "bf16"):
            for view in self.settings.views:
                for split in self.options.splits:
                    path = cache_dir / feature_key(self.settings, self.spec.name, dataset, split, view,
                                                   precision, self.cut_name).filename
                    work[precision] = work.get(precision, 0) + path.exists() + PartStore(path, {}).dir.exists()
        usable = [p for p in ("f32", "bf16") if work[p] and (p == "f32" or native_bf16())]
        if usable:
            self.precision = max(usable, key=lambda p: work[p])
            return self.precision
        first = dataset[self.options.splits[0]]
        decision = recorded(cache_dir / "engines", self.artifact_id(first), self.options.engine, "auto")
        if decision is not None:
            self.precision = decision["precision"]
        else:
            self.precision = self.engine(first).precision  # measures, and decides for every split
        return self.precision

    def ensure(self, path: Path, key: FeatureKey, dataset: Dataset, split: str) -> Path:
        if self.distribution.multiworker:  # shards per worker, merged by the chief
            return self.distribution.ensure(self, path, key, dataset, split)
        if path.exists():
            check(path, full=False)
            self.log(f"reusing cache {path} ({self.spec.name} {split}/{key.view}; backbone not built)")
            return path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            lock = lock_for(path)
            from filelock import Timeout

            try:
                lock.acquire(timeout=0)
            except Timeout:
                self.log(f"waiting: another featcache process is writing {path.name} (lock {lock.lock_file})")
                lock.acquire()
        except OSError as exc:
            from .cache import _disk_error

            raise _disk_error(exc, path.parent, "cache folder") from None
        try:
            if path.exists():
                check(path, full=False)
                self.log(f"reusing cache {path} (written by another process meanwhile)")
                return path
            return self._extract(path, key, dataset, split)
        finally:
            lock.release()

    def artifact_id(self, data: Optional[Split]) -> str:
        """Names the engine's model: backbone, size, pooling, weights, and the fed image size if any."""
        fed = self.fed(data)
        pixels = f"-from{fed[0]}x{fed[1]}" if fed else ""
        mixed = "-mixed16" if self.options.mixed_precision else ""
        weights = weights_identity(self.settings.weights).replace(":", "_")
        pooling = f"cut.{self.cut_name.replace(':', '.')}" if self.cut else self.settings.pooling
        return f"{self.spec.name}-{self.size}-{pooling}-{weights}{pixels}{mixed}"

    def backbone(self):
        """The frozen backbone on preprocessed inputs, built once (inside the strategy's scope)."""
        if self._model is None:
            import tensorflow as tf

            from .backbones import create_backbone
            from .memory import require_memory

            policy = None
            if self.options.mixed_precision:
                if not tf.config.list_physical_devices("GPU"):
                    self.log("warning: --mixed-precision without a GPU runs slower on CPU; continuing as asked")
                policy = "mixed_float16"
            if self.batch_size is None:
                self.batch_size = default_batch_size()
            with self.distribution.scope():
                self._model = create_backbone(self.spec.name, self.settings.weights, self.size,
                                              self.settings.pooling, cache_dir=self.settings.cache_dir,
                                              dtype_policy=policy)
                if self.cut is not None:
                    from .activations import lower_model

                    self._model = lower_model(self._model, self.cut.cut)
            require_memory(self._model, self.batch_size, f"{self.spec.name}", self.log)
        return self._model

    def fed(self, data: Optional[Split]) -> Optional[tuple[int, int]]:
        from .feeding import fed_as_stored

        return fed_as_stored(data, self.distribution.active)

    def engine(self, data: Optional[Split] = None):
        """The engine for ``data``'s feed (see ``feeding``), built once per fed image size.

        The first build under ``--precision auto`` decides the precision (by
        measurement); later builds keep it, so every split of a call shares it.
        """
        from .feeding import pixel_model

        fed = self.fed(data)
        if fed not in self._engines:
            from .engines import make_engine

            start = time.perf_counter()
            model = self.backbone()
            if self.distribution.active:
                engine = self.distribution.engine(model)
            else:
                if fed is not None:
                    model = pixel_model(model, self.spec.name, self.size, fed)
                engine = make_engine(self.options.engine, model, Path(self.settings.cache_dir) / "engines",
                                     self.artifact_id(data), self.batch_size, rows=self.rows,
                                     precision=self.precision, log=self.log, size=self.size)
                self.precision = engine.precision
            feed = f"fed {fed[0]}x{fed[1]} pixels, resized inside" if fed else "fed prepared batches"
            self.log(f"built {self.spec.name} at {self.size}px ({engine.name} engine, {engine.precision}, {feed}, "
                     f"batch {self.batch_size}) in {time.perf_counter() - start:.1f}s")
            self._engines[fed] = engine
        return self._engines[fed]

    def _extract(self, path: Path, key: FeatureKey, dataset: Dataset, split: str) -> Path:
        data = dataset[split]
        engine = self.engine(data)
        n, batch = len(data), self.batch_size
        chunk_rows = math.ceil(self.options.chunk_rows / batch) * batch
        meta = {"key": key.digest, "n_rows": n, "chunk_rows": chunk_rows, "batch_size": batch,
                "engine": engine.name}
        if self.fed(data):  # chunks fed prepared batches (the only feed before) keep their meta
            meta["feed"] = "pixels"
        store = PartStore(path, meta)
        done = self.open_store(store, path)
        start = min(done * chunk_rows, n)
        if start:
            self.log(f"resuming {path.name} at row {start}/{n} ({done} chunk(s) already done)")
        t0 = time.perf_counter()
        if start < n:
            self._run(engine, data, key, store, done, start, chunk_rows)
        seconds = time.perf_counter() - t0
        n_chunks = math.ceil(n / chunk_rows)
        first = store.load(0)
        width = self.check_width(first["features"])
        skipped = self.skipped(dataset, split)
        fed = self.fed(data)
        extra = {}
        if self.cut is not None:
            from .activations import cut_attrs

            extra = cut_attrs(self.cut)
        attrs = self.cache_attrs(key, dataset, split, engine.name, batch, seconds,
                                 feed=f"pixels {fed[0]}x{fed[1]}" if fed else "prepared", **extra)
        writer = None
        try:
            writer = HDF5Writer(path, n, width, key.dtype)
            for i in range(n_chunks):
                chunk = first if i == 0 else store.load(i)
                writer.append(chunk["features"], chunk["labels"], chunk["indices"])
            writer.commit(attrs)
        except FeatcacheError as exc:
            if writer is not None:
                writer.abort()
            if isinstance(exc, DamagedChunk):
                raise
            raise FeatcacheError(f"{exc} The {n_chunks} extracted chunk(s) stay in {store.dir}; "
                                 "rerun the same command to finish without extracting again.") from None
        store.remove()
        if n > start and seconds > 0:
            speed = f"{(n - start) / seconds:.1f} img/s"
        else:  # every chunk came from the interrupted run: nothing was timed
            speed = "assembled from the chunks of an interrupted run"
        note = f"; skipped {len(skipped)} unreadable file(s), listed in its skipped_files" if skipped else ""
        self.log(f"wrote {path} ({n} rows x {width}, {speed}{note})")
        return path

    def open_store(self, store: PartStore, path: Optional[Path] = None) -> int:
        """Open a chunk folder (chunks done so far), saying why an interrupted run's chunks were dropped
        and clearing temp files killed writers left; ``path`` (the final file, whose lock we hold) too."""
        done = store.open()
        if store.discarded:
            changed = ", ".join(f"{k} was {v}" for k, v in sorted(store.discarded.items()))
            self.log(f"starting {store.dir.name} over: the interrupted run's chunks used other settings ({changed})")
        store.remove_stale(path)
        return done

    def check_width(self, features: np.ndarray) -> int:
        width = int(features.shape[1])
        expected = self.cut.width if self.cut is not None else self.spec.width
        if width != expected:
            raise FeatcacheError(f"{self.spec.name} produced features of width {width}, expected {expected}.")
        return width

    @staticmethod
    def skipped(dataset: Dataset, split: str) -> list[str]:
        return [p for p in dataset.skipped if f"/{split}/" in p]

    def cache_attrs(self, key: FeatureKey, dataset: Dataset, split: str, engine: str, batch: int, seconds: float,
                    **extra) -> dict:
        """The attributes a finished cache file records, single-process or merged from workers."""
        return base_attrs(key, dataset.class_names, {
            "data_source": data_source_id(self.settings.data),
            "make_command": FeatureSettings(**{**self.settings.__dict__, "backbone": self.spec.name}).make_command()
            + (f" CUT={self.cut_name}" if self.cut else ""),
            "engine": engine,
            "batch_size": batch,
            **extra,
            "extract_seconds": round(seconds, 3),
            "skipped_files": json.dumps(self.skipped(dataset, split)),
            "ignored_files": dataset.ignored_files,
        })

    def _run(self, engine, data: Split, key: FeatureKey, store: PartStore, done: int, start: int,
             chunk_rows: int) -> None:
        from .chunk_writer import run_into_chunks
        from .feeding import make_stream

        stream = make_stream(data, self.spec.name, self.size, key.view, start, self.batch_size,
                             pixels=self.fed(data) is not None)
        run_into_chunks(engine, stream, data, key, store, done, start, chunk_rows,
                        label=f"{self.spec.name} {data.name}/{key.view}", progress=self.options.progress)
