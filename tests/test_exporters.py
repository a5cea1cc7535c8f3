"""Exports of every run kind in every format: self-checked, standalone, atomic; bad input in one line.

Runs are made once for the module on tiny random-weight backbones (``tests/tiny.py``):
logreg, linear and mlp heads, a concatenated ``tiny_a+tiny_b`` head over two views, and a
fine-tune run. Exports run back through featcache's own runners and, in a subprocess with
featcache hidden, through plain TensorFlow and LiteRT.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tiny
from featcache import image_model
from featcache.errors import FeatcacheError, InvalidArgument
from featcache.exporters import EXPORTERS, ExportOptions, export_run
from featcache.runs import load_run

tiny.register_tiny()
KINDS = ("logreg", "linear", "mlp", "concat_views", "finetune", "finetune_cached")


def quiet(message: str) -> None:
    pass


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """{kind: run} on one tiny image folder, plus the settings and test images."""
    root = tmp_path_factory.mktemp("exporters")
    data = tiny.make_data(root / "data")
    settings = tiny.tiny_settings(data, root / "cache")
    runs = {kind: tiny.head_run(settings, kind) for kind in ("logreg", "linear", "mlp")}
    both = tiny.tiny_settings(data, root / "cache", "tiny_a+tiny_b", ("orig", "flip"))
    runs["concat_views"] = tiny.head_run(both, "mlp")
    runs["finetune"] = tiny.finetune_run(settings, runs["mlp"])
    runs["finetune_cached"] = tiny.finetune_run(settings, runs["mlp"], mode="cached")
    images = sorted((data / "test").glob("*/*"))
    return {"runs": runs, "settings": settings, "cache_dir": Path(settings.cache_dir), "images": images, "root": root}


def pixels(paths) -> list[np.ndarray]:
    from featcache.decoding import read_image

    return [read_image(p).astype(np.float32)[None] for p in paths]


@pytest.mark.parametrize("kind", KINDS)
def test_every_run_kind_exports_in_every_format(made, kind):
    run = made["runs"][kind]
    assert run.val_acc is not None and run.val_acc > 0.9  # colour-coded classes: the check below means something
    model = image_model.build_image_model(run, made["cache_dir"])
    expected = np.concatenate([np.asarray(model(x, training=False)) for x in pixels(made["images"])])
    for name, exporter in EXPORTERS.items():
        entry = export_run(run.run_id, made["cache_dir"], ExportOptions(format=name), log=quiet)
        path = Path(entry["path"])
        assert path == run.path / "exports" / exporter.default_name("none") and path.exists()
        assert entry["passed"] and abs(entry["val_acc"] - run.val_acc) <= 0.005 and entry["n_val"] == run.record["n_val"]
        assert (path.parent / "labels.txt").read_text().split("\n")[:-1] == run.record["class_names"]
        runner = exporter.load(path)
        got = np.concatenate([runner(x) for x in pixels(made["images"])])
        np.testing.assert_allclose(got, expected, atol=2e-4)
        assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temporaries left
    record = json.loads((run.path / "record.json").read_text())
    assert [(e["format"], e["quantize"]) for e in record["exports"]] == [(n, "none") for n in EXPORTERS]


def test_quantised_exports_report_their_difference(made):
    run = made["runs"]["mlp"]
    for quantize in ("float16", "int8"):
        entry = export_run(run.run_id, made["cache_dir"], ExportOptions(format="tflite", quantize=quantize,
                                                                         force=True), log=quiet)
        assert Path(entry["path"]).name == f"model-{quantize}.tflite" and entry["tolerance"] == 0.02
        assert entry["difference"] == pytest.approx(entry["val_acc"] - run.val_acc)
        assert entry["forced"] == (abs(entry["difference"]) > 0.02)
    sizes = {e["quantize"]: e["bytes"] for e in load_run(made["cache_dir"], run.run_id).record["exports"]}
    assert sizes["int8"] < sizes["float16"]


def test_exports_run_where_featcache_cannot_be_imported(made, tmp_path):
    """SavedModel with TensorFlow alone, .tflite with LiteRT alone: featcache is blocked in the subprocess."""
    run = made["runs"]["concat_views"]
    saved = export_run(run.run_id, made["cache_dir"], ExportOptions(format="savedmodel", out=str(tmp_path / "sm")),
                       log=quiet)
    lite = export_run(run.run_id, made["cache_dir"], ExportOptions(format="tflite", out=str(tmp_path / "m.tflite")),
                      log=quiet)
    x = pixels(made["images"][:1])[0]
    np.save(tmp_path / "x.npy", x)
    script = f"""
