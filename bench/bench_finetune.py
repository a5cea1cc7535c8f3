"""Cached fine-tuning against the same training end to end, side by side on one CIFAR-10 subset.

Both routes start from the same lite0 linear head, train the same layers (those
above the cut: ``--cut top:2`` cached, ``--unfreeze above:top:2`` end to end)
for the same epochs at the same learning rate and schedule, with the same
augmentation (a horizontal mirror: a cached ``flip`` view against
``RandomFlip``), once per cut of ``--cuts``. The cached route's wall time
includes its activation extraction. Then the peak RSS of cached training
(activations already cached, the first cut) at two train sizes. Every step is
a ``featcache`` CLI call in its own process, timed from outside, reporting its
own peak RSS.

    .venv/bin/python bench/bench_finetune.py                  # defaults: about 20 min on 2 idle cores
    .venv/bin/python bench/bench_finetune.py --train 1000 --epochs 1 --cuts top:1 --rss-sizes 500,1000   # smoke run

Writes ``bench/results/<date>-<host>-finetune.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
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


def subset_folder(n: int, work: Path, source: Path, n_test: int) -> Path:
    """``n`` train and ``n_test`` test images, a seeded sample of CIFAR-10's train split, as an image folder of
    hard links (the test images are held out of the sample, not taken from CIFAR-10's test split)."""
    _, labels, files, _ = load_images(n + n_test, source, work / "sample")
    test = np.zeros(len(files), bool)
    test[np.random.default_rng(1).choice(len(files), n_test, replace=False)] = True
    folder = work / f"cifar-{n}-{n_test}"
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
    parser.add_argument("--rss-sizes", default="2000,8000", help="train sizes of the cached RSS runs ('' for none)")
    parser.add_argument("--work", default=None)
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args()
    cuts = [c for c in args.cuts.split(",") if c]
    if not cuts:
        parser.error("--cuts needs at least one cut, e.g. top:2")
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
    for cut in cuts:
        figures = {}
        say(f"cut {cut}, cached: activation extraction (orig + flip views) and training")
        figures["cached"] = cli("finetune", *common, "-d", str(folder), "--cache-dir", str(cache),
                                "--mode", "cached", "--cut", cut, "--views", "orig,flip")
        figures["cached"]["record"] = newest_record(cache)
        say(f"cut {cut}, cached: {figures['cached']['seconds']} s, val {figures['cached']['record']['val_acc']:.4f}")
        say(f"cut {cut}, end to end: the same layers, epochs and schedule, RandomFlip, every step through the "
            "whole network")
        figures["full"] = cli("finetune", *common, "-d", str(folder), "--cache-dir", str(cache), "--mode", "full",
                              "--unfreeze", f"above:{cut}", "--translate", "0")
        figures["full"]["record"] = newest_record(cache)
        say(f"cut {cut}, end to end: {figures['full']['seconds']} s, val {figures['full']['record']['val_acc']:.4f}")
        for route in figures.values():
            route.pop("stdout")
        result["figures"]["side_by_side"][cut] = figures

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
        "| cut | route | wall | of which extraction / training | peak RSS | val acc | test acc |",
        "|---|---|---|---|---|---|---|",
    ]
    ratios = []
    for cut, side in result["figures"]["side_by_side"].items():
        c, f = side["cached"], side["full"]
        rec = c["record"]
        parts = f"{rec.get('activation_seconds', float('nan')):.0f} s / {rec.get('train_seconds', float('nan')):.0f} s"
        lines += [
            f"| {cut} | cached (`--mode cached --cut {cut} --views orig,flip`) | {c['seconds']:.0f} s | {parts} "
            f"| {c['peak_rss_mb']:.0f} MB | {rec['val_acc']:.4f} | {rec['test_acc']:.4f} |",
            f"| {cut} | end to end (`--mode full --unfreeze above:{cut} --translate 0`) | {f['seconds']:.0f} s | | "
            f"{f['peak_rss_mb']:.0f} MB | {f['record']['val_acc']:.4f} | {f['record']['test_acc']:.4f} |",
        ]
        ratios.append(f"{cut} **{c['seconds'] / f['seconds']:.2f}**")
    lines += ["", f"Cached / end to end wall time: {', '.join(ratios)} (target <= 0.33).", ""]
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
