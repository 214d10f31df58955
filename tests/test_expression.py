"""What decoded faces keep of expression and colour (`vqmae.expression`)."""

from __future__ import annotations

import numpy as np
import pytest

from vqmae.expression import REGIONS, expression_agreement


def faces(n=12, seed=0):
    """Faces whose mouth opening and brow height vary per frame, on skin tones that vary too."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, 64, 64, 3), np.uint8)
    for i in range(n):
        x[i] = rng.integers(120, 200, 3)  # skin colour
        open_ = int(rng.integers(1, 8))
        x[i, 48:48 + open_, 24:40] = 30  # mouth
        brow = int(rng.integers(16, 24))
        x[i, brow:brow + 2, 12:52] = 40  # brows
    return x


def test_identical_crops_keep_everything_and_average_faces_keep_nothing():
    x = faces()
    same = expression_agreement(x, x)
    assert same["mouth_kept"] == pytest.approx(1) and same["eyes_kept"] == pytest.approx(1)
    assert same["colour_corr"] == pytest.approx(1)
    average = np.broadcast_to(x.mean(0).round().astype(np.uint8), x.shape)
    flat = expression_agreement(x, average)
    assert abs(flat["mouth_kept"]) < 0.05 and abs(flat["eyes_kept"]) < 0.05
    assert np.isnan(flat["colour_corr"])  # decoded colour never varies


def test_a_blurred_mouth_keeps_less_of_it_than_of_the_eyes():
    x = faces()
    blurred = x.copy()
    t, b, left, r = REGIONS["mouth"]
    region = blurred[:, int(t * 64):int(b * 64), int(left * 64):int(r * 64)].astype(np.float64)
    blurred[:, int(t * 64):int(b * 64), int(left * 64):int(r * 64)] = \
        (0.2 * region + 0.8 * region.mean(0, keepdims=True)).astype(np.uint8)
    got = expression_agreement(x, blurred)
    assert got["mouth_kept"] < 0.5 < got["eyes_kept"]
    grey = np.repeat(x.mean(-1, keepdims=True).astype(np.uint8), 3, -1)  # colour lost
    assert expression_agreement(x, grey)["colour_corr"] < expression_agreement(x, x)["colour_corr"]
