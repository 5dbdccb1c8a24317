"""Augmentation: a pure function of (seed, epoch, sample index); hand-checked flips and shifts."""
import numpy as np
import pytest

from partrain.augment import augment_batch, decisions, shift_flip

IMAGES = np.random.default_rng(0).integers(0, 256, (300, 3, 32, 32), dtype=np.uint8)


@pytest.mark.parametrize("pieces", [2, 3, 4])
def test_same_samples_however_the_batch_is_split(pieces):
    idx = np.random.default_rng(1).permutation(len(IMAGES))[:64]
    whole = augment_batch(IMAGES, idx, seed=7, epoch=3)
    parts = [augment_batch(IMAGES, part, seed=7, epoch=3) for part in np.array_split(idx, pieces)]
    np.testing.assert_array_equal(np.concatenate(parts), whole)
    # ...and whatever the order in which the samples come.
    rev = augment_batch(IMAGES, idx[::-1], seed=7, epoch=3)
    np.testing.assert_array_equal(rev[::-1], whole)


def test_out_buffer_and_dtype():
    idx = np.arange(10)
    buf = np.empty((16, 3, 32, 32), np.uint8)
    got = augment_batch(IMAGES, idx, 0, 0, out=buf)
    assert got.dtype == np.uint8 and got.shape == (10, 3, 32, 32)
    assert np.shares_memory(got, buf)
    np.testing.assert_array_equal(got, augment_batch(IMAGES, idx, 0, 0))


def test_no_augmentation_is_identity():
    idx = np.array([5, 2, 9])
    np.testing.assert_array_equal(augment_batch(IMAGES, idx, 0, 0, flip=False, translate=0),
                                  IMAGES[idx])


def test_shift_and_flip_by_hand():
    img = np.arange(16, dtype=np.uint8).reshape(1, 1, 4, 4)
    # rows of img: [0 1 2 3] [4 5 6 7] [8 9 10 11] [12 13 14 15]
    one = lambda f, dy, dx: shift_flip(img, np.array([f]), np.array([dy]), np.array([dx]), 2)[0, 0]
    np.testing.assert_array_equal(one(False, 0, 0), img[0, 0])
    # window one column right: out[y, x] = img[y, x+1], the last column reflects (x=4 -> 2)
    np.testing.assert_array_equal(one(False, 0, 1), [[1, 2, 3, 2], [5, 6, 7, 6], [9, 10, 11, 10],
                                                     [13, 14, 15, 14]])
    # window two rows up: out[y] = img[y-2], reflected: rows 2, 1, 0, 1
    np.testing.assert_array_equal(one(False, -2, 0), img[0, 0][[2, 1, 0, 1]])
    # flip only mirrors each row
    np.testing.assert_array_equal(one(True, 0, 0), img[0, 0][:, ::-1])
    # shift then flip: rows y+1 = 1, 2, 3, 4->2; columns x-1 = -1->1, 0, 1, 2; then mirrored
    np.testing.assert_array_equal(one(True, 1, -1), np.array([[5, 4, 5, 6], [9, 8, 9, 10],
                                                              [13, 12, 13, 14],
                                                              [9, 8, 9, 10]])[:, ::-1])
    with pytest.raises(ValueError):
        one(False, 3, 0)


def test_augment_batch_applies_its_decisions():
    idx = np.arange(40, 60)
    flips, dy, dx = decisions(3, 5, idx)
    ref = shift_flip(IMAGES[idx], flips, dy, dx, 2)
    np.testing.assert_array_equal(augment_batch(IMAGES, idx, 3, 5), ref)
    # the decisions themselves depend only on each index, not on the others
    f1, y1, x1 = decisions(3, 5, idx[7:8])
    assert (f1[0], y1[0], x1[0]) == (flips[7], dy[7], dx[7])


def test_distribution_of_decisions():
    idx = np.arange(50_000)
    f0, dy0, dx0 = decisions(11, 0, idx)
    f1, dy1, dx1 = decisions(11, 1, idx)
    f2, dy2, dx2 = decisions(11, 2, idx)
    assert abs(f0.mean() - 0.5) < 0.01
    np.testing.assert_array_equal(f1, ~f0)   # alternating flips: every other epoch
    np.testing.assert_array_equal(f2, f0)
    counts = np.bincount((dy0 + 2) * 5 + (dx0 + 2), minlength=25)
    assert counts.size == 25 and np.all(np.abs(counts / len(idx) - 1 / 25) < 0.004), counts
    # fresh offsets every epoch and for every seed: agreement ~ 1/5 per axis, not 1
    assert 0.17 < np.mean(dy0 == dy1) < 0.23 and 0.17 < np.mean(dx1 == dx2) < 0.23
    _, dy_other, _ = decisions(12, 0, idx)
    assert 0.17 < np.mean(dy0 == dy_other) < 0.23
    # dy and dx are independent of each other
    assert abs(np.corrcoef(dy0, dx0)[0, 1]) < 0.02
    f_other, _, _ = decisions(12, 0, idx)
    assert 0.48 < np.mean(f_other == f0) < 0.52


def test_translate_one_and_no_flip():
    f, dy, dx = decisions(0, 0, np.arange(1000), flip=False, translate=1)
    assert not f.any() and set(np.unique(dy)) == {-1, 0, 1} and set(np.unique(dx)) == {-1, 0, 1}
