"""Cached fine-tuning against the same training end to end, side by side on one CIFAR-10 subset.

Both routes start from the same lite0 linear head, train the same layers (those
above the cut: ``--cut top:2`` cached, ``--unfreeze above:top:2`` end to end)
for the same epochs at the same learning rate and schedule, with the same
augmentation, once per cut of ``--cuts`` and per view set of ``--views``:
``orig,flip`` draws a cached ``flip`` view against ``RandomFlip`` end to end,
``orig`` (the Makefile's default) has no augmentation on either side. The
cached route's wall time includes its activation extraction; the engine choice
for the cut's lower part (measured and converted once per machine, kept in
``engines/``) is made by an untimed warm-up beforehand, as ``bench/run.py``
does for pooled extraction, and its time is reported beside. Then the peak
RSS of cached training (activations already cached, the first cut) at two
train sizes. Every step is a ``featcache`` CLI call in its own process, timed
from outside, reporting its own peak RSS.

    .venv/bin/python bench/bench_finetune.py                  # defaults: about 30 min on 2 idle cores
    .venv/bin/python bench/bench_finetune.py --train 1000 --epochs 1 --cuts top:1 --rss-sizes 500,1000   # smoke run

Writes ``bench/results/<date>-<host>-finetune.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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
from run import DATA, load_images  # noqa: E402

# Runs the featcache CLI, then prints this process's peak RSS (MB) as the last stderr line.
WRAP = """
import resource, sys
from featcache.cli import main
sys.argv = ["featcache"] + sys.argv[1:]
try:
    main()
finally:
    print("PEAK_RSS_MB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, file=sys.stderr, flush=True)
"""


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def cli(*args: str) -> dict:
    """One featcache call: wall seconds, peak RSS and output; a failure stops the bench with its stderr."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", WRAP, *args], capture_output=True, text=True, env=env, cwd=ROOT)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"featcache {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    rss = [float(line.split()[1]) for line in done.stderr.splitlines() if line.startswith("PEAK_RSS_MB")]
    return {"seconds": round(seconds, 1), "peak_rss_mb": round(rss[-1], 1), "stdout": done.stdout}


