"""Engine levers on this CPU: which engine, precision and batch size does ``engine="auto"`` deserve?

Times the forward pass alone (preprocessed random batches, no data
pipeline) for each backbone with: ``model.predict`` (the naive baseline),
featcache's ``keras`` engine (a ``tf.function``), the same function over a
frozen constant graph (``convert_variables_to_constants_v2``), the
``tflite`` engine (LiteRT + XNNPACK) and the ``openvino`` engine in f32 and,
where the CPU computes it natively, bf16, at several batch sizes. Rounds are
interleaved so that load from other processes on a shared machine hits
every variant alike; each figure is the median over rounds.

    .venv/bin/python bench/engines.py --backbones resnet50,efficientnet_lite0 --batches 16,32,64
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from machine import machine_info, result_stem  # noqa: E402


def variants(model, batch_sizes: list[int], artifact_dir: Path, timings: dict) -> dict:
    """name -> (batch size, callable on a float32 batch); one-off costs go to ``timings``."""
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    from featcache.engines import KerasEngine, TFLiteEngine, convert_to_tflite, get_record, native_bf16

    spec = tf.TensorSpec((None,) + tuple(model.input_shape[1:]), tf.float32)
    frozen = convert_variables_to_constants_v2(
        tf.function(lambda x: model(x, training=False)).get_concrete_function(spec))
    start = time.perf_counter()
    path = convert_to_tflite(model, artifact_dir / f"{model.name}.tflite")
    timings["tflite_conversion_seconds"] = time.perf_counter() - start
    timings["tflite_bytes"] = path.stat().st_size
    keras_engine = KerasEngine(model)
    openvino = {}
    if not get_record("openvino").available():
        from featcache.engines import openvino as ov

        start = time.perf_counter()
        ov.convert(model, artifact_dir / f"{model.name}.ov")
        timings["openvino_conversion_seconds"] = time.perf_counter() - start
        for precision in ("f32", "bf16") if native_bf16() else ("f32",):
            openvino[precision] = ov.OpenVINOEngine(artifact_dir / f"{model.name}.ov", precision)
    out = {}
    for b in batch_sizes:
        out[f"predict b{b}"] = (b, lambda x, b=b: model.predict(x, batch_size=b, verbose=0))
        out[f"keras b{b}"] = (b, keras_engine)
        out[f"keras-frozen b{b}"] = (b, frozen_call(frozen))
        out[f"tflite b{b}"] = (b, TFLiteEngine(path, b))
        for precision, engine in openvino.items():
            out[f"openvino-{precision} b{b}"] = (b, engine)
    return out


def frozen_call(frozen):
    """The frozen concrete function returns a list of outputs; the features are the first."""
    import tensorflow as tf

    def call(x):
        result = frozen(tf.constant(x))
        return (result[0] if isinstance(result, (list, tuple)) else result).numpy()

    return call


def measure(backbone: str, size: int, batch_sizes: list[int], rounds: int, images_per_round: int) -> dict:
    from featcache.backbones import create_backbone

    model = create_backbone(backbone, None, size)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        timings: dict = {}
        runs = variants(model, batch_sizes, Path(tmp), timings)
        check = rng.uniform(-120, 130, (max(batch_sizes), size, size, 3)).astype(np.float32)
        reference = np.asarray(model(check, training=False))
        max_diff = {}
        for name, (b, fn) in runs.items():  # warm-up, and agreement with the model
            max_diff[name] = float(np.abs(np.asarray(fn(check[:b])) - reference[:b]).max())
        rates: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(rounds):
            for name, (b, fn) in runs.items():
                steps = max(1, images_per_round // b)
                x = rng.uniform(-120, 130, (b, size, size, 3)).astype(np.float32)
                start = time.perf_counter()
                for _ in range(steps):
                    fn(x)
                rates[name].append(steps * b / (time.perf_counter() - start))
    return {"one_off": timings,
            "variants": {name: {"images_per_s": statistics.median(r), "rounds": r,
                                "max_abs_diff_vs_model": max_diff[name]} for name, r in rates.items()}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", default="resnet50,efficientnet_lite0")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batches", default="16,32,64")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--images", type=int, default=64, help="images per variant per round")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    batch_sizes = [int(b) for b in args.batches.split(",")]
    command = "python bench/engines.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {"command": command.strip(), "machine": machine_info(), "size": args.size, "rounds": args.rounds,
              "images_per_round": args.images, "backbones": {}}
    for backbone in args.backbones.split(","):
        print(f"measuring {backbone} at {args.size} ...", flush=True)
        result["backbones"][backbone] = measure(backbone, args.size, batch_sizes, args.rounds, args.images)
        print(f"  tflite conversion {result['backbones'][backbone]['one_off']['tflite_conversion_seconds']:.1f}s")
        for name, row in result["backbones"][backbone]["variants"].items():
            print(f"  {name:<18} {row['images_per_s']:7.2f} img/s  diff {row['max_abs_diff_vs_model']:.1e}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = str(out / (result_stem() + "-engines"))
    Path(stem + ".json").write_text(json.dumps(result, indent=2) + "\n")
    Path(stem + ".md").write_text(markdown(result))
    print(f"wrote {stem}.json and {stem}.md")
    return 0


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"# Engine levers, {m['date']} on {m['host']}", "",
             f"Command: `{result['command']}`  ", f"Machine: {m['description']}  ",
             f"Forward pass only, random preprocessed batches at {result['size']}px; median images/s over "
             f"{result['rounds']} interleaved rounds of ~{result['images_per_round']} images; load average at start "
             f"{m.get('load_average_at_start', '?')}. Other jobs may share the cores, so compare within a column.", ""]
    for backbone, measured in result["backbones"].items():
        rows = measured["variants"]
        base = rows.get("predict b32", {}).get("images_per_s")
        lines += [f"## {backbone}", "", "| variant | images/s | vs predict b32 | max abs diff vs model |",
                  "|---|---:|---:|---:|"]
        for name, row in sorted(rows.items(), key=lambda kv: -kv[1]["images_per_s"]):
            ratio = f"{row['images_per_s'] / base:.2f}x" if base else "-"
            lines.append(f"| {name} | {row['images_per_s']:.1f} | {ratio} | {row['max_abs_diff_vs_model']:.1e} |")
        one_off = measured["one_off"]
        lines += ["", f"One-off TFLite conversion: {one_off['tflite_conversion_seconds']:.1f} s "
                      f"({one_off['tflite_bytes'] / 2**20:.1f} MB file).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
