"""Property: for ANY affine geotransform (rotation, shear, flips, pixel size) and raster size,
polygons land exactly where the per-pixel test model says they should.

The expected masks are computed independently of geoseg: the scene is painted from three colour
classes whose per-pixel model response is far from the threshold, plus nodata, so the expected
mask of each prompt is just "pixels of that class". The polygons are mapped back to pixel space
with the inverse of the random transform and burnt (pixel-centre rule): that must reproduce the
masks exactly, which can only happen if geoseg applied the full affine the right way round.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import shapely
from affine import Affine
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import geoseg

from .rasters import BLUE, RED, burn, footprint, read_polygons, same_crs, write

GREEN = (50, 130, 50)
NODATA = (0, 0, 0)
#: class -> colour; class 0 is nodata
COLOURS = np.array([NODATA, GREEN, RED, BLUE], np.uint8)


@st.composite
def geotransforms(draw):
    px = draw(st.floats(0.05, 500.0))
    aspect = draw(st.floats(0.5, 2.0))
    angle = draw(st.sampled_from([0.0, 90.0, 180.0, -90.0]) | st.floats(-180.0, 180.0))
    shear = draw(st.sampled_from([0.0]) | st.floats(-30.0, 30.0))
    flip_x, flip_y = draw(st.booleans()), draw(st.booleans())
    x0 = draw(st.floats(-1e6, 1e6))
    y0 = draw(st.floats(-1e6, 1e7))
    t = (Affine.translation(x0, y0) @ Affine.rotation(angle) @ Affine.shear(shear, 0.0)
         @ Affine.scale(px * (-1 if flip_x else 1), px * aspect * (1 if flip_y else -1)))
    return t


@st.composite
def scenes(draw):
    h = draw(st.integers(1, 120) | st.integers(300, 420))
    w = draw(st.integers(1, 120) | st.integers(300, 420))
    cell = draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    coarse = rng.choice(4, size=(math.ceil(h / cell), math.ceil(w / cell)), p=[0.15, 0.45, 0.2, 0.2])
    classes = np.kron(coarse, np.ones((cell, cell), np.int64))[:h, :w]
    return classes


def expected_masks(classes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per prompt (red roof, blue pool): the pixels of that colour class."""
    return classes == 2, classes == 3


@settings(max_examples=15, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(transform=geotransforms(), classes=scenes())
def test_polygons_land_where_the_model_says(tmp_path_factory, inproc_client, perpixel, transform, classes):
    assert abs(transform.determinant) > 0
    tmp = tmp_path_factory.mktemp("georef")
    h, w = classes.shape
    img = np.moveaxis(COLOURS[classes], -1, 0)
    path = write(tmp / "in.tif", img, crs="EPSG:32633", transform=transform, nodata=0)
    cfg = geoseg.SegmentConfig(str(path), ("red roof", "blue pool"), tmp / "out", chunk_size=352)
    result = geoseg.segment(cfg, client=inproc_client, segmenter_factory=perpixel)

    gdf = read_polygons(result.polygons)
    assert same_crs(gdf.crs, "EPSG:32633")
    scale = max(abs(v) for v in tuple(transform)[:6][:2] + tuple(transform)[3:5])
    # float64 affine of pixel corners: rounding ~1e-16 of the origin's magnitude; 1e-9 of it (and 1e-6
    # px) is far above that and far below any real offset (a pixel)
    foot = footprint(transform, w, h).buffer(1e-6 * scale + 1e-9 * max(abs(transform.c), abs(transform.f)))
    assert shapely.covered_by(gdf.geometry.values, foot).all()
    valid = classes != 0
    for prompt, expected in zip(("red roof", "blue pool"), expected_masks(classes)):
        burnt = burn(gdf.geometry.values[(gdf["prompt"] == prompt).to_numpy()], transform, (h, w))
        assert not (burnt & ~valid).any(), "a polygon covers nodata"
        assert np.array_equal(burnt, expected), f"{prompt}: {np.sum(burnt != expected)} pixels off"
    # area agrees with the pixel count under this transform (pixel area = |det|)
    px_area = abs(transform.determinant)
    for prompt, expected in zip(("red roof", "blue pool"), expected_masks(classes)):
        area = shapely.area(gdf.geometry.values[(gdf["prompt"] == prompt).to_numpy()]).sum()
        # polygon area from float64 vertex coordinates far from the origin: shoelace cancellation loses
        # ~1e-16 · (coordinate / pixel)^2 relative, < 1e-6 for these transforms; the count is exact
        assert area == pytest.approx(expected.sum() * px_area, rel=1e-6, abs=1e-9 * px_area)


def test_model_response_is_far_from_the_threshold(perpixel):
    """The colour classes give clear-cut per-pixel answers (so the expected masks are exact)."""
    seg = perpixel()
    rgb = (COLOURS[1:].T[:, :, None] / 255.0).astype(np.float32)  # (3, classes, 1)
    p = seg.whole_image(rgb)[:, :, 0]
    assert (p[:, 0] < 0.1).all()            # green: neither prompt
    assert p[0, 1] > 0.8 and p[1, 1] < 0.2  # red: red roof only
    assert p[1, 2] > 0.8 and p[0, 2] < 0.2  # blue: blue pool only
