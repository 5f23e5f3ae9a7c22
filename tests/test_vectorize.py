"""Tests for geoseg.vectorize: chunk-layout independence, exact seams, finalisation in map space."""

from __future__ import annotations

import math
import os
import pickle

import numpy as np
import pyproj
import pytest
import shapely
from affine import Affine
from shapely import affinity
from shapely.geometry import box

from geoseg.errors import ConfigError
from geoseg.pieces import Pieces, merge_seams, polygonize_chunk, read_pieces, write_pieces
from geoseg.polygons import OUTPUT_COLUMNS, finalize

H, W = 60, 72

# Known shapes in pixel space (x = col, y = row), each a union of pixel-aligned boxes.
RECT = box(3, 4, 20, 11)  # cols 3..19, rows 4..10
L_SHAPE = shapely.union_all([box(30, 2, 36, 30), box(30, 24, 55, 30)])
RING = box(8, 30, 28, 52).difference(box(13, 35, 23, 47))  # 20x22 with a 10x12 hole
ISLAND = box(16, 39, 19, 43)  # inside RING's hole, touching nothing
DIAG_A = box(40, 40, 45, 45)  # two squares touching at the point (45, 45)
DIAG_B = box(45, 45, 50, 50)
BIG = box(52, 34, 70, 58)
SHAPES = [RECT, L_SHAPE, RING, ISLAND, DIAG_A, DIAG_B, BIG]


def burn(geoms, shape=(H, W)) -> np.ndarray:
    """Mask of pixels whose centre is inside any of the geometries."""
    rows, cols = np.mgrid[0:shape[0], 0:shape[1]]
    inside = np.zeros(rows.size, bool)
    for g in geoms:
        inside |= shapely.contains_xy(g, cols.ravel() + 0.5, rows.ravel() + 0.5)
    return inside.reshape(shape)


def make_probs(mask: np.ndarray, seed: int = 0) -> np.ndarray:
    """Probabilities >= 0.5 exactly on the mask, random values (so stats are checkable)."""
    rng = np.random.default_rng(seed)
    p = np.where(mask, 0.5 + 0.5 * rng.random(mask.shape), 0.49 * rng.random(mask.shape))
    return p.astype(np.float32)[None]


def run_chunked(probs, valid, row_edges, col_edges, thresholds=(0.5,)):
    pieces, regions = [], []
    for r0, r1 in zip(row_edges[:-1], row_edges[1:]):
        for c0, c1 in zip(col_edges[:-1], col_edges[1:]):
            pieces.append(polygonize_chunk(probs[:, r0:r1, c0:c1], valid[r0:r1, c0:c1], r0, c0,
                                           thresholds))
            regions.append((r0, c0, r1 - r0, c1 - c0))
    return merge_seams(pieces, regions)


def grid(n, size):
    return [round(i * size / n) for i in range(n + 1)]


LAYOUTS = {
    "1x1": ([0, H], [0, W]),
    "2x2": (grid(2, H), grid(2, W)),
    "3x3": (grid(3, H), grid(3, W)),
    "irregular": ([0, 1, 5, 33, 34, 41, H], [0, 9, 13, 30, 45, 53, 71, W]),
    "per-8px": (list(range(0, H + 1, 8)) + [H], list(range(0, W + 1, 8)) + [W]),
}


def geom_set(geoms) -> list[bytes]:
    return sorted(shapely.to_wkb(shapely.normalize(np.asarray(geoms, dtype=object))).tolist())


def same_polygon_set(a, b) -> bool:
    """Topological equality of two polygon sets (normalize + equals, order-free)."""
    a = sorted(shapely.normalize(np.asarray(a, dtype=object)), key=lambda g: g.bounds)
    b = sorted(shapely.normalize(np.asarray(b, dtype=object)), key=lambda g: g.bounds)
    return len(a) == len(b) and all(shapely.equals(x, y) for x, y in zip(a, b))