def newest_record(cache_dir: Path) -> dict:
    records = sorted((cache_dir / "runs").glob("*/record.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(records[-1].read_text())


def fresh_copy(cache: Path, target: Path) -> Path:
    """The pooled cache, head run and engine choices of ``cache`` in a folder of their own, so that every
    side-by-side pair extracts its activations itself (cache files hard-linked: featcache never rewrites them)."""
    def link_h5(src: str, dst: str) -> None:
        (os.link if src.endswith(".h5") else shutil.copy2)(src, dst)

    shutil.copytree(cache, target, copy_function=link_h5)
    return target


def subset_folder(n: int, work: Path, source: Path, n_test: int, name: str = "cifar") -> Path:
    """``n`` train and ``n_test`` test images, a seeded sample of CIFAR-10's train split, as an image folder of
    hard links (the test images are held out of the sample, not taken from CIFAR-10's test split)."""
    _, labels, files, _ = load_images(n + n_test, source, work / "sample")
    test = np.zeros(len(files), bool)
    test[np.random.default_rng(1).choice(len(files), n_test, replace=False)] = True
    folder = work / f"{name}-{n}-{n_test}"
    for i, (file, label) in enumerate(zip(files, labels)):
        target = folder / ("test" if test[i] else "train") / f"c{int(label)}" / f"{i:06d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            os.link(file, target)
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--train", type=int, default=3000, help="train images of the side-by-side run")
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--cuts", default="top:2,top:1", help="cuts to compare, the first also for the RSS runs")
    parser.add_argument("--views", action="append", default=None,
                        help="a view set to compare, repeatable (default: 'orig,flip' and 'orig')")
    parser.add_argument("--rss-sizes", default="2000,8000", help="train sizes of the cached RSS runs ('' for none)")
    parser.add_argument("--work", default=None)
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args()
    cuts = [c for c in args.cuts.split(",") if c]
    if not cuts:
        parser.error("--cuts needs at least one cut, e.g. top:2")
    args.views = args.views or ["orig,flip", "orig"]
    if any(set(v.split(",")) - {"orig", "flip"} or "orig" not in v.split(",") for v in args.views):
        parser.error(f"--views takes 'orig' or 'orig,flip'; got {args.views}")
    work = Path(args.work or tempfile.mkdtemp(prefix="featcache-bench-ft-"))
    info = machine_info()
    say(f"machine: {info['cpu_model']}, {info['cores']} cores; work folder {work}")
    result = {"machine": info, "args": vars(args), "figures": {}}
    common = ["-b", "efficientnet_lite0", "-w", "imagenet", "--epochs", str(args.epochs), "--no-export",
              "--lr", "3e-4", "--schedule", "cosine"]

    folder = subset_folder(args.train, work, Path(args.data), args.test)
    cache = work / "cache-side-by-side"
    base = ["-b", "efficientnet_lite0", "-w", "imagenet", "-d", str(folder), "--cache-dir", str(cache)]
    say(f"side by side: {args.train} images ({folder.name}); pooled features and a linear head first (untimed)")
    cli("features", *base, "--no-progress")
    cli("head", *base, "--head", "linear")
    result["figures"]["side_by_side"] = {}
    warm = subset_folder(1000, work, Path(args.data), 100, name="warmup")
    for cut in cuts:
        say(f"cut {cut}: engine choice for the lower part (untimed warm-up on {warm.name}, other images)")
        warmup = cli("features", "-b", "efficientnet_lite0", "-w", "imagenet", "-d", str(warm), "--cache-dir",
                     str(cache), "--cut", cut, "--split", "train", "--no-progress")
        warmup.pop("stdout")
        result["figures"]["side_by_side"][cut] = {"engine_warmup": warmup}
        for views in args.views:
            flip = "flip" in views.split(",")
            figures = {}
            pair_cache = fresh_copy(cache, work / f"cache-{cut.replace(':', '')}-{views.replace(',', '-')}")
            say(f"cut {cut}, views {views}, cached: activation extraction and training")
            figures["cached"] = cli("finetune", *common, "-d", str(folder), "--cache-dir", str(pair_cache),
                                    "--mode", "cached", "--cut", cut, "--views", views)
            figures["cached"]["record"] = newest_record(pair_cache)
            say(f"cut {cut}, views {views}, cached: {figures['cached']['seconds']} s, "
                f"val {figures['cached']['record']['val_acc']:.4f}")
            say(f"cut {cut}, views {views}, end to end: the same layers, epochs and schedule"
                f"{', RandomFlip' if flip else ', no augmentation'}, every step through the whole network")
            figures["full"] = cli("finetune", *common, "-d", str(folder), "--cache-dir", str(pair_cache),
                                  "--mode", "full", "--unfreeze", f"above:{cut}", "--translate", "0",
                                  "--flip" if flip else "--no-flip")
            figures["full"]["record"] = newest_record(pair_cache)
            say(f"cut {cut}, views {views}, end to end: {figures['full']['seconds']} s, "
                f"val {figures['full']['record']['val_acc']:.4f}")
            for route in figures.values():
                route.pop("stdout")
            result["figures"]["side_by_side"][cut][views] = figures

    rss = []
    for n in (int(s) for s in args.rss_sizes.split(",") if s):
        folder = subset_folder(n, work, Path(args.data), 200)
        cache = work / f"cache-rss-{n}"
        base = ["-b", "efficientnet_lite0", "-w", "imagenet", "-d", str(folder), "--cache-dir", str(cache)]
        say(f"RSS: {n} train images; features, head and activations first, in their own processes")
        cli("features", *base, "--no-progress")
        cli("head", *base, "--head", "logreg")
        cli("features", *base, "--cut", cuts[0], "--views", "orig,flip", "--split", "train", "--no-progress")
        cli("features", *base, "--cut", cuts[0], "--split", "test", "--no-progress")
        run = cli("finetune", *base, "--mode", "cached", "--cut", cuts[0], "--views", "orig,flip", "--epochs", "1",
                  "--no-export")
        run.pop("stdout")
        rss.append({"train_images": n, **run})
        say(f"RSS: {n} images: peak {run['peak_rss_mb']} MB in {run['seconds']} s")
    result["figures"]["rss"] = rss

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{result_stem()}-finetune"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str))
    stem.with_suffix(".md").write_text(render(result))
    say(f"wrote {stem}.md")
    print(render(result))
    return 0


def render(result: dict) -> str:
    m, a = result["machine"], result["args"]
    lines = [
        f"# Cached fine-tuning against end to end ({m['date']}, {m['cpu_model']}, {m['cores']} cores)", "",
        f"EfficientNet-Lite0 @224 (ImageNet), {a['train']} CIFAR-10 train images (10% of them validation), "
        f"{a['test']} test images, {a['epochs']} epochs above each cut, lr 3e-4 cosine, from the same linear head. "
        "Wall time of each `featcache finetune` call (cached: activation extraction included, then its parts "
        "as the run records them).", "",
        "| cut | views | route | wall | of which extraction / training | peak RSS | val acc | test acc |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ratios, warmups = [], []
    for cut, side in result["figures"]["side_by_side"].items():
        warmups.append(f"{cut} {side['engine_warmup']['seconds']:.0f} s")
        for views, pair in side.items():
            if views == "engine_warmup":
                continue
            c, f = pair["cached"], pair["full"]
            rec = c["record"]
            flip = "--flip" if "flip" in views.split(",") else "--no-flip"
            parts = f"{rec['activation_seconds']:.0f} s / {rec['train_seconds']:.0f} s"
            lines += [
                f"| {cut} | {views} | cached (`--mode cached --cut {cut} --views {views}`) | {c['seconds']:.0f} s "
                f"| {parts} | {c['peak_rss_mb']:.0f} MB | {rec['val_acc']:.4f} | {rec['test_acc']:.4f} |",
                f"| {cut} | {views} | end to end (`--mode full --unfreeze above:{cut} --translate 0 {flip}`) "
                f"| {f['seconds']:.0f} s | | {f['peak_rss_mb']:.0f} MB | {f['record']['val_acc']:.4f} "
                f"| {f['record']['test_acc']:.4f} |",
            ]
            ratios.append(f"{cut} {views} **{c['seconds'] / f['seconds']:.2f}**")
    lines += ["", f"Cached / end to end wall time: {', '.join(ratios)} (target <= 0.33).", "",
              "Untimed warm-up per cut (the engine choice for the lower part, measured and converted once per "
              f"machine and kept in the cache's engines/ folder, on 1,000 other images): {', '.join(warmups)}.", ""]
    if not result["figures"]["rss"]:
        return "\n".join(lines)
    lines += [
        f"Peak RSS of cached training (cut {next(iter(result['figures']['side_by_side']))}, 1 epoch; activations "
        "cached beforehand by `featcache features --cut`):", "",
        "| train images | peak RSS | wall |", "|---|---|---|",
    ]
    lines += [f"| {r['train_images']} | {r['peak_rss_mb']:.0f} MB | {r['seconds']:.0f} s |" for r in result["figures"]["rss"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
