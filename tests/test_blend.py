"""The blend is a real feathered blend (DESIGN invariant 1b), checked against an independent re-derivation.

A per-pixel model cannot tell a Tukey blend from a plain average: any positive weights give the same
answer. These tests use models whose output depends on where a pixel lies in its tile
(``tests/models.py``): a constant per tile, and a model that is wrong within ``k`` px of the tile
border. The expected result is computed here from first principles (our own tile grid and our own
window formula, in float64), not with ``geoseg.tiling``.

What the design guarantees (tile 352, stride 264, hence 88 px cosine ramps):

* along an axis, the ramps of two tiles ``stride`` apart cover exactly their overlap and sum to one
  there (``up[i] + up[87 - i] = 1``); the flush last tile overlaps its neighbour by more, and the
  division by the sum of weights keeps the mix exact; per axis that sum is >= 1 everywhere;
* no weight is zero (the window is sampled at pixel centres): a pixel within ``k`` px of a tile side
  still gets weight ``up[k - 1]`` (0.018 for k = 8) from that tile, so a border fault is *damped*,
  by at most ``2 up[k - 1]`` (two axes) wherever another tile sees the pixel, not removed;
* sides on the raster boundary are not tapered, and only one tile covers a pixel there, so a border
  fault stays at the raster's own edges: no other tile exists to correct it.

Tolerances: the pipeline accumulates float32 products of float32 weights (at most 9 tiles cover a
pixel) and divides once; every operand is in [0, 1], so each step rounds by <= 2^-24 (6e-8) and the
whole by < 1e-6. ``ATOL = 1e-5`` leaves 10x margin; this is elementwise IEEE arithmetic (no
reductions, no BLAS), so it does not depend on the CPU or the thread count. Every mutant of the
blend moves values by > 1e-3.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import rasterio

import geoseg
from geoseg.raster import inspect_raster, open_input, read_rgb
from geoseg.tiling import Region

from .models import BorderFaultyFactory, PerPixelSegmenter, TileConstantFactory
from .rasters import write

TILE, STRIDE = 352, 264
RAMP = TILE - STRIDE
ATOL = 1e-5  # see the module docstring: elementwise float32, < 1e-6 of rounding in [0, 1] values


# -- an independent re-derivation of the blend -------------------------------------------------------

def starts(length: int, tile: int = TILE, stride: int = STRIDE) -> list[int]:
    """Tile origins: step by ``stride`` while the tile ends before the raster does; the last one flush."""
    out = [0]
    while out[-1] + tile < length:
        out.append(min(out[-1] + stride, length - tile))
    return out


def up(i, ramp: int = RAMP):
    """The rising half of a Tukey window sampled at pixel centres (i = 0 .. ramp - 1)."""
    return 0.5 * (1.0 - np.cos(np.pi * (np.asarray(i, float) + 0.5) / ramp))


def weights_1d(start: int, length: int, tile: int = TILE, stride: int = STRIDE) -> np.ndarray:
    """Weight by distance to the nearest *tapered* side (a side on the raster boundary is not one)."""
    ramp = min(tile - stride, tile // 2)
    o = np.arange(tile, dtype=float)
    d = np.full(tile, np.inf)
    if start > 0:
        d = np.minimum(d, o)
    if start + tile < length:
        d = np.minimum(d, tile - 1 - o)
    if ramp == 0:
        return np.ones(tile)
    return np.where(d < ramp, 0.5 * (1.0 - np.cos(np.pi * (np.minimum(d, ramp) + 0.5) / ramp)), 1.0)


def expected_blend(height: int, width: int, tile_output) -> np.ndarray:
    """Σ w_t · out_t / Σ w_t in float64; ``tile_output(row, col)`` gives a tile's (tile, tile) output."""
    acc = np.zeros((height + TILE, width + TILE))
    wsum = np.zeros_like(acc)
    for r in starts(height):
        wy = weights_1d(r, height)
        for c in starts(width):
            w = np.outer(wy, weights_1d(c, width))
            acc[r:r + TILE, c:c + TILE] += w * tile_output(r, c)
            wsum[r:r + TILE, c:c + TILE] += w
    return acc[:height, :width] / wsum[:height, :width]