# ------------------------------------------------------------------------------------------------
# polygonize + merge
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scene():
    mask = burn(SHAPES)
    probs = make_probs(mask)
    valid = np.ones(mask.shape, bool)
    return mask, probs, valid


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layouts_give_the_true_polygons(scene, layout):
    mask, probs, valid = scene
    rows, cols = LAYOUTS[layout]
    out = run_chunked(probs, valid, rows, cols)
    # the exact expected components (4-connectivity: the diagonal squares stay apart)
    assert same_polygon_set(out.geometry, SHAPES)
    assert shapely.is_valid(out.geometry).all()
    assert np.array_equal(shapely.area(out.geometry), out.n_px)
    assert out.n_px.sum() == mask.sum()


def test_layouts_identical_including_stats(scene):
    mask, probs, valid = scene
    results = [run_chunked(probs, valid, *LAYOUTS[k]) for k in LAYOUTS]
    ref = results[0]
    for res in results[1:]:
        assert geom_set(res.geometry) == geom_set(ref.geometry)
        # canonical order and vertices, so even exact equality holds
        assert all(shapely.equals_exact(res.geometry, ref.geometry, 0))
        assert np.array_equal(res.n_px, ref.n_px)
        np.testing.assert_allclose(res.sum_p, ref.sum_p, rtol=1e-12)  # float64 sums in another order
        assert np.array_equal(res.max_p, ref.max_p)


def test_stats_are_exact(scene):
    mask, probs, valid = scene
    out = run_chunked(probs, valid, *LAYOUTS["3x3"])
    p = probs[0]
    for geom, n, s, mx in zip(out.geometry, out.n_px, out.sum_p, out.max_p):
        m = burn([geom])
        assert n == m.sum()
        assert s == pytest.approx(p[m].astype(np.float64).sum(), rel=1e-12)  # float64 sums, another order
        assert mx == p[m].max()


def test_random_noise_layout_independent():
    rng = np.random.default_rng(7)
    probs = rng.random((2, 97, 131)).astype(np.float32)
    probs[0, 10:20, 10:20] = np.nan
    valid = rng.random((97, 131)) > 0.05
    t = (0.45, 0.6)
    ref = run_chunked(probs, valid, [0, 97], [0, 131], t)
    for rows, cols in [(grid(2, 97), grid(3, 131)), ([0, 3, 50, 51, 97], [0, 64, 65, 100, 131])]:
        out = run_chunked(probs, valid, rows, cols, t)
        assert geom_set(out.geometry) == geom_set(ref.geometry)
        assert np.array_equal(out.n_px, ref.n_px)
        assert np.array_equal(out.prompt_index, ref.prompt_index)
    # nodata and invalid pixels never belong to a piece
    with np.errstate(invalid="ignore"):
        expected = [(valid & (probs[i] >= t[i])).sum() for i in range(2)]
    assert [ref.n_px[ref.prompt_index == i].sum() for i in range(2)] == expected


def test_object_crossing_two_and_four_chunks():
    mask = np.zeros((40, 40), bool)
    mask[5:15, 12:30] = True  # crosses the vertical seam at col 20 only
    mask[22:35, 15:27] = True  # crosses the 4-chunk corner (20, 20)
    probs = make_probs(mask)
    out = run_chunked(probs, np.ones_like(mask), [0, 20, 40], [0, 20, 40])
    assert len(out) == 2
    areas = sorted(shapely.area(out.geometry))
    assert areas == [13 * 12, 10 * 18]
    assert sorted(out.n_px.tolist()) == [13 * 12, 10 * 18]
    assert all(g.geom_type == "Polygon" and len(g.interiors) == 0 for g in out.geometry)
    assert same_polygon_set(out.geometry, [box(12, 5, 30, 15), box(15, 22, 27, 35)])
    # no left-over seam vertices: a rectangle has exactly 4 corners
    assert all(len(g.exterior.coords) == 5 for g in out.geometry)


