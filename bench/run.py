"""``make bench``: featcache against the naive path, side by side in one run on one machine.

Writes ``bench/results/<date>-<host>.json`` and ``.md``. Every measurement
runs in its own subprocess (``bench/children.py``) so that each reports its
own peak RSS. Figures:

1. Extraction: the write-ups' naive path (Resizing inside a Keras model,
   ``model.predict(batch_size=32)``) against ``featcache.extract`` with its
   fastest engine, on the same images (JPEG files, decoded in featcache's
   pipeline), at two dataset sizes per backbone: images/s, ratio, the same
   engine's own forward-pass rate and the pipeline's share of it, peak RSS,
   max abs difference of the features, achieved GFLOP/s against a measured
   numpy float32 matmul peak.
2. A 20-epoch mlp head on 50,000 x 2,048 float16 features against one
   end-to-end epoch over 50,000 images (timed on a sample, extrapolated).
3. A warm ``featcache features`` call on an existing cache.
4. bf16 against f32 features of the whole CIFAR-10 copy: the default logreg
   and mlp heads trained on each (``--no-parity`` skips it).

    .venv/bin/python bench/run.py                       # defaults: 21 min on 2 idle cores
    .venv/bin/python bench/run.py --sizes efficientnet_lite0=10000,60000 --sizes resnet50=1000,4000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402

from machine import machine_info, result_stem  # noqa: E402

DEFAULT_SIZES = {"efficientnet_lite0": (2000, 20000), "resnet50": (500, 2000)}
DATA = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
TARGETS = {"efficientnet_lite0": 4.0, "resnet50": 5.0}
PIPELINE_SHARE_TARGET = 0.9  # the whole pipeline's rate over the engine's own forward-pass rate
RSS_TARGET_MB, RSS_TARGET_ROWS, WARM_TARGET_S = 3 * 1024, 60_000, 5.0
CHILD_TIMEOUT = 3 * 3600


def child(kind: str, args: dict, timeout: float = CHILD_TIMEOUT) -> dict:
    """Run one measurement in a fresh Python; its last stdout line is JSON."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, str(HERE / "children.py"), kind, json.dumps(args)], env=env,
                         capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if run.returncode != 0:
        raise RuntimeError(f"bench child {kind} failed ({run.returncode}):\n{run.stderr[-4000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- inputs --------------------------------------------------------------------

def load_images(n: int, source: Path, work: Path, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list, str]:
    """``n`` 32x32 RGB train images, their labels and JPEG files: a seeded sample of CIFAR-10 when present,
    else random pixels (written as JPEGs, whose decoded pixels are then the images)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    if source.exists():
        from featcache.datasets import load_dataset

        split = load_dataset(str(source), work / "datasets")["train"]
        rows = np.sort(rng.choice(len(split), size=min(n, len(split)), replace=False))
        images = np.stack([np.asarray(Image.open(split.paths[i]).convert("RGB")) for i in rows])
        return (images, split.labels[rows], [split.paths[i] for i in rows],
                f"{source.name} (seeded sample of the train split, decoded with PIL)")
    folder = work / "random-jpegs"
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i, pixels in enumerate(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)):
        files.append(str(folder / f"{i:06d}.jpg"))
        Image.fromarray(pixels).save(files[-1], quality=95)
    images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    return images, np.arange(n) % 10, files, "random uint8 pixels as JPEGs (cifar10-jpeg.tar.gz not found)"


def write_folder(path: Path, files: list, labels: np.ndarray) -> Path:
    """An image folder of the given JPEG files (hard-linked) as train/c<label>/, with one test image per class.

    Named by a digest of its files, so a reused ``--work`` folder never mixes two samples.
    """
    import hashlib

    path = path.with_name(f"{path.name}-{hashlib.sha256(chr(0).join(files).encode()).hexdigest()[:8]}")
    for i, (file, label) in enumerate(zip(files, labels)):
        target = path / "train" / f"c{int(label)}" / f"{i:06d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            try:
                os.link(file, target)
            except OSError:
                shutil.copyfile(file, target)
    for label in np.unique(labels):  # the loader wants every class in test/ too (not extracted here)
        test = path / "test" / f"c{int(label)}"
        test.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(files[int(np.flatnonzero(labels == label)[0])], test / "one.jpg")
    return path


def write_npz(path: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    np.savez(path, x_train=images, y_train=labels, x_test=images[:10], y_test=labels[:10])
    return path


def matmul_peak(repeats: int = 10) -> dict:
    """Best float32 GFLOP/s of numpy's BLAS over a few square sizes (all cores); best-of resists others' load."""
    best = {}
    for n in (2048, 4096):
        a = np.random.default_rng(0).random((n, n), dtype=np.float32)
        b = np.random.default_rng(1).random((n, n), dtype=np.float32)
        a @ b
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        best[n] = 2 * n ** 3 / min(times) / 1e9
    return {"gflops": max(best.values()), "by_size": best,
            "method": f"numpy float32 a @ b, n in 2048/4096, best of {repeats}, before and after the run"}


def weights_for(backbone: str, work: Path) -> tuple[str, str]:
    """ImageNet weights for efficientnet_lite0 when featcache can convert them; random otherwise."""
    if backbone == "efficientnet_lite0":
        try:
            probe = subprocess.run([sys.executable, "-c", (
                "from featcache.backbones import create_backbone as c; "
                f"c('efficientnet_lite0', 'imagenet', 224, cache_dir={str(work / 'cache')!r})")],
                capture_output=True, text=True, timeout=1800, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
            if probe.returncode == 0:
                return "imagenet", "ImageNet (featcache's converted efficientnet-lite0 checkpoint)"
            return "none", f"random (ImageNet weights unavailable: {probe.stderr.strip().splitlines()[-1][:200]})"
        except Exception as exc:  # the port may be missing in this checkout
            return "none", f"random ({type(exc).__name__})"
    return "none", "random (seeded)"


# --- figures ---------------------------------------------------------------------

def figure_extraction(backbone: str, sizes: tuple, work: Path, source: Path, peak: dict,
                      engine: str, batch: int) -> dict:
    weights, weights_note = weights_for(backbone, work)
    say(f"{backbone}: weights {weights}; counting FLOPs")
    flops = child("flops", {"backbone": backbone, "size": 224})
    images, labels, files, images_note = load_images(max(sizes), source, work)
    cache_dir = work / "cache"
    say(f"{backbone}: engine warm-up: converts the engine artefacts and lets 'auto' measure (untimed)")
    # A few images of every class: the sample is sorted by file, and files are listed by class.
    few = np.concatenate([np.flatnonzero(labels == c)[:4] for c in np.unique(labels)])
    warm = write_folder(work / f"{backbone}-warmup", [files[j] for j in few], labels[few])
    decided = child("featcache", {"backbone": backbone, "weights": weights, "data": str(warm), "size": 224,
                                  "cache_dir": str(cache_dir), "engine": engine, "batch_size": batch, "decide": True})
    rows = []
    for i, n in enumerate(sizes):
        # In the order an image folder lists them (by class, then name), so that rows line up with the naive ones.
        order = np.argsort(labels[:n], kind="stable")
        npz = write_npz(work / f"{backbone}-{n}.npz", images[:n][order], labels[:n][order])
        folder = write_folder(work / f"{backbone}-{n}", [files[j] for j in order], labels[:n][order])
        sample = work / f"{backbone}-{n}-naive.npy"
        common = {"backbone": backbone, "weights": weights, "size": 224, "cache_dir": str(cache_dir)}
        runs = {
            "naive": lambda: child("naive", {**common, "npz": str(npz), "sample_out": str(sample)}),
            "featcache": lambda: child("featcache", {**common, "data": str(folder), "engine": engine,
                                                     "batch_size": batch}),
        }
        done = {}
        for name in (("naive", "featcache") if i % 2 == 0 else ("featcache", "naive")):  # ABBA against drift
            say(f"{backbone}: {name} on {n} images")
            done[name] = runs[name]()
            say(f"{backbone}: {name} {done[name]['images_per_s']:.1f} img/s "
                f"({done[name].get('images_per_s_median_batch', float('nan')):.1f} median batch)")
        say(f"{backbone}: the same engine alone on {min(n, 512)} images in memory")
        alone = child("engine", {**common, "data": str(folder), "npz": str(npz), "engine": engine,
                                 "batch_size": batch, "images": min(n, 512)})
        naive, fc = done["naive"], done["featcache"]
        rows.append({"images": n, "folder": str(folder), "naive": naive, "featcache": fc, "engine_alone": alone,
                     "ratio": fc["images_per_s"] / naive["images_per_s"],
                     "ratio_median_batch": fc["images_per_s_median_batch"] / naive["images_per_s_median_batch"],
                     "pipeline_share": fc["images_per_s"] / alone["images_per_s"],
                     "difference": compare(np.load(sample), fc["cache"]),
                     "gflops_naive": naive["images_per_s"] * flops["flops_per_image"] / 1e9,
                     "gflops_featcache": fc["images_per_s"] * flops["flops_per_image"] / 1e9})
        for key in ("gflops_naive", "gflops_featcache"):
            rows[-1][key.replace("gflops", "peak_fraction")] = rows[-1][key] / peak["gflops"]
    rss = [r["featcache"]["peak_mb"] for r in rows]
    slope = (rss[-1] - rss[0]) / (sizes[-1] - sizes[0]) if len(sizes) > 1 else 0.0
    extrapolated = rss[-1] + slope * (RSS_TARGET_ROWS - sizes[-1])
    ratio = statistics.median(r["ratio"] for r in rows)
    ratio_batch = statistics.median(r["ratio_median_batch"] for r in rows)
    return {"backbone": backbone, "size": 224, "weights": weights_note, "images": images_note, "flops": flops,
            "auto_decision": [m for m in decided["log"] if m.startswith("auto engine")],
            "rows": rows, "ratio_median": ratio, "ratio_median_batch": ratio_batch, "ratio_target": TARGETS.get(backbone),
            "featcache_rss_slope_mb_per_1000_images": slope * 1000,
            "featcache_rss_extrapolated_60000_mb": extrapolated}


def figure_parity(work: Path, source: Path, backbone: str = "efficientnet_lite0") -> dict:
    """bf16 against f32 features of the real CIFAR-10 copy: the default logreg and mlp heads on each."""
    if not source.exists():
        return {"skipped": f"{source} not found"}
    say(f"parity: {backbone} f32 and bf16 features of {source.name}, logreg and mlp heads on each")
    weights, _ = weights_for(backbone, work)
    return {"backbone": backbone, "weights": weights,
            **child("parity", {"backbone": backbone, "weights": weights, "data": str(source),
                               "cache_dir": str(work / "cache-parity")})}


def compare(naive_sample: np.ndarray, cache_path: str) -> dict:
    """Max abs difference, and whether every element is within float16 rounding (+1e-4 for the engine)."""
    from featcache.cache import load_features

    cached = load_features(cache_path).features[: naive_sample.shape[0]].astype(np.float32)
    diff = np.abs(cached - naive_sample)
    half_ulp = np.abs(np.spacing(naive_sample.astype(np.float16)).astype(np.float32)) / 2
    return {"rows_compared": int(naive_sample.shape[0]), "max_abs_diff": float(diff.max()),
            "max_relative_to_max_feature": float(diff.max() / np.abs(naive_sample).max()),
            "max_abs_feature": float(np.abs(naive_sample).max()),
            "within_float16_rounding": bool(np.all(diff <= half_ulp + 1e-4)),
            "max_diff_in_float16_half_ulps": float((diff / np.maximum(half_ulp, 1e-12)).max())}


def figure_head_vs_end_to_end(work: Path, rows: int, sample_steps: int) -> dict:
    say("head: 20-epoch mlp on random float16 features")
    head = child("head", {"rows": rows, "width": 2048, "epochs": 20, "work": str(work / "head")})
    say("end to end: resnet50 at 224, timed on a sample")
    e2e = child("e2e", {"backbone": "resnet50", "weights": "none", "size": 224, "steps": sample_steps})
    epoch = rows / e2e["images_per_s"]
    out = {"rows": rows, "head": head, "end_to_end": e2e, "end_to_end_epoch_seconds_extrapolated": epoch}
    if "seconds" in head:
        out["ratio_one_e2e_epoch_over_20_head_epochs"] = epoch / head["seconds"]
    return out


def figure_warm(work: Path, backbone: str, weights: str, npz: Path, repeats: int) -> dict:
    command = [str(Path(sys.executable).with_name("featcache")), "features", "--backbone", backbone,
               "--weights", weights, "--data", str(npz), "--size", "224", "--split", "train",
               "--cache-dir", str(work / "cache")]
    if not Path(command[0]).exists():
        command = [sys.executable, "-m", "featcache"] + command[1:]
    times, output = [], ""
    for _ in range(repeats):
        start = time.perf_counter()
        run = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
        times.append(time.perf_counter() - start)
        output = run.stdout
        if run.returncode != 0 or "reusing" not in run.stdout:
            raise RuntimeError(f"warm call did not reuse the cache:\n{run.stdout}\n{run.stderr[-2000:]}")
    return {"command": " ".join(command).replace(str(work), "$WORK"), "seconds": times,
            "median_seconds": statistics.median(times), "target_seconds": WARM_TARGET_S,
            "output": output.strip().splitlines()[0]}


# --- report ---------------------------------------------------------------------

def markdown(result: dict) -> str:
    m = result["machine"]
    peak = result["matmul_peak"]
    lines = [f"# featcache benchmarks, {m['date']} on {m['host']}", "",
             f"Command: `{result['command']}`  ",
             f"Machine: {m['description']}  ",
             f"Load average (1, 5, 15 min) at start: {', '.join(f'{v:.2f}' for v in m['load_average_at_start'])}; "
             "other jobs may share these VMs' cores, so absolute figures are upper bounds on time (ratios come "
             "from runs made back to back on the same images).  ",
             f"Float32 matmul peak: {peak['gflops']:.1f} GFLOP/s ({peak['method']}).  ",
             f"Total wall time: {result['wall_seconds'] / 60:.1f} min.", ""]
    lines += ["## 1. Extraction: naive `model.predict` vs featcache", "",
              "Naive: `Input(32x32x3) -> Resizing(224) -> preprocess -> backbone -> pooling`, "
              "`model.predict(x, batch_size=32)` on a numpy array of the images (decoded beforehand, untimed). "
              "featcache: `featcache.extract` on an image folder of the same JPEG files (train split): its whole "
              "pipeline from JPEG decoding to the finished cache file, engine "
              f"`{result['settings']['engine']}` (chosen and converted by an untimed warm-up run), batch "
              f"{result['settings']['batch_size']}, float16 cache. images/s exclude model building (both) and "
              "the one-time dataset scan. Engine alone: the same engine on the same images held in memory "
              "(its forward-pass rate); pipeline share = featcache's rate over it. Peak RSS = the largest of "
              "ru_maxrss, VmHWM and VmRSS sampled every 50 ms.", "",
              "img/s is rows / total time (what a user waits); in brackets, from the median time between batch "
              "completions (robust to other jobs' bursts on the shared CPU).", "",
              "| backbone @224 | weights | images | engine | naive img/s | featcache img/s | ratio (target) | "
              f"engine alone img/s | pipeline share (>= {PIPELINE_SHARE_TARGET:.0%}) | naive / featcache peak RSS | "
              "max abs diff of max | GFLOP/s naive / featcache (% of peak) |",
              "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for fig in result["extraction"]:
        for row in fig["rows"]:
            d, fc = row["difference"], row["featcache"]
            lines.append(
                f"| {fig['backbone']} | {fig['weights'].split(' (')[0]} | {row['images']:,} | "
                f"{fc['engine']} {fc.get('precision', 'f32')}, {fc.get('feed', 'prepared')} | "
                f"{row['naive']['images_per_s']:.1f} ({row['naive']['images_per_s_median_batch']:.1f}) | "
                f"{fc['images_per_s']:.1f} ({fc['images_per_s_median_batch']:.1f}) | "
                f"**{row['ratio']:.2f}x** ({row['ratio_median_batch']:.2f}x) (>= {fig['ratio_target']}x) | "
                f"{row['engine_alone']['images_per_s']:.1f} | **{row['pipeline_share']:.0%}** | "
                f"{row['naive']['peak_mb']:.0f} / {fc['peak_mb']:.0f} MB | "
                f"{d['max_abs_diff']:.2g} of {d['max_abs_feature']:.3g} | {row['gflops_naive']:.1f} / "
                f"{row['gflops_featcache']:.1f} ({100 * row['peak_fraction_naive']:.0f}% / "
                f"{100 * row['peak_fraction_featcache']:.0f}%) |")
    lines.append("")
    for fig in result["extraction"]:
        lines.append(f"- {fig['backbone']}: {fig['flops']['flops_per_image'] / 1e9:.2f} GFLOP per image at 224 "
                     f"({fig['flops']['method']}); weights: {fig['weights']}; images: {fig['images']}. "
                     f"{'; '.join(fig.get('auto_decision', []))}. featcache "
                     f"peak RSS grows {fig['featcache_rss_slope_mb_per_1000_images']:.1f} MB per 1,000 images "
                     f"(extrapolated to 60,000 images: {fig['featcache_rss_extrapolated_60000_mb']:.0f} MB; "
                     f"target <= {RSS_TARGET_MB} MB); median ratio over sizes {fig['ratio_median']:.2f}x "
                     f"({fig['ratio_median_batch']:.2f}x from batch cadence; target >= {fig['ratio_target']}x).")
    lines.append("")
    fig2 = result["head_vs_end_to_end"]
    lines += ["## 2. Head from the cache vs end to end", ""]
    head = fig2["head"]
    e2e = fig2["end_to_end"]
    if "skipped" in head:
        lines.append(f"- mlp head: **skipped**: {head['skipped']}.")
    else:
        lines.append(f"- 20-epoch mlp head on {fig2['rows']:,} x 2,048 float16 random features: "
                     f"{head['seconds']:.1f} s ({head.get('note', 'featcache.heads')}).")
    lines.append(f"- One end-to-end epoch, {e2e['backbone']} at {e2e['size']} (backbone frozen, Resizing in the "
                 f"model, mlp head 256-128-64 with dropout 0.5, `train_on_batch` of {e2e['batch_size']}): median step "
                 f"{e2e['step_seconds_median']:.2f} s over {e2e['sample_images']} images = {e2e['images_per_s']:.1f} "
                 f"img/s, **extrapolated** to {fig2['rows']:,} images: "
                 f"{fig2['end_to_end_epoch_seconds_extrapolated'] / 60:.0f} min.")
    if "ratio_one_e2e_epoch_over_20_head_epochs" in fig2:
        lines.append(f"- Ratio: one end-to-end epoch takes **{fig2['ratio_one_e2e_epoch_over_20_head_epochs']:.0f}x** "
                     "as long as 20 head epochs from the cache.")
    warm = result["warm"]
    lines += ["", "## 3. Warm cache", "",
              f"`{warm['command']}` on an existing cache: median **{warm['median_seconds']:.2f} s** over "
              f"{len(warm['seconds'])} calls (target <= {warm['target_seconds']:.0f} s); it prints "
              f"\"{warm['output'][:120]}\".", ""]
    parity = result.get("parity")
    if parity:
        lines += ["## 4. bf16 against f32 features: head accuracy on real data", ""]
        if "skipped" in parity:
            lines.append(f"Skipped: {parity['skipped']}.")
        else:
            lines += [f"{parity['backbone']} at its default size, weights {parity['weights']}, all of the CIFAR-10 "
                      "copy (45,000 train / 5,000 val / 10,000 test); the default heads through `featcache.train_head`.",
                      "", "| head | f32 val / test | bf16 val / test | test difference (target within 0.3 points) |",
                      "|---|---:|---:|---:|"]
            for kind in ("logreg", "mlp"):
                a, b = parity["f32"][kind], parity["bf16"][kind]
                lines.append(f"| {kind} | {100 * a['val']:.2f} / {100 * a['test']:.2f}% | {100 * b['val']:.2f} / "
                             f"{100 * b['test']:.2f}% | **{parity[f'{kind}_test_difference_points']:+.2f}** |")
            lines += ["", f"Extraction: f32 with {parity['f32']['engine']} in {parity['f32']['extract_seconds']:.0f} s, "
                      f"bf16 with {parity['bf16']['engine']} in {parity['bf16']['extract_seconds']:.0f} s "
                      "(60,000 images each, including the one-time scan for the first).", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", action="append", default=[], metavar="BACKBONE=N1,N2",
                        help=f"dataset sizes per backbone (default {DEFAULT_SIZES})")
    parser.add_argument("--data", default=str(DATA), help="images: a CIFAR-10 .tar.gz (else random pixels)")
    parser.add_argument("--engine", default="auto")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--head-rows", type=int, default=50_000)
    parser.add_argument("--e2e-steps", type=int, default=6)
    parser.add_argument("--warm-repeats", type=int, default=5)
    parser.add_argument("--no-parity", action="store_true", help="skip figure 4 (bf16 vs f32 heads, ~20 min)")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed)")
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    sizes = dict(DEFAULT_SIZES)
    for item in args.sizes:
        name, _, values = item.partition("=")
        sizes[name] = tuple(int(v) for v in values.split(","))
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="featcache-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    for stale in (work / "cache").glob("*.h5"):  # a reused --work keeps converted weights, never features
        stale.unlink()
    started = time.perf_counter()
    command = "python bench/run.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {"command": command.strip(), "machine": machine_info(),
              "settings": {"engine": args.engine, "batch_size": args.batch_size, "sizes": sizes}}
    try:
        say("numpy matmul peak")
        result["matmul_peak"] = peak = matmul_peak()
        result["extraction"] = [figure_extraction(name, tuple(n), work, Path(args.data), peak, args.engine,
                                                  args.batch_size) for name, n in sizes.items()]
        result["head_vs_end_to_end"] = figure_head_vs_end_to_end(work, args.head_rows, args.e2e_steps)
        lite = result["extraction"][0]
        say("warm cache calls")
        say("numpy matmul peak, again")
        again = matmul_peak()
        if again["gflops"] > peak["gflops"]:
            peak.update(gflops=again["gflops"], by_size=again["by_size"])
            for fig in result["extraction"]:
                for row in fig["rows"]:
                    for side in ("naive", "featcache"):
                        row[f"peak_fraction_{side}"] = row[f"gflops_{side}"] / peak["gflops"]
        if not args.no_parity:
            result["parity"] = figure_parity(work, Path(args.data))
        result["warm"] = figure_warm(work, lite["backbone"], "imagenet" if lite["weights"].startswith("ImageNet")
                                     else "none", Path(lite["rows"][0]["folder"]), args.warm_repeats)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    result["wall_seconds"] = time.perf_counter() - started
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = str(out / result_stem())
    Path(stem + ".json.tmp").write_text(json.dumps(result, indent=2, default=str) + "\n")
    os.replace(stem + ".json.tmp", stem + ".json")
    Path(stem + ".md").write_text(markdown(result))
    say(f"wrote {stem}.json and {stem}.md")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
