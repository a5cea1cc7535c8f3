"""ActivationStream: every row once per pass, a random view per image, bounded memory."""

import h5py
import numpy as np
import pytest

from featcache.finetuning.stream import ActivationStream

SHAPE = (2, 2, 3)


def write(path, values):
    with h5py.File(path, "w") as fh:
        fh["features"] = values.astype(np.float16)
    return path


@pytest.fixture
def views(tmp_path):
    """Two view files of 1,000 rows: every value of row i is i (orig) or i + 0.5 (flip)."""
    n = 1000
    base = np.repeat(np.arange(n, dtype=np.float32)[:, None], int(np.prod(SHAPE)), axis=1) / 4
    return [write(tmp_path / "orig.h5", base), write(tmp_path / "flip.h5", base + 0.125)], n


def test_a_pass_yields_each_row_once_with_its_label(views):
    paths, n = views
    rows = np.random.default_rng(0).choice(n, 700, replace=False)
    labels = np.arange(n) % 7
    stream = ActivationStream(paths, SHAPE, rows, labels, batch_size=32, shuffle=True, seed=1, block_rows=50,
                              mix_blocks=3)
    batches = list(stream)
    assert len(batches) == len(stream) == 22 and all(len(x) == 32 for x, _ in batches[:-1])
    x = np.concatenate([b[0] for b in batches]).reshape(700, -1).astype(np.float32)
    y = np.concatenate([b[1] for b in batches])
    row_of = np.floor(x[:, 0] * 4).astype(int)
    assert sorted(row_of) == sorted(rows) and np.array_equal(y, labels[row_of])
    assert (x == x[:, :1]).all()  # one view per image, never a mix inside an image
    flipped = (x[:, 0] * 4 - row_of) > 0.25
    assert 0.35 < flipped.mean() < 0.65  # both views drawn, about equally
    assert not np.array_equal(row_of, np.sort(row_of))  # shuffled
    # a second pass draws other views and another order
    x2 = np.concatenate([b[0] for b in stream]).reshape(700, -1).astype(np.float32)
    assert not np.array_equal(x2, x)


def test_memory_is_bounded_by_the_blocks_not_the_rows(views, tmp_path):
    paths, n = views
    small = ActivationStream(paths, SHAPE, np.arange(200), np.zeros(n), 16, shuffle=True, block_rows=40, mix_blocks=2)
    large = ActivationStream(paths, SHAPE, np.arange(n), np.zeros(n), 16, shuffle=True, block_rows=40, mix_blocks=2)
    for stream in (small, large):
        for _ in stream:
            pass
    assert small.peak_rows == large.peak_rows <= 2 * 40 + 16


def test_unshuffled_reads_the_first_view_in_order(views):
    paths, n = views
    rows = np.array([5, 3, 900, 4])
    x = np.concatenate([b[0] for b in ActivationStream(paths, SHAPE, rows, np.zeros(n), 3)]).astype(np.float32)
    assert np.array_equal(x[:, 0, 0, 0] * 4, rows)