# -- running the product ---------------------------------------------------------------------------------

def noise(height: int, width: int, seed: int) -> np.ndarray:
    """Uniform uint8 noise: every tile's centre value differs from its neighbours'."""
    return np.random.default_rng(seed).integers(0, 256, (3, height, width), dtype=np.uint8)


def model_input(src) -> np.ndarray:
    """The whole image as the model sees it (3, H, W) float32, padded by one tile of zeros."""
    info = inspect_raster(str(src))
    with open_input(info) as ds:
        rgb, valid = read_rgb(ds, info, Region(0, 0, info.height, info.width))
    assert valid.all()
    return np.pad(rgb, ((0, 0), (0, TILE), (0, TILE)))


def segment(tmp_path, src, client, factory, name="out", chunk_size=4096) -> np.ndarray:
    cfg = geoseg.SegmentConfig(str(src), ("a",), tmp_path / name, chunk_size=chunk_size)
    result = geoseg.segment(cfg, client=client, segmenter_factory=factory)
    with rasterio.open(result.probabilities) as ds:
        return ds.read(1)


def tile_constant_expected(rgb: np.ndarray) -> np.ndarray:
    h, w = rgb.shape[1] - TILE, rgb.shape[2] - TILE
    return expected_blend(h, w, lambda r, c: rgb[0, r + TILE // 2, c + TILE // 2])


def border_faulty_expected(rgb: np.ndarray, factory: BorderFaultyFactory) -> tuple[np.ndarray, np.ndarray]:
    """(expected blend, per-pixel truth) for the border-faulty model."""
    h, w = rgb.shape[1] - TILE, rgb.shape[2] - TILE
    truth = PerPixelSegmenter(factory.weights, factory.bias, factory.gain).whole_image(rgb)[0].astype(float)
    k = factory.border
    faulty = np.zeros((TILE, TILE), bool)
    faulty[:k] = faulty[-k:] = True
    faulty[:, :k] = faulty[:, -k:] = True

    def out(r, c):
        return np.where(faulty, factory.fault, truth[r:r + TILE, c:c + TILE])

    return expected_blend(h, w, out), truth[:h, :w]


# shapes: flush last tiles overlapping their neighbour by more than the ramp (700: starts 0, 264, 348;
# 617: 0, 264, 265, almost a full tile of overlap), and an axis shorter than a tile (300).
SHAPES = [(700, 1000), (617, 300)]


@pytest.mark.parametrize("shape", SHAPES)
def test_tile_constant_blend_is_the_weighted_mix(tmp_path, inproc_client, shape):
    src = write(tmp_path / "in.tif", noise(*shape, seed=11))
    rgb = model_input(src)
    got = segment(tmp_path, src, inproc_client, TileConstantFactory(), chunk_size=400)
    want = tile_constant_expected(rgb)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)


def test_tile_constant_blend_is_continuous(tmp_path, inproc_client):
    """Neighbouring pixels differ by at most the weights' own step times the spread of the constants.

    With v = Σ w_t c_t / Σ w_t and Σ w >= 1 per axis, a one-pixel step moves v by at most
    Σ_t |Δw_t| · max|c_t - c_t'| (Δw only along the step's axis). A plain average jumps by half the
    difference of two tile constants where a tile starts; so would a mis-normalised or mis-ramped blend.
    """
    h, w = 700, 1000
    src = write(tmp_path / "in.tif", noise(h, w, seed=12))
    rgb = model_input(src)
    got = segment(tmp_path, src, inproc_client, TileConstantFactory()).astype(float)
    consts = np.array([[rgb[0, r + TILE // 2, c + TILE // 2] for c in starts(w)] for r in starts(h)])
    spread = consts.max() - consts.min()
    assert spread > 0.5, "the tiles' constants must differ for the test to mean anything"

    def max_step(length):  # max over x of Σ_t |w_t(x + 1) - w_t(x)| (a tile adds 0 outside itself)
        total = np.zeros(length + TILE)
        for s in starts(length):
            wt = np.zeros(length + TILE + 1)
            wt[s:s + TILE] = weights_1d(s, length)
            total += np.abs(np.diff(wt))[:length + TILE]
        return total[:length - 1].max()

    step_y, step_x = max_step(h), max_step(w)
    assert step_x < 0.06 and step_y < 0.06  # a few times sin(pi / 176) = 0.018
    assert np.abs(np.diff(got, axis=1)).max() <= step_x * spread + ATOL
    assert np.abs(np.diff(got, axis=0)).max() <= step_y * spread + ATOL


@pytest.mark.parametrize("shape", SHAPES)
def test_border_fault_is_damped_away_from_the_raster_edges(tmp_path, inproc_client, shape):
    factory = BorderFaultyFactory(border=8, fault=1.0)
    src = write(tmp_path / "in.tif", noise(*shape, seed=13))
    rgb = model_input(src)
    got = segment(tmp_path, src, inproc_client, factory, chunk_size=400).astype(float)
    want, truth = border_faulty_expected(rgb, factory)
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)
    k = factory.border
    # away from the raster's own edges every faulty sample is weighted <= up[k-1] per axis, against
    # a per-axis sum of weights >= 1: the error is at most 2 up[k-1] (0.036), a plain average's 0.5
    inner = (slice(k, -k), slice(k, -k))
    bound = 2 * float(up(k - 1)) * np.abs(factory.fault - truth[inner]).max()
    err = np.abs(got[inner] - truth[inner])
    assert err.max() <= bound + ATOL
    # ... and the model really is faulty: on the raster's own edge no other tile can correct it
    for edge in (got[0], got[-1], got[:, 0]):
        np.testing.assert_allclose(edge, factory.fault, rtol=0, atol=ATOL)
    assert err.max() > 1e-4  # damped, not removed: no weight is zero


@pytest.mark.parametrize("factory", [TileConstantFactory(), BorderFaultyFactory(border=8)], ids=["constant", "faulty"])
def test_chunk_pixels_equal_the_whole_image_blend(tmp_path, inproc_client, factory):
    """Bit-identical for any chunk size: each chunk runs every global-grid tile touching it, and a
    pixel receives its tiles' terms in the same (row-major global) order whatever the chunk, so the
    float32 sums are the same operations in the same order."""
    h, w = 900, 1000
    src = write(tmp_path / "in.tif", noise(h, w, seed=14), tiled=True, blockxsize=128, blockysize=128)
    outs = {c: segment(tmp_path, src, inproc_client, factory, name=f"c{c}", chunk_size=c) for c in (352, 640, 4096)}
    for c in (352, 640):
        assert np.array_equal(outs[c], outs[4096]), f"chunk size {c} changed pixels"
    rgb = model_input(src)
    want = (tile_constant_expected(rgb) if isinstance(factory, TileConstantFactory)
            else border_faulty_expected(rgb, factory)[0])
    np.testing.assert_allclose(outs[352], want, rtol=0, atol=ATOL)


def test_independent_weights_match_the_design():
    """Sanity of the re-derivation itself: 88 px ramps that sum to one across a regular overlap."""
    assert RAMP == 88
    i = np.arange(RAMP)
    np.testing.assert_allclose(up(i) + up(RAMP - 1 - i), 1.0, rtol=0, atol=1e-15)  # float64 identity
    assert starts(700) == [0, 264, 348] and starts(617) == [0, 264, 265] and starts(300) == [0]
    assert starts(352) == [0] and starts(353) == [0, 1]
    assert math.isclose(float(up(0)), 0.5 * (1 - math.cos(math.pi / 176)))
