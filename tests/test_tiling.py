"""Properties of the global tile grid and the Tukey weights, for any raster length, tile and stride.

Weights are float64 from ``axis_weights`` (``tile_weights`` casts their outer product to float32).
The only non-exact identity used is ``up[i] + up[R-1-i] = 1`` (cosines of supplementary angles):
two float64 cosines and a few float64 operations, so within 1e-12; everything else is exact
(comparisons of ones, integer grid maths).
"""

from __future__ import annotations

import math
from itertools import pairwise

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from geoseg.tiling import (
    Region,
    axis_weights,
    halo,
    tile_starts,
    tile_weights,
    tiles_touching,
)

EPS64 = 1e-12  # a few float64 roundings of values <= 1 (see the module docstring)


@st.composite
def grids(draw, max_length=1500):
    tile = draw(st.integers(1, 400))
    stride = draw(st.integers(1, tile))
    length = draw(st.integers(1, max_length))
    return length, tile, stride


def coverage(length, tile, stride):
    """(per-pixel sum of weights over [0, length), list of (start, weights)) along one axis."""
    tiles = [(s, axis_weights(s, length, tile, stride)) for s in tile_starts(length, tile, stride)]
    total = np.zeros(max(length, tile))
    for s, w in tiles:
        total[s:s + tile] += w
    return total[:length], tiles


@settings(max_examples=150, deadline=None)
@given(grids())
def test_tile_starts_cover_every_pixel_with_a_flush_last_tile(g):
    length, tile, stride = g
    s = tile_starts(length, tile, stride)
    assert s[0] == 0
    assert s[-1] == max(0, length - tile), "the last tile is flush with the raster edge"
    assert all(b > a for a, b in pairwise(s))
    assert all(b - a == stride for a, b in pairwise(s[:-1])) and all(b - a <= stride for a, b in pairwise(s))
    covered = np.zeros(max(length, tile), bool)
    for a in s:
        covered[a:a + tile] = True
    assert covered[:length].all()
    assert len(s) == (1 if length <= tile else math.ceil((length - tile) / stride) + 1)


@settings(max_examples=150, deadline=None)
@given(grids())
def test_weights_positive_untapered_at_the_boundary_and_normalisable(g):
    length, tile, stride = g
    total, tiles = coverage(length, tile, stride)
    for s, w in tiles:
        assert w.shape == (tile,) and (w > 0).all() and (w <= 1).all()
        if s == 0:
            assert (w[: tile // 2] == 1).all(), "a side on the raster boundary is not tapered"
        if s + tile >= length:
            assert (w[tile // 2:] == 1).all(), "a side on the raster boundary is not tapered"
    # every pixel has weight; per axis the sum is >= 1, so a tile's share is never amplified
    assert (total >= 1 - EPS64).all()


@settings(max_examples=150, deadline=None)
@given(grids())
def test_ramps_are_continuous_and_neighbouring_ramps_sum_to_one(g):
    length, tile, stride = g
    ramp = min(tile - stride, tile // 2)
    _, tiles = coverage(length, tile, stride)
    # one pixel step of a cosine ramp sampled at pixel centres: sin(pi/(2R)) at most
    max_step = math.sin(math.pi / (2 * ramp)) if ramp else 0.0
    for _, w in tiles:
        assert np.abs(np.diff(w)).max(initial=0) <= max_step + EPS64
    if stride * 2 >= tile:  # ramp == overlap: two tiles a stride apart meet ramp to ramp
        for (a, wa), (b, wb) in pairwise(tiles):
            if b - a != stride:
                continue  # the flush last tile overlaps more; the division by Σw handles it
            overlap = tile - stride
            np.testing.assert_allclose(wa[stride:] + wb[:overlap], 1.0, rtol=0, atol=EPS64)
            # ... and outside the overlap each tile is flat: its ramp is exactly the overlap
            assert (wa[:stride][ramp:] == 1).all() and (wb[overlap:][: tile - 2 * ramp] == 1).all()


def test_the_default_design():
    """352 px tiles every 264 px: 88 px ramps, the last tile flush, ramps summing to one."""
    s = tile_starts(1000, 352, 264)
    assert s == (0, 264, 528, 648)
    w = [axis_weights(a, 1000, 352, 264) for a in s]
    assert (w[0][:264] == 1).all() and w[0][264] < 1 and w[1][0] < 1e-4
    np.testing.assert_allclose(w[1][264:] + w[2][:88], 1.0, rtol=0, atol=EPS64)
    assert (w[3][176:] == 1).all() and w[3][0] < 1e-4
    t = tile_weights(Region(264, 0, 352, 352), 1000, 1000, 352, 264)
    assert t.dtype == np.float32
    # float32 cast of the float64 outer product: exact up to one float32 rounding
    np.testing.assert_allclose(t, np.outer(w[1], w[0]), rtol=2 ** -24, atol=0)


@settings(max_examples=60, deadline=None)
@given(grids(max_length=900), st.data())
def test_tiles_touching_a_region_are_every_tile_that_overlaps_it(g, data):
    """A chunk's halo holds every global-grid tile touching it, in row-major order (one tile fewer
    and that chunk's pixels would differ from the whole-image blend)."""
    length, tile, stride = g
    width = data.draw(st.integers(1, 900))
    r0 = data.draw(st.integers(0, length - 1))
    c0 = data.draw(st.integers(0, width - 1))
    region = Region(r0, c0, data.draw(st.integers(1, length - r0)), data.draw(st.integers(1, width - c0)))
    got = tiles_touching(region, length, width, tile, stride)
    want = [Region(r, c, tile, tile) for r in tile_starts(length, tile, stride)
            for c in tile_starts(width, tile, stride) if Region(r, c, tile, tile).intersection(region)]
    assert got == want
    window = halo(got, length, width)
    assert window.intersection(region) == region