def test_diagonal_touch_across_seam_stays_two():
    mask = np.zeros((20, 20), bool)
    mask[5:10, 5:10] = True  # touches (10, 10) = the 4-chunk corner point
    mask[10:15, 10:15] = True
    mask[0:3, 7:10] = True  # ...and across a straight seam: (row 2, col 9) vs (row 3, col 10)
    mask[3:4, 10:12] = True
    probs = make_probs(mask)
    split = run_chunked(probs, np.ones_like(mask), [0, 10, 20], [0, 10, 20])
    whole = run_chunked(probs, np.ones_like(mask), [0, 20], [0, 20])
    assert len(whole) == 4
    assert len(split) == 4
    assert geom_set(split.geometry) == geom_set(whole.geometry)


def test_multiple_prompts_do_not_merge_with_each_other():
    probs = np.zeros((2, 10, 10), np.float32)
    probs[0, :, :5] = 0.9  # prompt 0 left half
    probs[1, :, 5:] = 0.9  # prompt 1 right half, shares the seam at col 5 with prompt 0
    probs[1, :, 2:5] = 0.95  # prompt 1 also crosses the seam
    out = run_chunked(probs, np.ones((10, 10), bool), [0, 10], [0, 5, 10], (0.5, 0.5))
    assert sorted(out.prompt_index.tolist()) == [0, 1]
    assert same_polygon_set(out.geometry[out.prompt_index == 1], [box(2, 0, 10, 10)])
    assert out.n_px[out.prompt_index == 1][0] == 80


def test_polygonize_config_errors():
    probs = np.zeros((1, 4, 4), np.float32)
    valid = np.ones((4, 4), bool)
    with pytest.raises(ConfigError):
        polygonize_chunk(probs, valid, 0, 0, [0.5, 0.5])
    with pytest.raises(ConfigError):
        polygonize_chunk(probs, valid, 0, 0, [1.5])
    with pytest.raises(ConfigError):
        polygonize_chunk(probs[0], valid, 0, 0, [0.5])
    with pytest.raises(ConfigError):
        polygonize_chunk(probs, valid[:3], 0, 0, [0.5])
    with pytest.raises(ConfigError):
        merge_seams([Pieces.empty()], [])
    assert len(polygonize_chunk(probs, valid, 0, 0, [0.5])) == 0


def test_write_read_and_pickle_roundtrip(tmp_path, scene):
    mask, probs, valid = scene
    pieces = polygonize_chunk(probs[:, 20:, 30:], valid[20:, 30:], 20, 30, [0.5])
    path = tmp_path / "chunk_0001.npz"
    write_pieces(path, pieces)
    write_pieces(path, pieces)  # overwrite in place
    assert os.listdir(tmp_path) == ["chunk_0001.npz"]  # no temp files left behind
    back = read_pieces(path)
    for other in (back, pickle.loads(pickle.dumps(pieces))):
        assert all(shapely.equals_exact(other.geometry, pieces.geometry, 0))
        assert np.array_equal(other.n_px, pieces.n_px)
        assert np.array_equal(other.sum_p, pieces.sum_p)
        assert np.array_equal(other.max_p, pieces.max_p)
        assert np.array_equal(other.prompt_index, pieces.prompt_index)
    write_pieces(tmp_path / "empty.npz", Pieces.empty())
    assert len(read_pieces(tmp_path / "empty.npz")) == 0


