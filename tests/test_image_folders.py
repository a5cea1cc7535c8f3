"""Image folders and archives: listing, the scan, fingerprints, odd and broken files."""

import tarfile

import numpy as np
import pytest
from conftest import CLASSES, make_image_folder, odd_images

from featcache.datasets import load_dataset
from featcache.errors import FeatcacheError


def test_image_folder_classes_sorted_and_labels(image_folder, cache_dir):
    ds = load_dataset(image_folder, cache_dir)
    assert ds.class_names == sorted(CLASSES)
    assert len(ds["train"]) == 18 and len(ds["test"]) == 6
    assert np.bincount(ds["train"].labels).tolist() == [6, 6, 6]
    assert all(p.endswith((".jpg", ".png")) for p in ds["train"].paths)


def test_fingerprint_stable_and_content_sensitive(image_folder, cache_dir):
    first = load_dataset(image_folder, cache_dir)["train"].fingerprint
    assert load_dataset(image_folder, cache_dir)["train"].fingerprint == first
    target = sorted((image_folder / "train" / "cat").iterdir())[0]
    from PIL import Image

    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(target)
    assert load_dataset(image_folder, cache_dir)["train"].fingerprint != first


def test_tar_gz_extracted_once(tmp_path, cache_dir):
    folder = make_image_folder(tmp_path / "src")
    archive = tmp_path / "tiny.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="tiny")
    ds = load_dataset(archive, cache_dir)
    assert len(ds["train"]) == 18
    extracted = list((cache_dir / "datasets").glob("tiny-*/.featcache-extracted"))
    assert len(extracted) == 1
    mtime = extracted[0].stat().st_mtime_ns
    assert load_dataset(archive, cache_dir)["train"].fingerprint == ds["train"].fingerprint
    assert extracted[0].stat().st_mtime_ns == mtime


def test_tar_with_an_extra_top_level_folder(tmp_path, cache_dir):
    folder = make_image_folder(tmp_path / "src")
    (tmp_path / "__MACOSX").mkdir()
    (tmp_path / "__MACOSX" / "._x").write_bytes(b"junk")
    archive = tmp_path / "mac.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="tiny")
        tar.add(tmp_path / "__MACOSX", arcname="__MACOSX")
    assert len(load_dataset(archive, cache_dir)["train"]) == 18
    empty = tmp_path / "empty.tar.gz"
    with tarfile.open(empty, "w:gz") as tar:
        tar.add(tmp_path / "__MACOSX", arcname="__MACOSX")
    with pytest.raises(FeatcacheError, match=r"no train/ folder at its top or one level down \(it holds __MACOSX/\)"):
        load_dataset(empty, cache_dir)


def test_content_rewritten_with_cp_p_is_noticed(image_folder, cache_dir):
    import os
    import shutil

    first = load_dataset(image_folder, cache_dir)["train"].fingerprint
    target = sorted((image_folder / "train" / "cat").iterdir())[0]
    other = sorted((image_folder / "train" / "dog").iterdir())[0]
    st = target.stat()
    data = bytearray(target.read_bytes())
    replacement = tmp = target.with_name("replacement" + target.suffix)
    shutil.copyfile(other, tmp)
    if tmp.stat().st_size != st.st_size:  # same size and mtime, other content: flip bytes in a copy instead
        data[-3] ^= 0xFF
        tmp.write_bytes(bytes(data))
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
    shutil.copy2(replacement, target)  # cp -p: content replaced, size and mtime kept
    tmp.unlink()
    assert target.stat().st_size == st.st_size and target.stat().st_mtime_ns == st.st_mtime_ns
    assert load_dataset(image_folder, cache_dir, skip_corrupt=True)["train"].fingerprint != first


def test_non_image_files_ignored_with_count(image_folder, cache_dir):
    (image_folder / "train" / "cat" / "notes.txt").write_text("hello")
    ds = load_dataset(image_folder, cache_dir)
    assert ds.ignored_files == 1 and len(ds["train"]) == 18


def test_corrupt_image_stops_with_path_or_is_skipped(image_folder, cache_dir):
    bad = image_folder / "train" / "dog" / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.raises(FeatcacheError, match="bad.jpg"):
        load_dataset(image_folder, cache_dir)
    ds = load_dataset(image_folder, cache_dir, skip_corrupt=True)
    assert ds.skipped == [str(bad)] and len(ds["train"]) == 18