import sys
sys.modules["featcache"] = None  # any import of featcache now fails
import numpy as np, tensorflow as tf
from ai_edge_litert.interpreter import Interpreter
x = np.load({str(tmp_path / 'x.npy')!r})
out = tf.saved_model.load({saved['path']!r}).signatures["serving_default"](images=tf.constant(x))
lite = Interpreter(model_path={lite['path']!r})
inp = lite.get_input_details()[0]
lite.resize_tensor_input(inp["index"], list(x.shape)); lite.allocate_tensors()
lite.set_tensor(inp["index"], x); lite.invoke()
p = lite.get_tensor(lite.get_output_details()[0]["index"])
names = open({lite['labels']!r}).read().split()
print(out["classes"].numpy()[0].decode(), names[int(p.argmax())], float(np.abs(out["probabilities"].numpy() - p).max()))
try:
    import featcache
    print("featcache importable")
except ImportError:
    print("featcache hidden")
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result, hidden = done.stdout.strip().splitlines()[-2:]
    assert hidden == "featcache hidden"
    sm_class, lite_class, diff = result.split()
    model = image_model.build_image_model(run, made["cache_dir"])
    expected = run.record["class_names"][int(np.asarray(model(x)).argmax())]
    assert sm_class == lite_class == expected and float(diff) < 1e-4


def test_a_broken_export_fails_its_self_check_and_leaves_nothing(made, monkeypatch):
    """Permuting the head's output columns breaks the export: refused, no file, record unchanged."""
    run = made["runs"]["linear"]
    build = image_model.build_image_model

    def broken(run, cache_dir):
        model = build(run, cache_dir)
        layer = next(l for l in image_model.find_layers(model, "Dense") if l.name == "probabilities")
        kernel, bias = layer.get_weights()
        layer.set_weights([np.roll(kernel, 1, axis=1), np.roll(bias, 1)])
        return model

    monkeypatch.setattr(image_model, "build_image_model", broken)
    before = (run.path / "record.json").read_text()
    for options in (ExportOptions(format="keras", out=str(run.path / "broken.keras")),
                    ExportOptions(format="tflite", quantize="float16", out=str(run.path / "broken.tflite"))):
        with pytest.raises(FeatcacheError, match=r"Export refused, nothing written: self-check: validation accuracy "
                                                 r"0\.\d+ on \d+ images against the run's 1\.0000"):
            export_run(run.run_id, made["cache_dir"], options, log=quiet)
        assert not Path(options.out).exists()
        assert not [p for p in run.path.iterdir() if p.name.startswith(".")]
    assert (run.path / "record.json").read_text() == before
    forced = export_run(run.run_id, made["cache_dir"], ExportOptions(format="tflite", quantize="float16", force=True,
                                                                     out=str(run.path / "forced.tflite")), log=quiet)
    assert forced["forced"] and not forced["passed"] and Path(forced["path"]).exists()