def test_pieces_written_in_batches_read_a_band_at_a_time(tmp_path, scene):
    """A chunk's deferred pieces are written a batch at a time and streamed back by the client a
    band of rows at a time: the batches make the file one write makes, array for array, and the
    bands read back exactly the pieces whose top row is above each stop (holes and offsets
    shifted), reading only those; a file without top rows (an older part) is read whole."""
    import zipfile

    from geoseg.pieces import PieceStream

    mask, probs, valid = scene
    pieces = polygonize_chunk(probs, valid, 0, 0, [0.5])
    order = np.argsort(shapely.bounds(pieces.geometry)[:, 1], kind="stable")  # by top row, as parts are
    pieces = pieces.take(order)
    tops = shapely.bounds(pieces.geometry)[:, 1]
    assert len(pieces) == len(SHAPES) and shapely.get_num_interior_rings(pieces.geometry).max() == 1
    write_pieces(tmp_path / "one.npz", pieces)
    write_pieces(tmp_path / "batches.npz", (pieces.take(slice(a, b)) for a, b in ((0, 3), (3, 3), (3, 5), (5, 7))))
    with np.load(tmp_path / "one.npz") as one, np.load(tmp_path / "batches.npz") as batches:
        assert sorted(one.files) == sorted(batches.files)
        assert all(np.array_equal(one[k], batches[k]) for k in one.files)
        assert np.array_equal(one["top"], tops)
        plain = {k: one[k] for k in one.files if k != "top"}
    np.savez(tmp_path / "old.npz", **plain)
    stops = [tops[1] + 0.5, tops[1] + 0.5, tops[4], np.inf]  # a band with nothing new, then the rest
    for name in ("batches.npz", "old.npz"):
        stream, got = PieceStream(tmp_path / name), []
        for stop in stops:
            band = stream.until(stop)
            assert (shapely.bounds(band.geometry).reshape(-1, 4)[:, 1] < stop).all()
            got.append(band)
        stream.close()
        assert [len(b) for b in got] == [int((tops < stops[0]).sum()), 0,
                                        int((tops < stops[2]).sum() - (tops < stops[0]).sum()),
                                        int((tops >= stops[2]).sum())], name
        back = Pieces.concat(got)
        assert all(shapely.equals_exact(back.geometry, pieces.geometry, 0)), name
        assert np.array_equal(back.n_px, pieces.n_px) and np.array_equal(back.sum_p, pieces.sum_p)
        assert np.array_equal(back.max_p, pieces.max_p) and np.array_equal(back.prompt_index, pieces.prompt_index)
    with zipfile.ZipFile(tmp_path / "one.npz") as z:  # streamed as stored, uncompressed members
        assert {i.compress_type for i in z.infolist()} == {zipfile.ZIP_STORED}
    write_pieces(tmp_path / "none.npz", iter([]))
    assert len(read_pieces(tmp_path / "none.npz")) == 0 and len(PieceStream(tmp_path / "none.npz").until(np.inf)) == 0


# ------------------------------------------------------------------------------------------------
# finalize
# ------------------------------------------------------------------------------------------------

UTM = "EPSG:32633"


def ellipsoidal_area(geom, crs):
    """Independent reference: unproject with pyproj and measure on the CRS's ellipsoid."""
    c = pyproj.CRS(crs)
    to_geo = pyproj.Transformer.from_crs(c, c.geodetic_crs, always_xy=True)
    lonlat = shapely.transform(geom, lambda xy: np.column_stack(to_geo.transform(xy[:, 0], xy[:, 1])))
    area, perim = c.get_geod().geometry_area_perimeter(shapely.orient_polygons(lonlat))
    return abs(area), perim


def test_min_area_after_merge_keeps_large_object_built_from_small_pieces():
    mask = np.zeros((64, 64), bool)
    mask[4:44, 4:44] = True  # 1600 px, every 8x8 chunk holds at most 64 px of it
    mask[50:53, 50:53] = True  # 9 px alone
    probs = make_probs(mask)
    edges = list(range(0, 65, 8))
    merged = run_chunked(probs, np.ones_like(mask), edges, edges)
    gdf = finalize(merged, Affine(2, 0, 500000, 0, -2, 4000000), UTM, ["blob"], [0.5], min_area=1000)
    assert len(gdf) == 1
    assert gdf.pixels.iloc[0] == 1600
    # the same geodesic computation on the same float64 vertices (perhaps densified differently): 1e-9
    assert gdf.area_m2.iloc[0] == pytest.approx(ellipsoidal_area(gdf.geometry.iloc[0], UTM)[0], rel=1e-9)
    assert gdf.area_m2.iloc[0] == pytest.approx(1600 * 4, rel=2e-3)  # UTM scale error < 0.1 %
    assert gdf.geometry.iloc[0].area == pytest.approx(6400)  # integer-pixel vertices x 2 m: exact in float64