def test_empty_class_folder_is_an_error(image_folder, cache_dir):
    (image_folder / "train" / "zebra").mkdir()
    with pytest.raises(FeatcacheError, match="zebra.*no images"):
        load_dataset(image_folder, cache_dir)


def test_class_in_test_but_not_train(image_folder, cache_dir):
    extra = image_folder / "test" / "zebra"
    extra.mkdir()
    (image_folder / "test" / "cat" / "000.jpg").rename(extra / "000.jpg")
    with pytest.raises(FeatcacheError, match="zebra"):
        load_dataset(image_folder, cache_dir)


def test_single_class_image_folder_is_refused(tmp_path, cache_dir):
    folder = make_image_folder(tmp_path / "data")
    import shutil

    for split in ("train", "test"):
        for extra in sorted((folder / split).iterdir())[1:]:
            shutil.rmtree(extra)
    with pytest.raises(FeatcacheError, match="single training class"):
        load_dataset(folder, cache_dir)


def test_every_image_mode_decodes_to_the_same_rgb(tmp_path, cache_dir):
    import tensorflow as tf

    from featcache.preprocessing import decode_file

    root = make_image_folder(tmp_path / "data", n_train=1, n_test=1)
    from PIL import Image

    cases, deep = odd_images()
    expected = {}
    for name, img in cases.items():
        img.save(root / "train" / "cat" / name)
        with Image.open(root / "train" / "cat" / name) as saved:  # as PIL reads the file back
            expected[name] = deep if name == "deep16.png" else np.asarray(saved.convert("RGB"))
    ds = load_dataset(root, cache_dir)
    assert not ds.skipped
    by_name = {}
    for path in ds["train"].paths:
        by_name[path] = decode_file(tf.constant(path)).numpy()
    originals = sorted(p for p in (root / "train" / "cat").iterdir() if p.name in cases)
    cat_paths = [p for p, label in zip(ds["train"].paths, ds["train"].labels) if label == 0]
    assert len(cat_paths) == len(cases) + 1
    listed = dict(zip(sorted(p for p in (root / "train" / "cat").iterdir()), cat_paths))
    for original in originals:
        got = by_name[listed[original]].astype(int)
        want = expected[original.name].astype(int)
        assert got.shape == want.shape, original.name
        tolerance = 8 if original.suffix == ".jpg" else 0  # JPEG decoders (TF, PIL) differ by rounding
        assert np.abs(got - want).max() <= tolerance, original.name
    # Palette and bilevel BMPs are the ones TensorFlow misreads; they are read from converted copies.
    converted = {o.name for o in originals if listed[o] != str(o)}
    assert converted == {"palette.bmp", "bilevel.bmp", "grey.bmp"} or converted == {"palette.bmp", "bilevel.bmp"}


def test_truncated_png_and_jpeg_are_caught_by_the_scan(image_folder, cache_dir):
    for name in ("001.png", "000.jpg"):
        path = image_folder / "train" / "frog" / name
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(FeatcacheError, match=r"Unreadable image .*frog.*\(and 1 more\).*--skip-corrupt"):
        load_dataset(image_folder, cache_dir)
    ds = load_dataset(image_folder, cache_dir, skip_corrupt=True)
    assert len(ds.skipped) == 2 and len(ds["train"]) == 16


def test_edited_image_invalidates_the_scan(image_folder, cache_dir):
    load_dataset(image_folder, cache_dir)
    path = image_folder / "train" / "cat" / "000.jpg"
    path.write_bytes(b"not an image any more")
    with pytest.raises(FeatcacheError, match="000.jpg"):
        load_dataset(image_folder, cache_dir)


def test_edited_palette_bmp_gets_a_fresh_converted_copy(image_folder, cache_dir):
    import tensorflow as tf
    from PIL import Image

    from featcache.preprocessing import decode_file

    path = image_folder / "train" / "cat" / "palette.bmp"
    seen = []
    for colour in ((200, 10, 10), (10, 10, 200)):  # same size, same mode: only the pixels change
        Image.new("RGB", (5, 4), colour).convert("P").save(path)
        with Image.open(path) as img:
            want = np.asarray(img.convert("RGB"))
        ds = load_dataset(image_folder, cache_dir)
        (read,) = [p for p in ds["train"].paths if p.endswith(".png") and "converted" in p]
        got = decode_file(tf.constant(read)).numpy()
        assert np.array_equal(got, want)
        seen.append(got)
    assert not np.array_equal(*seen)