def test_bad_input_is_one_clear_error(made, tmp_path):
    run = made["runs"]["mlp"]
    cache = made["cache_dir"]
    cases = [
        (ExportOptions(format="onnx"), InvalidArgument, "Unknown export format 'onnx'; expected one of: 'keras', "
                                                        "'savedmodel', 'tflite'"),
        (ExportOptions(format="keras", quantize="int8"), InvalidArgument, "--quantize int8 is for --format tflite"),
        (ExportOptions(format="tflite", quantize="int4"), InvalidArgument, "Unknown quantisation 'int4'"),
        (ExportOptions(out=str(tmp_path / "missing" / "m.tflite")), FeatcacheError, "the folder .*missing does not exist"),
        (ExportOptions(out=""), InvalidArgument, "--out is empty"),
    ]
    for options, error, message in cases:
        with pytest.raises(error, match=message):
            export_run(run.run_id, cache, options, log=quiet)
    with pytest.raises(FeatcacheError, match="No run 'nosuchrun'"):
        export_run("nosuchrun", cache, log=quiet)
    taken = tmp_path / "taken.tflite"
    taken.write_text("mine")
    with pytest.raises(FeatcacheError, match="taken.tflite already exists; pass --force"):
        export_run(run.run_id, cache, ExportOptions(out=str(taken)), log=quiet)
    folder = tmp_path / "user_folder"
    folder.mkdir()
    with pytest.raises(FeatcacheError, match="is not a featcache savedmodel export; not replacing it"):
        export_run(run.run_id, cache, ExportOptions(format="savedmodel", out=str(folder), force=True), log=quiet)
    assert taken.read_text() == "mine" and folder.is_dir()


def test_int8_with_too_few_training_images(tmp_path):
    from conftest import make_image_folder

    data = make_image_folder(tmp_path / "data", n_train=12, n_test=2, size=16)
    run = tiny.head_run(tiny.tiny_settings(data, tmp_path / "cache"), "linear")
    with pytest.raises(FeatcacheError, match=r"int8 needs at least 100 training images to calibrate on; run .* has "
                                             r"29 besides its validation images"):
        export_run(run.run_id, tmp_path / "cache", ExportOptions(format="tflite", quantize="int8"), log=quiet)
    assert not (run.path / "exports").exists()


@pytest.fixture
def read_only(tmp_path):
    """A real read-only bind mount (root ignores permission bits), as in test_fsio; skipped where not permitted."""
    source, target = tmp_path / "rw", tmp_path / "ro"
    source.mkdir()
    target.mkdir()
    done = subprocess.run(["mount", "--bind", str(source), str(target)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"mounting is not permitted here ({done.stderr.strip() or done.returncode})")
    done = subprocess.run(["mount", "-o", "remount,bind,ro", str(target)], capture_output=True, text=True)
    if done.returncode != 0:
        subprocess.run(["umount", "-l", str(target)], check=False)
        pytest.skip(f"a read-only remount is not permitted here ({done.stderr.strip()})")
    yield target
    subprocess.run(["umount", "-l", str(target)], check=False)


def test_read_only_folder_is_one_line(made, read_only):
    with pytest.raises(FeatcacheError, match=r"^Cannot write the export .*ro/m.tflite: the file system is read-only\.$"):
        export_run(made["runs"]["mlp"].run_id, made["cache_dir"], ExportOptions(out=str(read_only / "m.tflite")),
                   log=quiet)
    assert not list(read_only.iterdir())


def test_force_replaces_an_earlier_export_file_or_folder(made, tmp_path):
    run = made["runs"]["linear"]
    for fmt, out in (("savedmodel", tmp_path / "sm"), ("tflite", tmp_path / "m.tflite")):
        first = export_run(run.run_id, made["cache_dir"], ExportOptions(format=fmt, out=str(out)), log=quiet)
        with pytest.raises(FeatcacheError, match="already exists; pass --force"):
            export_run(run.run_id, made["cache_dir"], ExportOptions(format=fmt, out=str(out)), log=quiet)
        again = export_run(run.run_id, made["cache_dir"], ExportOptions(format=fmt, out=str(out), force=True),
                           log=quiet)
        assert again["path"] == first["path"] and out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.txt", "m.tflite", "sm"]  # nothing aside is left
    paths = [e["path"] for e in load_run(made["cache_dir"], run.run_id).record["exports"]]
    assert paths.count(str(tmp_path / "sm")) == 1  # a replaced export is listed once