def test_fill_holes_and_islands():
    mask = burn([box(0, 0, 30, 20).difference(box(3, 3, 5, 5)).difference(box(10, 3, 25, 17)),
                 box(15, 8, 18, 11)], shape=(20, 30))  # 4 px hole, 210 px hole with a 9 px island
    probs = make_probs(mask)
    merged = run_chunked(probs, np.ones_like(mask), [0, 10, 20], [0, 15, 30])
    assert len(merged) == 2
    tr = Affine(1, 0, 0, 0, -1, 20)
    gdf = finalize(merged, tr, UTM, ["x"], [0.5], fill_holes=5)
    assert len(gdf) == 2 and sorted(gdf.n_holes) == [0, 1]
    big = gdf.loc[gdf.n_holes.idxmax()]
    assert big.geometry.area == pytest.approx(600 - 210)  # unit pixels, integer vertices: exact in float64
    # large hole filled too: the island is absorbed, so nothing overlaps
    gdf = finalize(merged, tr, UTM, ["x"], [0.5], fill_holes=500)
    assert len(gdf) == 1
    assert gdf.geometry.iloc[0].equals(box(0, 0, 30, 20))
    assert gdf.pixels.iloc[0] == merged.n_px.sum()
    assert gdf.max_prob.iloc[0] == merged.max_p.max()


def _two_touching_jagged_polygons():
    """Two same-prompt polygons sharing a long staircase edge (a user finalizing unmerged pieces)."""
    from rasterio.features import shapes

    labels = np.zeros((40, 60), np.int32)
    rows, cols = np.mgrid[0:40, 0:60]
    boundary = 25 + (rows // 3) % 4 + (rows // 7)
    labels[(cols >= 5) & (cols < 55) & (rows >= 3) & (rows < 37)] = 1
    labels[(labels == 1) & (cols >= boundary)] = 2
    geoms = [shapely.geometry.shape(g) for g, v in shapes(labels, mask=labels > 0, connectivity=4)]
    assert len(geoms) == 2
    return Pieces(np.zeros(2, np.int32), geoms, shapely.area(geoms).astype(int), [1.0, 1.0],
                  [0.9, 0.9])


def test_coverage_safe_simplify():
    pieces = _two_touching_jagged_polygons()
    before = sum(len(g.exterior.coords) for g in pieces.geometry)
    gdf = finalize(pieces, Affine(1, 0, 0, 0, -1, 40), UTM, ["x"], [0.5], simplify=3)
    assert len(gdf) == 2
    a, b = gdf.geometry
    assert a.is_valid and b.is_valid
    assert sum(len(g.exterior.coords) for g in gdf.geometry) < before  # it did simplify
    # coverage-safe simplification keeps the shared edge's vertices: overlay rounding only (float64,
    # coordinates < 100): an overlap below 1e-9 unit² is noise, a real one is >= ~1 unit²
    assert a.intersection(b).area == pytest.approx(0, abs=1e-9)
    assert a.union(b).area == pytest.approx(a.area + b.area, rel=1e-12)
    assert shapely.intersection(a.boundary, b.boundary).length > 10  # still share the edge


def test_simplify_keeps_diagonal_neighbours_apart(scene):
    mask, probs, valid = scene
    merged = run_chunked(probs, valid, *LAYOUTS["3x3"])
    gdf = finalize(merged, Affine(1, 0, 0, 0, -1, H), UTM, ["x"], [0.5], simplify=2)
    g = np.asarray(gdf.geometry.values)
    tree = shapely.STRtree(g)
    i, j = tree.query(g, predicate="intersects")
    sel = i < j
    # pytest.approx(0) is an absolute 1e-12: overlay rounding of float64 coordinates < 100, vs >= 1 px²
    assert shapely.area(shapely.intersection(g[i[sel]], g[j[sel]])).max(initial=0) == pytest.approx(0)


TRANSFORMS = {
    "north-up": Affine(0.5, 0, 600000, 0, -0.5, 5000000),
    "rotated-30": Affine.translation(600000, 5000000) @ Affine.rotation(30) @ Affine.scale(0.5, -0.5),
    "south-up": Affine(0.5, 0, 600000, 0, 0.5, 4999000),
}


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_transforms_match_true_shape(scene, name):
    mask, probs, valid = scene
    tr = TRANSFORMS[name]
    merged = run_chunked(probs, valid, *LAYOUTS["2x2"])
    gdf = finalize(merged, tr, UTM, ["x"], [0.5])
    coeffs = [tr.a, tr.b, tr.d, tr.e, tr.c, tr.f]
    assert gdf.geometry.is_valid.all()
    for truth_px in SHAPES:
        truth = affinity.affine_transform(truth_px, coeffs)
        hits = gdf[gdf.intersects(truth.representative_point())]
        assert len(hits) == 1
        got = hits.geometry.iloc[0]
        iou = got.intersection(truth).area / got.union(truth).area
        assert iou >= 0.99
        assert got.exterior.is_ccw  # consistent orientation whatever the determinant sign
        assert all(not r.is_ccw for r in got.interiors)
        # abs: geographiclib's polygon area carries ~1e-5 m² of absolute error on metre-sized shapes
        assert hits.area_m2.iloc[0] == pytest.approx(ellipsoidal_area(truth, UTM)[0], rel=1e-6, abs=1e-4)


def test_geographic_area_is_geodesic():
    mask = np.zeros((20, 20), bool)
    mask[5:15, 5:15] = True  # 10 x 10 pixels of 0.001° = a 0.01° square
    probs = make_probs(mask)
    merged = run_chunked(probs, np.ones_like(mask), [0, 10, 20], [0, 10, 20])
    tr = Affine(0.001, 0, -0.01, 0, -0.001, 0.01)  # square spans lon -0.005..0.005, lat -0.005..0.005
    gdf = finalize(merged, tr, "EPSG:4326", ["x"], [0.5])
    geod = pyproj.Geod(ellps="WGS84")
    expected, perim = geod.polygon_area_perimeter([-0.005, 0.005, 0.005, -0.005],
                                                   [-0.005, -0.005, 0.005, 0.005])
    # ~1.2364e6 m² on a 6371 km sphere; the WGS84 ellipsoid gives 1.2309e6
    assert abs(expected) == pytest.approx(1.2364e6, rel=1e-2)  # a sanity figure of the set-up, not a check
    # rel 1e-8: geoseg measures the region bounded by the pixels' parallels (exact for a lon/lat
    # grid), pyproj the polygon with geodesic edges, which bulge poleward by ~3e-9 of the area here
    assert gdf.area_m2.iloc[0] == pytest.approx(abs(expected), rel=1e-8)
    assert gdf.perimeter_m.iloc[0] == pytest.approx(perim, rel=1e-9)  # geodesic lengths, float64 (~1e-15)
    # min_area is in m² too
    assert len(finalize(merged, tr, "EPSG:4326", ["x"], [0.5], min_area=1.3e6)) == 0
    assert len(finalize(merged, tr, "EPSG:4326", ["x"], [0.5], min_area=1.2e6)) == 1


def test_us_survey_feet_area():
    mask = np.zeros((120, 120), bool)
    mask[10:110, 10:110] = True  # 100 x 100 pixels of 10 ft = 1000 ft square
    probs = make_probs(mask)
    merged = run_chunked(probs, np.ones_like(mask), grid(3, 120), grid(3, 120))
    tr = Affine(10, 0, 6000000, 0, -10, 2100000)
    gdf = finalize(merged, tr, "EPSG:2227", ["x"], [0.5])
    ft = 1200 / 3937
    area, perim = ellipsoidal_area(gdf.geometry.iloc[0], "EPSG:2227")
    # the same geodesic computation on the same float64 vertices: agreement far below 1e-9
    assert gdf.area_m2.iloc[0] == pytest.approx(area, rel=1e-9)
    assert gdf.perimeter_m.iloc[0] == pytest.approx(perim, rel=1e-9)
    # the feet are converted: within the Lambert projection's scale error of the planar figure
    assert gdf.area_m2.iloc[0] == pytest.approx((1000 * ft) ** 2, rel=2e-3)
    assert gdf.geometry.iloc[0].area == pytest.approx(1000 * 1000)  # geometry stays in feet (exact vertices)


def test_no_crs_areas_in_crs_units():
    mask = np.zeros((10, 10), bool)
    mask[1:4, 1:4] = True
    mask[6:9, 6:10] = True
    merged = run_chunked(make_probs(mask), np.ones_like(mask), [0, 10], [0, 10])
    gdf = finalize(merged, Affine(2, 0, 0, 0, -2, 0), None, ["x"], [0.5], min_area=40)
    assert len(gdf) == 1 and gdf.pixels.iloc[0] == 12
    assert gdf.area_m2.isna().all() and gdf.perimeter_m.isna().all()


@pytest.mark.parametrize("src,tr", [
    # UTM 60N, about 30 km wide around lon 180 at lat ~9°
    ("EPSG:32660", Affine(100, 0, 820000, 0, -100, 1000000)),
    # PDC Mercator (central meridian 150°E): 180° is at x ≈ 3.34e6 m
    ("EPSG:3832", Affine(100, 0, 3325000, 0, -100, -1000000)),
])
def test_antimeridian_split(src, tr):
    mask = np.zeros((200, 400), bool)
    mask[20:180, 20:380] = True
    merged = run_chunked(make_probs(mask), np.ones_like(mask), [0, 100, 200], [0, 200, 400])
    native = finalize(merged, tr, src, ["x"], [0.5])
    gdf = finalize(merged, tr, src, ["x"], [0.5], dst_crs="EPSG:4326")
    assert gdf.crs == pyproj.CRS("EPSG:4326")
    g = gdf.geometry.iloc[0]
    assert g.is_valid
    parts = list(shapely.get_parts(g))
    assert len(parts) == 2
    minx, miny, maxx, maxy = np.array([p.bounds for p in parts]).T
    assert (minx >= -180).all() and (maxx <= 180).all()
    # the split point is computed (reprojection + interpolation in float64): 180 to ~1e-13, approx's 1e-6
    assert maxx.max() == pytest.approx(180) and minx.min() == pytest.approx(-180)
    width = float(np.sum(maxx - minx))
    assert 0.1 < width < 1.0  # ~30-36 km, not 360°
    # area_m2 is ellipsoidal in a projected CRS too: the Mercator scene's 1/cos²(9°) ≈ 1.025 planar
    # inflation is not in it, so it matches the geodesic area of the split lon/lat polygon
    geod = pyproj.Geod(ellps="WGS84")
    assert abs(geod.geometry_area_perimeter(g)[0]) == pytest.approx(native.area_m2.iloc[0], rel=2e-3)
    assert gdf.area_m2.iloc[0] == native.area_m2.iloc[0]


def test_reproject_without_crossing_is_plain():
    mask = np.zeros((20, 20), bool)
    mask[2:18, 2:18] = True
    merged = run_chunked(make_probs(mask), np.ones_like(mask), [0, 20], [0, 20])
    gdf = finalize(merged, Affine(10, 0, 500000, 0, -10, 5000000), UTM, ["x"], [0.5],
                   dst_crs="EPSG:4326")
    g = gdf.geometry.iloc[0]
    assert g.geom_type == "Polygon" and 14 < g.centroid.x < 16


def test_empty_input_gives_empty_frame():
    for dst in (None, "EPSG:4326"):
        gdf = finalize(Pieces.empty(), Affine(1, 0, 0, 0, -1, 0), UTM, ["a", "b"], [0.5, 0.6],
                       dst_crs=dst)
        assert len(gdf) == 0
        assert list(gdf.columns) == list(OUTPUT_COLUMNS) + ["geometry"]
        assert gdf.crs == pyproj.CRS(dst or UTM)
    # everything filtered away also gives the empty frame
    merged = run_chunked(make_probs(np.ones((4, 4), bool)), np.ones((4, 4), bool), [0, 4], [0, 4])
    gdf = finalize(merged, Affine(1, 0, 0, 0, -1, 0), UTM, ["a"], [0.5], min_area=100)
    assert len(gdf) == 0 and list(gdf.columns) == list(OUTPUT_COLUMNS) + ["geometry"]


def test_attributes(scene):
    mask, probs, valid = scene
    merged = run_chunked(probs, valid, *LAYOUTS["3x3"])
    gdf = finalize(merged, Affine(1, 0, 0, 0, -1, 0), UTM, ["tree"], [0.5])
    assert list(gdf.columns) == list(OUTPUT_COLUMNS) + ["geometry"]
    assert (gdf.prompt == "tree").all() and (gdf.threshold == 0.5).all()
    assert ((gdf.mean_prob >= 0.5) & (gdf.mean_prob <= gdf.max_prob)).all()
    assert gdf.pixels.sum() == mask.sum()
    sq = gdf[gdf.pixels == 25].iloc[0]
    assert sq.compactness == pytest.approx(math.pi / 4)  # 4πA/P² of a square, float64 (~1e-16)
    assert gdf.n_holes.max() == 1


@pytest.mark.parametrize("kw", [{"min_area": -1}, {"fill_holes": float("nan")}, {"simplify": "x"}])
def test_finalize_config_errors(kw):
    with pytest.raises(ConfigError):
        finalize(Pieces.empty(), Affine.identity(), UTM, ["a"], [0.5], **kw)


def test_finalize_rejects_mismatched_prompts():
    merged = run_chunked(np.full((2, 4, 4), 0.9, np.float32), np.ones((4, 4), bool), [0, 4], [0, 4],
                         (0.5, 0.5))
    with pytest.raises(ConfigError):
        finalize(merged, Affine.identity(), UTM, ["a"], [0.5])


def test_antimeridian_split_of_continuous_longitudes():
    """A native lon 170..190 raster asked for EPSG:4326 output: cut at 180, east part at -180..-170."""
    mask = np.zeros((20, 40), bool)
    mask[5:15, 5:35] = True
    merged = run_chunked(make_probs(mask), np.ones_like(mask), [0, 20], [0, 20, 40])
    tr = Affine(0.5, 0, 170, 0, -0.5, 5)  # lon 170..190
    gdf = finalize(merged, tr, "EPSG:4326", ["x"], [0.5], dst_crs="EPSG:4326")
    g = gdf.geometry.iloc[0]
    parts = sorted(shapely.get_parts(g), key=lambda p: p.bounds[0])
    assert [tuple(np.round(p.bounds, 6)) for p in parts] == [(-180, -2.5, -172.5, 2.5), (172.5, -2.5, 180, 2.5)]
    assert all(p.exterior.is_ccw for p in parts)


@pytest.mark.parametrize("t", [0.0, 1.0, -0.1, float("nan")])
def test_one_threshold_rule_everywhere(t):
    """config.check_thresholds owns the range (0, 1), open: the config and the stages agree."""
    from geoseg.config import VectorizeConfig

    with pytest.raises(ConfigError, match="between 0 and 1"):
        VectorizeConfig(threshold=t)
    with pytest.raises(ConfigError, match="between 0 and 1"):
        polygonize_chunk(np.full((1, 2, 2), 0.5, np.float32), np.ones((2, 2), bool), 0, 0, [t])
    with pytest.raises(ConfigError, match="between 0 and 1"):
        finalize(Pieces.empty(), Affine.identity(), UTM, ["a"], [t])


def _die_on(name: str, region) -> str:
    """A chunk task whose process the OS kills (as the OOM killer does) on chunk ``name``."""
    import signal

    if region.name == name:
        os.kill(os.getpid(), signal.SIGKILL)
    return region.name


def test_a_killed_worker_process_is_a_chunk_error_not_a_broken_pool():
    import functools

    from geoseg.errors import ChunkFailedError
    from geoseg.pipeline import _map_chunks
    from geoseg.tiling import chunk_regions

    regions = chunk_regions(64, 64, 16, 64)  # r0000000 .. r0000048
    with pytest.raises(ChunkFailedError, match=r"worker process died \(killed by the OS, out of memory\?\) "
                                               r"with chunk r00000(00|16|32)_c0000000 unfinished \([012] of 4"):
        with _map_chunks(functools.partial(_die_on, "r0000032_c0000000"), regions, 2) as names:
            assert list(names)  # never reached
